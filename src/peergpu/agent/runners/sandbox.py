"""Bubblewrap (``bwrap``) isolation for the process runner.

Inside the sandbox a job sees: the host's file system read-only; a private ``/tmp``, ``/dev/shm``
and minimal ``/dev`` and ``/proc``; its own work dir read-write at the same path (sibling work dirs
hidden under a tmpfs); no network unless the spec asks for it (``--unshare-net``; ``/run`` is then
hidden as well); its own pid, IPC and UTS namespaces, so that when its main process ends every
process it started dies with it (``--unshare-pid``); ``--die-with-parent`` so that the sandbox dies
if the agent does; ``--new-session`` against terminal injection.

GPU device nodes are bound in only when the job has GPUs; which GPU it uses is then selected by
``CUDA_VISIBLE_DEVICES`` (advisory: the docker runner gives hard device isolation).

bwrap runs after the launcher has dropped root, so it works unprivileged through user namespaces;
:func:`probe_bwrap` checks once that this works on the host.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path

from peergpu.agent.runners.base import RunSpec

_NVIDIA_SHARED_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)


def find_bwrap() -> str | None:
    """The path of ``bwrap`` on ``PATH`` (or the usual system locations), or ``None``."""
    return shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")


def probe_bwrap(bwrap: str, *, uid: int | None, gid: int | None) -> str | None:
    """Run a trivial sandbox as the job's user; ``None`` if it works, else why it does not."""
    argv = [*sandbox_prefix(bwrap, workdir=Path("/"), network=False, gpu_ids=()), "true"]
    try:
        completed = subprocess.run(
            argv,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
            env={"PATH": "/usr/bin:/bin"},
        )
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    if completed.returncode != 0:
        return completed.stderr.decode("utf-8", "replace").strip() or f"exit {completed.returncode}"
    return None


def sandbox_command(bwrap: str, spec: RunSpec) -> list[str]:
    """The argv that runs ``spec.command`` inside a bubblewrap sandbox."""
    prefix = sandbox_prefix(bwrap, workdir=spec.workdir, network=spec.network, gpu_ids=spec.gpu_ids)
    return [*prefix, *spec.command]


def sandbox_prefix(
    bwrap: str, *, workdir: Path, network: bool, gpu_ids: tuple[str, ...]
) -> list[str]:
    """bwrap and its options up to and including the ``--`` before the command."""
    args = [
        bwrap,
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if not network:
        args.append("--unshare-net")
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    args += ["--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    if not network:
        args += ["--tmpfs", "/run"]
    for node in _gpu_device_nodes(gpu_ids):
        args += ["--dev-bind", node, node]
    workdir_text = str(workdir)
    if workdir != Path("/"):
        if len(workdir.parent.parts) >= 3:
            # Hide the other jobs' work dirs next to this one (they may share the job uid).
            args += ["--tmpfs", str(workdir.parent)]
        args += ["--bind", workdir_text, workdir_text]
    args += ["--chdir", workdir_text, "--"]
    return args


def _gpu_device_nodes(gpu_ids: tuple[str, ...]) -> list[str]:
    if not gpu_ids:
        return []
    shared = [node for node in _NVIDIA_SHARED_NODES if Path(node).exists()]
    if all(gpu_id.isdigit() for gpu_id in gpu_ids):
        per_gpu = [f"/dev/nvidia{gpu_id}" for gpu_id in gpu_ids]
        per_gpu = [node for node in per_gpu if Path(node).exists()]
    else:  # UUIDs: the index is not known here, so bind every GPU node
        per_gpu = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return shared + per_gpu
