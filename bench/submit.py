"""The renter's submit path alone: ``POST /api/v1/jobs`` with an API key, as fast as it goes.

No host is online, so every job stays queued and the scheduler's passes stop at their first
probe: what is measured is the request (HTTP, authentication, validation, the INSERTs and the
commit, the wake-up published). The server is the benchmark server of ``bench/scheduler.py``
(uvicorn, one process, the real application); this process plays the renter over the minimal
keep-alive client, in a closed loop with ``--connections`` connections.

Prints submits per second, the request's latency as the client saw it, and the server's CPU
per submit (its event-loop thread and all of it), on each backend asked for.

    .venv/bin/python bench/submit.py --backend both
    .venv/bin/python bench/submit.py --backend postgres --sample    # where the CPU goes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

if not __package__:  # run as a script (python bench/submit.py): make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import _gateway_http as http  # noqa: E402
from bench import scheduler as sched  # noqa: E402
from bench._harness import PASSWORD, environment  # noqa: E402
from peergpu.config import ServerSettings  # noqa: E402
from peergpu.server.context import ServerContext  # noqa: E402
from peergpu.server.db.models import UserRole  # noqa: E402
from peergpu.server.schemas.api_keys import ApiKeyCreate  # noqa: E402
from peergpu.server.security.principal import Principal  # noqa: E402
from peergpu.server.services import accounts, api_keys  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--sample", action="store_true", help="sample the server's stacks")
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    for backend in backends:
        print(asyncio.run(_bench(backend, args)), flush=True)  # noqa: T201


async def _seed(settings: ServerSettings) -> str:
    context = ServerContext.build(settings)
    try:
        async with context.sessionmaker() as session:
            renter = await accounts.create_user(
                session=session,
                passwords=context.passwords,
                email="renter@bench.example",
                password=PASSWORD,
                roles=[UserRole.renter],
                signup_credit_micros=10**15,
            )
            _key, plaintext = await api_keys.create_key(
                session=session,
                principal=Principal.for_session(renter),
                data=ApiKeyCreate(name="bench"),
            )
        return plaintext
    finally:
        await context.close()


async def _bench(backend: str, args: argparse.Namespace) -> str:
    async with environment(backend, "peergpu-bench-submit") as settings:
        api_key = await _seed(settings)
        with sched._server(settings, None, sample=args.sample, experiments=[]) as server:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.port}") as client:
                return await _load(backend, settings, server.pid, api_key, client, args)


async def _load(
    backend: str,
    settings: ServerSettings,
    pid: int,
    api_key: str,
    client: httpx.AsyncClient,
    args: argparse.Namespace,
) -> str:
    target = http.Target(settings.port, "/api/v1/jobs", b"", authorization=api_key)
    monitor = sched._CpuMonitor(pid, os.getpid(), os.getpid(), stores=backend == "postgres")
    window: dict[str, float] = {}
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(10**9))

    async def worker() -> None:
        connection = http.Connection(target)
        try:
            while True:
                now = time.time()
                if now >= window.get("end", float("inf")):
                    return
                body = json.dumps({"command": ["true"], "name": f"s-{next(counter)}"}).encode()
                status, answer = await connection.post(body)
                done = time.time()
                if status != 201:
                    errors.append(f"{status} {answer[:200]!r}")
                    continue
                if window.get("start", float("inf")) <= now and done <= window["end"]:
                    latencies.append(done - now)
        finally:
            await connection.close()

    start = time.time()
    window["start"] = start + args.warmup
    window["end"] = window["start"] + args.duration
    workers = [asyncio.create_task(worker()) for _ in range(args.connections)]
    await sched._sleep_until(window["start"])
    before = monitor.sample()
    samples_before = await sched._samples(client) if args.sample else None
    await sched._sleep_until(window["end"])
    after = monitor.sample()
    samples_after = await sched._samples(client) if args.sample else None
    await asyncio.gather(*workers)
    if errors:
        raise RuntimeError(f"{len(errors)} submits failed, first: {errors[:3]}")
    count = len(latencies)
    wall = after["wall"] - before["wall"]
    cpu = {k: after[k] - before[k] for k in ("server", "server loop thread")}
    pct = sched._percentiles(latencies)
    lines = [
        f"== submit path, {backend}: {args.connections} connections, closed loop, "
        f"{args.duration:.0f} s window ==",
        f"submits/s: {count / wall:,.0f} ({count:,} in the window)",
        f"latency (client): p50 {pct['p50']:.2f} ms, p99 {pct['p99']:.2f} ms",
        f"server CPU per submit: {cpu['server'] / max(count, 1) * 1000:.2f} ms "
        f"(event-loop thread {cpu['server loop thread'] / max(count, 1) * 1000:.2f} ms)",
        "CPU (cores): "
        + ", ".join(
            f"{name} {(after[name] - before[name]) / wall:.2f}"
            for name in ("server", "server loop thread", "driver", "postgres", "redis", "machine")
            if name in after
        ),
    ]
    if samples_before is not None and samples_after is not None:
        lines.append(sched._sample_summary(samples_before, samples_after))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
