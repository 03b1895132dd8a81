"""``LocalObjectStore``: objects as files under one folder, served by the server itself.

Layout under ``root`` (every name containing ``~`` is ours: ``~`` is never part of a key, so
these names cannot collide with an object)::

    <key>            the object's bytes, at root/<key> (``jobs/7/out.bin`` -> root/jobs/7/out.bin)
    <key>~meta       JSON sidecar: {"sha256", "size", "mtime_ns", "ino"} of the file it describes
    .tmp~/put-*      uploads in progress; renamed into place once complete

A ``put`` streams into ``.tmp~`` (same filesystem, so the final ``os.replace`` is atomic), hashing
as it goes and fsyncing before the rename; a failure anywhere unlinks the temp file, so nothing
is left behind. The sidecar is written after the data, and it only counts while the size, mtime
and inode it names still match the data file: a crash between the two renames, or two puts of
the same key crossing, yields ``sha256=None`` ("unknown"), never a wrong hash. Copying the folder
to another disk keeps the bytes but, because inodes change, reports ``sha256=None`` too.

A filesystem cannot hold both ``a`` and ``a/b``; where S3 would accept both, ``put`` raises
``Conflict``. Empty folders left by ``delete`` are removed so such a clash does not outlive the
objects that caused it.

URLs point at ``<public_url>/storage/o/<key>``, which ``peergpu.server.api.storage`` serves
after checking the signature with ``signer``.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlencode

from anyio import to_thread

from peergpu.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from peergpu.server.storage.base import (
    ObjectInfo,
    ObjectStore,
    ObjectStream,
    is_valid_key,
    validate_filename,
    validate_key,
    validate_lifetime,
    validate_prefix,
    validate_sha256,
)
from peergpu.server.storage.signing import UrlSigner

#: Where the router is mounted, relative to ``public_url``.
OBJECTS_PATH = "/storage/o/"
#: Reads and writes go to the disk in chunks of this size (memory per transfer stays ~1 MiB).
CHUNK_SIZE = 1 << 20

_TEMP_DIR = ".tmp~"
_META_SUFFIX = "~meta"
_OURS = "~"


class LocalObjectStore(ObjectStore):
    """Objects under ``root`` (see the module docstring); URLs signed with ``secret`` and
    rooted at ``public_url`` (e.g. ``https://peergpu.example/api/v1``)."""

    def __init__(
        self,
        root: Path,
        *,
        public_url: str,
        secret: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not public_url.startswith(("http://", "https://")):
            raise ValueError(f"public_url must be an absolute http(s) URL, not {public_url!r}")
        self.root = root.resolve()
        self.public_url = public_url.rstrip("/")
        self.signer = UrlSigner(secret, clock=clock)

    async def put(
        self,
        key: str,
        data: AsyncIterator[bytes] | bytes,
        *,
        max_bytes: int | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        validate_key(key)
        expected = validate_sha256(sha256) if sha256 is not None else None
        if max_bytes is not None and max_bytes < 0:
            raise InvalidInput("max_bytes cannot be negative.", details={"max_bytes": max_bytes})
        if isinstance(data, bytes | bytearray | memoryview) and max_bytes is not None:
            _check_size(len(data), max_bytes)  # refuse before writing anything
        temp = await to_thread.run_sync(self._new_temp_file)
        try:
            with temp.open("wb") as file:
                digest, size = await _write_stream(file, _chunks(data), max_bytes)
                file_stat = await to_thread.run_sync(_sync_and_stat, file)
            if expected is not None and digest != expected:
                raise InvalidInput(
                    "The uploaded bytes do not have the expected SHA-256; nothing was stored.",
                    code="checksum_mismatch",
                    details={"expected": expected, "actual": digest},
                )
            meta = {
                "sha256": digest,
                "size": size,
                "mtime_ns": file_stat.st_mtime_ns,
                "ino": file_stat.st_ino,
            }
            await to_thread.run_sync(self._commit, key, temp, meta)
        except BaseException as error:
            # Synchronous on purpose: a cancelled task may not await again before re-raising.
            temp.unlink(missing_ok=True)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ServiceUnavailable(
                    "The object store is out of space; nothing was stored.", code="storage_full"
                ) from error
            raise
        created_at = datetime.fromtimestamp(file_stat.st_mtime, UTC)
        return ObjectInfo(key=key, size=size, sha256=digest, created_at=created_at)

    async def get(self, key: str) -> ObjectStream:
        validate_key(key)
        file, info = await to_thread.run_sync(self._open, key)
        return _FileStream(file, info)

    async def head(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        return await to_thread.run_sync(self._head, key)

    async def delete(self, key: str) -> None:
        validate_key(key)
        await to_thread.run_sync(self._delete, key)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        validate_prefix(prefix)
        return await to_thread.run_sync(self._list, prefix)

    def presign_put(
        self, key: str, *, expires_in: int, max_bytes: int, sha256: str | None = None
    ) -> str:
        validate_key(key)
        if max_bytes < 0:
            raise InvalidInput("max_bytes cannot be negative.", details={"max_bytes": max_bytes})
        grant = self.signer.grant(
            "PUT",
            key,
            expires_in=validate_lifetime(expires_in),
            max_bytes=max_bytes,
            sha256=validate_sha256(sha256) if sha256 is not None else None,
        )
        return self._url(key, self.signer.query(grant))

    def presign_get(self, key: str, *, expires_in: int, filename: str | None = None) -> str:
        validate_key(key)
        grant = self.signer.grant(
            "GET",
            key,
            expires_in=validate_lifetime(expires_in),
            filename=validate_filename(filename) if filename is not None else None,
        )
        return self._url(key, self.signer.query(grant))

    # -- helpers (the synchronous ones run in a worker thread) --------------------------------

    def _url(self, key: str, query: dict[str, str]) -> str:
        return f"{self.public_url}{OBJECTS_PATH}{quote(key, safe='/')}?{urlencode(query)}"

    def _path(self, key: str) -> Path:
        """The file for ``key``, refusing any path that resolves outside ``root`` (a symlink
        planted inside the folder, say): keys are validated, this is the second lock."""
        path = self.root.joinpath(*key.split("/"))
        if not path.resolve().is_relative_to(self.root):
            raise InvalidInput("The key points outside the store.", code="invalid_key")
        return path

    def _new_temp_file(self) -> Path:
        temp_dir = self.root / _TEMP_DIR
        temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="put-", dir=temp_dir)
        os.close(fd)
        return Path(name)

    def _commit(self, key: str, temp: Path, meta: dict[str, object]) -> None:
        path = self._path(key)
        meta_temp = temp.with_name(temp.name + _META_SUFFIX)
        meta_temp.write_text(json.dumps(meta))
        try:
            self._replace(temp, path, key)
            os.replace(meta_temp, _meta_path(path))
        finally:
            meta_temp.unlink(missing_ok=True)

    def _replace(self, temp: Path, path: Path, key: str) -> None:
        for attempt in range(3):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp, path)
                return
            except FileNotFoundError:
                # A concurrent delete pruned the (then empty) folder between mkdir and rename.
                if attempt == 2:
                    raise
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
                raise Conflict(
                    "Another object's key is a folder of this key, or the other way round "
                    "(the local store cannot hold both 'a' and 'a/b').",
                    code="key_conflict",
                    details={"key": key},
                ) from error

    def _open(self, key: str) -> tuple[BinaryIO, ObjectInfo]:
        path = self._path(key)
        try:
            # O_NONBLOCK: a FIFO planted in the folder must not hang the read; no effect on files.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
            raise _not_found(key) from error
        try:
            file_stat = os.fstat(fd)
            if not stat.S_ISREG(file_stat.st_mode):  # a folder, a FIFO: not an object
                raise _not_found(key)
            info = _info(key, path, file_stat)
            return os.fdopen(fd, "rb"), info
        except BaseException:
            os.close(fd)
            raise

    def _head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            file_stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _info(key, path, file_stat) if stat.S_ISREG(file_stat.st_mode) else None

    def _delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():  # a folder of other keys, not an object
            return
        for target in (path, _meta_path(path)):
            try:
                target.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): stop pruning
                return
            parent = parent.parent

    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        folder_key = prefix.rpartition("/")[0]
        start = self._path(folder_key) if folder_key else self.root
        found: builtins.list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):  # does not follow symlinks
            relative = Path(dirpath).relative_to(self.root).parts
            dirnames[:] = [
                name
                for name in dirnames
                if _OURS not in name and _may_match("/".join((*relative, name)) + "/", prefix)
            ]
            for name in filenames:
                key = "/".join((*relative, name))
                if _OURS in name or not key.startswith(prefix) or not is_valid_key(key):
                    continue
                path = Path(dirpath, name)
                try:
                    file_stat = path.lstat()
                except FileNotFoundError:  # deleted while we walked
                    continue
                if stat.S_ISREG(file_stat.st_mode):
                    found.append(_info(key, path, file_stat))
        return sorted(found, key=lambda info: info.key)


