"""Scheduling + dispatch, end to end: queued job -> claim -> signed manifest -> agent socket.

Sizes (defaults): 10,000 registered hosts with one GPU each (``--gpus-per-host``; varied models,
VRAM and prices), 1,000 of them connected as real WebSocket agents from a separate process
(``bench/_sched_agents.py``: one asyncio loop, the real agent's connection options, a heartbeat
every interval the server asks for), and 100,000 queued jobs from 20 renters. The server is
the real application under uvicorn in its own process (as ``peergpu server`` runs it), so the
server, the agents and this driver do not share a GIL.

Phase 1, throughput: the hosts and the 100,000 queued jobs are bulk-inserted before the
server starts (on PostgreSQL then ANALYZEd, as autoanalyze would; SQLite gathers no statistics
unless told to, and the server never does), with every host paused so nothing is handed out
while the agents connect; one UPDATE unpauses them and one job submitted through the API wakes
the scheduler. Every agent answers each manifest at once with ``manifest_ack``, ``job_status
running`` and ``job_status succeeded`` (zero-length jobs), which frees its GPU, so the figure
is the whole cycle the server sustains per job: a claim, a manifest and three agent reports.
Reported: manifests received per second over a steady window after a warm-up, the best 1-second
window (burst), the time from the wake-up to the Nth manifest while every GPU starts free, the
scheduler's passes and where their wall time went, how the database runs the claim UPDATE and
the queue-order SELECT, the SQL statements per job, and the CPU each process used.

Phase 2, latency: the backlog is cancelled (one UPDATE), in-flight jobs finish, then jobs are
submitted with ``POST /api/v1/jobs`` (an API key) at a fixed rate, by default half the measured
sustained rate. Three clocks, all ``time.time()`` on this one machine:

* server side (the goal's definition): the submit's commit is done (``jobs.submit`` is about to
  publish its wake-up) -> the manifest frame written to the agent's socket by the hub. Both
  moments are recorded inside the server process by thin wrappers this benchmark installs
  (``--serve``); nothing else changes.
* proxy: the job's ``created_at`` (stamped just before the INSERT, so it includes the INSERT and
  the commit) -> the agent process has the frame (loopback and the agent's loop included):
  slightly pessimistic.
* renter's view: ``POST`` sent -> the agent has the frame (HTTP, auth and the commit included).

    .venv/bin/python bench/scheduler.py --backend sqlite
    .venv/bin/python bench/scheduler.py --backend postgres --batch-size 1000
    .venv/bin/python bench/scheduler.py --backend postgres --sample   # where the CPU goes
    .venv/bin/python bench/scheduler.py --backend postgres --experiment redis-pool
    .venv/bin/python bench/scheduler.py --hosts 300 --agents 50 --jobs 5000 --duration 10

``--sample`` samples the server's event-loop thread on ``SIGPROF`` (per 2 ms of CPU time) and
prints where its time went in each phase's window, attributing SQLAlchemy's greenlet frames
to the coroutine that called them; it slows the server somewhat. ``--profile FILE`` runs
cProfile instead (slower, and misleading for asyncio: coroutine cumulative times include
their waits). ``--experiment`` runs the server with one of the patches in ``EXPERIMENTS``,
each a proposed change, labelled in the output. ``PEERGPU_BENCH_LOG_DIR=DIR`` keeps the
server's and the agents' logs.

PostgreSQL comes from ``PEERGPU_BENCH_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``; a scratch database is created and dropped)
and Redis from ``PEERGPU_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``; keys under a
unique prefix, deleted afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import cProfile
import hashlib
import json
import os
import pstats
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from sqlalchemy import func, insert, select, text, update

if not __package__:  # run as a script (python bench/scheduler.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _gateway_http as http  # noqa: E402
from bench._harness import (  # noqa: E402
    PASSWORD,
    SECRET,
    environment,
    free_port,
    listening,
    machine_cpu,
    process_cpu,
)
from peergpu.config import ServerSettings
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel, HostModel
from peergpu.server.db.job_models import JobModel, JobState
from peergpu.server.db.models import UserRole
from peergpu.server.schemas.api_keys import ApiKeyCreate
from peergpu.server.security import api_keys as key_format
from peergpu.server.security.principal import Principal
from peergpu.server.services import accounts, api_keys, job_queue, scheduler

HERE = Path(__file__).resolve().parent
#: (model, VRAM MiB, share of hosts)
GPU_MODELS = [
    ("NVIDIA GeForce RTX 4090", 24564, 0.35),
    ("NVIDIA GeForce RTX 3090", 24576, 0.20),
    ("NVIDIA L4", 23034, 0.15),
    ("NVIDIA A100-SXM4-80GB", 81920, 0.20),
    ("NVIDIA H100 80GB HBM3", 81559, 0.10),
]
#: Patches the server process can run with (``--experiment``), each a proposed change.
EXPERIMENTS = {
    "redis-pool": "the bus's Redis client may open 10,000 connections instead of redis-py's "
    "default 100 (every agent socket's subscription holds one)",
    "sqlite-one-connection": "SQLite gets a pool of one connection, so transactions queue in "
    "asyncio instead of sleeping in SQLite's busy handler",
}
#: Keep-alive connections phase 2 submits over.
SUBMIT_CONNECTIONS = 64
GOAL_SUSTAINED = 500.0
GOAL_BURST = 2000.0
GOAL_P50_MS = 10.0
GOAL_P99_MS = 50.0


def _say(message: str) -> None:
    """Progress, on stderr (stdout carries only the result blocks)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: T201


