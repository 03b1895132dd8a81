"""What ``bench/gateway.py`` measured, as figures: CPU accounting per process, the phases'
results, the table it prints, and the server's profile."""

from __future__ import annotations

import argparse
import json
import pstats
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._gateway_http import StreamResult, Throughput
from bench._harness import machine_cpu, process_cpu

GOAL_ADDED_P50_MS = 2.0
GOAL_ADDED_P99_MS = 10.0
GOAL_REQUESTS_PER_SECOND = 500.0
LABELS = {"sqlite": "SQLite + in-process bus", "postgres": "PostgreSQL + Redis"}
PROCESSES = ("server", "agent", "engine", "client", "other")


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds each process used over ``wall`` seconds; ``other`` is the rest of the
    machine (PostgreSQL, Redis, and anything else running)."""

    seconds: dict[str, float]
    wall: float

    def per(self, count: int, scale: float = 1000) -> str:
        """Each process's CPU per unit (ms by default), ``server/agent/engine/client/other``."""
        return " / ".join(f"{self.seconds[p] * scale / max(count, 1):.2f}" for p in PROCESSES)

    def cores(self) -> str:
        return " / ".join(f"{self.seconds[p] / self.wall:.2f}" for p in PROCESSES)


class Cpu:
    def __init__(self, **pids: int) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float]:
        taken = {name: process_cpu(pid) for name, pid in self.pids.items()}
        taken["client"] = time.process_time()
        taken["machine"] = machine_cpu()
        taken["wall"] = time.perf_counter()
        return taken

    def since(self, before: dict[str, float]) -> CpuUse:
        after = self.snapshot()
        used = {name: after[name] - before[name] for name in after}
        wall = used.pop("wall")
        machine = used.pop("machine")
        used["other"] = max(0.0, machine - sum(used.values()))
        return CpuUse(used, wall)


