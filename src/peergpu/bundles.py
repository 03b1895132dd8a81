"""Job bundles (zip files of code and data): validation and safe extraction. Standard library only.

The server calls :func:`validate_bundle` on upload; the agent calls :func:`safe_extract` before a
job runs (it validates again: the agent trusts no one's checks but its own). Both read only the
zip's central directory to decide; extraction then also counts the bytes actually decompressed,
because headers can lie. Every refusal is a :class:`BundleError` whose ``reason`` is one of:

==========================  ========================================================
``not_a_zip``               not a readable zip file
``too_many_members``        more than ``max_members`` entries
``too_large``               total or one member larger than allowed (declared or actual)
``compression_ratio``       compressed suspiciously well (a zip bomb)
``absolute_path``           ``/x``, ``\\x`` or ``C:...``
``path_traversal``          a ``..`` component, or a path resolving outside the destination
``invalid_name``            empty, NUL/control characters, backslashes, over-long
``duplicate_name``          two entries for one path, or a file used as a directory
``symlink``                 a symbolic link entry
``special_file``            a device, FIFO, socket... (only files and directories pass)
``encrypted``               an encrypted entry
``unsupported_compression`` a compression method other than stored/deflate/bzip2/lzma
``corrupt``                 data that does not match its header (bad CRC, truncated, or a
                            size that lies); found while extracting
==========================  ========================================================

Extracted files get mode 0644, or 0744 when the archive marks them executable by their owner
(no setuid/setgid/sticky or group/other bits are taken from the archive); directories get 0755.
If extraction fails, what it had written is removed again.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: Members declaring less than this are exempt from the per-member compression ratio check
#: (small, very compressible files are common; the total still counts).
RATIO_CHECK_MIN_BYTES = 1024 * 1024

_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CHUNK = 1024 * 1024


class BundleError(ValueError):
    """A bundle was refused; ``reason`` is a machine code (see the module docstring)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class BundleLimits:
    """What a bundle may contain; sizes are uncompressed bytes."""

    max_members: int = 10_000
    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int | None = None
    max_compression_ratio: float = 200.0


@dataclass(frozen=True)
class BundleSummary:
    members: int
    total_bytes: int


def validate_bundle(path: Path, limits: BundleLimits = BundleLimits()) -> BundleSummary:
    """Check a bundle from its central directory, without extracting; raises BundleError."""
    with _open_zip(path) as archive:
        summary, _ = _check_members(archive.infolist(), limits)
        return summary


def safe_extract(path: Path, dest: Path, limits: BundleLimits = BundleLimits()) -> BundleSummary:
    """Validate, then extract into ``dest`` (created if missing), never writing outside it.

    Raises BundleError; on failure everything this call created under ``dest`` is removed.
    """
    with _open_zip(path) as archive:
        summary, names = _check_members(archive.infolist(), limits)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        created: list[Path] = []
        try:
            written = 0
            for info, name in zip(archive.infolist(), names, strict=True):
                written = _extract_member(archive, info, name, root, created, written, limits)
        except BaseException:
            _remove_created(created)
            raise
        return summary


# ---------------------------------------------------------------- validation


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as error:
        raise BundleError("not_a_zip", f"The bundle is not a readable zip file: {error}") from None


def _check_members(
    members: list[zipfile.ZipInfo], limits: BundleLimits
) -> tuple[BundleSummary, list[PurePosixPath]]:
    """Check every entry; the summary and each entry's normalized relative path."""
    if len(members) > limits.max_members:
        raise BundleError(
            "too_many_members",
            f"The bundle has {len(members)} entries; at most {limits.max_members} are allowed.",
        )
    names: list[PurePosixPath] = []
    seen: dict[PurePosixPath, bool] = {}  # path -> is a directory
    total = compressed = 0
    for info in members:
        name = _member_path(info.filename)
        _check_entry(info, limits)
        _check_unique(name, _is_dir(info), seen, info.filename)
        names.append(name)
        total += info.file_size
        compressed += info.compress_size
    if total > limits.max_total_bytes:
        raise BundleError(
            "too_large",
            f"The bundle unpacks to {total} bytes; at most {limits.max_total_bytes} are allowed.",
        )
    if total >= RATIO_CHECK_MIN_BYTES and total / max(compressed, 1) > limits.max_compression_ratio:
        raise BundleError(
            "compression_ratio",
            f"The bundle expands {total / max(compressed, 1):.0f}-fold; at most "
            f"{limits.max_compression_ratio:g} is allowed (zip bomb?).",
        )
    return BundleSummary(members=len(members), total_bytes=total), names