# ---------------------------------------------------------------- entry point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--hosts", type=int, default=10_000, help="registered hosts")
    parser.add_argument(
        "--gpus-per-host",
        type=int,
        default=1,
        help="GPUs of each host (the same model); more free GPUs than agents at the start "
        "measures a burst of claims into free capacity",
    )
    parser.add_argument("--agents", type=int, default=1_000, help="hosts connected as agents")
    parser.add_argument("--jobs", type=int, default=100_000, help="queued jobs for phase 1")
    parser.add_argument("--renters", type=int, default=20, help="owners of the queued jobs")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the window")
    parser.add_argument("--duration", type=float, default=30.0, help="steady window, seconds")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="PEERGPU_SCHEDULER_BATCH_SIZE (default 200)"
    )
    parser.add_argument(
        "--latency-rate", type=float, default=0, help="jobs/s in phase 2 (0: half the sustained)"
    )
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="phase 2 length")
    parser.add_argument("--skip-latency", action="store_true", help="phase 1 only")
    parser.add_argument(
        "--scheduler-replica",
        action="store_true",
        help="PostgreSQL only: two server processes on the one database and Redis, as two "
        "replicas: one serves the API and the agents' sockets (PEERGPU_SCHEDULER_ENABLED=false), "
        "the other runs the scheduler and the billing loops",
    )
    parser.add_argument("--profile", type=Path, help="cProfile the server process into this file")
    parser.add_argument(
        "--sample",
        action="store_true",
        help="sample the server's event-loop thread every 2 ms in phase 1's window and print "
        "where its time went (cheaper and truer for asyncio than cProfile)",
    )
    parser.add_argument(
        "--experiment",
        action="append",
        choices=sorted(EXPERIMENTS),
        default=[],
        help="run the server with a patch, to measure a proposed change (repeatable): "
        + "; ".join(f"{name}: {text}" for name, text in sorted(EXPERIMENTS.items())),
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve()
        return
    if args.agents > args.hosts:
        parser.error("--agents cannot exceed --hosts")
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if args.scheduler_replica and backends != ["postgres"]:
        parser.error("--scheduler-replica needs --backend postgres (SQLite runs one scheduler)")
    command = " ".join([".venv/bin/python", "bench/scheduler.py", *sys.argv[1:]])
    for backend in backends:
        report = asyncio.run(_bench(backend, args))
        print(report.render(command), flush=True)  # noqa: T201
        if args.profile is not None:
            _print_profile(_profile_path(args.profile, backend))


# ---------------------------------------------------------------- results


@dataclass
class Report:
    backend: str
    args: argparse.Namespace
    batch_size: int
    seed_seconds: dict[str, float] = field(default_factory=dict)
    connect_seconds: float = 0.0
    connected: int = 0
    throughput: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    samples: str = ""
    latency_samples: str = ""
    sql: str = ""

    def render(self, command: str) -> str:
        a = self.args
        label = "SQLite + in-process bus" if self.backend == "sqlite" else "PostgreSQL + Redis"
        t = self.throughput
        lines = [
            "",
            f"=== scheduler benchmark: {label} ===",
            f"command: {command}",
            f"sizes:   {a.hosts:,} hosts ({a.gpus_per_host} GPU each), {self.connected:,} of "
            f"{a.agents:,} agents "
            f"connected ({self.connect_seconds:.1f} s), "
            f"{a.jobs:,} queued jobs from {a.renters} renters; scheduler_batch_size "
            f"{self.batch_size}; {os.cpu_count()} CPU cores",
            "seeding: "
            + ", ".join(f"{name} {secs:.1f} s" for name, secs in self.seed_seconds.items()),
        ]
        lines += [
            f"EXPERIMENT (server patched): {name}: {EXPERIMENTS[name]}" for name in a.experiment
        ]
        if t:
            sustained, burst = t["sustained"], t["burst"]
            lines += [
                "phase 1 - throughput (queued -> manifest at an agent; each job then acked, "
                "running, succeeded):",
                f"  sustained   {sustained:8,.0f} jobs/s  over {t['window']:.0f} s after "
                f"{a.warmup:.0f} s warm-up ({t['window_jobs']:,} jobs)   goal >= "
                f"{GOAL_SUSTAINED:,.0f}  -> {sustained / GOAL_SUSTAINED:.2f}x "
                f"{_verdict(sustained >= GOAL_SUSTAINED)}",
                f"  burst       {burst:8,.0f} jobs/s  best 1-s window (starting "
                f"{t['burst_at']:.1f} s in)            goal >= {GOAL_BURST:,.0f} -> "
                f"{burst / GOAL_BURST:.2f}x {_verdict(burst >= GOAL_BURST)}",
                f"  from the wake-up to the {t['first_n']:,}th manifest (every GPU free at the "
                f"start): {t['first_n_seconds']:.2f} s = "
                f"{t['first_n'] / max(t['first_n_seconds'], 1e-9):,.0f} jobs/s",
                f"  server clock agrees: {t['server_sustained']:,.0f} manifest frames/s sent "
                f"in the same window",
                f"  per second: {t['per_second']}",
                f"  scheduler passes in the window: {t['passes']}",
                f"  CPU in the window (cores): {t['cpu']}",
            ]
        lt = self.latency
        if lt:
            lines += [
                f"phase 2 - latency at {lt['rate']:,.0f} jobs/s offered ({lt['rate_note']}) "
                f"for {a.latency_seconds:.0f} s via POST /api/v1/jobs: {lt['jobs']:,} jobs, "
                f"achieved {lt['achieved']:,.0f}/s, {lt['http_errors']} HTTP errors, "
                f"{lt['missing']} manifests missing",
            ]
            for key, title in (
                ("server", "submit committed -> manifest frame sent (server)"),
                ("proxy", "created_at -> manifest at the agent (proxy)   "),
                ("renter", "POST sent -> manifest at the agent (renter)   "),
            ):
                stats = lt[key]
                line = (
                    f"  {title}  p50 {stats['p50']:7.1f} ms  p99 {stats['p99']:7.1f} ms  "
                    f"max {stats['max']:7.1f} ms"
                )
                if key in ("server", "proxy"):
                    line += (
                        f"   goal p50 <= {GOAL_P50_MS:.0f} "
                        f"{_verdict(stats['p50'] <= GOAL_P50_MS)}, p99 <= {GOAL_P99_MS:.0f} "
                        f"{_verdict(stats['p99'] <= GOAL_P99_MS)}"
                    )
                lines.append(line)
            lines += [
                f"  median split: {lt['split']}",
                f"  HTTP POST round trip p50 {lt['http']['p50']:.1f} ms, p99 "
                f"{lt['http']['p99']:.1f} ms",
                f"  scheduler passes: {lt['passes']}",
                f"  CPU (cores): {lt['cpu']}",
            ]
        lines += [f"note: {note}" for note in self.notes]
        if self.sql:
            lines.append(self.sql)
        if self.samples:
            lines.append("phase 1: " + self.samples)
        if self.latency_samples:
            lines.append("phase 2: " + self.latency_samples)
        return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(round(p * len(ordered))) - 1))]

    return {"p50": rank(0.50) * 1000, "p99": rank(0.99) * 1000, "max": ordered[-1] * 1000}


# ---------------------------------------------------------------- one backend


async def _bench(backend: str, args: argparse.Namespace) -> Report:
    overrides = {"scheduler_batch_size": args.batch_size} if args.batch_size else {}
    async with environment(backend, "peergpu-bench-sched", **overrides) as settings:
        report = Report(backend, args, settings.scheduler_batch_size)
        seeded = await _seed(settings, args, report)
        profile = _profile_path(args.profile, backend) if args.profile else None
        split = args.scheduler_replica
        with (
            _server(
                settings,
                profile,
                sample=args.sample,
                experiments=args.experiment,
                scheduler=not split,
            ) as server,
            _scheduler_replica(settings, args) as replica,
            _Agents(settings, seeded) as agents,
        ):
            started = time.monotonic()
            status = await agents.wait_connected(args.agents, timeout=300)
            report.connect_seconds = time.monotonic() - started
            report.connected = status["welcomed"]
            if status["failed_connects"]:
                report.notes.append(
                    f"{status['failed_connects']} agents could not connect: "
                    f"{sorted(set(status['error_samples']))}"
                )
            _say(f"{backend}: {status['welcomed']} agents connected")
            monitor = _CpuMonitor(
                server.pid,
                agents.pid,
                os.getpid(),
                stores=not settings.is_sqlite,
                replica=replica[0].pid if replica else None,
            )
            client = _client(settings, seeded.api_key)
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(client)
                servers = [client]
                if replica:
                    servers.append(
                        await stack.enter_async_context(
                            httpx.AsyncClient(base_url=f"http://127.0.0.1:{replica[1]}")
                        )
                    )
                await _throughput(settings, seeded, agents, servers, monitor, args, report)
                if not args.skip_latency:
                    await _latency(settings, seeded, agents, servers, monitor, args, report)
            final = await agents.status()
            if final["errors"] or final["closed"]:
                report.notes.append(
                    f"agents saw {final['errors']} error frames and {final['closed']} closed "
                    f"sockets: {sorted(set(final['error_samples']))}"
                )
        if profile is not None or args.sample:
            report.notes.append(
                "profiled run: the profiler slows the server (cProfile roughly 1.5-2x, "
                "--sample less), so these numbers are below an unprofiled run's"
            )
        return report


