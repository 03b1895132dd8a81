"""Log throughput and latency, end to end: an agent's socket -> the server -> a renter's socket.

A real server runs in a subprocess (uvicorn, as ``peergpu server`` runs it). This process
enrols a host and creates a running job on it directly in the database, then plays both ends:
an agent that speaks the agent protocol on ``/api/v1/agent/ws`` (``hello``, then ``log_batch``
messages of ``--batch`` lines, the way ``agent.logbatch`` batches them) and a renter that
follows ``/api/v1/jobs/{id}/ws``. Each line carries the time it was made (``ts``); latency is
the time from there until the renter has the line. Throughput is lines / (last line received
- first line sent).

    .venv/bin/python -m bench.logs                      # both backends, as fast as it goes
    .venv/bin/python -m bench.logs --rate 20000         # latency at a fixed offered load
    .venv/bin/python -m bench.logs --backend sqlite --profile /tmp/server.prof

PostgreSQL comes from ``PEERGPU_BENCH_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``; a scratch database is created and dropped)
and Redis from ``PEERGPU_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``; keys under a
unique prefix, deleted afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import uvicorn
from websockets.asyncio.client import connect

from bench._harness import (
    PASSWORD,
    SECRET,
    environment,
    listening,
    machine_cpu,
    process_cpu,
)
from peergpu.config import ServerSettings
from peergpu.protocol.messages import Heartbeat, Hello
from peergpu.server.app import create_app
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.job_models import JobModel, JobState
from peergpu.server.db.models import UserRole
from peergpu.server.security.principal import Principal
from peergpu.server.services import accounts, hosts


@dataclass(frozen=True)
class Seeded:
    credential: str
    job_id: uuid.UUID
    renter_token: str


@dataclass(frozen=True)
class Result:
    backend: str
    lines: int
    seconds: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float
    machine_cpu: float

    def report(self) -> str:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        cores = f"server {self.server_cpu / self.seconds:.2f}, bench client " + (
            f"{self.client_cpu / self.seconds:.2f}, whole machine "
            f"{self.machine_cpu / self.seconds:.2f}"
        )
        return (
            f"{self.backend:<26} {self.lines:>7} lines in {self.seconds:6.2f} s = "
            f"{self.lines / self.seconds:>9,.0f} lines/s | latency p50 {p50 * 1000:7.1f} ms, "
            f"p99 {ordered and p99 * 1000:7.1f} ms, max {ordered[-1] * 1000:7.1f} ms | "
            f"CPU cores used: {cores}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--lines", type=int, default=200_000, help="lines to send")
    parser.add_argument("--batch", type=int, default=500, help="lines per log_batch")
    parser.add_argument("--line-bytes", type=int, default=80, help="characters per line")
    parser.add_argument("--rate", type=float, default=0, help="lines/s to offer (0: max)")
    parser.add_argument(
        "--ws-batch", action="store_true", help="follow with ?batch=true (a frame per batch)"
    )
    parser.add_argument(
        "--no-compression", action="store_true", help="renter socket without permessage-deflate"
    )
    parser.add_argument("--profile", type=Path, help="cProfile the server into this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.profile)
        return
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    print("command:", " ".join([Path(sys.executable).name, "-m", "bench.logs", *sys.argv[1:]]))  # noqa: T201
    for backend in backends:
        background = _background_load()
        if background > 0.2:
            print(  # noqa: T201
                f"warning: {background:.2f} cores were busy before the run (other work on "
                "this machine); the figures below are lower than on a quiet one"
            )
        result = asyncio.run(_bench(backend, args))
        print(result.report(), flush=True)  # noqa: T201
        if args.profile is not None:
            _print_profile(args.profile)


async def _bench(backend: str, args: argparse.Namespace) -> Result:
    async with environment(backend, "peergpu-bench") as settings:
        seeded = await _seed(settings)
        with _server(settings, args.profile) as server:
            return await _measure(backend, settings, seeded, server, args)


async def _measure(
    backend: str,
    settings: ServerSettings,
    seeded: Seeded,
    server: subprocess.Popen[bytes],
    args: argparse.Namespace,
) -> Result:
    base = f"ws://127.0.0.1:{settings.port}/api/v1"
    follow_url = f"{base}/jobs/{seeded.job_id}/ws?access_token={seeded.renter_token}"
    if args.ws_batch:
        follow_url += "&batch=true"
    compression = None if args.no_compression else "deflate"
    async with connect(follow_url, max_size=None, compression=compression) as renter:
        first = json.loads(await renter.recv())
        assert first["type"] == "state", first
        cpu_before = (process_cpu(server.pid), time.process_time(), machine_cpu())
        started = time.time()
        sender = asyncio.create_task(_send(f"{base}/agent/ws", seeded, args))
        latencies = await _receive(renter, args.lines)
        finished = time.time()
        cpu_after = (process_cpu(server.pid), time.process_time(), machine_cpu())
        await sender
    server_cpu, client_cpu, machine_busy = (
        b - a for a, b in zip(cpu_before, cpu_after, strict=True)
    )
    label = "SQLite+in-process" if backend == "sqlite" else "PostgreSQL+Redis"
    label += " batched" if args.ws_batch else ""
    return Result(
        label, len(latencies), finished - started, latencies, server_cpu, client_cpu, machine_busy
    )


async def _receive(renter: object, total: int) -> list[float]:
    latencies: list[float] = []
    async for raw in renter:  # type: ignore[attr-defined]
        now = time.time()
        if raw.startswith('{"type":"logs"'):
            latencies += [now - line["ts"] for line in json.loads(raw)["lines"]]
        elif raw.startswith('{"type":"log"'):
            # The server writes ``ts`` last; parsing it alone keeps this side cheap.
            latencies.append(now - float(raw[raw.rindex('"ts":') + 5 : -1]))
        if len(latencies) >= total:
            break
    return latencies


async def _send(url: str, seeded: Seeded, args: argparse.Namespace) -> None:
    """An agent: hello, then batches as fast as the socket takes them (or at ``--rate``),
    with a heartbeat every 2 s so the host stays online."""
    headers = {"Authorization": f"Bearer {seeded.credential}"}
    text = ("x" * args.line_bytes).replace('"', "'")
    job = str(seeded.job_id)
    async with connect(url, additional_headers=headers, max_size=None) as agent:
        hello = Hello(protocol_versions=[1], agent_version="bench", running_jobs=[seeded.job_id])
        await agent.send(hello.model_dump_json())
        welcome = json.loads(await agent.recv())
        assert welcome["type"] == "welcome", welcome
        drain = asyncio.create_task(_drain_acks(agent, args.lines - 1))
        started = time.monotonic()
        next_beat = started + 2
        for first in range(0, args.lines, args.batch):
            if args.rate:
                await asyncio.sleep(max(0.0, started + first / args.rate - time.monotonic()))
            now = time.time()
            lines = ",".join(
                f'{{"seq":{seq},"stream":"stdout","line":"{text}","ts":{now}}}'
                for seq in range(first, min(first + args.batch, args.lines))
            )
            await agent.send(f'{{"type":"log_batch","job_id":"{job}","lines":[{lines}]}}')
            if time.monotonic() > next_beat:
                await agent.send(Heartbeat(running_jobs=[seeded.job_id]).model_dump_json())
                next_beat += 2
        await drain


async def _drain_acks(agent: object, last_seq: int) -> None:
    """Read the server's replies until the last line is acknowledged."""
    async for raw in agent:  # type: ignore[attr-defined]
        message = json.loads(raw)
        if message.get("type") == "error":
            raise RuntimeError(f"the server refused a message: {message}")
        if message.get("type") == "log_ack" and message["seq"] >= last_seq:
            return


