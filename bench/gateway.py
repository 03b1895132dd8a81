"""The inference gateway's cost: the same engine called directly and through PeerGPU.

Four processes, as in production: the server (the real application under uvicorn, one worker,
as ``peergpu server`` runs it), a real agent (``peergpu agent run --simulate H100``, enrolled
through the API) serving one chat model from a local engine, the engine (the tests' scripted
OpenAI-compatible engine, ``tests/gateway/scripted_engine.py``, under uvicorn: it echoes the
last message word by word), and this process, which seeds through the API (a host owner, a
renter with credit and an ``inference`` key) and then plays the renter with a minimal
keep-alive HTTP/1.1 client (``bench/_gateway_http.py``). Every request goes to one of two
targets: the engine's ``/v1/chat/completions`` directly, or the gateway's on the server, which
relays it over the agent's WebSocket to the same engine. Three phases, per backend:

1. Latency: a non-streaming chat with a short message, one request at a time, direct and
   gateway interleaved (after a warm-up). Added latency = gateway - direct, for p50 and p99,
   both as the difference of the two distributions' percentiles and as percentiles of the
   per-round differences.
2. Throughput: non-streaming requests/s with ``--clients`` concurrent connections (each sends
   its next request when the last is answered) for ``--duration`` seconds after a 2 s
   warm-up, direct first (the reference), then through the gateway; once per value of
   ``--clients`` (default 8 and 64).
3. SSE relay: streamed chats whose answer has ``--stream-chunks`` events; events per second
   the client receives, directly and through the gateway.

Every phase also reports the CPU each process used per request (or per event), from
``/proc``; "other" is the rest of the machine: PostgreSQL, Redis, and anything else running.
The server runs with the scheduler (and so the usage billing its requests cause) on, and with
the renter's rate limits and credit raised out of the way.

    .venv/bin/python -m bench.gateway                         # both backends
    .venv/bin/python -m bench.gateway --backend sqlite --quick
    .venv/bin/python -m bench.gateway --clients 8 --sample /tmp/gateway-samples.json
    .venv/bin/python -m bench.gateway --backend sqlite --clients 8 --profile /tmp/gateway.prof

``--sample`` runs ``bench/scheduler.py``'s stack sampler in the server and in the agent during
the gateway's first throughput run and its SSE streams, and prints where each spent its CPU
(and the server's SQL statements per request); ``--profile`` runs cProfile (CPU time of the
loop thread) in the server during the first throughput run. Both slow what they watch.
``PEERGPU_BENCH_LOG_DIR=DIR`` keeps the server's, the agent's and the engine's logs.

PostgreSQL comes from ``PEERGPU_BENCH_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``; a scratch database is created and dropped)
and Redis from ``PEERGPU_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``; keys under a
unique prefix, deleted afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

if not __package__:  # run as a script (python bench/gateway.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.integration.harness import AgentProcess  # noqa: E402

from bench import _gateway_http as load  # noqa: E402
from bench._gateway_report import Cpu, Phases, print_profile, print_samples, render  # noqa: E402
from bench._harness import (  # noqa: E402
    PASSWORD,
    SECRET,
    environment,
    free_port,
    listening,
    machine_cpu,
)
from peergpu.config import ServerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "echo-chat"
CHAT_MESSAGE = "hello from the gateway benchmark"
STREAM_WORDS = "one two three four five six seven eight nine ten"
WARMUP_ROUNDS = 50
IDLE_SECONDS = 3.0  # how busy the processes are with no request (background loops)
#: The renter's settings for the run: no limit or wallet in the way of the measurement. The
#: scheduler stays on: it also runs the usage billing the gateway's requests cause.
SERVER_ENV = {
    "PEERGPU_GATEWAY_REQUESTS_PER_MINUTE": str(10**9),
    "PEERGPU_GATEWAY_TOKENS_PER_MINUTE": str(10**12),
    "PEERGPU_SIGNUP_CREDIT_MICROS": str(10**12),
    "PEERGPU_ARGON2_TIME_COST": "1",
    "PEERGPU_ARGON2_MEMORY_COST_KIB": "64",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=500, help="latency: requests per target")
    parser.add_argument(
        "--clients",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[8, 64],
        help="throughput: concurrent connections, one run per value (default 8,64)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="throughput window, s")
    parser.add_argument("--stream-chunks", type=int, default=3000, help="events per stream")
    parser.add_argument("--streams", type=int, default=5, help="streams per target")
    parser.add_argument("--max-concurrency", type=int, default=64, help="the model's, on the host")
    parser.add_argument(
        "--profile", type=Path, help="cProfile the server (gateway throughput phase) into this file"
    )
    parser.add_argument(
        "--sample",
        type=Path,
        help="sample the server's and the agent's stacks (first gateway throughput run, SSE "
        "streams) into this JSON file (and *.agent.json) and print where their CPU went",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.profile, args.sample)
        return
    if args.quick:  # smaller defaults; what was given explicitly stays
        quick = {"rounds": 50, "duration": 2.0, "stream_chunks": 500, "streams": 1}
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    print("command:", " ".join([Path(sys.executable).name, "-m", "bench.gateway", *sys.argv[1:]]))  # noqa: T201
    print(  # noqa: T201
        f"machine: {os.cpu_count()} cores, shared by the server, the agent, the engine, this "
        "client, PostgreSQL and Redis"
    )
    results: dict[str, Phases] = {}
    for backend in backends:
        background = _background_load()
        if background > 0.2:
            print(  # noqa: T201
                f"warning: {background:.2f} cores were busy before the {backend} run (other "
                "work on this machine); the figures below are lower than on a quiet one"
            )
        results[backend] = asyncio.run(_bench(backend, args))
        print(render({backend: results[backend]}, args), flush=True)  # noqa: T201
        if args.profile is not None:
            print_profile(args.profile, results[backend].profiled_requests)
        if args.sample is not None:
            agent_samples = _agent_samples(args.sample)
            assert agent_samples is not None
            print_samples(args.sample, agent_samples, results[backend], args)
    if len(results) > 1:
        print(render(results, args))  # noqa: T201


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class Seeded:
    key: str
    enrollment_token: str


async def _bench(backend: str, args: argparse.Namespace) -> Phases:
    async with environment(backend, "peergpu-bench-gw") as settings:
        engine_port = free_port()
        with (
            _process(
                [sys.executable, "-m", "bench._gateway_engine", str(engine_port)],
                engine_port,
                settings.data_dir / "engine.log",
                os.environ,
            ) as engine,
            _process(
                _server_command(args),
                settings.port,
                settings.data_dir / "server.log",
                _server_env(settings),
            ) as server,
        ):
            url = f"http://127.0.0.1:{settings.port}"
            seeded = await _seed(url)
            models = [
                {
                    "name": MODEL,
                    "kind": "chat",
                    "url": f"http://127.0.0.1:{engine_port}/v1",
                    "engine_model": "echo",
                    "max_concurrency": args.max_concurrency,
                    "input_price_per_million_micros": 100_000,
                    "output_price_per_million_micros": 200_000,
                }
            ]
            agent = _Agent(
                samples=_agent_samples(args.sample),
                state_dir=settings.data_dir / "agent",
                simulate="H100",
                extra_env={"PEERGPU_AGENT_MODELS": json.dumps(models)},
            )
            enrolled = agent.enroll(url, seeded.enrollment_token)
            if enrolled.returncode != 0:
                raise RuntimeError(f"agent enroll failed: {enrolled.stderr}{enrolled.stdout}")
            agent.start(heartbeat=settings.agent_heartbeat_seconds)
            try:
                await _wait_served(url, seeded.key, agent)
                assert agent.process is not None
                cpu = Cpu(server=server.pid, agent=agent.process.pid, engine=engine.pid)
                return await _measure(backend, settings.port, engine_port, seeded, cpu, args)
            finally:
                agent.stop()
                _print_tail("agent", agent.log())
                _keep_log(agent.log_path)


async def _measure(
    backend: str,
    port: int,
    engine_port: int,
    seeded: Seeded,
    cpu: Cpu,
    args: argparse.Namespace,
) -> Phases:
    chat = {"messages": [{"role": "user", "content": CHAT_MESSAGE}]}
    direct = load.Target(engine_port, "/v1/chat/completions", _json({**chat, "model": "echo"}))
    gateway = load.Target(port, "/v1/chat/completions", _json({**chat, "model": MODEL}), seeded.key)
    await _check(direct, gateway)
    phases = Phases(backend)
    before = cpu.snapshot()
    await asyncio.sleep(IDLE_SECONDS)
    phases.idle = cpu.since(before)

    await load.sequential([direct, gateway], WARMUP_ROUNDS)
    before = cpu.snapshot()
    direct_s, gateway_s = await load.sequential([direct, gateway], args.rounds)
    phases.latency(direct_s, gateway_s, cpu.since(before))

    for index, clients in enumerate(args.clients):
        for name, target in (("direct", direct), ("gateway", gateway)):
            # The profile covers the gateway's first concurrency only.
            profiled = name == "gateway" and index == 0
            if profiled:
                _window(cpu, signal.SIGUSR1, args)
            before = cpu.snapshot()
            result = await load.closed_loop(target, clients, warmup=2.0, duration=args.duration)
            phases.throughput(name, clients, result, cpu.since(before))
            if profiled:
                _window(cpu, signal.SIGUSR2, args)
                phases.profiled_requests = result.total

    stream = {
        "messages": [{"role": "user", "content": STREAM_WORDS}],
        "stream": True,
        "repeat": max(1, args.stream_chunks // len(STREAM_WORDS.split())),
    }
    stream_direct = load.Target(
        engine_port, "/v1/chat/completions", _json({**stream, "model": "echo"})
    )
    stream_gateway = load.Target(
        port, "/v1/chat/completions", _json({**stream, "model": MODEL}), seeded.key
    )
    for name, target in (("direct", stream_direct), ("gateway", stream_gateway)):
        await load.streams(target, 1)  # warm-up
        if name == "gateway":
            _window(cpu, signal.SIGUSR1, args)
        before = cpu.snapshot()
        phases.relay(name, await load.streams(target, args.streams), cpu.since(before))
        if name == "gateway":
            _window(cpu, signal.SIGUSR2, args)
    return phases


def _window(cpu: Cpu, signum: int, args: argparse.Namespace) -> None:
    """Open (SIGUSR1) or close (SIGUSR2) a profiled window in the server (a no-op there
    unless --profile or --sample asked for one) and, under --sample, in the agent."""
    os.kill(cpu.pids["server"], signum)
    if args.sample is not None:
        os.kill(cpu.pids["agent"], signum)


async def _check(direct: load.Target, gateway: load.Target) -> None:
    """Both targets answer the same echo (the gateway under the public model name)."""
    for target, model in ((direct, "echo"), (gateway, MODEL)):
        connection = load.Connection(target)
        try:
            answer = json.loads(await connection.call())
        finally:
            await connection.close()
        content = answer["choices"][0]["message"]["content"]
        if content != CHAT_MESSAGE or answer["model"] != model:
            raise RuntimeError(f"unexpected answer from port {target.port}: {answer}")


def _json(body: dict[str, object]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# ---------------------------------------------------------------- environment


async def _seed(url: str) -> Seeded:
    """A host owner (with an enrolment token) and a renter (with an ``inference`` key),
    through the API as people would make them."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        owner = await _login(http, "host", "bench-host@example.com")
        token = await http.post("/api/v1/hosts/enrollment-tokens", json={}, headers=owner)
        token.raise_for_status()
        renter = await _login(http, "renter", "bench-renter@example.com")
        key = await http.post(
            "/api/v1/keys", json={"name": "bench", "scopes": ["inference"]}, headers=renter
        )
        key.raise_for_status()
        return Seeded(key=key.json()["key"], enrollment_token=token.json()["token"])