@dataclass(frozen=True)
class Seeded:
    credentials_file: Path
    api_key: str


def _client(settings: ServerSettings, api_key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{settings.port}",
        headers={"Authorization": f"Bearer {api_key}"},
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        timeout=60,
    )


async def _throughput(
    settings: ServerSettings,
    seeded: Seeded,
    agents: _Agents,
    servers: list[httpx.AsyncClient],
    monitor: _CpuMonitor,
    args: argparse.Namespace,
    report: Report,
) -> None:
    client = servers[0]  # the API (and, unless --scheduler-replica, the scheduler too)
    context = ServerContext.build(settings)
    try:
        released = time.perf_counter()
        async with context.sessionmaker() as session:
            await session.execute(
                update(HostModel).where(HostModel.paused.is_(True)).values(paused=False)
            )
            await session.commit()
        if not settings.is_sqlite:
            # The paused flag changed on every host: new statistics, as autoanalyze would.
            async with context.engine.connect() as connection:
                await connection.execute(text("ANALYZE hosts"))
                await connection.commit()
        report.seed_seconds["release (unpause hosts)"] = time.perf_counter() - released
    finally:
        await context.close()
    # Wake every scheduler loop the way a renter does (the in-process bus is not reachable
    # from here): one more job through the API.
    woken = time.time()
    response = await client.post("/api/v1/jobs", json={"command": ["true"], "name": "wake"})
    response.raise_for_status()
    _say(f"{report.backend}: released {args.jobs:,} jobs")
    first = await agents.wait_first_manifest(timeout=60)
    window_start = first + args.warmup
    window_end = window_start + args.duration
    await _sleep_until(window_start)
    before = monitor.sample()
    samples_before = await _samples(client)
    replica_before = await _samples(servers[1]) if args.sample and len(servers) > 1 else None
    await _sleep_until(window_end)
    after = monitor.sample()
    samples_after = await _samples(client)
    replica_after = await _samples(servers[1]) if replica_before is not None else None
    await asyncio.sleep(0.5)
    receipts = await agents.receipts()
    stats = await _server_stats(servers, since=first - 1)
    times = sorted(r[0] for r in receipts)
    if not times:
        raise RuntimeError("no manifest reached the agents")
    last = times[-1]
    ran_dry = len(times) > args.jobs  # every queued job (and the wake-up one) went out
    end = min(window_end, last) if ran_dry else window_end
    window = max(end - window_start, 1e-9)
    in_window = bisect.bisect_left(times, end) - bisect.bisect_left(times, window_start)
    frames = sorted(f[0] for f in stats["frames"])
    server_in_window = bisect.bisect_left(frames, end) - bisect.bisect_left(frames, window_start)
    burst, burst_at = _best_window(times, 1.0)
    first_n = min(report.connected, len(times))
    per_second = [
        bisect.bisect_left(times, first + s + 1) - bisect.bisect_left(times, first + s)
        for s in range(int(min(last, window_end) - first) + 1)
    ]
    report.sql = _sql_summary(samples_before["sql"], samples_after["sql"], server_in_window)
    if args.sample:
        report.samples = _sample_summary(samples_before, samples_after)
        if replica_before is not None and replica_after is not None:
            report.samples += "\nphase 1, the scheduler replica: " + _sample_summary(
                replica_before, replica_after
            )
    report.throughput = {
        "sustained": in_window / window,
        "window": window,
        "window_jobs": in_window,
        "server_sustained": server_in_window / window,
        "burst": burst,
        "burst_at": burst_at - first,
        "first_n": first_n,
        "first_n_seconds": times[first_n - 1] - min(woken, first),
        "per_second": " ".join(str(n) for n in per_second),
        "passes": _pass_summary(stats["passes"], window_start, end),
        "cpu": monitor.render(before, after),
    }
    report.notes += await _plans(settings, report.batch_size)
    if ran_dry and last < window_end:
        report.notes.append(
            f"the queue ran dry {window_end - last:.1f} s before the window's end: "
            "use more --jobs for a full window"
        )
    longest_gap = max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)
    if longest_gap > 2:
        report.notes.append(f"stalls: the longest time without a manifest was {longest_gap:.1f} s")


async def _latency(
    settings: ServerSettings,
    seeded: Seeded,
    agents: _Agents,
    servers: list[httpx.AsyncClient],
    monitor: _CpuMonitor,
    args: argparse.Namespace,
    report: Report,
) -> None:
    client = servers[0]
    context = ServerContext.build(settings)
    try:
        async with context.sessionmaker() as session:
            now = utcnow()
            await session.execute(
                update(JobModel)
                .where(JobModel.state == JobState.queued.value)
                .values(
                    state=JobState.cancelled.value,
                    finished_at=now,
                    updated_at=now,
                    failure_reason="cancelled",
                    message="bench: backlog cancelled after phase 1",
                )
            )
            await session.commit()
        if not settings.is_sqlite:
            # Cancelling ~70,000 jobs in one UPDATE left as many dead index entries, which
            # every queue read of phase 2 would step over until autovacuum came by (it does,
            # within a minute): vacuum now, as a live queue that drains gradually never has
            # this many at once.
            async with context.engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                await autocommit.execute(text("VACUUM ANALYZE jobs"))
        _say(f"{report.backend}: backlog cancelled; waiting for jobs in flight to finish")
        deadline = time.monotonic() + 120
        while True:
            async with context.sessionmaker() as session:
                active = await session.scalar(
                    select(func.count())
                    .select_from(JobModel)
                    .where(JobModel.state.in_([JobState.assigned.value, JobState.running.value]))
                )
            if not active:
                break
            if time.monotonic() > deadline:
                report.notes.append(f"{active} jobs still active when phase 2 started")
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)  # let the last completions' follow-up work settle
        sustained = report.throughput.get("sustained", 0.0)
        rate = args.latency_rate or max(sustained / 2, 1.0)
        rate_note = "given" if args.latency_rate else "half the sustained rate"
        count = max(1, int(rate * args.latency_seconds))
        _say(f"{report.backend}: phase 2, {count:,} jobs at {rate:,.0f}/s")
        before_manifests = (await agents.status())["manifests"]
        sent: dict[str, float] = {}
        http_times: list[float] = []
        errors: list[str] = []

        # An open-loop load on the minimal keep-alive client: each job is due at its moment
        # and taken by the next free connection. (httpx cost this process 0.75 cores at ~200
        # requests/s: its pool rescans every waiting request, CPU the server then lacked.)
        due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
        target = http.Target(settings.port, "/api/v1/jobs", b"", authorization=seeded.api_key)

        async def submitter() -> None:
            connection = http.Connection(target)
            try:
                while (item := await due.get()) is not None:
                    index, due_at = item
                    body = json.dumps({"command": ["true"], "name": f"lat-{index}"}).encode()
                    sent_at = time.time()
                    try:
                        status, answer = await connection.post(body)
                    except (OSError, asyncio.IncompleteReadError) as exc:
                        errors.append(repr(exc))
                        await connection.close()
                        continue
                    if status != 201:
                        errors.append(f"{status} {answer[:200]!r}")
                        continue
                    sent[json.loads(answer)["id"]] = due_at
                    http_times.append(time.time() - sent_at)
            finally:
                await connection.close()

        phase_start = time.time()
        before = monitor.sample()
        samples_before = await _samples(client) if args.sample else None
        replica_before = await _samples(servers[1]) if args.sample and len(servers) > 1 else None
        workers = [asyncio.create_task(submitter()) for _ in range(SUBMIT_CONNECTIONS)]
        start = time.monotonic()
        for index in range(count):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            due.put_nowait((index, time.time()))
        for _ in workers:
            due.put_nowait(None)
        await asyncio.gather(*workers)
        offered_seconds = time.monotonic() - start
        after = monitor.sample()
        if samples_before is not None:
            report.latency_samples = _sample_summary(samples_before, await _samples(client))
        if replica_before is not None:
            report.latency_samples += "\nphase 2, the scheduler replica: " + _sample_summary(
                replica_before, await _samples(servers[1])
            )
        await agents.wait_manifests(before_manifests + len(sent), timeout=60)
        receipts = {job: at for at, job, _issued in await agents.receipts()}
        issued = {job: iss for _at, job, iss in await agents.receipts()}
        stats = await _server_stats(servers, since=phase_start - 1)
        frames = {job: at for at, job in stats["frames"]}
        submits = dict(stats["submits"])
        created = await _created_at(context, list(sent))
    finally:
        await context.close()
    server, proxy, renter = [], [], []
    split: dict[str, list[float]] = {
        "insert+commit": [],
        "commit->pass claimed+signed": [],
        "publish+hub->frame sent": [],
        "wire+agent": [],
    }
    missing = 0
    for job, t_sent in sent.items():
        if job not in receipts or job not in frames or job not in submits:
            missing += 1
            continue
        server.append(frames[job] - submits[job])
        proxy.append(receipts[job] - created[job])
        renter.append(receipts[job] - t_sent)
        split["insert+commit"].append(submits[job] - created[job])
        split["commit->pass claimed+signed"].append(issued[job] - submits[job])
        split["publish+hub->frame sent"].append(frames[job] - issued[job])
        split["wire+agent"].append(receipts[job] - frames[job])
    report.latency = {
        "rate": rate,
        "rate_note": rate_note,
        "jobs": count,
        "achieved": len(sent) / offered_seconds,
        "http_errors": len(errors),
        "missing": missing,
        "server": _percentiles(server),
        "proxy": _percentiles(proxy),
        "renter": _percentiles(renter),
        "split": ", ".join(
            f"{name} {_percentiles(values)['p50']:.2f} ms" for name, values in split.items()
        ),
        "http": _percentiles(http_times),
        "passes": _pass_summary(stats["passes"], phase_start, phase_start + offered_seconds),
        "cpu": monitor.render(before, after),
    }
    if errors:
        report.notes.append(f"phase 2 HTTP errors, first: {errors[:3]}")


