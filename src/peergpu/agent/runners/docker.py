"""The docker runner: a job as a locked-down container.

:func:`build_docker_command` is the whole security policy and is unit-tested flag by flag: no
network unless asked, read-only root file system with a tmpfs /tmp, all capabilities dropped,
no-new-privileges, a non-root user, memory (no swap), process, open-file, file-size and CPU-time
limits, only the job's GPUs, the work dir at ``/workspace`` and ``outputs/`` at ``/outputs``,
and no log copy kept by the daemon (the agent streams the output itself). Everything is passed as
argv, never through a shell, and the image, env names, GPU ids and paths are validated first.

Note that ``-e NAME=VALUE`` puts the job's environment on the docker client's command line, which
other local users of the host can read in /proc; the alternative (``-e NAME`` with the value in
the client's environment) would let a job's ``LD_PRELOAD`` reach the root-run client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import time
from pathlib import Path

from peergpu.agent.runners.base import (
    MAX_LINE_BYTES,
    FailureReason,
    OutputSink,
    Runner,
    RunnerError,
    RunResult,
    RunSpec,
)
from peergpu.agent.runners.outcome import (
    ExitFacts,
    classify,
    finished,
    format_bytes,
    start_failed,
)
from peergpu.agent.runners.prepare import chown_tree, validate_env, validate_gpu_ids
from peergpu.agent.runners.streams import OutputTail, pump_lines

_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# A first component is a registry only if it has a dot or a port, or is localhost (as docker reads
# it); otherwise it is part of the (lower-case) repository path.
_REGISTRY = (
    rf"(?:localhost(?::[0-9]+)?|{_DOMAIN_PART}(?:\.{_DOMAIN_PART})+(?::[0-9]+)?"
    rf"|{_DOMAIN_PART}:[0-9]+)"
)
IMAGE_REFERENCE = re.compile(
    rf"(?:{_REGISTRY}/)?"  # registry[:port]/
    rf"{_PATH_PART}(?:/{_PATH_PART})*"  # name
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"  # :tag
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"  # @digest
)
_CONTAINER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]+")
_USER = re.compile(r"[0-9]+(?::[0-9]+)?")
_MOUNT_UNSAFE = re.compile(r"[,\"'=\n\r\0]")


def validate_image(image: str) -> str:
    """Return ``image`` if it is a plain image reference; raise :class:`RunnerError` if not."""
    if image.startswith("-") or len(image) > 512 or not IMAGE_REFERENCE.fullmatch(image):
        raise RunnerError(f"Invalid image reference {image!r}.")
    return image


def container_name_for(job_id: str) -> str:
    """A stable, valid container name for a job (a hash keeps sanitized ids distinct)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", job_id)[:48]
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
    return f"peergpu-{cleaned}-{digest}"


def build_docker_command(
    spec: RunSpec,
    *,
    container_name: str,
    user: str = "65534:65534",
    cpus: float | None = None,
    docker: str = "docker",
) -> list[str]:
    """The ``docker run`` argv for ``spec``; raises :class:`RunnerError` for an unsafe spec."""
    if spec.image is None:
        raise RunnerError("The docker runner needs an image.")
    image = validate_image(spec.image)
    if not _CONTAINER_NAME.fullmatch(container_name):
        raise RunnerError(f"Invalid container name {container_name!r}.")
    if not _USER.fullmatch(user):
        raise RunnerError(f"The container user must be numeric uid[:gid], not {user!r}.")
    if any("\0" in arg for arg in spec.command):
        raise RunnerError("The command contains a NUL character.")
    validate_env(spec.env)
    workdir, outputs = _mount_source(spec.workdir), _mount_source(spec.workdir / "outputs")
    command = [docker, "run", "--rm", "--name", container_name, "--init"]
    command += ["--log-driver", "none"]
    command += _gpu_flags(spec.gpu_ids)
    command += _limit_flags(spec, cpus)
    if not spec.network:
        command += ["--network", "none"]
    command += ["--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev"]
    command += ["--mount", f"type=bind,src={workdir},dst=/workspace"]
    command += ["--mount", f"type=bind,src={outputs},dst=/outputs"]
    command += ["-w", "/workspace"]
    command += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", user]
    for name, value in _container_env(spec).items():
        command += ["-e", f"{name}={value}"]
    return [*command, image, *spec.command]