async def _login(http: httpx.AsyncClient, role: str, email: str) -> dict[str, str]:
    body = {"email": email, "password": PASSWORD, "roles": [role]}
    (await http.post("/api/v1/auth/register", json=body)).raise_for_status()
    tokens = await http.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    tokens.raise_for_status()
    return {"Authorization": f"Bearer {tokens.json()['access_token']}"}


async def _wait_served(url: str, key: str, agent: AgentProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            listed = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            if any(m["id"] == MODEL for m in listed.json().get("data", [])):
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the agent's model was not served in {timeout} s:\n{agent.log()[-3000:]}")


class _Agent(AgentProcess):
    """``peergpu agent run``, or with ``samples`` the same under the stack sampler."""

    def __init__(self, *, samples: Path | None, **options: Any) -> None:
        super().__init__(**options)
        self.samples = samples

    def start(self, *, heartbeat: float = 0.5) -> AgentProcess:
        if self.samples is None:
            return super().start(heartbeat=heartbeat)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "bench._gateway_agent", str(self.samples), "run"),
                    *("--state-dir", str(self.state_dir), "--simulate", self.simulate),
                    *("--heartbeat", str(heartbeat)),
                ],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self


def _agent_samples(server_samples: Path | None) -> Path | None:
    return None if server_samples is None else server_samples.with_suffix(".agent.json")