# ---------------------------------------------------------------- environment


async def _seed(settings: ServerSettings) -> Seeded:
    """A host (enrolled as `peergpu agent enroll` would) running one job of a renter."""
    context = ServerContext.build(settings)
    try:
        async with context.sessionmaker() as session:
            owner = await accounts.create_user(
                session=session,
                passwords=context.passwords,
                email="bench@example.com",
                password=PASSWORD,
                roles=[UserRole.renter, UserRole.host],
            )
            _row, token = await hosts.create_enrollment_token(
                session=session,
                principal=Principal.for_session(owner),
                settings=hosts.HostSettings(name="bench"),
                ttl_seconds=600,
            )
            enrollment = await hosts.enroll(session=session, token=token, hostname="bench")
            now = utcnow()
            # Seen just now: the server's first sweep must not take the job for lost.
            enrollment.host.last_seen_at = now
            job = JobModel(
                owner_id=owner.id,
                command=["yes"],
                max_duration_seconds=3600,
                queue_expires_at=now + timedelta(hours=1),
                state=JobState.running.value,
                attempt=1,
                host_id=enrollment.host.id,
                assigned_at=now,
                acked_at=now,
                started_at=now,
                env={},
                gpu_models=[],
                tags=[],
                gpu_indices=[],
                excluded_host_ids=[],
            )
            session.add(job)
            await session.commit()
            return Seeded(enrollment.credential, job.id, context.access_tokens.issue(owner.id))
    finally:
        await context.close()


@contextlib.contextmanager
def _server(settings: ServerSettings, profile: Path | None) -> object:
    env = {
        **os.environ,
        "PEERGPU_DATA_DIR": str(settings.data_dir),
        "PEERGPU_SECRET_KEY": SECRET,
        "PEERGPU_HOST": "127.0.0.1",
        "PEERGPU_PORT": str(settings.port),
        "PEERGPU_DATABASE_URL": settings.database_url,
        "PEERGPU_REDIS_URL": settings.redis_url,
        "PEERGPU_REDIS_PREFIX": settings.redis_prefix,
        "PEERGPU_MIGRATE_ON_START": "false",
        "PEERGPU_HOST_LOST_GRACE_SECONDS": "3600",
    }
    command = [sys.executable, "-m", "bench.logs", "--serve"]
    if profile is not None:
        command += ["--profile", str(profile)]
    log = open(settings.data_dir / "server.log", "wb")  # closed in the finally below
    process = subprocess.Popen(
        command, env=env, cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while not listening(settings.port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
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
        tail = (settings.data_dir / "server.log").read_text(errors="replace")[-3000:]
        if tail.strip():
            print("server log (tail):\n" + tail, file=sys.stderr)  # noqa: T201


def _serve(profile: Path | None) -> None:
    """The server subprocess: settings from PEERGPU_* variables, as ``peergpu server``."""
    settings = ServerSettings()  # type: ignore[call-arg]
    parent = os.getppid()

    def exit_with_parent() -> None:  # never outlive a killed benchmark
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    profiler = cProfile.Profile() if profile is not None else None
    if profiler is not None:
        profiler.enable()
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it was stopped with, after a clean shutdown
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)


def _print_profile(path: Path) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(25)


def _background_load(seconds: float = 2.0) -> float:
    """How many cores something else keeps busy, measured over ``seconds``."""
    before = machine_cpu()
    time.sleep(seconds)
    return (machine_cpu() - before) / seconds


if __name__ == "__main__":
    main()