class DockerRunner(Runner):
    """Runs each job with ``docker run`` (see :func:`build_docker_command`).

    ``pull``: ``docker pull`` the image first (its progress is not part of the job's output). On
    timeout or cancel the container gets ``docker stop`` (SIGTERM, ``kill_grace_seconds``,
    SIGKILL), then ``docker kill`` if it is still there.
    """

    name = "docker"

    def __init__(
        self,
        *,
        docker: str = "docker",
        user: str = "65534:65534",
        cpus: float | None = None,
        pull: bool = True,
        kill_grace_seconds: float = 5.0,
        pull_timeout_seconds: float = 1800.0,
    ) -> None:
        self._docker = docker
        self._user = user
        self._cpus = cpus
        self._pull = pull
        self._kill_grace = kill_grace_seconds
        self._pull_timeout = pull_timeout_seconds
        self._stops: dict[str, asyncio.Event] = {}

    async def run(self, spec: RunSpec, sink: OutputSink) -> RunResult:
        started = time.monotonic()
        if spec.job_id in self._stops:
            return start_failed(spec, started, f"Job {spec.job_id} is already running here.")
        stop = self._stops[spec.job_id] = asyncio.Event()
        try:
            name = container_name_for(spec.job_id)
            try:
                command = build_docker_command(
                    spec, container_name=name, user=self._user, cpus=self._cpus, docker=self._docker
                )
                await asyncio.to_thread(self._prepare_workdir, spec.workdir)
                if self._pull:
                    await self._pull_image(spec.image or "")
            except (RunnerError, OSError) as error:
                return start_failed(spec, started, str(error))
            if stop.is_set():
                return finished(
                    spec, started, None, FailureReason.CANCELLED, "Cancelled on request."
                )
            return await self._execute(spec, command, name, stop, sink, started)
        finally:
            del self._stops[spec.job_id]

    async def cancel(self, job_id: str) -> None:
        stop = self._stops.get(job_id)
        if stop is not None:
            stop.set()

    async def _execute(
        self,
        spec: RunSpec,
        command: list[str],
        name: str,
        stop: asyncio.Event,
        sink: OutputSink,
        started: float,
    ) -> RunResult:
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=MAX_LINE_BYTES,
            )
        except OSError as error:
            return start_failed(spec, started, f"Could not run {self._docker}: {error}")
        assert process.stdout is not None and process.stderr is not None
        tail = OutputTail()
        sink_errors: list[Exception] = []
        pumps = asyncio.gather(
            _pump(process.stdout, "stdout", sink, None, stop, sink_errors),
            _pump(process.stderr, "stderr", sink, tail, stop, sink_errors),
        )
        try:
            stopped_by = await self._wait_or_stop(spec, process, name, stop)
            await pumps
        except BaseException:
            pumps.cancel()
            await asyncio.shield(self._force_stop(process, name))
            raise
        if sink_errors:
            raise sink_errors[0]
        return _classify(spec, started, process.returncode or 0, stopped_by, tail)

    async def _wait_or_stop(
        self, spec: RunSpec, process: asyncio.subprocess.Process, name: str, stop: asyncio.Event
    ) -> FailureReason | None:
        waiter = asyncio.create_task(process.wait())
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, stopper},
                timeout=spec.limits.wall_clock_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopper.cancel()
        if waiter in done:
            return None
        reason = FailureReason.CANCELLED if stop.is_set() else FailureReason.TIMEOUT
        grace = max(1, round(self._kill_grace))
        await self._docker_quietly("stop", "--time", str(grace), name, timeout=grace + 15)
        await asyncio.wait({waiter}, timeout=5)
        if not waiter.done():
            await self._force_stop(process, name)
        await waiter
        return reason

    async def _force_stop(self, process: asyncio.subprocess.Process, name: str) -> None:
        await self._docker_quietly("kill", name, timeout=15)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def _docker_quietly(self, *args: str, timeout: float) -> int | None:
        """Run a docker subcommand, discarding its output; its exit code or ``None``."""
        try:
            helper = await asyncio.create_subprocess_exec(
                self._docker,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            return None
        try:
            return await asyncio.wait_for(helper.wait(), timeout)
        except TimeoutError:
            helper.kill()
            await helper.wait()
            return None

    async def _pull_image(self, image: str) -> None:
        helper = await asyncio.create_subprocess_exec(
            self._docker,
            "pull",
            "--quiet",
            image,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(helper.communicate(), self._pull_timeout)
        except TimeoutError:
            helper.kill()
            await helper.wait()
            raise RunnerError(
                f"Pulling {image} took longer than {self._pull_timeout:g} s."
            ) from None
        if helper.returncode != 0:
            detail = stderr.decode("utf-8", "replace").strip()[-500:]
            raise RunnerError(f"Could not pull {image}: {detail or 'docker pull failed'}")

    def _prepare_workdir(self, workdir: Path) -> None:
        """Create the work dir and ``outputs/`` (or adopt a work dir the caller filled) for the
        container's numeric user: owned by it when the agent is root, else its directories
        world-writable (the files the caller put there stay world-readable, mode 0644)."""
        if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
            raise RunnerError(f"The work dir {workdir} exists and is not a directory.")
        outputs = workdir / "outputs"
        if outputs.is_symlink():
            raise RunnerError(f"{outputs} is a symlink.")
        outputs.mkdir(parents=True, exist_ok=True)
        uid, _, gid = self._user.partition(":")
        if os.geteuid() == 0:
            chown_tree(workdir, int(uid), int(gid or uid))
            os.chmod(workdir, 0o700)
        else:
            for directory, _, _ in os.walk(workdir):  # never follows symlinks
                os.chmod(directory, 0o777)


async def _pump(
    reader: asyncio.StreamReader,
    stream: str,
    sink: OutputSink,
    tail: OutputTail | None,
    stop: asyncio.Event,
    errors: list[Exception],
) -> None:
    """Pump one stream; if the sink fails, remember why and stop the container."""
    try:
        await pump_lines(reader, stream, sink, tail)
    except Exception as error:
        errors.append(error)
        stop.set()


def _gpu_flags(gpu_ids: tuple[str, ...]) -> list[str]:
    if not gpu_ids:
        return []
    validate_gpu_ids(gpu_ids)
    devices = ",".join(gpu_ids)
    # --gpus takes CSV: several ids must be quoted so the commas are not read as separators.
    return ["--gpus", f'"device={devices}"' if len(gpu_ids) > 1 else f"device={devices}"]


def _limit_flags(spec: RunSpec, cpus: float | None) -> list[str]:
    limits = spec.limits
    flags: list[str] = []
    if limits.memory_bytes is not None:
        flags += ["--memory", f"{limits.memory_bytes}b", "--memory-swap", f"{limits.memory_bytes}b"]
    if cpus is not None:
        flags += ["--cpus", f"{cpus:g}"]
    if limits.max_processes is not None:
        flags += ["--pids-limit", str(limits.max_processes)]
    flags += ["--ulimit", f"nofile={limits.max_open_files}:{limits.max_open_files}"]
    flags += ["--ulimit", "core=0:0"]
    if limits.max_file_bytes is not None:
        flags += ["--ulimit", f"fsize={limits.max_file_bytes}:{limits.max_file_bytes}"]
    if limits.cpu_seconds is not None:
        flags += ["--ulimit", f"cpu={limits.cpu_seconds}:{limits.cpu_seconds + 2}"]
    return flags


def _container_env(spec: RunSpec) -> dict[str, str]:
    env = {"HOME": "/workspace", "PYTHONUNBUFFERED": "1"}
    env.update(spec.env)
    env.update(
        PEERGPU_JOB_ID=spec.job_id,
        PEERGPU_WORKDIR="/workspace",
        PEERGPU_OUTPUT_DIR="/outputs",
    )
    return env


def _mount_source(path: Path) -> str:
    text = str(path)
    if not path.is_absolute() or _MOUNT_UNSAFE.search(text):
        raise RunnerError(f"The work dir path {text!r} cannot be used as a docker mount.")
    return text


def _classify(
    spec: RunSpec,
    started: float,
    docker_exit: int,
    stopped_by: FailureReason | None,
    tail: OutputTail,
) -> RunResult:
    lines = tail.lines()
    if docker_exit == 125 and stopped_by is None:
        detail = lines[-1] if lines else "docker run failed"
        return start_failed(spec, started, f"Could not start the container: {detail}")
    # docker reports a container killed by signal N as 128 + N.
    exit_code = 128 - docker_exit if 128 < docker_exit < 128 + signal.NSIG else docker_exit
    facts = ExitFacts(
        exit_code=exit_code, limits=spec.limits, stopped_by=stopped_by, stderr_tail=lines
    )
    reason, message = classify(facts)
    memory = spec.limits.memory_bytes
    if reason is FailureReason.KILLED_BY_SIGNAL and exit_code == -signal.SIGKILL and memory:
        message = (
            "Killed by SIGKILL; in a container this usually means it exceeded its "
            f"{format_bytes(memory)} memory limit."
        )
    return finished(spec, started, exit_code, reason, message)
