"""Per-job cgroups (v2, or v1 memory/pids/cpuacct), used where the host lets the agent write them.

A job cgroup gives what rlimits cannot: a memory limit for the whole process tree with reliable
OOM detection and peak usage, a process-count limit that does not depend on the uid, total CPU
time, and a complete list of the job's processes to kill at the end (daemons included).

:func:`detect_cgroups` looks at ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` and probes by
creating and removing a test cgroup next to the agent's own. It never raises: on a host where
nothing is writable (a container, no root, cgroup v2 without delegation) it returns ``None`` and
the runner falls back to rlimits. For cgroup v2 the agent's cgroup must have ``memory``/``pids`` in
``cgroup.subtree_control`` or allow enabling them (systemd: ``Delegate=yes`` and run the agent in
a leaf cgroup, passing its parent as ``cgroup_parent``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

from peergpu.agent.runners.base import ResourceLimits

logger = logging.getLogger(__name__)

_V1_CONTROLLERS = ("memory", "pids", "cpuacct")


@dataclass(frozen=True, slots=True)
class CgroupHost:
    """Where job cgroups go: one parent directory per controller (all the same for v2)."""

    version: int
    memory_parent: Path | None
    pids_parent: Path | None
    cpu_parent: Path | None

    def describe(self) -> str:
        parts = [
            f"{name} at {parent}"
            for name, parent in (
                ("memory", self.memory_parent),
                ("pids", self.pids_parent),
                ("cpu accounting", self.cpu_parent),
            )
            if parent is not None
        ]
        return f"cgroup v{self.version}: " + ", ".join(parts)


def detect_cgroups(parent: Path | None = None) -> CgroupHost | None:
    """Find where this process may create job cgroups; ``None`` if nowhere.

    ``parent`` forces the cgroup v2 directory under which job cgroups are created.
    """
    try:
        if parent is not None:
            return _probe_v2(parent)
        mounts = _cgroup_mounts()
        own = _own_cgroups()
        unified = mounts.get("cgroup2")
        if unified is not None and "" in own:
            found = _probe_v2(_join(unified, own[""]))
            if found is not None:
                return found
        return _probe_v1(mounts, own)
    except OSError as error:
        logger.info("cgroups unavailable: %s", error)
        return None


class JobCgroup:
    """The cgroup(s) of one job. All reads return ``None``/``0`` when a file is unreadable."""

    def __init__(self, host: CgroupHost, dirs: dict[str, Path]) -> None:
        self.host = host
        self._dirs = dirs

    @classmethod
    def create(cls, host: CgroupHost, name: str, limits: ResourceLimits) -> JobCgroup | None:
        """Create the job's cgroup(s) and write the limits; ``None`` (and nothing left behind) if
        that fails."""
        unique = f"peergpu-{name}-{secrets.token_hex(3)}"
        parents = {
            "memory": host.memory_parent,
            "pids": host.pids_parent,
            "cpu": host.cpu_parent,
        }
        dirs = {key: parent / unique for key, parent in parents.items() if parent is not None}
        cgroup = cls(host, dirs)
        try:
            for directory in set(dirs.values()):
                directory.mkdir()
            cgroup._write_limits(limits)
        except OSError as error:
            logger.warning("could not set up cgroup %s: %s", unique, error)
            cgroup.remove()
            return None
        return cgroup

    @property
    def limits_pids(self) -> bool:
        """Whether this cgroup can limit the job's process count."""
        return "pids" in self._dirs

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to in order to join."""
        return sorted({str(directory / "cgroup.procs") for directory in self._dirs.values()})

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in set(self._dirs.values()):
            text = _read(directory / "cgroup.procs") or ""
            found.update(int(item) for item in text.split())
        return found

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (atomically through ``cgroup.kill`` on v2)."""
        for directory in set(self._dirs.values()):
            kill_file = directory / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def peak_memory_bytes(self) -> int | None:
        directory = self._dirs.get("memory")
        if directory is None:
            return None
        name = "memory.peak" if self.host.version == 2 else "memory.max_usage_in_bytes"
        return _read_int(directory / name)

    def oom_kills(self) -> int:
        directory = self._dirs.get("memory")
        if directory is None:
            return 0
        name = "memory.events" if self.host.version == 2 else "memory.oom_control"
        return _read_key(directory / name, "oom_kill")

    def pids_limit_hits(self) -> int:
        """How many times a fork failed because of ``pids.max``."""
        directory = self._dirs.get("pids")
        return 0 if directory is None else _read_key(directory / "pids.events", "max")

    def cpu_seconds(self) -> float | None:
        directory = self._dirs.get("cpu")
        if directory is None:
            return None
        if self.host.version == 2:
            usec = _read_key(directory / "cpu.stat", "usage_usec")
            return usec / 1e6
        nanoseconds = _read_int(directory / "cpuacct.usage")
        return None if nanoseconds is None else nanoseconds / 1e9

    def remove(self) -> bool:
        """Remove the cgroup directories; ``False`` if one is still busy."""
        removed = True
        for directory in set(self._dirs.values()):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed

    def _write_limits(self, limits: ResourceLimits) -> None:
        memory, pids = self._dirs.get("memory"), self._dirs.get("pids")
        if memory is not None and limits.memory_bytes is not None:
            if self.host.version == 2:
                (memory / "memory.max").write_text(str(limits.memory_bytes))
                _try_write(memory / "memory.swap.max", "0")
            else:
                (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
                _try_write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        if pids is not None and limits.max_processes is not None:
            (pids / "pids.max").write_text(str(limits.max_processes))


# ---------------------------------------------------------------- detection helpers


def _probe_v2(parent: Path) -> CgroupHost | None:
    controllers = set((_read(parent / "cgroup.controllers") or "").split())
    wanted = controllers & {"memory", "pids"}
    if not wanted:
        return None
    enabled = set((_read(parent / "cgroup.subtree_control") or "").split())
    missing = wanted - enabled
    if missing:
        # Fails (EBUSY) if the agent's own cgroup holds processes: cgroup v2 only lets leaves
        # hold processes. Then there is nothing we may do here without moving the agent.
        _try_write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        enabled = set((_read(parent / "cgroup.subtree_control") or "").split())
    usable = wanted & enabled
    if not usable or not _can_create_child(parent):
        return None
    return CgroupHost(
        version=2,
        memory_parent=parent if "memory" in usable else None,
        pids_parent=parent if "pids" in usable else None,
        cpu_parent=parent,
    )


def _probe_v1(mounts: dict[str, Path], own: dict[str, str]) -> CgroupHost | None:
    parents: dict[str, Path | None] = {}
    for controller in _V1_CONTROLLERS:
        mount = mounts.get(controller)
        path = own.get(controller)
        candidate = None if mount is None or path is None else _join(mount, path)
        parents[controller] = candidate if candidate and _can_create_child(candidate) else None
    if parents["memory"] is None and parents["pids"] is None:
        return None
    return CgroupHost(
        version=1,
        memory_parent=parents["memory"],
        pids_parent=parents["pids"],
        cpu_parent=parents["cpuacct"],
    )


def _cgroup_mounts() -> dict[str, Path]:
    """Controller name (or ``"cgroup2"``) -> mount point, from ``/proc/self/mountinfo``.

    Mounts whose root is not the hierarchy root (bind-mounted sub-trees) are mapped back so that
    :func:`_join` can place the agent's own cgroup path under them.
    """
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, mount_point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if root != "/":
            continue  # a sub-tree of the hierarchy: our own path cannot be mapped reliably
        if tail[0] == "cgroup2":
            mounts.setdefault("cgroup2", mount_point)
        elif tail[0] == "cgroup":
            for option in tail[2].split(","):
                mounts.setdefault(option, mount_point)
    return mounts


def _own_cgroups() -> dict[str, str]:
    """Controller name (``""`` for v2) -> this process's cgroup path."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _can_create_child(parent: Path) -> bool:
    probe = parent / f"peergpu-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        probe.mkdir()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        probe.rmdir()
    return True


def _join(mount: Path, cgroup_path: str) -> Path:
    return mount / cgroup_path.lstrip("/")


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape") if "\\" in text else text


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text.strip())
    except ValueError:
        return None


def _read_key(path: Path, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file (``"name value"`` per line); 0 if none."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value.strip())
    return 0


def _try_write(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(value)