async def _plans(settings: ServerSettings, batch_size: int) -> list[str]:
    """How the database runs some of each pass's statements, built as the scheduler builds
    them: the claim UPDATE (``claim_statement``, for one free GPU of a connected host, rolled
    back), the free-GPU read, and the two queue reads of ``_take_batch`` (the renters' queue
    heads, then the bounded fair-share ranking)."""
    context = ServerContext.build(settings)
    try:
        async with context.sessionmaker() as session:
            row = (
                await session.execute(
                    select(HostGpuModel.id)
                    .join(HostModel, HostModel.id == HostGpuModel.host_id)
                    .where(HostModel.status == "online", HostGpuModel.job_id.is_(None))
                    .limit(1)
                )
            ).first()
            job_id = await session.scalar(select(JobModel.id).limit(1))
            queued = await session.scalar(
                select(func.count()).select_from(JobModel).where(JobModel.state == "queued")
            )
            statements: list[tuple[str, Any]] = []
            if row is not None and job_id is not None:
                claim = scheduler.claim_statement(
                    {row[0]: job_id}, postgresql=not settings.is_sqlite
                )
                statements.append(("claim UPDATE (one GPU)", claim))
            free_limit = scheduler.FREE_READ_MIN + 1
            statements.append(
                (
                    f"free-GPU read (first {free_limit})",
                    (scheduler._free_query(limited=True), {"free_limit": free_limit}),
                )
            )
            heads_statement = job_queue.heads_statement(
                batch_size, skip_scan=not settings.is_sqlite
            )
            heads = [
                (owner, priority) for owner, priority in await session.execute(heads_statement)
            ]
            statements.append((f"queue heads over {queued:,} queued jobs", heads_statement))
            if heads:
                statements.append(
                    (
                        f"queue-order SELECT ({len(heads)} renter queues)",
                        job_queue.order_statement(heads, job_queue.first_read(batch_size, heads)),
                    )
                )
            notes = []
            for label, statement in statements:
                statement, parameters = (
                    statement if isinstance(statement, tuple) else (statement, {})
                )
                try:
                    notes.append(await _plan(session, settings, label, statement, parameters))
                except Exception as exc:  # noqa: BLE001 - a plan is a note; the figures stand
                    await session.rollback()
                    notes.append(f"{label}: no plan ({exc!r:.200})")
    finally:
        await context.close()
    return notes


async def _plan(
    session: Any, settings: ServerSettings, label: str, statement: Any, parameters: dict[str, Any]
) -> str:
    if parameters:  # PostgreSQL's claim takes arrays, which have no literal form: bind them
        compiled = statement.compile(dialect=session.bind.dialect)
        connection = await session.connection()
        started = time.perf_counter()
        result = await connection.exec_driver_sql(
            "EXPLAIN ANALYZE " + str(compiled),
            tuple({**compiled.params, **parameters}[name] for name in compiled.positiontup),
        )
        elapsed = time.perf_counter() - started
        plan = [str(r[0]).strip() for r in result]
        plan = [p for p in plan if not p.startswith(("Trigger", "Planning"))]
        await session.rollback()
        return f"{label}: {elapsed * 1000:.1f} ms, plan: " + " / ".join(plan[:16])
    sql = str(
        statement.compile(dialect=session.bind.dialect, compile_kwargs={"literal_binds": True})
    )
    if settings.is_sqlite:
        plan = [str(r[3]) for r in await session.execute(text("EXPLAIN QUERY PLAN " + sql))]
        started = time.perf_counter()
        await session.execute(text(sql))
        elapsed = time.perf_counter() - started
    else:
        started = time.perf_counter()
        plan = [str(r[0]).strip() for r in await session.execute(text("EXPLAIN ANALYZE " + sql))]
        elapsed = time.perf_counter() - started
        plan = [p for p in plan if not p.startswith(("Trigger", "Planning"))]
    await session.rollback()
    return f"{label}: {elapsed * 1000:.1f} ms, plan: " + " / ".join(plan[:16])