@dataclass
class Relayed:
    """A phase-3 figure: streamed events per second and time to the first event."""

    events: int
    seconds: float
    first_event_ms: float
    complete: bool
    cpu: CpuUse

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass
class Phases:
    backend: str
    profiled_requests: int = 0  # answered while the server's profiler ran
    idle: CpuUse | None = None
    latencies: dict[str, list[float]] = field(default_factory=dict)
    latency_cpu: CpuUse | None = None
    loads: dict[tuple[str, int], tuple[Throughput, CpuUse]] = field(default_factory=dict)
    relays: dict[str, Relayed] = field(default_factory=dict)

    def latency(self, direct: list[float], gateway: list[float], cpu: CpuUse) -> None:
        self.latencies = {"direct": direct, "gateway": gateway}
        self.latency_cpu = cpu

    def throughput(self, name: str, clients: int, result: Throughput, cpu: CpuUse) -> None:
        self.loads[(name, clients)] = (result, cpu)

    def relay(self, name: str, results: list[tuple[float, StreamResult]], cpu: CpuUse) -> None:
        events = sum(r.events for _, r in results)
        seconds = sum(r.last_event_at - sent for sent, r in results)
        first = statistics.median((r.first_event_at - sent) * 1000 for sent, r in results)
        complete = all(r.done for _, r in results)
        self.relays[name] = Relayed(events, seconds, first, complete, cpu)

    # ------------------------------------------------------------ derived figures

    def added_ms(self) -> tuple[float, float]:
        direct, gateway = self.latencies["direct"], self.latencies["gateway"]
        return (
            (percentile(gateway, 50) - percentile(direct, 50)) * 1000,
            (percentile(gateway, 99) - percentile(direct, 99)) * 1000,
        )

    def rows(self, args: argparse.Namespace) -> list[tuple[str, str]]:
        direct, gateway = self.latencies["direct"], self.latencies["gateway"]
        added50, added99 = self.added_ms()
        rounds = [g - d for d, g in zip(direct, gateway, strict=True)]
        assert self.latency_cpu is not None and self.idle is not None
        rows = [
            ("cores busy idle: server / agent / engine / client / other", self.idle.cores()),
            ("latency p50: direct / gateway", f"{_ms(direct, 50)} / {_ms(gateway, 50)} ms"),
            ("latency p99: direct / gateway", f"{_ms(direct, 99)} / {_ms(gateway, 99)} ms"),
            (
                "**added p50 / p99** (goal <= 2 / 10 ms)",
                f"**{added50:.2f} / {added99:.2f} ms** "
                f"({_verdict(added50, GOAL_ADDED_P50_MS)}, {_verdict(added99, GOAL_ADDED_P99_MS)})",
            ),
            ("added per round (paired): p50 / p99", f"{_ms(rounds, 50)} / {_ms(rounds, 99)} ms"),
            (
                "CPU ms per gateway request, one at a time: server / agent / engine / client "
                "/ other",
                self.latency_cpu.per(len(gateway)),
            ),
        ]
        for clients in args.clients:
            rows += self._throughput_rows(clients)
        relay_direct, relay_gateway = self.relays["direct"], self.relays["gateway"]
        return rows + [
            (
                f"SSE relay, {args.stream_chunks:,}-event answers: direct / gateway",
                f"{relay_direct.rate:,.0f} / {relay_gateway.rate:,.0f} events/s "
                f"({relay_gateway.rate / relay_direct.rate:.2f}x)"
                + ("" if relay_gateway.complete and relay_direct.complete else " INCOMPLETE"),
            ),
            (
                "SSE first event: direct / gateway",
                f"{relay_direct.first_event_ms:.1f} / {relay_gateway.first_event_ms:.1f} ms",
            ),
            (
                "CPU us per relayed event: server / agent / engine / client / other",
                relay_gateway.cpu.per(relay_gateway.events, scale=1e6),
            ),
        ]

    def _throughput_rows(self, clients: int) -> list[tuple[str, str]]:
        direct, _ = self.loads[("direct", clients)]
        gateway, cpu = self.loads[("gateway", clients)]
        errors = gateway.errors + direct.errors
        return [
            (f"{clients} clients: direct", f"{direct.rate:,.0f} req/s"),
            (
                f"**{clients} clients: gateway** (goal >= 500 req/s)",
                f"**{gateway.rate:,.0f} req/s** "
                f"({gateway.rate / GOAL_REQUESTS_PER_SECOND:.2f}x goal; "
                f"{gateway.rate / max(direct.rate, 1e-9):.2f}x direct)",
            ),
            (
                f"{clients} clients: gateway latency p50 / p99",
                f"{_ms(gateway.latencies, 50)} / {_ms(gateway.latencies, 99)} ms",
            ),
            (
                f"{clients} clients: CPU ms per gateway request: server / agent / engine / "
                "client / other",
                cpu.per(gateway.total) if gateway.total else "- (none answered)",
            ),
            (
                f"{clients} clients: cores busy: server / agent / engine / client / other",
                cpu.cores(),
            ),
        ] + (
            [
                (
                    f"{clients} clients: errors",
                    f"{errors}, first: {gateway.first_error or direct.first_error}",
                )
            ]
            if errors
            else []
        )


def render(results: dict[str, Phases], args: argparse.Namespace) -> str:
    """A Markdown table: one row per figure, one column per backend."""
    backends = list(results)
    table = {b: dict(results[b].rows(args)) for b in backends}
    lines = [
        "| | " + " | ".join(LABELS[b] for b in backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    names = list(dict.fromkeys(name for b in backends for name in table[b]))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(table[b].get(name, "") for b in backends) + " |")
    return "\n".join(lines)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if pct == 50:
        return statistics.median(ordered)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def _ms(values: list[float], pct: float) -> str:
    return f"{percentile(values, pct) * 1000:.2f}"


def _verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else f"missed by {value - goal:.2f} ms"


# ---------------------------------------------------------------- profile


def print_profile(path: Path, requests: int) -> None:
    """The server's top functions by own CPU time in the gateway's throughput phase, per
    request answered, and the same grouped by package (where the time goes, whoever calls
    it)."""
    stats = pstats.Stats(str(path))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in entries.values())
    print(  # noqa: T201
        f"\nserver profile (CPU of the loop thread, gateway throughput phase): {total:.1f} s "
        f"over {requests:,} requests = {total / requests * 1e6:,.0f} us per request "
        "(cProfile's own overhead included)"
    )
    packages: dict[str, float] = {}
    for (filename, _line, _name), entry in entries.items():
        package = _package(filename)
        packages[package] = packages.get(package, 0.0) + entry[2]
    print("own time by package, us per request:")  # noqa: T201
    for package, seconds in sorted(packages.items(), key=lambda item: -item[1])[:20]:
        print(f"  {seconds / requests * 1e6:8.1f}  {seconds / total:5.1%}  {package}")  # noqa: T201
    print("top functions by own time, us per request:")  # noqa: T201
    ranked = sorted(entries.items(), key=lambda item: -item[1][2])[:30]
    for (filename, line, name), entry in ranked:
        where = f"{_package(filename)}:{Path(filename).name}:{line}({name})"
        print(f"  {entry[2] / requests * 1e6:8.1f}  {entry[1]:>9,} calls  {where}")  # noqa: T201
    print("cumulative time of the gateway's steps, us per request:")  # noqa: T201
    for (filename, line, name), entry in entries.items():
        if any(step in (Path(filename).name, name) for step in _STEPS):
            if entry[3] / requests * 1e6 >= 5:
                where = f"{_package(filename)}:{Path(filename).name}:{line}({name})"
                print(f"  {entry[3] / requests * 1e6:8.1f}  {entry[1]:>9,} calls  {where}")  # noqa: T201


