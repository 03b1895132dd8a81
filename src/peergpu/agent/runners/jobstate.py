"""The state of one running job in the process runner, and how to stop and clean it up."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field

from peergpu.agent.runners import procs
from peergpu.agent.runners.base import FailureReason, RunSpec
from peergpu.agent.runners.cgroups import JobCgroup

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class RunningJob:
    """A job the process runner is running: what is needed to stop it and find its processes."""

    spec: RunSpec
    uses_bwrap: bool = False
    nproc_uid: int | None = None  # the uid whose process count RLIMIT_NPROC limits, if set
    pid: int | None = None
    cgroup: JobCgroup | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: FailureReason | None = None  # why a stop was requested
    stopped_by: FailureReason | None = None  # set once the runner actually stopped the job
    sink_error: BaseException | None = None

    def request_stop(self, reason: FailureReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_requested.set()

    def find_processes(self, *, spare_sandbox: bool = False) -> set[int]:
        """Every live process of the job; with ``spare_sandbox``, not the bwrap monitor (killing
        it first would take the whole sandbox down before the job could handle SIGTERM)."""
        extra = self.cgroup.pids() if self.cgroup is not None else set()
        marker = f"PEERGPU_JOB_ID={self.spec.job_id}".encode()
        found = procs.find_processes(session_id=self.pid, env_marker=marker, extra=extra)
        if spare_sandbox and self.uses_bwrap and self.pid is not None:
            found.discard(self.pid)
        return found

    def kill_all(self) -> None:
        if self.cgroup is not None:
            self.cgroup.kill()
        procs.signal_processes(self.find_processes(), signal.SIGKILL)


async def kill_and_reap(job: RunningJob, process: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup when supervising failed or was cancelled: SIGKILL everything, reap."""
    job.kill_all()
    if process.returncode is None:
        try:
            status, _ = await procs.wait_for_exit(process.pid)
            process.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            process.returncode = -signal.SIGKILL
    await procs.kill_until_gone(job.find_processes)


async def remove_cgroup(cgroup: JobCgroup | None) -> None:
    """Remove the job's cgroup; a just-killed process may take a moment to leave it."""
    if cgroup is None:
        return
    for _ in range(50):
        if cgroup.remove():
            return
        await asyncio.sleep(0.02)
    logger.warning("could not remove a job cgroup: %s", cgroup.procs_files)
