"""The process runner: a job as a plain process tree on the host, contained as far as the host
allows.

Layers, each used where available (see :meth:`ProcessRunner.detect`):

- always: a fresh work dir, a scrubbed environment, a new session, rlimits (memory as RLIMIT_DATA,
  CPU, file size, open files, no core dumps), a wall-clock limit that stops the whole tree
  (SIGTERM, ``kill_grace_seconds``, then SIGKILL), and after the main process ends every process
  left behind is killed (found by cgroup, session and environment marker; see :mod:`.procs`);
- as root: the job runs as an unprivileged user (default ``nobody``), which also makes
  RLIMIT_NPROC bind. Jobs sharing one uid can signal each other; give each job slot its own uid
  (``run_as``) where that matters;
- cgroups (v2, or v1 memory/pids/cpuacct) where writable: a memory limit for the whole tree with
  OOM detection and peak usage, a process limit, total CPU time (:mod:`.cgroups`);
- bubblewrap where installed and working: read-only system, private /tmp, no network unless asked,
  own pid namespace (:mod:`.sandbox`).

The job is started through :mod:`.launch` (not a ``preexec_fn``), which joins the cgroups, sets
the rlimits and drops privileges between fork and exec safely in a threaded agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from peergpu.agent.runners import procs
from peergpu.agent.runners.base import (
    FailureReason,
    OutputSink,
    Runner,
    RunnerError,
    RunResult,
    RunSpec,
)
from peergpu.agent.runners.cgroups import CgroupHost, JobCgroup, detect_cgroups
from peergpu.agent.runners.jobstate import RunningJob, kill_and_reap, remove_cgroup
from peergpu.agent.runners.outcome import ExitFacts, classify, finished, start_failed
from peergpu.agent.runners.prepare import (
    JobUser,
    job_environment,
    prepare_workdir,
    resolve_user,
    rlimits,
    validate_spec,
)
from peergpu.agent.runners.sandbox import find_bwrap, probe_bwrap, sandbox_command
from peergpu.agent.runners.streams import OutputTail, open_pipe_reader, pump_lines

logger = logging.getLogger(__name__)

LAUNCHER: Final = Path(__file__).with_name("launch.py")


class _Auto:
    def __repr__(self) -> str:
        return "AUTO"


#: Default for ``run_as``: ``"nobody"`` when the agent runs as root, else the agent's own user.
AUTO: Final = _Auto()


@dataclass(frozen=True, slots=True)
class HostSetup:
    """What the process runner found on this host (see :meth:`ProcessRunner.detect`)."""

    user: JobUser | None
    bwrap: str | None
    bwrap_problem: str | None
    cgroups: CgroupHost | None

    def describe(self) -> str:
        user = f"as {self.user.name} (uid {self.user.uid})" if self.user else "as the agent's user"
        sandbox = (
            f"bubblewrap {self.bwrap}" if self.bwrap else f"no bubblewrap ({self.bwrap_problem})"
        )
        cgroups = self.cgroups.describe() if self.cgroups else "no writable cgroups"
        return f"jobs run {user}; {sandbox}; {cgroups}"


@dataclass(frozen=True, slots=True)
class _Exit:
    status: int
    cpu_seconds: float
    max_rss_bytes: int | None  # the largest single process's peak RSS, if known
    stderr_tail: list[str]


class ProcessRunner(Runner):
    """Runs jobs as contained host processes; see the module docstring.

    ``run_as``: the user (name or uid) jobs run as; by default ``"nobody"`` when the agent is root
    and the agent's own user otherwise; ``None`` never switches (as root: jobs run as root).
    Switching needs root; an unknown user name raises :class:`RunnerError` here.
    ``use_bwrap``/``use_cgroups``: ``None`` = use if available, ``True`` = require (jobs fail to
    start without), ``False`` = never. ``cgroup_parent`` forces the cgroup v2 directory to create
    job cgroups in. ``kill_grace_seconds``: between SIGTERM and SIGKILL on timeout or cancel.
    ``drain_timeout_seconds`` bounds how long output is awaited after the job's processes are
    gone (a pipe held open by an escaped process is then closed). ``launcher_python`` runs
    :mod:`.launch` (any Python 3.11+; it only needs the standard library).
    """

    name = "process"

    def __init__(
        self,
        *,
        run_as: str | int | None | _Auto = AUTO,
        use_bwrap: bool | None = None,
        use_cgroups: bool | None = None,
        cgroup_parent: Path | None = None,
        kill_grace_seconds: float = 5.0,
        drain_timeout_seconds: float = 10.0,
        launcher_python: str = sys.executable,
    ) -> None:
        if isinstance(run_as, _Auto):
            run_as = "nobody" if os.geteuid() == 0 else None
        self._user = resolve_user(run_as) if run_as is not None else None
        if self._user is not None and self._user.uid == os.geteuid():
            self._user = None
        if self._user is not None and os.geteuid() != 0:
            raise RunnerError(f"Running jobs as {self._user.name} requires the agent to be root.")
        self._use_bwrap = use_bwrap
        self._use_cgroups = use_cgroups
        self._cgroup_parent = cgroup_parent
        self._kill_grace = kill_grace_seconds
        self._drain_timeout = drain_timeout_seconds
        self._python = launcher_python
        self._jobs: dict[str, RunningJob] = {}
        self._setup: HostSetup | None = None
        self._setup_lock = asyncio.Lock()

    async def detect(self) -> HostSetup:
        """Detect (once, then cached) the job user, bubblewrap and cgroups on this host."""
        async with self._setup_lock:
            if self._setup is None:
                self._setup = await asyncio.to_thread(self._detect_blocking)
                logger.info("process runner: %s", self._setup.describe())
        return self._setup

    async def run(self, spec: RunSpec, sink: OutputSink) -> RunResult:
        started = time.monotonic()
        if spec.job_id in self._jobs:
            return start_failed(spec, started, f"Job {spec.job_id} is already running here.")
        job = RunningJob(spec)
        self._jobs[spec.job_id] = job
        try:
            try:
                argv, config = await self._prepare(job)
            except (RunnerError, OSError) as error:
                return start_failed(spec, started, str(error))
            try:
                return await self._execute(job, argv, config, sink, started)
            finally:
                await remove_cgroup(job.cgroup)
        finally:
            del self._jobs[spec.job_id]

    async def cancel(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            job.request_stop(FailureReason.CANCELLED)

    # ------------------------------------------------------------ preparation

    def _detect_blocking(self) -> HostSetup:
        bwrap, problem = self._detect_bwrap()
        cgroups = None if self._use_cgroups is False else detect_cgroups(self._cgroup_parent)
        return HostSetup(user=self._user, bwrap=bwrap, bwrap_problem=problem, cgroups=cgroups)

    def _detect_bwrap(self) -> tuple[str | None, str | None]:
        """``(bwrap path, None)`` if usable, else ``(None, why not)``."""
        if self._use_bwrap is False:
            return None, "disabled"
        bwrap = find_bwrap()
        if bwrap is None:
            return None, "not installed"
        uid, gid = (self._user.uid, self._user.gid) if self._user else (None, None)
        problem = probe_bwrap(bwrap, uid=uid, gid=gid)
        return (None, problem) if problem else (bwrap, None)

    async def _prepare(self, job: RunningJob) -> tuple[list[str], dict[str, Any]]:
        """Check the spec, make the work dir and cgroup; the launcher's argv and configuration."""
        spec = job.spec
        setup = await self.detect()
        validate_spec(spec)
        if self._use_bwrap and setup.bwrap is None:
            raise RunnerError(f"bubblewrap is required but unusable: {setup.bwrap_problem}.")
        if self._use_cgroups and setup.cgroups is None:
            raise RunnerError("cgroups are required but none is writable on this host.")
        job.uses_bwrap = setup.bwrap is not None
        await asyncio.to_thread(
            prepare_workdir, spec.workdir, setup.user, private_tmp=job.uses_bwrap
        )
        if setup.cgroups is not None:
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.job_id)[:64]
            job.cgroup = JobCgroup.create(setup.cgroups, name, spec.limits)
        # RLIMIT_NPROC counts every process of the uid, across jobs sharing it: use it only when
        # no pids cgroup limits this job alone.
        limit_nproc = job.cgroup is None or not job.cgroup.limits_pids
        if limit_nproc and spec.limits.max_processes is not None:
            job.nproc_uid = setup.user.uid if setup.user else os.geteuid()
        command = sandbox_command(setup.bwrap, spec) if setup.bwrap else list(spec.command)
        config = {
            "cgroup_procs": job.cgroup.procs_files if job.cgroup else [],
            "rlimits": rlimits(spec.limits, limit_nproc=limit_nproc),
            "uid": setup.user.uid if setup.user else None,
            "gid": setup.user.gid if setup.user else None,
            "no_new_privs": not job.uses_bwrap,
            "workdir": str(spec.workdir),
            "argv": command,
            "env": job_environment(spec, private_tmp=job.uses_bwrap),
        }
        argv = [self._python, "-I", "-S", str(LAUNCHER)]
        return argv, config

    # ------------------------------------------------------------ execution

    async def _execute(
        self,
        job: RunningJob,
        argv: list[str],
        config: dict[str, Any],
        sink: OutputSink,
        started: float,
    ) -> RunResult:
        spec = job.spec
        if job.stop_requested.is_set():
            return finished(spec, started, None, FailureReason.CANCELLED, "Cancelled on request.")
        if job.nproc_uid is not None and spec.limits.max_processes is not None:
            # Zombies count against RLIMIT_NPROC until their parent (init, for a killed job's
            # orphans) reaps them; on some hosts that takes seconds. Give them that time.
            await procs.wait_for_process_room(job.nproc_uid, limit=spec.limits.max_processes)
        config_fd = _config_file(config)
        status_read, status_write = os.pipe()
        try:
            process = subprocess.Popen(
                [*argv, str(config_fd), str(status_write)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(config_fd, status_write),
                env={"LANG": "C.UTF-8"},
                cwd="/",
            )
        except OSError as error:
            os.close(status_read)
            return start_failed(spec, started, f"Could not start the launcher: {error}")
        finally:
            os.close(config_fd)
            os.close(status_write)
        job.pid = process.pid
        try:
            ended = await self._supervise(job, process, sink)
            start_error = os.read(status_read, 4096).decode("utf-8", "replace")
        except BaseException:
            # run() was cancelled (or something broke): never leave the job behind.
            await asyncio.shield(kill_and_reap(job, process))
            raise
        finally:
            os.close(status_read)
        if job.sink_error is not None:
            raise job.sink_error
        return self._result(job, ended, start_error, started)

    async def _supervise(
        self, job: RunningJob, process: subprocess.Popen[bytes], sink: OutputSink
    ) -> _Exit:
        """Stream output, enforce the wall clock and stop requests, reap, kill leftovers, drain."""
        assert process.stdout is not None and process.stderr is not None
        tail = OutputTail()
        readers: list[tuple[asyncio.StreamReader, asyncio.BaseTransport]] = []
        pumps: list[asyncio.Task[None]] = []
        exit_task: asyncio.Task[tuple[int, Any]] | None = None
        try:
            readers.append(await open_pipe_reader(process.stdout))
            readers.append(await open_pipe_reader(process.stderr))
            pumps.append(asyncio.create_task(self._pump(job, readers[0][0], "stdout", sink, None)))
            pumps.append(asyncio.create_task(self._pump(job, readers[1][0], "stderr", sink, tail)))
            agent_peak = _own_peak_rss()
            exit_task = asyncio.create_task(procs.wait_for_exit(process.pid))
            await self._wait_or_stop(job, exit_task)
            status, usage = await exit_task
            process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            leftovers = await procs.kill_until_gone(job.find_processes)
            if leftovers:
                logger.error("job %s: processes %s survived SIGKILL", job.spec.job_id, leftovers)
            await self._drain(pumps, [transport for _, transport in readers])
        finally:  # on success all of these are done already
            for task in pumps:
                task.cancel()
            if exit_task is not None:
                exit_task.cancel()
            for _, transport in readers:
                transport.close()
        cpu = usage.ru_utime + usage.ru_stime
        return _Exit(status, cpu, _job_max_rss(usage.ru_maxrss * 1024, agent_peak), tail.lines())

    async def _wait_or_stop(self, job: RunningJob, exit_task: asyncio.Task[Any]) -> None:
        """Return when the main process has exited, or stop the job first (timeout, cancel)."""
        stop_task = asyncio.create_task(job.stop_requested.wait())
        try:
            done, _ = await asyncio.wait(
                {exit_task, stop_task},
                timeout=job.spec.limits.wall_clock_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop_task.cancel()
        if exit_task in done:
            return
        job.request_stop(FailureReason.TIMEOUT)  # keeps an earlier CANCELLED
        job.stopped_by = job.stop_reason
        procs.signal_processes(job.find_processes(spare_sandbox=True), signal.SIGTERM)
        await asyncio.wait({exit_task}, timeout=self._kill_grace)
        while not exit_task.done():
            job.kill_all()
            await asyncio.wait({exit_task}, timeout=0.05)

    async def _pump(
        self,
        job: RunningJob,
        reader: asyncio.StreamReader,
        stream: str,
        sink: OutputSink,
        tail: OutputTail | None,
    ) -> None:
        try:
            await pump_lines(reader, stream, sink, tail)
        except Exception as error:  # the sink failed: stop the job, re-raise from run()
            job.sink_error = error
            job.request_stop(FailureReason.CANCELLED)

    async def _drain(
        self, pumps: list[asyncio.Task[None]], transports: list[asyncio.BaseTransport]
    ) -> None:
        _, pending = await asyncio.wait(pumps, timeout=self._drain_timeout)
        if pending:
            # An escaped process still holds a pipe: stop reading; what is buffered still arrives.
            for transport in transports:
                transport.close()
            await asyncio.wait(pending)

    # ------------------------------------------------------------ results

    def _result(self, job: RunningJob, ended: _Exit, start_error: str, started: float) -> RunResult:
        spec = job.spec
        if start_error:
            return start_failed(spec, started, f"Could not start the job: {start_error}.")
        exit_code = os.waitstatus_to_exitcode(ended.status)
        if job.uses_bwrap:
            if exit_code == 1 and ended.stderr_tail[-1:] and _is_bwrap_error(ended.stderr_tail):
                return start_failed(
                    spec, started, f"Could not start the job: {ended.stderr_tail[-1]}"
                )
            if 128 < exit_code < 128 + signal.NSIG:
                exit_code = 128 - exit_code  # bwrap reports death by signal N as 128 + N
        cgroup = job.cgroup
        cpu = cgroup.cpu_seconds() if cgroup else None
        peak = cgroup.peak_memory_bytes() if cgroup else None
        facts = ExitFacts(
            exit_code=exit_code,
            limits=spec.limits,
            stopped_by=job.stopped_by,
            oom_kills=cgroup.oom_kills() if cgroup else 0,
            pids_limit_hits=cgroup.pids_limit_hits() if cgroup else 0,
            cpu_seconds=cpu if cpu is not None else ended.cpu_seconds,
            stderr_tail=ended.stderr_tail,
        )
        reason, message = classify(facts)
        return finished(
            spec,
            started,
            exit_code,
            reason,
            message,
            peak_memory_bytes=peak or ended.max_rss_bytes,
            cpu_seconds=facts.cpu_seconds,
        )


def _is_bwrap_error(stderr_tail: list[str]) -> bool:
    return stderr_tail[-1].startswith("bwrap: ")


def _config_file(config: dict[str, Any]) -> int:
    """The launcher's configuration in an anonymous in-memory file (never on a command line,
    never on disk), positioned at its start; the caller closes it."""
    descriptor = os.memfd_create("peergpu-job-config")
    with open(descriptor, "wb", closefd=False) as handle:
        handle.write(json.dumps(config).encode())
    os.lseek(descriptor, 0, os.SEEK_SET)
    return descriptor


def _job_max_rss(max_rss: int, agent_peak: int | None) -> int | None:
    """``wait4``'s peak RSS if it is the job's: a forked child starts with its parent's memory
    counted (with vfork, the parent's peak), so a value not above the agent's own peak may be
    the agent's and says nothing about the job."""
    if agent_peak is None or max_rss <= agent_peak:
        return None
    return max_rss


def _own_peak_rss() -> int | None:
    """This process's peak resident memory (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
