"""Safe local paths for downloaded artifacts, and writing one download to disk with checks.

The artifact list comes from the server, and the files were named by the job: neither is trusted
to choose where bytes land. :func:`safe_destination` refuses absolute paths, drive letters,
backslashes, control characters and ``..`` components, and then checks that the resolved path is
still inside the destination (which also catches a symbolic link already sitting in it).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from peergpu.client.errors import DownloadError, UnsafePath

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PART_SUFFIX = ".peergpu-part"


def safe_destination(dest_dir: Path, relative: str) -> Path:
    """Where the artifact ``relative`` goes under ``dest_dir``; :class:`UnsafePath` if it would
    land anywhere else."""
    if not relative or _CONTROL.search(relative) or "\\" in relative:
        raise UnsafePath(f"refusing artifact path {relative!r}: empty or unusual characters")
    if relative.startswith("/") or _DRIVE.match(relative):
        raise UnsafePath(f"refusing artifact path {relative!r}: it is absolute")
    parts = [p for p in PurePosixPath(relative).parts if p != "."]
    if not parts or ".." in parts:
        raise UnsafePath(f"refusing artifact path {relative!r}: it leaves the destination")
    root = dest_dir.resolve()
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root) or target.resolve() == root:
        raise UnsafePath(f"refusing artifact path {relative!r}: it leaves the destination")
    return target


def write_verified(
    chunks: Iterable[bytes],
    target: Path,
    *,
    size: int,
    sha256: str,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Stream ``chunks`` to ``target`` through a temporary file next to it, then rename it into
    place only if the size and SHA-256 match; otherwise remove it and raise DownloadError."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + PART_SUFFIX)
    digest = hashlib.sha256()
    written = 0
    try:
        with part.open("wb") as out:
            for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise DownloadError(f"{target.name}: more bytes than the {size} announced")
                digest.update(chunk)
                out.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        if written != size:
            raise DownloadError(f"{target.name}: got {written} bytes, expected {size}")
        if digest.hexdigest() != sha256.lower():
            raise DownloadError(f"{target.name}: SHA-256 mismatch (the file is corrupt)")
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