#: Functions whose cumulative time says what a request's steps cost (coroutines' cumulative
#: time counts only their own resumptions under cProfile, not the awaits in between).
_STEPS = (
    "get_principal",
    "authenticate_key",
    "admit",
    "ensure_can_spend",
    "chat_completions",
    "_relay",
    "serve",
    "whole",
    "events",
    "_read_loop",
    "route",
    "deliver",
    "parse_agent_message",
    "model_dump_json",
    "record",
    "acquire",
    "solve_dependencies",
    "request_validation",
    "serialize_response",
)


def print_samples(server: Path, agent: Path, phases: Phases, args: argparse.Namespace) -> None:
    """Where the server's and the agent's main threads spent their CPU in the two sampled
    windows (the gateway's first throughput run, its SSE streams), from ``bench/scheduler.py``'s
    stack sampler (one sample per 2 ms of the process's CPU, any thread's)."""
    from bench.scheduler import _sample_summary

    empty: dict[str, Any] = {"count": 0, "leaf": {}, "leaf_function": {}, "inclusive": {}}
    empty["inner"] = {}
    relay = phases.relays["gateway"]
    windows = [
        f"non-streaming, {args.clients[0]} clients, {phases.profiled_requests:,} requests",
        f"SSE, {args.streams} streams, {relay.events:,} events",
    ]
    for process, path in (("server", server), ("agent", agent)):
        snapshots = json.loads(path.read_text())
        for index, (title, after) in enumerate(zip(windows, snapshots, strict=False)):
            before = snapshots[index - 1] if index else empty
            print(  # noqa: T201
                f"\n{process}, {title}: {after['count'] - before['count']:,} samples (SIGPROFs "
                "that arrive together count once: read the shares; CPU per request is above)"
            )
            summary = _sample_summary(before, after, top=30)
            print(summary.replace("server process", f"{process} process"))  # noqa: T201
            if after.get("sql"):
                units = phases.profiled_requests if index == 0 else relay.events
                unit = "request" if index == 0 else "event"
                print(_sql_lines(before.get("sql", {}), after["sql"], units, unit))  # noqa: T201


def _sql_lines(before: dict[str, int], after: dict[str, int], units: int, unit: str) -> str:
    counts = {kind: n - before.get(kind, 0) for kind, n in after.items()}
    ranked = sorted(((n, kind) for kind, n in counts.items() if n > 0), reverse=True)
    total = sum(n for n, _ in ranked)
    lines = [f"  SQL statements: {total:,} = {total / max(units, 1):.3f} per {unit}"]
    lines += [f"    {n / max(units, 1):6.3f}  {kind}" for n, kind in ranked[:12]]
    return "\n".join(lines)


def _package(filename: str) -> str:
    """``peergpu/server/gateway``, ``starlette``, ``sqlalchemy``... for a source file."""
    parts = Path(filename).parts
    if "site-packages" in parts:
        rest = parts[parts.index("site-packages") + 1 :]
        return rest[0] if len(rest) > 1 else Path(rest[0]).stem
    if "peergpu" in parts:
        rest = parts[parts.index("peergpu") :]
        return "/".join(rest[:3]) if len(rest) > 3 else "/".join(rest[:-1])
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    return "stdlib:" + (parts[-2] if parts[-2] == "asyncio" else Path(filename).stem)
