"""What every job runner takes, returns and promises; see :mod:`peergpu.agent.runners`.

A runner starts one job (a :class:`RunSpec`), streams its output line by line into an
:data:`OutputSink`, enforces the :class:`ResourceLimits`, and returns a :class:`RunResult` that
says in machine-readable form (:class:`FailureReason`) and in one human sentence what happened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

#: Receives one line of job output: ``(stream, line)`` with ``stream`` ``"stdout"`` or
#: ``"stderr"`` and the line decoded as UTF-8 (errors replaced), without its newline. A line longer
#: than :data:`MAX_LINE_BYTES` arrives as several pieces. The runner awaits each call before it
#: reads more of that stream, so a slow sink slows the job down instead of filling memory.
OutputSink = Callable[[str, str], Awaitable[None]]

#: Longest piece of a line handed to a sink, in bytes of the job's output.
MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """Limits for one job; ``None`` means "no limit of this kind".

    - ``memory_bytes``: the process runner sets RLIMIT_DATA (per process; counts writable private
      mappings, so it works with thread arenas and CUDA's address-space reservations, unlike
      RLIMIT_AS) and, where the host allows, a memory cgroup limit for the whole job (no swap).
      Docker: ``--memory`` and ``--memory-swap``.
    - ``cpu_seconds``: RLIMIT_CPU (per process: SIGXCPU at the limit, SIGKILL 2 s later).
    - ``max_processes``: a pids cgroup limit (for this job alone) where available, else
      RLIMIT_NPROC, which counts every process and thread of the job's uid, so it only binds
      after dropping root, and jobs sharing a uid share it: give each job slot its own uid.
      Docker: ``--pids-limit``.
    - ``max_open_files``: RLIMIT_NOFILE. ``max_file_bytes``: RLIMIT_FSIZE (largest file written).
    - ``wall_clock_seconds``: the job's whole process tree is stopped after this long.
    """

    memory_bytes: int | None = 2 * 1024**3
    cpu_seconds: int | None = None
    max_processes: int | None = 256
    max_open_files: int = 1024
    max_file_bytes: int | None = 10 * 1024**3
    wall_clock_seconds: float | None = 3600.0


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One job to run.

    ``workdir`` is created by the runner (mode 0700, owned by the job's user). It may also already
    exist, holding the job's files (the caller extracted the bundle there); it must then be a real
    directory, not a symlink. ``workdir/"outputs"`` is created for results and exposed to the job
    as ``$PEERGPU_OUTPUT_DIR`` (process runner) or ``/outputs`` (docker). ``env`` is merged over
    a scrubbed base environment, never the agent's own; names must match
    ``[A-Za-z_][A-Za-z0-9_]*``. ``command`` is an argv list run as is (no shell).
    """

    job_id: str
    command: list[str]
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    gpu_ids: tuple[str, ...] = ()
    network: bool = False
    limits: ResourceLimits = ResourceLimits()


class FailureReason(StrEnum):
    """Why a job did not succeed; ``RunResult.failure_reason`` is ``None`` on success.

    - ``timeout``: stopped after ``wall_clock_seconds``.
    - ``cancelled``: stopped because :meth:`Runner.cancel` was called.
    - ``memory_limit``: killed by the memory cgroup, or died of an allocation failure
      (MemoryError, ``std::bad_alloc``, ENOMEM) while a memory limit was set.
    - ``process_limit``: failed because it could not create more processes.
    - ``cpu_limit``: killed after using ``cpu_seconds`` of CPU time (SIGXCPU).
    - ``file_size_limit``: tried to write a file larger than ``max_file_bytes`` (SIGXFSZ/EFBIG).
    - ``killed_by_signal``: died of another signal.
    - ``nonzero_exit``: exited with a non-zero code for no reason the runner could tell.
    - ``start_failed``: never started (bad spec, command not found, work dir unusable, image
      missing...).
    """

    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    MEMORY_LIMIT = "memory_limit"
    PROCESS_LIMIT = "process_limit"
    CPU_LIMIT = "cpu_limit"
    FILE_SIZE_LIMIT = "file_size_limit"
    KILLED_BY_SIGNAL = "killed_by_signal"
    NONZERO_EXIT = "nonzero_exit"
    START_FAILED = "start_failed"


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a job ended.

    ``exit_code`` is the job's exit status, or ``-N`` if signal N killed it, or ``None`` if it
    never started. ``peak_memory_bytes`` and ``cpu_seconds`` are ``None`` where unknown. The
    process runner measures the whole job through cgroups where available (peak memory then
    includes page cache, as the kernel charges it); otherwise it reports the main process and
    the children it waited for, and peak memory only when it exceeds the agent's own peak (a
    forked child starts with its parent's memory counted, so smaller values are meaningless).
    """

    exit_code: int | None
    duration_seconds: float
    failure_reason: FailureReason | None
    message: str
    peak_memory_bytes: int | None
    cpu_seconds: float | None
    outputs_dir: Path

    @property
    def succeeded(self) -> bool:
        return self.failure_reason is None


class RunnerError(Exception):
    """A spec the runner refuses before starting anything; ``run`` turns it into
    ``FailureReason.START_FAILED`` with this message."""


class Runner(ABC):
    """Runs jobs.

    Contract for implementations:

    - ``run`` never raises for anything the job does or for a spec it refuses: it returns a
      :class:`RunResult` (``start_failed`` if nothing ran). When ``run`` returns, every process
      of the job is dead. If the task awaiting ``run`` is cancelled, the job is killed before the
      cancellation propagates.
    - ``cancel(job_id)`` stops that job's whole process tree (or container); the pending ``run``
      then returns ``failure_reason=cancelled``. Cancelling an unknown or finished job is a no-op.
    - One runner instance may run several jobs at once; job ids must be unique among them.
    """

    name: ClassVar[str]

    @abstractmethod
    async def run(self, spec: RunSpec, sink: OutputSink) -> RunResult: ...

    @abstractmethod
    async def cancel(self, job_id: str) -> None: ...