def _member_path(filename: str) -> PurePosixPath:
    """The entry's path relative to the destination, or BundleError."""
    if filename.startswith(("/", "\\")) or _DRIVE.match(filename):
        raise BundleError("absolute_path", f"Entry {filename!r} has an absolute path.")
    parts = re.split(r"[\\/]", filename)
    if ".." in parts:
        raise BundleError("path_traversal", f"Entry {filename!r} contains a '..' component.")
    if "\\" in filename or _CONTROL.search(filename):
        raise BundleError(
            "invalid_name", f"Entry {filename!r} contains a backslash or control character."
        )
    kept = [part for part in parts if part not in ("", ".")]
    if not kept or len(filename.encode()) > 4096 or any(len(p.encode()) > 255 for p in kept):
        raise BundleError("invalid_name", f"Entry {filename!r} has an empty or over-long name.")
    return PurePosixPath(*kept)


def _check_entry(info: zipfile.ZipInfo, limits: BundleLimits) -> None:
    name = info.filename
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        raise BundleError("symlink", f"Entry {name!r} is a symbolic link.")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise BundleError("special_file", f"Entry {name!r} is not a regular file or directory.")
    if info.flag_bits & 0x1:
        raise BundleError("encrypted", f"Entry {name!r} is encrypted.")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise BundleError(
            "unsupported_compression",
            f"Entry {name!r} uses compression method {info.compress_type}.",
        )
    if limits.max_member_bytes is not None and info.file_size > limits.max_member_bytes:
        raise BundleError(
            "too_large",
            f"Entry {name!r} unpacks to {info.file_size} bytes; at most "
            f"{limits.max_member_bytes} are allowed per file.",
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size >= RATIO_CHECK_MIN_BYTES and ratio > limits.max_compression_ratio:
        raise BundleError(
            "compression_ratio",
            f"Entry {name!r} expands {ratio:.0f}-fold; at most "
            f"{limits.max_compression_ratio:g} is allowed (zip bomb?).",
        )


def _check_unique(
    name: PurePosixPath, is_dir: bool, seen: dict[PurePosixPath, bool], filename: str
) -> None:
    """Refuse a second entry for a path, and a file where another entry needs a directory.

    ``seen`` maps every path met so far, entries and their parent directories, to whether it is
    a directory.
    """
    previous = seen.get(name)
    if previous is not None and not (is_dir and previous):
        raise BundleError("duplicate_name", f"Entry {filename!r} clashes with another entry.")
    for ancestor in name.parents:
        if seen.get(ancestor) is False:
            raise BundleError("duplicate_name", f"Entry {filename!r} lies below a file.")
        seen[ancestor] = True
    seen[name] = is_dir


def _is_dir(info: zipfile.ZipInfo) -> bool:
    return info.filename.endswith("/") or stat.S_ISDIR(info.external_attr >> 16)


# ---------------------------------------------------------------- extraction


def _extract_member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    name: PurePosixPath,
    root: Path,
    created: list[Path],
    written: int,
    limits: BundleLimits,
) -> int:
    """Extract one entry; returns the running total of bytes written."""
    target = root.joinpath(*name.parts)
    if _is_dir(info):
        _make_dirs(root, target, created)
        return written
    _make_dirs(root, target.parent, created)
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    created.append(target)
    member_bytes = 0
    try:
        with os.fdopen(descriptor, "wb") as output, archive.open(info) as source:
            while chunk := source.read(_CHUNK):
                member_bytes += len(chunk)
                written += len(chunk)
                _check_actual_size(info, member_bytes, written, limits)
                output.write(chunk)
            os.fchmod(output.fileno(), _file_mode(info))
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as error:
        raise BundleError("corrupt", f"Entry {info.filename!r} is corrupt: {error}") from None
    return written


def _check_actual_size(
    info: zipfile.ZipInfo, member_bytes: int, written: int, limits: BundleLimits
) -> None:
    if member_bytes > info.file_size:
        raise BundleError(
            "too_large", f"Entry {info.filename!r} unpacks to more than its declared size."
        )
    if written > limits.max_total_bytes:
        raise BundleError("too_large", "The bundle unpacks to more than allowed.")


def _make_dirs(root: Path, directory: Path, created: list[Path]) -> None:
    """Create ``directory`` and missing parents under ``root``, refusing anything that resolves
    outside ``root`` (a symlink already in the destination, for instance)."""
    missing: list[Path] = []
    current = directory
    while current != root and not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        os.mkdir(path, 0o755)
        os.chmod(path, 0o755)
        created.append(path)
    resolved = directory.resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise BundleError("path_traversal", f"{directory} resolves outside the destination.")


def _file_mode(info: zipfile.ZipInfo) -> int:
    owner_executable = (info.external_attr >> 16) & stat.S_IXUSR
    return 0o644 | owner_executable


def _remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass
