"""Finding and killing every process of a job, by three independent means.

A job's processes are found by (1) its cgroup, where there is one: complete, even for daemons
that changed session and environment; (2) its session: the launcher starts a new session whose id
is the job's main pid, and children inherit it unless they call ``setsid``; (3) a marker in the
environment (``PEERGPU_JOB_ID=<id>``), which children inherit unless they exec with a clean
environment. Only a process that escapes all three (possible without cgroups and without
bubblewrap) can outlive its job; with bubblewrap, the pid namespace dies with the job as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path

_PROC = Path("/proc")


def find_processes(
    *,
    session_id: int | None,
    env_marker: bytes | None,
    extra: set[int] | None = None,
) -> set[int]:
    """Pids of live (non-zombie) processes in ``session_id`` or whose environment holds the
    ``env_marker`` entry (e.g. ``b"PEERGPU_JOB_ID=abc"``), plus ``extra``; never this process."""
    found = set(extra or ())
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _read_stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        if session_id is not None and stat[1] == session_id:
            found.add(pid)
        elif env_marker is not None and _has_env_entry(pid, env_marker):
            found.add(pid)
    found.discard(os.getpid())
    return {pid for pid in found if _is_alive(pid)}


def signal_processes(pids: set[int], signum: int) -> None:
    """Send ``signum`` to each pid, ignoring ones that are gone or not ours."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


async def kill_until_gone(
    find: Callable[[], set[int]], *, timeout: float = 5.0, interval: float = 0.02
) -> set[int]:
    """SIGKILL whatever ``find`` returns, again and again, until it returns nothing or ``timeout``
    passes (a fork bomb keeps forking between two scans; a pids limit makes this converge).
    Returns the pids still alive at the end (normally none)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pids = find()
        if not pids:
            return set()
        signal_processes(pids, signal.SIGKILL)
        if loop.time() >= deadline:
            return pids
        await asyncio.sleep(interval)


def _read_stat(pid: int) -> tuple[str, int] | None:
    """``(state, session id)`` of ``pid``, or ``None`` if it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ')': parse after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[3])
    except (IndexError, ValueError):
        return None


def _has_env_entry(pid: int, entry: bytes) -> bool:
    try:
        environ = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return entry in environ.split(b"\0")


async def wait_for_process_room(
    uid: int, *, limit: int, margin: int = 8, timeout: float = 5.0
) -> bool:
    """Wait until ``uid`` has fewer than ``limit - margin`` tasks (processes and threads, zombies
    included: all count against RLIMIT_NPROC), as long as some of them are zombies that their
    parent (init, for a killed job's orphans) may yet reap; ``False`` if there is still no room.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        tasks, zombies = _count_tasks(uid)
        if tasks + margin < limit:
            return True
        if not zombies or loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)


def _count_tasks(uid: int) -> tuple[int, int]:
    """``(tasks, zombies)`` owned by ``uid``; a task is a process or a thread."""
    tasks = zombies = 0
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":
            zombies += 1
            tasks += 1
        else:
            tasks += max(1, int(fields[17]))  # num_threads
    return tasks, zombies


def _is_alive(pid: int) -> bool:
    stat = _read_stat(pid)
    return stat is not None and stat[0] != "Z"


async def wait_for_exit(pid: int) -> tuple[int, resource.struct_rusage]:
    """Reap child ``pid`` and return its wait status and resource usage (``wait4``).

    Uses a pidfd so that no thread blocks (Linux 5.3+); falls back to a blocking ``wait4`` in a
    worker thread. If the awaiting task is cancelled, the child is left unreaped: the caller must
    kill it and wait again.
    """
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return await loop.run_in_executor(None, _blocking_wait4, pid)
    exited = asyncio.Event()
    loop.add_reader(pidfd, exited.set)
    try:
        while True:
            waited, status, usage = os.wait4(pid, os.WNOHANG)
            if waited:
                return status, usage
            await exited.wait()
            exited.clear()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _blocking_wait4(pid: int) -> tuple[int, resource.struct_rusage]:
    _, status, usage = os.wait4(pid, 0)
    return status, usage