def _server_env(settings: ServerSettings) -> dict[str, str]:
    return {
        **os.environ,
        "PEERGPU_DATA_DIR": str(settings.data_dir),
        "PEERGPU_SECRET_KEY": SECRET,
        "PEERGPU_HOST": "127.0.0.1",
        "PEERGPU_PORT": str(settings.port),
        "PEERGPU_PUBLIC_URL": f"http://127.0.0.1:{settings.port}",
        "PEERGPU_DATABASE_URL": settings.database_url,
        "PEERGPU_REDIS_URL": settings.redis_url,
        "PEERGPU_REDIS_PREFIX": settings.redis_prefix,
        "PEERGPU_MIGRATE_ON_START": "false",
        **SERVER_ENV,
    }


def _server_command(args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "bench.gateway", "--serve"]
    if args.profile is not None:
        command += ["--profile", str(args.profile)]
    if args.sample is not None:
        command += ["--sample", str(args.sample)]
    return command


@contextlib.contextmanager
def _process(
    command: list[str], port: int, log_path: Path, env: os._Environ[str] | dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` running until it listens on ``port``; stopped with SIGINT on exit."""
    log = log_path.open("wb")  # closed in the finally below
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        _print_tail(log_path.stem, log_path.read_text(errors="replace"))
        _keep_log(log_path)


def _keep_log(path: Path) -> None:
    """A copy in ``PEERGPU_BENCH_LOG_DIR``, when set (the scratch folder is removed)."""
    keep = os.environ.get("PEERGPU_BENCH_LOG_DIR")
    if keep and path.exists():
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / f"{path.parent.name}-{path.name}")


def _print_tail(name: str, text: str) -> None:
    if text.strip():
        print(f"{name} log (tail):\n{text[-3000:]}", file=sys.stderr)  # noqa: T201


def _serve(profile: Path | None, sample: Path | None) -> None:
    """The server subprocess: settings from PEERGPU_* variables, as ``peergpu server``.
    SIGUSR1 opens a measured window, SIGUSR2 closes it: the stack sampler covers every window,
    cProfile the first (the gateway's throughput phase)."""
    import cProfile

    import uvicorn

    from bench._gateway_sampling import SampledWindows
    from peergpu.server.app import create_app

    settings = ServerSettings()  # type: ignore[call-arg]
    parent = os.getppid()

    def exit_with_parent() -> None:  # never outlive a killed benchmark
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level="warning"
    )
    server = uvicorn.Server(config)
    # CPU time of the loop's thread, not wall time: a machine shared with other processes
    # preempts the server, and wall time would charge that to whatever was running.
    profiler = cProfile.Profile(time.thread_time) if profile is not None else None
    windows = SampledWindows(sample)
    if sample is not None:
        windows.count_sql()

    def profile_first(window: int, enable: bool) -> None:  # cProfile: the throughput window
        if profiler is not None and window == 0:
            profiler.enable() if enable else profiler.disable()

    windows.install(
        on_open=lambda window: profile_first(window, True),
        on_close=lambda window: profile_first(window, False),
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it was stopped with, after a clean shutdown
    finally:
        windows.write()
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)


def _background_load(seconds: float = 2.0) -> float:
    """How many cores something else keeps busy, measured over ``seconds``."""
    before = machine_cpu()
    time.sleep(seconds)
    return (machine_cpu() - before) / seconds


if __name__ == "__main__":
    main()
