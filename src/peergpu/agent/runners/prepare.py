"""Everything the process runner does before starting a job: checking the spec, the job's user,
its work dir, its environment and its rlimits. Blocking file-system work; call it in a thread.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from peergpu.agent.runners.base import ResourceLimits, RunnerError, RunSpec

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
GPU_ID = re.compile(r"[0-9]+|(?:GPU|MIG)-[A-Za-z0-9/-]+")  # an index, or an NVIDIA UUID

#: The PATH a job starts with (it may set its own in ``spec.env``).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: RLIMIT_CPU: SIGXCPU at the limit, SIGKILL this many seconds of CPU later.
CPU_KILL_GRACE_SECONDS = 2


@dataclass(frozen=True, slots=True)
class JobUser:
    """The unprivileged account a job runs as."""

    name: str
    uid: int
    gid: int


def validate_spec(spec: RunSpec) -> None:
    """Refuse a spec that cannot be run safely; raises :class:`RunnerError`."""
    if not spec.job_id or "\0" in spec.job_id or "/" in spec.job_id:
        raise RunnerError(f"Invalid job id {spec.job_id!r}.")
    if not spec.command:
        raise RunnerError("The command is empty.")
    if any("\0" in arg for arg in spec.command):
        raise RunnerError("The command contains a NUL character.")
    validate_env(spec.env)
    validate_gpu_ids(spec.gpu_ids)
    if not spec.workdir.is_absolute():
        raise RunnerError(f"The work dir must be an absolute path, not {spec.workdir}.")


def validate_env(env: dict[str, str]) -> None:
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise RunnerError(
                f"Invalid environment variable name {name!r}: use letters, digits and '_', "
                "not starting with a digit."
            )
        if "\0" in value:
            raise RunnerError(f"The value of environment variable {name} contains a NUL.")


def validate_gpu_ids(gpu_ids: tuple[str, ...]) -> None:
    for gpu_id in gpu_ids:
        if not GPU_ID.fullmatch(gpu_id):
            raise RunnerError(f"Invalid GPU id {gpu_id!r}: use an index or a GPU/MIG UUID.")


def resolve_user(run_as: str | int) -> JobUser:
    """Look up a user by name or uid (a uid without passwd entry runs with gid = uid)."""
    try:
        entry = pwd.getpwnam(run_as) if isinstance(run_as, str) else pwd.getpwuid(run_as)
    except KeyError:
        if isinstance(run_as, int):
            return JobUser(name=str(run_as), uid=run_as, gid=run_as)
        raise RunnerError(f"The job user {run_as!r} does not exist on this host.") from None
    return JobUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def prepare_workdir(workdir: Path, user: JobUser | None, *, private_tmp: bool) -> None:
    """Create the work dir (or adopt one the caller filled), ``outputs/`` and, without a private
    /tmp, ``.tmp/``; hand everything to the job's user; check that user can reach it."""
    if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
        raise RunnerError(f"The work dir {workdir} exists and is not a directory.")
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    subdirs = ["outputs"] if private_tmp else ["outputs", ".tmp"]
    for name in subdirs:
        path = workdir / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise RunnerError(f"{path} exists and is not a directory.")
        path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(workdir, 0o700)
    if user is not None:
        chown_tree(workdir, user.uid, user.gid)
        check_reachable(workdir, user)


def check_reachable(path: Path, user: JobUser) -> None:
    """Raise :class:`RunnerError` if ``user`` cannot traverse every directory above ``path``."""
    for ancestor in reversed(path.parents):
        info = ancestor.stat()
        if info.st_uid == user.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == user.gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            raise RunnerError(
                f"The job user {user.name} cannot reach {path}: {ancestor} has mode "
                f"{stat.S_IMODE(info.st_mode):04o}. Put job work dirs under a directory others "
                "may traverse (e.g. mode 0711)."
            )


def job_environment(spec: RunSpec, *, private_tmp: bool) -> dict[str, str]:
    """The job's environment: a scrubbed base, ``spec.env`` over it, then the names a job cannot
    override: ``PEERGPU_JOB_ID`` (it also marks the job's processes), ``PEERGPU_WORKDIR`` and
    ``PEERGPU_OUTPUT_DIR``."""
    workdir = str(spec.workdir)
    visible_gpus = ",".join(spec.gpu_ids)
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": workdir,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp" if private_tmp else str(spec.workdir / ".tmp"),
        "PYTHONUNBUFFERED": "1",  # live logs from Python jobs writing to a pipe
        "CUDA_VISIBLE_DEVICES": visible_gpus,
        "NVIDIA_VISIBLE_DEVICES": visible_gpus or "void",
    }
    env.update(spec.env)
    env.update(
        PEERGPU_JOB_ID=spec.job_id,
        PEERGPU_WORKDIR=workdir,
        PEERGPU_OUTPUT_DIR=str(spec.workdir / "outputs"),
    )
    return env


def rlimits(limits: ResourceLimits, *, limit_nproc: bool) -> list[tuple[str, int, int]]:
    """``(RLIMIT name, soft, hard)`` triples for the launcher; -1 means unlimited."""
    result = [
        ("RLIMIT_CORE", 0, 0),
        ("RLIMIT_NOFILE", limits.max_open_files, limits.max_open_files),
    ]
    if limits.memory_bytes is not None:
        result.append(("RLIMIT_DATA", limits.memory_bytes, limits.memory_bytes))
    if limits.cpu_seconds is not None:
        hard = limits.cpu_seconds + CPU_KILL_GRACE_SECONDS
        result.append(("RLIMIT_CPU", limits.cpu_seconds, hard))
    if limits.max_file_bytes is not None:
        result.append(("RLIMIT_FSIZE", limits.max_file_bytes, limits.max_file_bytes))
    if limit_nproc and limits.max_processes is not None:
        result.append(("RLIMIT_NPROC", limits.max_processes, limits.max_processes))
    return result


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give ``root`` and everything below it to ``uid:gid`` (symlinks themselves, not targets)."""
    os.chown(root, uid, gid, follow_symlinks=False)
    for directory, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)
