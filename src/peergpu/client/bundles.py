"""Zip a directory into a job bundle that the server's checks accept, reproducibly.

The same tree always gives the same bytes (so the same content-addressed bundle): members in
sorted order, timestamps fixed at 1980-01-01, permissions normalised to 0644 (0755 when the owner
may execute the file, which the agent keeps). ``.git``, ``__pycache__``, ``.venv`` and
``node_modules`` folders are left out. Symbolic links that stay inside the tree are followed
(their targets' contents are stored, since bundles may not contain links); a link that leaves the
tree, or a loop of links, is refused with :class:`BundleError`, as are sockets and FIFOs.
Files are streamed into the archive in chunks: nothing is read whole into memory.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peergpu.client.errors import BundleError

#: folder names never bundled (version control, caches, virtual environments, npm installs)
SKIPPED_DIRS = frozenset({".git", "__pycache__", ".venv", "node_modules"})
ProgressCallback = Callable[[int, int], None]

_EPOCH = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class BundleFile:
    arcname: str
    source: Path
    size: int
    executable: bool


def zip_directory(
    directory: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write ``directory``'s contents to the zip file ``dest`` and return its path.

    ``progress(done_bytes, total_bytes)`` is called as file contents are written. Raises
    :class:`BundleError` for a missing directory, a link out of the tree, a link loop or a
    special file; ``dest`` is then not left behind."""
    root = Path(directory)
    if not root.is_dir():
        raise BundleError(f"{root} is not a directory")
    dest_path = Path(dest)
    files, empty_dirs = collect_files(root, exclude=dest_path)
    total = sum(f.size for f in files)
    done = 0
    if progress is not None:
        progress(0, total)
    try:
        with zipfile.ZipFile(dest_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for entry in _merge(files, empty_dirs):
                if isinstance(entry, str):
                    archive.writestr(_dir_info(entry), b"")
                    continue
                with entry.source.open("rb") as source, archive.open(_file_info(entry), "w") as out:
                    while chunk := source.read(_CHUNK):
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
    except BaseException:
        dest_path.unlink(missing_ok=True)
        raise
    return dest_path


def collect_files(root: Path, *, exclude: Path | None = None) -> tuple[list[BundleFile], list[str]]:
    """The files to bundle (sorted by archive name) and the empty folders (as ``name/``)."""
    real_root = root.resolve()
    excluded = exclude.resolve() if exclude is not None else None
    files: list[BundleFile] = []
    empty_dirs: list[str] = []
    _walk(real_root, real_root, "", (real_root,), excluded, files, empty_dirs)
    files.sort(key=lambda f: f.arcname)
    return files, sorted(empty_dirs)


def _walk(
    real_root: Path,
    folder: Path,
    prefix: str,
    ancestors: tuple[Path, ...],
    excluded: Path | None,
    files: list[BundleFile],
    empty_dirs: list[str],
) -> None:
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    added = len(files), len(empty_dirs)
    for entry in entries:
        arcname = prefix + entry.name
        path = Path(entry.path)
        if entry.is_symlink():
            path = _inside_target(real_root, path, arcname)
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            if entry.name in SKIPPED_DIRS:
                continue
            real = path.resolve()
            if real in ancestors:
                raise BundleError(f"{arcname}: a symbolic link loop")
            sub = (*ancestors, real)
            _walk(real_root, real, arcname + "/", sub, excluded, files, empty_dirs)
        elif stat.S_ISREG(info.st_mode):
            if excluded is not None and path.resolve() == excluded:
                continue
            executable = bool(info.st_mode & stat.S_IXUSR)
            files.append(BundleFile(arcname, path, info.st_size, executable))
        else:
            raise BundleError(f"{arcname}: not a regular file or folder (socket, FIFO, device)")
    if prefix and (len(files), len(empty_dirs)) == added:
        empty_dirs.append(prefix)


def _inside_target(real_root: Path, link: Path, arcname: str) -> Path:
    try:
        target = link.resolve(strict=True)
    except FileNotFoundError as exc:
        raise BundleError(f"{arcname}: a symbolic link to nothing") from exc
    except RuntimeError as exc:  # resolve() reports a loop of links this way
        raise BundleError(f"{arcname}: a symbolic link loop") from exc
    if not target.is_relative_to(real_root):
        raise BundleError(
            f"{arcname}: a symbolic link to {target}, outside the folder being bundled"
        )
    return target


def _merge(files: list[BundleFile], empty_dirs: list[str]) -> list[BundleFile | str]:
    entries: list[BundleFile | str] = [*files, *empty_dirs]
    return sorted(entries, key=lambda e: e if isinstance(e, str) else e.arcname)


def _file_info(entry: BundleFile) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(entry.arcname, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    mode = 0o755 if entry.executable else 0o644
    info.external_attr = (stat.S_IFREG | mode) << 16
    info.create_system = 3  # Unix, so the mode bits are read back
    info.file_size = entry.size  # lets zipfile pick ZIP64 up front for files over 2 GiB
    return info


def _dir_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
    info.create_system = 3
    return info
