"""``peergpu demo`` at run time: the server, three simulated hosts whose agents run as separate
processes (really executing jobs with the process runner), and a sample job whose live logs are
printed, so the first thing a new user sees is a job going queued -> running -> succeeded.
Then the inference gateway: the built-in engine's real models, served by one demo host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from rich.console import Console

from peergpu import demo_inference
from peergpu.client import PeerGPU
from peergpu.client.models import JobUpdate, LogLine
from peergpu.config import ServerSettings
from peergpu.demo import DemoHost
from peergpu.server.app import create_app

SAMPLE_JOB = """\
import json, math, os, pathlib, random, time
random.seed(7)
print("fine-tuning tiny-mlp on the demo dataset (CPU, simulated GPU host)", flush=True)
loss = 2.5
for epoch in range(1, 21):
    loss = loss * 0.86 + random.uniform(-0.02, 0.02)
    print(f"epoch {epoch:2d}/20  loss={loss:.4f}  lr={3e-4 * math.cos(epoch / 40):.2e}", flush=True)
    time.sleep(0.5)
out = pathlib.Path(os.environ["PEERGPU_OUTPUT_DIR"])
(out / "metrics.json").write_text(json.dumps({"final_loss": round(loss, 4), "epochs": 20}))
print("saved outputs/metrics.json", flush=True)
"""


def run_demo(
    settings: ServerSettings,
    demo_hosts: list[DemoHost],
    api_key: str,
    console: Console,
    *,
    log_level: str = "warning",
    sample_job: bool = True,
) -> None:
    """Serve until Ctrl-C; agents are started once the server listens and stopped on exit."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            proxy_headers=True,
        )
    )
    agents: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    missing = demo_inference.engines_missing()
    engine_url = ""
    if not missing:
        engine_port = _free_port()
        engine_url = f"http://127.0.0.1:{engine_port}/v1"
        agents.append(
            demo_inference.start_engine(settings.data_dir, engine_port, _stop_with_parent)
        )

    def companion() -> None:
        while not server.started:
            if stop.wait(0.05):
                return
        for host in demo_hosts:
            serves = engine_url and host.name == demo_inference.SERVING_HOST
            extra = demo_inference.serve_model_args(engine_url) if serves else []
            agents.append(_start_agent(settings, host, extra))
        console.print(
            f"started {len(agents)} simulated hosts: "
            + ", ".join(f"{h.name} ({h.simulate})" for h in demo_hosts)
        )
        if sample_job:
            try:
                _sample_job(settings.effective_public_url, api_key, console, stop, len(demo_hosts))
            except Exception as exc:  # noqa: BLE001 - the demo server keeps running regardless
                console.print(f"[yellow]the sample job could not be shown: {exc}[/]")
        if engine_url:
            try:
                demo_inference.show_inference(
                    settings.effective_public_url, api_key, engine_url, console, stop
                )
            except Exception as exc:  # noqa: BLE001 - the demo server keeps running regardless
                console.print(f"[yellow]the inference sample could not be shown: {exc}[/]")
            console.rule()
        else:
            console.print(
                "[yellow]no inference models: the engines extra is missing "
                f"({', '.join(missing)}); install peergpu[engines][/]"
            )
        # The agents were started from this thread: on Linux they are told to stop when it
        # ends (PR_SET_PDEATHSIG), so it lives as long as the server.
        stop.wait()

    thread = threading.Thread(target=companion, name="demo", daemon=True)
    thread.start()
    try:
        asyncio.run(server.serve())
    finally:
        stop.set()
        for process in agents:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in agents:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def _work_root(data_dir: Path) -> Path:
    """Where the demo agents keep job work dirs. Not under the data dir: when the demo runs as
    root, jobs run as an unprivileged user, who must be able to reach their work dir, and a
    data dir under a private home (0700) would not let them. One per data dir and user."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    root = Path(tempfile.gettempdir()) / f"peergpu-demo-{os.getuid()}-{digest}"
    root.mkdir(mode=0o711, exist_ok=True)
    root.chmod(0o711)
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_agent(
    settings: ServerSettings, host: DemoHost, extra_args: list[str]
) -> subprocess.Popen[bytes]:
    work = _work_root(settings.data_dir) / host.name
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PEERGPU_")},
        "PEERGPU_AGENT_WORK_DIR": str(work.resolve()),
    }
    log = (host.state_dir / "agent.log").open("ab")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peergpu",
                "agent",
                "run",
                "--state-dir",
                str(host.state_dir),
                "--simulate",
                host.simulate,
                *extra_args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the agents itself
            preexec_fn=_stop_with_parent,
        )
    finally:
        log.close()


def _stop_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the demo dies, however it dies (uvicorn
    re-raises SIGTERM after its graceful shutdown, which skips ``finally`` blocks)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _sample_job(
    url: str, api_key: str, console: Console, stop: threading.Event, expected_hosts: int
) -> None:
    with PeerGPU(url, api_key=api_key) as client:
        deadline = time.monotonic() + 60
        # Wait for every demo host (so the job goes to the cheapest), or at least one.
        while len(market := client.list_marketplace_hosts().items) < expected_hosts:
            if stop.wait(0.25):
                return
            if time.monotonic() > deadline:
                if market:
                    break
                console.print("[yellow]no demo host came online; see the agents' logs[/]")
                return
        names = {h.id: f"{h.name} ({h.gpus[0].model if h.gpus else 'no GPU'})" for h in market}
        job = client.submit_job(
            command=["python3", "-c", SAMPLE_JOB],
            name="sample: fine-tune tiny-mlp",
            max_duration_seconds=300,
        )
        console.rule(f"[bold]sample job {job.id}")
        console.print(
            f"follow it yourself:  peergpu login --server {url} --api-key {api_key}\n"
            f"                     peergpu jobs logs -f {job.id}"
        )
        state = job.state
        console.print(f"[cyan]state[/] {state}")
        for event in client.iter_logs(job.id, follow=True):
            if stop.is_set():
                return
            if isinstance(event, LogLine):
                style = {"stderr": "red", "system": "dim"}.get(event.stream, "")
                console.print(event.line, style=style, markup=False, highlight=False)
            elif isinstance(event, JobUpdate) and event.job.state != state:
                state = event.job.state
                host_id = str(event.job.host_id or "")
                host = f" on {names.get(host_id, host_id)}" if host_id else ""
                console.print(f"[cyan]state[/] {state}{host}")
                if state == "failed":
                    reason = f"{event.job.failure_reason}: {event.job.message}"
                    console.print(reason, style="red", markup=False, highlight=False)
        artifacts = client.list_artifacts(job.id)
        for artifact in artifacts:
            console.print(
                f"[green]artifact[/] {artifact.path} ({artifact.size} bytes, sha256 "
                f"{artifact.sha256[:12]}...)  peergpu jobs download {job.id}"
            )
        _print_cost(client, job.id, console, stop)
        console.rule()


def _print_cost(client: PeerGPU, job_id: str, console: Console, stop: threading.Event) -> None:
    """What the sample job cost, once settled (the settlement loop runs right after the end)."""
    for _ in range(40):
        receipt = client.receipt(job_id)
        if receipt.settled and receipt.charges:
            charge = receipt.charges[-1]
            price = charge.price_per_gpu_hour_micros / 1e6
            console.print(
                f"[green]cost[/] {receipt.total_usd}: {charge.billed_seconds} s on "
                f"{charge.gpu_count} GPU at ${price:.2f}/GPU-hour, billed by the second  "
                f"peergpu jobs receipt {job_id}"
            )
            return
        if stop.wait(0.25):
            return