async def _created_at(context: ServerContext, job_ids: list[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    async with context.sessionmaker() as session:
        for start in range(0, len(job_ids), 500):
            chunk = [uuid.UUID(j) for j in job_ids[start : start + 500]]
            rows = await session.execute(
                select(JobModel.id, JobModel.created_at).where(JobModel.id.in_(chunk))
            )
            for job_id, created in rows:
                found[str(job_id)] = created.timestamp()
    return found


def _best_window(times: list[float], width: float) -> tuple[float, float]:
    """The most events in any ``width``-second window, as events/s, and where it starts."""
    best, best_at, low = 0, times[0], 0
    for high, at in enumerate(times):
        while at - times[low] >= width:
            low += 1
        if high - low + 1 > best:
            best, best_at = high - low + 1, times[low]
    return best / width, best_at


def _pass_summary(passes: list[list[float]], start: float, end: float) -> str:
    """Passes that overlap [start, end): how many, jobs per pass, where their time went."""
    chosen = [p for p in passes if p[0] < end and p[0] + p[1] > start]
    busy = [p for p in chosen if p[2] > 0]
    if not chosen:
        return "none"

    def mean_ms(rows: list[list[float]], index: int) -> float:
        return sum(r[index] for r in rows) / max(len(rows), 1) * 1000

    span = max(end - start, 1e-9)
    total = sum(p[1] for p in chosen)
    return (
        f"{len(chosen)} ({len(chosen) / span:.1f}/s, {len(busy)} assigned work), "
        f"{sum(p[2] for p in chosen) / max(len(busy), 1):.0f} jobs per busy pass (longest "
        f"{max(p[1] for p in chosen):.2f} s) of "
        f"{mean_ms(busy, 3) / 1000:.0f} considered; busy pass {mean_ms(busy, 1):.1f} ms wall = "
        f"free GPUs {mean_ms(busy, 4):.1f} + queue batch {mean_ms(busy, 5):.1f} + claims "
        f"{mean_ms(busy, 6):.1f} + transitions/commit/rest {mean_ms(busy, 7):.1f}, then its "
        f"dispatch {mean_ms(busy, 8):.1f} (beside the next pass); the loop spent "
        f"{total / span:.0%} of wall time in passes{_pass_statements(busy)}"
    )


def _pass_statements(busy: list[list[Any]]) -> str:
    """A busy pass's statements, by kind: how many, and their mean time from cursor execute
    to result (the thread hop and waits for a core included); BEGIN and COMMIT are not cursor
    executes, so they are in what is left."""
    if not busy or len(busy[0]) < 10:
        return ""
    kinds: dict[str, list[float]] = {}
    for row in busy:
        for kind, (count, seconds) in row[9].items():
            entry = kinds.setdefault(kind, [0, 0.0])
            entry[0] += count
            entry[1] += seconds
    n = len(busy)
    inside = sum(seconds for _count, seconds in kinds.values()) / n * 1000
    wall = sum(row[1] for row in busy) / n * 1000
    parts = ", ".join(
        f"{kind} {count / n:.1f}x {seconds / count * 1000:.1f} ms"
        for kind, (count, seconds) in sorted(kinds.items(), key=lambda kv: -kv[1][1])
    )
    return (
        f"\n    a busy pass's statements: {sum(c for c, _s in kinds.values()) / n:.1f}, "
        f"{inside:.1f} of its {wall:.1f} ms (the rest: Python, BEGIN/COMMIT, waits): {parts}"
    )


async def _samples(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/_bench/samples")
    response.raise_for_status()
    samples: dict[str, Any] = response.json()
    return samples


def _sql_summary(before: dict[str, Any], after: dict[str, Any], jobs: int) -> str:
    """SQL statements the server ran in phase 1's window, per job dispatched."""
    rows = []
    for kind, (count, seconds) in after.items():
        old_count, old_seconds = before.get(kind, (0, 0.0))
        if count > old_count:
            rows.append((kind, count - old_count, seconds - old_seconds))
    rows.sort(key=lambda r: -r[1])
    per_job = max(jobs, 1)
    total = sum(r[1] for r in rows)
    lines = [
        f"SQL in phase 1's window: {total:,} statements = {total / per_job:.1f} per job "
        "(per job | mean ms from cursor execute to result, thread hop and lock waits "
        "included | statement):"
    ]
    lines += [
        f"  {count / per_job:6.2f} | {seconds / count * 1000:7.2f} | {kind}"
        for kind, count, seconds in rows[:20]
    ]
    return "\n".join(lines)


def _sample_summary(before: dict[str, Any], after: dict[str, Any], top: int = 30) -> str:
    """What the server's event-loop thread was doing in the window, from stack samples."""
    total = max(after["count"] - before["count"], 1)

    def diff(kind: str) -> list[tuple[str, int]]:
        old = before[kind]
        counts = {k: v - old.get(k, 0) for k, v in after[kind].items()}
        return sorted(((k, v) for k, v in counts.items() if v > 0), key=lambda kv: -kv[1])

    lines = [
        f"server process, {total:,} SIGPROF samples (one per 2 ms of its CPU time) of the "
        "event-loop thread's stack in the window:"
    ]
    lines.append("  innermost frame, by package (self time):")
    lines += [f"    {v / total:6.1%}  {k}" for k, v in diff("leaf")[:15]]
    lines.append("  innermost frame, by function:")
    lines += [f"    {v / total:6.1%}  {k}" for k, v in diff("leaf_function")[:15]]
    lines.append("  inclusive, peergpu functions (on the stack):")
    lines += [f"    {v / total:6.1%}  {k}" for k, v in diff("inclusive")[:top]]
    lines.append("  innermost peergpu function -> package below it:")
    lines += [f"    {v / total:6.1%}  {k}" for k, v in diff("inner")[:top]]
    return "\n".join(lines)


async def _server_stats(servers: list[httpx.AsyncClient], *, since: float) -> dict[str, Any]:
    """What every server process recorded (frames, submits, passes), merged."""
    stats: dict[str, Any] = {}
    for client in servers:
        response = await client.get("/_bench/stats", params={"since": since})
        response.raise_for_status()
        for key, values in response.json().items():
            stats.setdefault(key, []).extend(values)
    for values in stats.values():
        values.sort()
    return stats


async def _sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


# ---------------------------------------------------------------- environment and seeding


async def _seed(settings: ServerSettings, args: argparse.Namespace, report: Report) -> Seeded:
    """Users, an API key, hosts with credentials made as ``hosts.enroll`` makes them (in bulk,
    paused), and the queued jobs."""
    rng = random.Random(42)
    context = ServerContext.build(settings)
    try:
        started = time.perf_counter()
        async with context.sessionmaker() as session:
            owner = await accounts.create_user(
                session=session,
                passwords=context.passwords,
                email="hosts@bench.example",
                password=PASSWORD,
                roles=[UserRole.host],
            )
            renters = [
                await accounts.create_user(
                    session=session,
                    passwords=context.passwords,
                    email=f"renter{i}@bench.example",
                    password=PASSWORD,
                    roles=[UserRole.renter],
                    # Enough credit for every hold (jobs are paid for since billing landed).
                    signup_credit_micros=10**15,
                )
                for i in range(args.renters)
            ]
            _key, api_key = await api_keys.create_key(
                session=session,
                principal=Principal.for_session(renters[0]),
                data=ApiKeyCreate(name="bench"),
            )
        report.seed_seconds["users"] = time.perf_counter() - started

        started = time.perf_counter()
        now = utcnow()
        host_rows, gpu_rows, specs = [], [], []
        weights = [share for _model, _mib, share in GPU_MODELS]
        for index in range(args.hosts):
            host_id = uuid.uuid4()
            model, memory, _share = rng.choices(GPU_MODELS, weights)[0]
            credential = key_format.generate_api_key(key_format.HOST_CREDENTIAL_MARKER)
            name = f"bench-host-{index:05d}"
            host_rows.append(
                {
                    "id": host_id,
                    "owner_id": owner.id,
                    "name": name,
                    "region": rng.choice(["eu-west", "us-east", "us-west", "ap-south"]),
                    "tags": [],
                    # 0.10 to 3.00 $/GPU-hour, in steps of 1 cent.
                    "price_per_gpu_hour_micros": rng.randrange(100_000, 3_000_001, 10_000),
                    # Paused until phase 1 starts, so no job is handed out while agents connect.
                    "paused": True,
                    "verified": True,
                    "status": "offline",
                    "credential_prefix": credential.prefix,
                    "credential_hash": credential.secret_hash,
                    "hostname": name,
                    "runners": ["process"],
                    "reliability": round(rng.uniform(0.5, 1.0), 3),
                    "created_at": now,
                }
            )
            gpus = []
            for gpu_index in range(args.gpus_per_host):
                gpu_uuid = f"GPU-{uuid.UUID(int=rng.getrandbits(128))}"
                gpus.append({"index": gpu_index, "uuid": gpu_uuid})
                gpu_rows.append(
                    {
                        "id": uuid.uuid4(),
                        "host_id": host_id,
                        "index": gpu_index,
                        "uuid": gpu_uuid,
                        "model": model,
                        "memory_total_mib": memory,
                    }
                )
            if index < args.agents:
                specs.append(
                    {
                        "credential": credential.plaintext,
                        "name": name,
                        "gpus": gpus,
                        "model": model,
                        "memory_mib": memory,
                    }
                )
        async with context.sessionmaker() as session:
            for start in range(0, len(host_rows), 5000):
                await session.execute(insert(HostModel), host_rows[start : start + 5000])
                await session.execute(insert(HostGpuModel), gpu_rows[start : start + 5000])
            await session.commit()
        report.seed_seconds[f"{args.hosts:,} hosts"] = time.perf_counter() - started

        started = time.perf_counter()
        await _seed_jobs(context, [r.id for r in renters], args.jobs, rng)
        report.seed_seconds[f"{args.jobs:,} jobs"] = time.perf_counter() - started
        if not settings.is_sqlite:
            # A live PostgreSQL has planner statistics (autoanalyze); a bulk-seeded one has
            # none for a minute or so, and the claim UPDATE's plan depends on them. SQLite
            # gathers none unless told to (the server never runs ANALYZE), so neither do we.
            started = time.perf_counter()
            async with context.engine.connect() as connection:
                await connection.execute(text("ANALYZE"))
                await connection.commit()
            report.seed_seconds["ANALYZE"] = time.perf_counter() - started
    finally:
        await context.close()
    credentials_file = settings.data_dir / "agents.json"
    credentials_file.write_text(json.dumps(specs))
    return Seeded(credentials_file, api_key)


async def _seed_jobs(
    context: ServerContext, owners: list[uuid.UUID], count: int, rng: random.Random
) -> None:
    """Queued jobs, oldest first, round-robin over the renters. Most ask for any GPU; some
    want an A100/H100, some 40 GB of VRAM, some a price cap, a few a higher priority."""
    now = utcnow()
    first = now - timedelta(seconds=count / 1000 + 60)
    chunk: list[dict[str, Any]] = []
    async with context.sessionmaker() as session:
        for index in range(count):
            kind = rng.random()
            created = first + timedelta(milliseconds=index)
            chunk.append(
                {
                    "id": uuid.uuid4(),
                    "owner_id": owners[index % len(owners)],
                    "org_id": None,
                    "name": f"bench-{index}",
                    "state": JobState.queued.value,
                    "command": ["python", "train.py", "--epochs", "1"],
                    "env": {},
                    "gpu_count": 1,
                    "min_vram_mib": 40_000 if 0.80 <= kind < 0.88 else 0,
                    "gpu_models": ["A100", "H100"] if 0.88 <= kind < 0.95 else [],
                    "max_price_per_gpu_hour_micros": 2_000_000 if kind >= 0.95 else None,
                    "tags": [],
                    "max_duration_seconds": 3600,
                    "priority": 1 if rng.random() < 0.05 else 0,
                    "network": False,
                    "max_retries": 2,
                    "request_hash": hashlib.sha256(str(index).encode()).hexdigest(),
                    "attempt": 0,
                    "gpu_indices": [],
                    "excluded_host_ids": [],
                    "created_at": created,
                    "updated_at": created,
                    "queue_expires_at": now + timedelta(days=1),
                }
            )
            if len(chunk) == 5000:
                await session.execute(insert(JobModel), chunk)
                chunk = []
        if chunk:
            await session.execute(insert(JobModel), chunk)
        await session.commit()


def _profile_path(base: Path, backend: str) -> Path:
    return base.with_name(f"{base.stem}-{backend}{base.suffix or '.prof'}")


# ---------------------------------------------------------------- the processes


@contextlib.contextmanager
def _server(
    settings: ServerSettings,
    profile: Path | None,
    *,
    sample: bool,
    experiments: list[str],
    scheduler: bool = True,
    name: str = "server",
) -> Iterator[subprocess.Popen[bytes]]:
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
        "PEERGPU_SCHEDULER_BATCH_SIZE": str(settings.scheduler_batch_size),
        "PEERGPU_BENCH_PROFILE": str(profile or ""),
        "PEERGPU_BENCH_SAMPLE": "1" if sample else "",
        "PEERGPU_BENCH_EXPERIMENTS": ",".join(experiments),
        "PEERGPU_SCHEDULER_ENABLED": "true" if scheduler else "false",
    }
    log_path = settings.data_dir / f"{name}.log"
    log = open(log_path, "wb")  # closed in the finally below  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve"],
        env=env,
        cwd=HERE.parent,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while not listening(settings.port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start: " + log_path.read_text()[-2000:])
            time.sleep(0.05)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        _keep_log(log_path, name)


@contextlib.contextmanager
def _scheduler_replica(
    settings: ServerSettings, args: argparse.Namespace
) -> Iterator[tuple[subprocess.Popen[bytes], int] | None]:
    """With ``--scheduler-replica``, a second server process on its own port that runs the
    scheduler (and the billing loops) for the one the agents and the renter talk to."""
    if not args.scheduler_replica:
        yield None
        return
    replica = settings.model_copy(update={"port": free_port()})
    with _server(
        replica, None, sample=args.sample, experiments=args.experiment, name="scheduler-replica"
    ) as process:
        yield process, replica.port


def _keep_log(path: Path, name: str) -> None:
    """Show the end of a log on stderr; keep all of it under PEERGPU_BENCH_LOG_DIR if set."""
    text = path.read_text(errors="replace").strip()
    keep = os.environ.get("PEERGPU_BENCH_LOG_DIR")
    if keep:
        target = Path(keep) / f"{name}-{time.strftime('%H%M%S')}.log"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    if text:
        _say(f"{name} log ({len(text.splitlines())} lines), the end:\n" + text[-2000:])


class _Agents:
    """The agents subprocess and its line protocol (see ``bench/_sched_agents.py``)."""

    def __init__(self, settings: ServerSettings, seeded: Seeded) -> None:
        self.url = f"ws://127.0.0.1:{settings.port}/api/v1/agent/ws"
        self.credentials = seeded.credentials_file
        self.dump_path = settings.data_dir / "receipts.json"
        self.log_path = settings.data_dir / "agents.log"

    def __enter__(self) -> _Agents:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self._popen = subprocess.Popen(
            [sys.executable, str(HERE / "_sched_agents.py"), self.url, str(self.credentials)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.pid = self._popen.pid
        self._lock = threading.Lock()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._command_sync({"cmd": "stop"}, timeout=30)
            self._popen.wait(30)
        except Exception:  # noqa: BLE001 - teardown: make sure it is gone
            self._popen.kill()
            self._popen.wait()
        self._log.close()
        _keep_log(self.log_path, "agents")

    def _command_sync(self, command: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        assert self._popen.stdin is not None and self._popen.stdout is not None
        with self._lock:
            self._popen.stdin.write((json.dumps(command) + "\n").encode())
            self._popen.stdin.flush()
            line = self._popen.stdout.readline()
        if not line:
            raise RuntimeError("the agents process exited: " + self.log_path.read_text()[-2000:])
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def command(self, command: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self._command_sync, command)

    async def status(self) -> dict[str, Any]:
        return await self.command({"cmd": "status"})

    async def receipts(self) -> list[tuple[float, str, float]]:
        await self.command({"cmd": "dump", "path": str(self.dump_path)})
        return [tuple(r) for r in json.loads(self.dump_path.read_text())]

    async def wait_connected(self, count: int, *, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status()
            if status["welcomed"] + status["failed_connects"] >= count:
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"agents did not connect in {timeout:.0f} s: {status}")
            await asyncio.sleep(0.5)

    async def wait_first_manifest(self, *, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while (await self.status())["manifests"] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("no manifest reached an agent")
            await asyncio.sleep(0.1)
        return min(r[0] for r in await self.receipts())

    async def wait_manifests(self, count: int, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (await self.status())["manifests"] < count and time.monotonic() < deadline:
            await asyncio.sleep(0.2)


class _CpuMonitor:
    """CPU seconds of the server, the agents, this driver, PostgreSQL, Redis and the machine."""

    def __init__(
        self, server: int, agents: int, driver: int, *, stores: bool, replica: int | None = None
    ) -> None:
        self.pids = {"server": server, "agents": agents, "driver": driver}
        if replica is not None:
            self.pids["scheduler replica"] = replica
        self.stores = stores  # PostgreSQL and Redis are ours (else they count as "other")

    def sample(self) -> dict[str, float]:
        values = {name: process_cpu(pid) for name, pid in self.pids.items()}
        values["server loop thread"] = process_cpu(
            self.pids["server"], f"/proc/{self.pids['server']}/task/{self.pids['server']}/stat"
        )
        if self.stores:
            values["postgres"] = _cpu_by_name("postgres")
            values["redis"] = _cpu_by_name("redis-server")
        values["machine"] = machine_cpu()
        values["wall"] = time.time()
        return values

    @staticmethod
    def render(before: dict[str, float], after: dict[str, float]) -> str:
        wall = max(after["wall"] - before["wall"], 1e-9)
        used = {k: (after[k] - before[k]) / wall for k in before if k != "wall"}
        ours = sum(v for k, v in used.items() if k not in ("machine", "server loop thread"))
        return (
            f"server {used['server']:.2f} (its event-loop thread {used['server loop thread']:.2f}"
            f", other threads {used['server'] - used['server loop thread']:.2f}), "
            + ", ".join(
                f"{k} {used[k]:.2f}"
                for k in ("scheduler replica", "agents", "driver", "postgres", "redis")
                if k in used
            )
            + f"; machine {used['machine']:.2f} of {os.cpu_count()}"
            + f" (other processes {max(used['machine'] - ours, 0):.2f})"
        )


def _cpu_by_name(name: str) -> float:
    """CPU seconds of every process called ``name``, with the children they reaped (so that
    PostgreSQL backends that exited still count, through the postmaster)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if comm == name or comm.startswith(name):
            fields = text.rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


# ---------------------------------------------------------------- the server process


class _Recorder:
    """Timestamps taken inside the server by thin wrappers; served at ``/_bench/stats``."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, str]] = []  # manifest frame written to a socket
        self.submits: list[tuple[str, float]] = []  # a submit committed (before its wake-up)
        # per pass: start, wall, assigned, considered, free GPUs, batch, claims, rest, dispatch
        self.passes: list[list[float]] = []
        self.current: dict[str, float] | None = None
        # SQL statements: first words -> [count, seconds from before to after cursor execute]
        self.sql: dict[str, list[float]] = {}
        # The pass in flight (its task) and its statements so far: first words -> [count, s]
        self.pass_task: asyncio.Task[Any] | None = None
        self.pass_sql: dict[str, list[float]] = {}


class _Sampler:
    """A tiny sampling profiler for the server's event-loop (main) thread.

    ``SIGPROF`` fires every ``interval`` seconds of the process's CPU time; Python runs the
    handler in the main thread at its next bytecode, with the frame it was executing, which,
    while a task runs, holds that task's whole coroutine chain. (A sampler thread reading
    ``sys._current_frames()`` would not do: it only gets the GIL when the loop releases it,
    so its samples pile up on socket calls.) Counted per sample:

    * ``leaf``: the package of the innermost Python frame, and ``leaf_function`` the
      function;
    * ``inclusive``: each peergpu function on the stack, once per sample;
    * ``inner``: the innermost peergpu function with the package of the innermost frame.

    SQLAlchemy runs its ORM code in greenlets whose frames do not link back to the coroutine
    that called it; the walk goes on from the parent greenlet's suspended frame.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.count = 0
        self.leaf: dict[str, int] = {}
        self.leaf_function: dict[str, int] = {}
        self.inclusive: dict[str, int] = {}
        self.inner: dict[str, int] = {}

    def start(self) -> None:
        """Call from the main thread."""
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_IGN)

    def _sample(self, _signum: int, frame: Any) -> None:
        import greenlet  # type: ignore[import-untyped]

        if frame is None:
            return
        self.count += 1
        code = frame.f_code
        leaf = _package(code.co_filename, code.co_name)
        _bump(self.leaf, leaf)
        _bump(self.leaf_function, f"{leaf}:{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}")
        seen: set[str] = set()
        innermost = ""
        current: Any = frame
        hopped = False
        while current is not None:
            code = current.f_code
            if "/peergpu/" in code.co_filename and "/site-packages/" not in code.co_filename:
                name = code.co_filename.split("/peergpu/", 1)[1].removesuffix(".py")
                key = f"{name.replace('/', '.')}:{code.co_qualname}"
                if not innermost:
                    innermost = key
                if key not in seen:
                    seen.add(key)
                    _bump(self.inclusive, key)
            current = current.f_back
            if current is None and not hopped:
                hopped = True
                parent = greenlet.getcurrent().parent
                if parent is not None:
                    current = parent.gr_frame
        if innermost:
            _bump(self.inner, f"{innermost} -> {leaf}")

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "leaf": dict(self.leaf),
            "leaf_function": dict(self.leaf_function),
            "inclusive": dict(self.inclusive),
            "inner": dict(self.inner),
        }


def _statement_kind(statement: str) -> str:
    """``UPDATE jobs``, ``SELECT ... FROM host_gpus JOIN hosts``: enough to tell them apart."""
    words = statement.split()
    if not words:
        return "?"
    verb = words[0].upper()
    lowered = [w.lower() for w in words]
    if verb in ("UPDATE", "DELETE", "INSERT"):
        target = words[2] if verb != "UPDATE" else words[1]
        return f"{verb} {target}"
    tables = [words[i + 1] for i, w in enumerate(lowered[:-1]) if w in ("from", "join")]
    return f"{verb} {' '.join(dict.fromkeys(t for t in tables if t.isidentifier()))}".strip()


def _bump(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


def _package(filename: str, function: str) -> str:
    if filename.endswith("selectors.py") and function == "select":
        return "idle (waiting in select)"
    if filename.endswith("runners.py") and function == "run":
        return "uvloop C code (or another thread's CPU time)"
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1].split("/", 1)[0]
    if "/peergpu/" in filename:
        return "peergpu"
    return "stdlib:" + filename.rsplit("/", 1)[-1]


def _instrument(recorder: _Recorder) -> None:
    """Wrap the scheduler's steps, the submit's wake-up and the hub's socket send with timers.
    Behaviour is unchanged; each wrapper costs a couple of microseconds."""
    from sqlalchemy import event

    from peergpu.server import context as context_module
    from peergpu.server.agents import hub
    from peergpu.server.services import job_writer, scheduler

    # ``context`` imported ``create_engine`` by name: wrap it where ``ServerContext`` looks.
    original_engine = context_module.create_engine  # type: ignore[attr-defined]

    def create_engine(settings: ServerSettings) -> Any:
        engine = original_engine(settings)
        started: dict[int, float] = {}

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            started[id(cursor)] = time.perf_counter()

        @event.listens_for(engine.sync_engine, "after_cursor_execute")
        def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            elapsed = time.perf_counter() - started.pop(id(cursor), time.perf_counter())
            key = _statement_kind(statement)
            entry = recorder.sql.get(key)
            if entry is None:
                entry = recorder.sql[key] = [0, 0.0]
            entry[0] += 1
            entry[1] += elapsed
            if recorder.pass_task is not None and asyncio.current_task() is recorder.pass_task:
                entry = recorder.pass_sql.setdefault(key, [0, 0.0])
                entry[0] += 1
                entry[1] += elapsed

        return engine

    context_module.create_engine = create_engine  # type: ignore[attr-defined]

    marker = 'job_id\\":\\"'

    def timed(name: str, original: Any) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                if recorder.current is not None:
                    recorder.current[name] += time.perf_counter() - started

        return wrapper

    scheduler._free_capacity = timed("free", scheduler._free_capacity)
    scheduler._take_batch = timed("batch", scheduler._take_batch)
    scheduler._claim = timed("claims", scheduler._claim)
    original_pass = scheduler._pass
    original_dispatch = scheduler._dispatch
    rows_by_pass: dict[int, list[float]] = {}

    async def one_pass(context: Any) -> Any:
        wall = time.time()
        started = time.perf_counter()
        recorder.current = dict.fromkeys(("free", "batch", "claims"), 0.0)
        recorder.pass_task, recorder.pass_sql = asyncio.current_task(), {}
        result = await original_pass(context)
        ended = time.perf_counter()
        c = recorder.current
        recorder.current = None
        statements, recorder.pass_task = recorder.pass_sql, None
        rest = (ended - started) - c["free"] - c["batch"] - c["claims"]
        row = [
            wall,
            ended - started,
            len(result.assigned),
            result.considered,
            c["free"],
            c["batch"],
            c["claims"],
            rest,
            0.0,  # its dispatch, which overlaps the next pass: filled in below
            statements,
        ]
        recorder.passes.append(row)
        rows_by_pass[id(result.assigned)] = row
        return result

    async def dispatch(context: Any, assigned: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original_dispatch(context, assigned)
        finally:
            row = rows_by_pass.pop(id(assigned), None)
            if row is not None:
                row[8] = time.perf_counter() - started

    scheduler._pass = one_pass
    scheduler._dispatch = dispatch

    # The submit's commit: the job writer announces a batch (its wake-up) right after its
    # commit. Stamped there, not when ``jobs.submit`` returns: the scheduler (on another
    # replica with --scheduler-replica) may have assigned the job during that publish.
    original_announce = job_writer.JobWriter._announce

    async def announce(self: Any, job_ids: list[Any]) -> None:
        at = time.time()
        recorder.submits.extend((str(job_id), at) for job_id in job_ids)
        await original_announce(self, job_ids)

    job_writer.JobWriter._announce = announce  # type: ignore[method-assign]

    original_send = hub._Socket.send

    async def send(self: Any, payload: str) -> None:
        await original_send(self, payload)
        if payload.startswith('{"type":"manifest"'):
            at = payload.find(marker) + len(marker)
            recorder.frames.append((time.time(), payload[at : at + 36]))

    hub._Socket.send = send  # type: ignore[method-assign]


def _apply_experiment(name: str) -> None:
    """Patch the server for ``--experiment name`` (see ``EXPERIMENTS``)."""
    if name == "redis-pool":
        from redis.asyncio import Redis

        from peergpu.server.bus import redis as redis_bus

        def create_client(url: str, *, socket_timeout: float, retries: int) -> Redis:
            client = original_client(url, socket_timeout=socket_timeout, retries=retries)
            client.connection_pool.max_connections = 10_000
            return client

        original_client = redis_bus._create_client
        redis_bus._create_client = create_client
    elif name == "sqlite-one-connection":
        from sqlalchemy.ext.asyncio import create_async_engine

        from peergpu.server import context as context_module
        from peergpu.server.db import session as session_module

        wrapped = context_module.create_engine  # type: ignore[attr-defined]

        def create_engine(settings: ServerSettings) -> Any:
            if not settings.is_sqlite:
                return wrapped(settings)
            engine = create_async_engine(
                settings.effective_database_url,
                echo=settings.database_echo,
                connect_args={"timeout": 30},
                pool_size=1,
                max_overflow=0,
                pool_timeout=120,
            )
            session_module._tune_sqlite(engine)
            return engine

        context_module.create_engine = create_engine  # type: ignore[attr-defined]
    else:
        raise SystemExit(f"unknown experiment {name!r}")


def _serve() -> None:
    """The server subprocess: settings from PEERGPU_* variables, as ``peergpu server``."""
    from fastapi import Response

    from peergpu.server.app import create_app

    settings = ServerSettings()
    parent = os.getppid()

    def exit_with_parent() -> None:  # never outlive a killed benchmark
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    for name in filter(None, os.environ.get("PEERGPU_BENCH_EXPERIMENTS", "").split(",")):
        _apply_experiment(name)  # before the instruments, which wrap what they find
    recorder = _Recorder()
    _instrument(recorder)
    app = create_app(settings)

    async def stats(since: float = 0.0) -> Response:
        body = {
            "frames": [f for f in recorder.frames if f[0] >= since],
            "submits": [s for s in recorder.submits if s[1] >= since],
            "passes": [p for p in recorder.passes if p[0] >= since],
        }
        return Response(json.dumps(body), media_type="application/json")

    app.add_api_route("/_bench/stats", stats, methods=["GET"], include_in_schema=False)
    sampler = _Sampler() if os.environ.get("PEERGPU_BENCH_SAMPLE") else None
    if sampler is not None:
        sampler.start()

    async def samples() -> Response:
        body = sampler.snapshot() if sampler is not None else {}
        body["sql"] = recorder.sql
        return Response(json.dumps(body), media_type="application/json")

    app.add_api_route("/_bench/samples", samples, methods=["GET"], include_in_schema=False)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    profile = os.environ.get("PEERGPU_BENCH_PROFILE", "")
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it was stopped with, after a clean shutdown
    finally:
        if sampler is not None:
            sampler.stop()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)


def _print_profile(path: Path) -> None:
    if not path.exists():
        _say(f"no profile at {path}")
        return
    print(f"\nserver profile ({path}), by own time:", flush=True)  # noqa: T201
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(30)
    print("by cumulative time, peergpu code:", flush=True)  # noqa: T201
    stats.sort_stats("cumulative").print_stats(r"peergpu", 40)


if __name__ == "__main__":
    main()
