"""Job runners: how the agent executes a job and reports how it ended.

Two implementations of :class:`Runner`: ``"process"`` (:class:`ProcessRunner`, a contained
process tree on the host; works everywhere, stronger with root, cgroups and bubblewrap) and
``"docker"`` (:class:`DockerRunner`, a locked-down container). Both stream output line by line,
with backpressure, into an :data:`OutputSink` (a :class:`peergpu.agent.logbatch.LogBatcher`'s
``add`` fits) and return a :class:`RunResult`. Pick one with :func:`create_runner`.
"""

from __future__ import annotations

from typing import Any

from peergpu.agent.runners.base import (
    MAX_LINE_BYTES,
    FailureReason,
    OutputSink,
    ResourceLimits,
    Runner,
    RunnerError,
    RunResult,
    RunSpec,
)
from peergpu.agent.runners.docker import DockerRunner, build_docker_command
from peergpu.agent.runners.process import AUTO, HostSetup, ProcessRunner

__all__ = [
    "AUTO",
    "MAX_LINE_BYTES",
    "DockerRunner",
    "FailureReason",
    "HostSetup",
    "OutputSink",
    "ProcessRunner",
    "ResourceLimits",
    "RunResult",
    "RunSpec",
    "Runner",
    "RunnerError",
    "build_docker_command",
    "create_runner",
]

_RUNNERS: dict[str, type[ProcessRunner] | type[DockerRunner]] = {
    ProcessRunner.name: ProcessRunner,
    DockerRunner.name: DockerRunner,
}


def create_runner(name: str, **options: Any) -> Runner:
    """A runner by name (``"process"`` or ``"docker"``), built with ``options`` as its keyword
    arguments; raises ``ValueError`` for an unknown name."""
    try:
        runner_class = _RUNNERS[name]
    except KeyError:
        known = ", ".join(sorted(_RUNNERS))
        raise ValueError(f"Unknown runner {name!r}; choose one of: {known}.") from None
    return runner_class(**options)