class _FileStream(ObjectStream):
    """Reads exactly ``info.size`` bytes from an open file; the file was opened before any
    rename could replace it, so the bytes are those of one version."""

    def __init__(self, file: BinaryIO, info: ObjectInfo) -> None:
        self.info = info
        self._file: BinaryIO | None = file
        self._remaining = info.size

    async def __anext__(self) -> bytes:
        if self._file is None:
            raise StopAsyncIteration
        chunk = b""
        if self._remaining > 0:
            chunk = await to_thread.run_sync(self._file.read, min(CHUNK_SIZE, self._remaining))
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        self._remaining -= len(chunk)
        return chunk

    async def aclose(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def _chunks(data: AsyncIterator[bytes] | bytes) -> AsyncIterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
        return
    async for chunk in data:
        yield chunk


async def _write_stream(
    file: BinaryIO, chunks: AsyncIterator[bytes], max_bytes: int | None
) -> tuple[str, int]:
    """Write and hash ``chunks``, batching small ones into ~``CHUNK_SIZE`` writes; return the
    hex digest and the size. Raises ``PayloadTooLarge`` as soon as ``max_bytes`` is passed."""
    hasher = hashlib.sha256()
    size = 0
    pending = bytearray()
    async for chunk in chunks:
        size += len(chunk)
        if max_bytes is not None:
            _check_size(size, max_bytes)
        pending += chunk
        if len(pending) >= CHUNK_SIZE:
            # The worker thread is awaited even on cancellation, so `pending` is ours again.
            await to_thread.run_sync(_write_and_hash, file, hasher, pending)
            pending.clear()
    if pending:
        await to_thread.run_sync(_write_and_hash, file, hasher, pending)
    return hasher.hexdigest(), size


def _write_and_hash(file: BinaryIO, hasher: hashlib._Hash, data: bytearray) -> None:
    hasher.update(data)
    file.write(data)


def _sync_and_stat(file: BinaryIO) -> os.stat_result:
    file.flush()
    os.fsync(file.fileno())
    return os.fstat(file.fileno())


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise PayloadTooLarge(
            f"The object is larger than the {max_bytes} bytes allowed; nothing was stored.",
            details={"max_bytes": max_bytes},
        )


def _info(key: str, path: Path, file_stat: os.stat_result) -> ObjectInfo:
    return ObjectInfo(
        key=key,
        size=file_stat.st_size,
        sha256=_recorded_sha256(path, file_stat),
        created_at=datetime.fromtimestamp(file_stat.st_mtime, UTC),
    )


def _recorded_sha256(path: Path, file_stat: os.stat_result) -> str | None:
    """The sidecar's hash if the sidecar describes this very file, else ``None``."""
    try:
        meta = json.loads(_meta_path(path).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    describes_this_file = (
        meta.get("size") == file_stat.st_size
        and meta.get("mtime_ns") == file_stat.st_mtime_ns
        and meta.get("ino") == file_stat.st_ino
    )
    sha256 = meta.get("sha256")
    return sha256 if describes_this_file and isinstance(sha256, str) else None


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + _META_SUFFIX)


def _may_match(folder_key: str, prefix: str) -> bool:
    """Whether keys under ``folder_key`` (ending in '/') can start with ``prefix``."""
    return folder_key.startswith(prefix) or prefix.startswith(folder_key)


def _not_found(key: str) -> NotFound:
    return NotFound(f"No object under key '{key}'.", details={"key": key})
