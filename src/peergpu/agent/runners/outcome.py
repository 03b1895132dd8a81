"""Turning what the runner observed about an ended job into a FailureReason and one sentence.

The order of checks matters: what the runner did itself (timeout, cancel) wins; then definite
kernel evidence (cgroup OOM kills, fork failures counted by ``pids.events``, SIGXCPU, SIGXFSZ);
then what the job printed last on stderr (``MemoryError``, ``File too large``, ``Resource
temporarily unavailable``), which only counts while the matching limit was set.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

from peergpu.agent.runners.base import FailureReason, ResourceLimits, RunResult, RunSpec

_MEMORY_HINTS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "ENOMEM")
_FILE_SIZE_HINTS = ("File too large", "EFBIG", "File size limit exceeded")
_PROCESS_HINTS = (
    "Resource temporarily unavailable",
    "fork: retry",
    "Cannot fork",
    "can't fork",
    "pthread_create",
)


@dataclass(frozen=True, slots=True)
class ExitFacts:
    """What is known about a job that ended. ``exit_code`` is negative (-N) for signal N."""

    exit_code: int
    limits: ResourceLimits
    stopped_by: FailureReason | None = None  # TIMEOUT or CANCELLED when the runner stopped it
    oom_kills: int = 0
    pids_limit_hits: int = 0
    cpu_seconds: float | None = None
    stderr_tail: list[str] = field(default_factory=list)


def classify(facts: ExitFacts) -> tuple[FailureReason | None, str]:
    """The failure reason (``None`` for success) and a human sentence explaining it."""
    limits = facts.limits
    if facts.stopped_by is FailureReason.TIMEOUT:
        wall = format_seconds(limits.wall_clock_seconds or 0)
        extra = _also_hit(facts)
        return FailureReason.TIMEOUT, f"Stopped after exceeding the {wall} wall-clock limit.{extra}"
    if facts.stopped_by is FailureReason.CANCELLED:
        return FailureReason.CANCELLED, "Cancelled on request."
    if facts.exit_code == 0:
        return None, "Exited with code 0."
    for check in (_memory, _cpu, _file_size, _processes):
        found = check(facts)
        if found is not None:
            return found
    if facts.exit_code < 0:
        name = signal_name(-facts.exit_code)
        return FailureReason.KILLED_BY_SIGNAL, f"Killed by signal {name}."
    return FailureReason.NONZERO_EXIT, f"Exited with code {facts.exit_code}."


def finished(
    spec: RunSpec,
    started: float,
    exit_code: int | None,
    reason: FailureReason | None,
    message: str,
    *,
    peak_memory_bytes: int | None = None,
    cpu_seconds: float | None = None,
) -> RunResult:
    """The RunResult of a job that started at ``started`` (``time.monotonic()``) and ended now."""
    return RunResult(
        exit_code=exit_code,
        duration_seconds=time.monotonic() - started,
        failure_reason=reason,
        message=message,
        peak_memory_bytes=peak_memory_bytes,
        cpu_seconds=cpu_seconds,
        outputs_dir=spec.workdir / "outputs",
    )


def start_failed(spec: RunSpec, started: float, message: str) -> RunResult:
    return finished(spec, started, None, FailureReason.START_FAILED, message)


def format_bytes(count: int) -> str:
    """``268435456`` -> ``"256 MiB"``."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    return f"{seconds:g} s"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _memory(facts: ExitFacts) -> tuple[FailureReason, str] | None:
    limit = facts.limits.memory_bytes
    if limit is None:
        return None
    if facts.oom_kills:
        return FailureReason.MEMORY_LIMIT, (
            f"Killed after exceeding the {format_bytes(limit)} memory limit."
        )
    if _stderr_mentions(facts, _MEMORY_HINTS):
        return FailureReason.MEMORY_LIMIT, (
            f"Ran out of memory: an allocation failed under the {format_bytes(limit)} memory "
            f"limit (exit code {facts.exit_code})."
        )
    return None


def _cpu(facts: ExitFacts) -> tuple[FailureReason, str] | None:
    limit = facts.limits.cpu_seconds
    if limit is None:
        return None
    by_signal = facts.exit_code in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
    hard_kill = facts.exit_code == -signal.SIGKILL and (facts.cpu_seconds or 0) >= limit
    if by_signal or hard_kill:
        return FailureReason.CPU_LIMIT, (
            f"Killed after using its {format_seconds(limit)} CPU-time limit."
        )
    return None


def _file_size(facts: ExitFacts) -> tuple[FailureReason, str] | None:
    limit = facts.limits.max_file_bytes
    if limit is None:
        return None
    by_signal = facts.exit_code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ)
    if by_signal or _stderr_mentions(facts, _FILE_SIZE_HINTS):
        return FailureReason.FILE_SIZE_LIMIT, (
            f"Tried to write a file larger than the {format_bytes(limit)} file-size limit "
            f"(exit code {facts.exit_code})."
        )
    return None


def _processes(facts: ExitFacts) -> tuple[FailureReason, str] | None:
    limit = facts.limits.max_processes
    if limit is None:
        return None
    if facts.pids_limit_hits or _stderr_mentions(facts, _PROCESS_HINTS):
        return FailureReason.PROCESS_LIMIT, (
            f"Could not create more processes: the limit is {limit} (exit code {facts.exit_code})."
        )
    return None


def _also_hit(facts: ExitFacts) -> str:
    if facts.pids_limit_hits and facts.limits.max_processes is not None:
        return f" It had also reached its {facts.limits.max_processes}-process limit."
    if facts.oom_kills and facts.limits.memory_bytes is not None:
        return f" It had also exceeded its {format_bytes(facts.limits.memory_bytes)} memory limit."
    return ""


def _stderr_mentions(facts: ExitFacts, needles: tuple[str, ...]) -> bool:
    return any(
        needle in line and "CUDA" not in line  # GPU memory errors are not our host-memory limit
        for line in facts.stderr_tail
        for needle in needles
    )
