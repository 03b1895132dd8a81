"""Downloading job bundles: streamed to disk, bounded, checked against their sha256, cached.

:func:`fetch_bundle` downloads one URL to one file. :class:`BundleCache` keeps downloaded
bundles by sha256 (``<root>/<sha256>.zip``) so that jobs sharing a bundle download it once, and
bounds the cache's total size (least recently used first). Unpacking is not done here: the
caller hands the file to :func:`peergpu.bundles.safe_extract`.

Every failure is a :class:`BundleFetchError` whose ``reason`` is one of:

============================  ================================================================
``bundle_download_failed``    no connection, an HTTP error status, a broken or slow transfer,
                              or the file could not be written
``bundle_checksum_mismatch``  the downloaded bytes do not hash to the manifest's sha256
``bundle_too_large``          more than ``max_bytes`` (declared by the server or received)
============================  ================================================================

Nothing is ever held whole in memory. A download goes to a temporary name next to its
destination and is renamed into place only once complete and verified, so concurrent downloads
of the same bundle (in one agent or several) cannot corrupt each other; on any failure, and on
cancellation, the partial file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from peergpu.agent.runners.outcome import format_bytes

logger = logging.getLogger(__name__)

DEFAULT_MAX_BUNDLE_BYTES = 2 * 1024**3
DEFAULT_CACHE_BYTES = 10 * 1024**3
DEFAULT_TIMEOUT_SECONDS = 600.0

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PART = ".part-"
_EVICTING = ".evict-"
_CHUNK = 1024 * 1024
#: Each network read may take at most this long (the whole download: ``timeout``).
_READ_TIMEOUT_SECONDS = 60.0
_CONNECT_TIMEOUT_SECONDS = 15.0

T = TypeVar("T")


class BundleFetchError(Exception):
    """A bundle could not be downloaded; ``reason`` is a machine code (see the module
    docstring) and ``message`` one sentence for the job's owner."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


async def fetch_bundle(
    url: str,
    sha256: str,
    dest_zip: Path,
    *,
    max_bytes: int,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """Download ``url`` to ``dest_zip`` and return its size; raises :class:`BundleFetchError`.

    The body is streamed to ``<dest_zip>.part-<random>`` while its sha256 is computed, refused
    past ``max_bytes`` or if it hashes to anything but ``sha256`` (64 hex digits), and renamed
    to ``dest_zip`` (replacing any file there) only when complete. ``timeout`` bounds the whole
    download. On failure or cancellation the partial file is removed and ``dest_zip`` is left
    as it was. ``transport`` replaces httpx's network transport (tests).
    """
    expected = sha256.lower()
    if not SHA256_HEX.fullmatch(expected):
        raise ValueError(f"Not a sha256 in hex: {sha256!r}.")
    part = dest_zip.with_name(f"{dest_zip.name}{_PART}{secrets.token_hex(8)}")
    try:
        try:
            async with asyncio.timeout(timeout):
                size, digest = await _download(url, part, max_bytes, transport)
        except TimeoutError:
            raise BundleFetchError(
                "bundle_download_failed",
                f"Downloading the bundle from {_where(url)} took longer than {timeout:g} s.",
            ) from None
        if digest != expected:
            raise BundleFetchError(
                "bundle_checksum_mismatch",
                f"The downloaded bundle has sha256 {digest}, not {expected} as the manifest "
                "says: it was changed or corrupted on the way.",
            )
        await run_to_completion(os.replace, part, dest_zip)
    except BaseException:
        part.unlink(missing_ok=True)  # one quick syscall; also safe while being cancelled
        raise
    return size


@dataclass(frozen=True, slots=True)
class CachedBundle:
    """A bundle file checked out of the cache; ``downloaded`` is False on a cache hit."""

    path: Path
    size: int
    downloaded: bool


class BundleCache:
    """Verified bundles by sha256 under ``root``, at most ``max_cache_bytes`` in total.

    :meth:`checkout` yields a bundle's file, downloading it first unless a file with the right
    sha256 is already there (the cached file is hashed again on every hit: a crash or a disk
    error must not hand a job someone else's bytes). One agent downloads a given sha256 once at
    a time; other jobs wanting it wait for that download. A checked-out bundle is never evicted;
    after each checkout, the least recently used other bundles are deleted until the total fits
    (so a bundle larger than the whole cache is deleted once its jobs have unpacked it).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.root = root
        self._max_cache_bytes = max_cache_bytes
        self._max_bundle_bytes = max_bundle_bytes
        self._timeout = timeout
        self._transport = transport
        self._pins: dict[str, int] = {}  # sha256 -> checkouts in progress
        self._pins_lock = threading.Lock()  # eviction runs in a worker thread
        self._download_locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def checkout(self, url: str, sha256: str) -> AsyncIterator[CachedBundle]:
        """The bundle with this sha256, downloaded from ``url`` if not cached; raises
        :class:`BundleFetchError`. The file stays in place until the block exits."""
        sha = sha256.lower()
        if not SHA256_HEX.fullmatch(sha):
            raise ValueError(f"Not a sha256 in hex: {sha256!r}.")
        with self._pins_lock:
            self._pins[sha] = self._pins.get(sha, 0) + 1
        lock = self._download_locks.setdefault(sha, asyncio.Lock())
        try:
            async with lock:
                bundle = await self._ensure(url, sha)
            yield bundle
        finally:
            with self._pins_lock:
                self._pins[sha] -= 1
                if not self._pins[sha]:
                    del self._pins[sha]
                    self._download_locks.pop(sha, None)
            await run_to_completion(self._evict)

    def path_for(self, sha256: str) -> Path:
        return self.root / f"{sha256.lower()}.zip"

    async def _ensure(self, url: str, sha: str) -> CachedBundle:
        path = self.path_for(sha)
        try:
            cached = await run_to_completion(_cached_size, path, sha)
            if cached is not None:
                return CachedBundle(path=path, size=cached, downloaded=False)
            await run_to_completion(_make_private_dir, self.root)
        except OSError as error:
            raise BundleFetchError(
                "bundle_download_failed", f"The bundle cache {self.root} is unusable: {error}"
            ) from None
        size = await fetch_bundle(
            url,
            sha,
            path,
            max_bytes=self._max_bundle_bytes,
            timeout=self._timeout,
            transport=self._transport,
        )
        logger.info("downloaded bundle %s (%d bytes)", sha, size)
        return CachedBundle(path=path, size=size, downloaded=True)

    def _evict(self) -> None:
        """Delete unpinned bundles, least recently used first, until the total fits; also
        leftovers of downloads and evictions a crash interrupted."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:  # no cache yet (or unreadable: nothing to evict then)
            return
        bundles: list[tuple[float, str, int]] = []  # (last used, name, size)
        stale_before = time.time() - 2 * self._timeout - 60
        for entry in entries:
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if _PART in entry.name or _EVICTING in entry.name:
                    if info.st_mtime < stale_before or _EVICTING in entry.name:
                        os.unlink(entry.path)
                elif entry.name.endswith(".zip"):
                    bundles.append((info.st_mtime, entry.name, info.st_size))
        total = sum(size for _, _, size in bundles)
        for _, name, size in sorted(bundles):
            if total <= self._max_cache_bytes:
                break
            if self._claim_for_eviction(name):
                total -= size

    def _claim_for_eviction(self, name: str) -> bool:
        """Move an unpinned bundle out of the way (atomically, so no checkout can pick it up),
        then delete it; False if it is pinned or already gone."""
        doomed = self.root / f"{name}{_EVICTING}{secrets.token_hex(4)}"
        with self._pins_lock:
            if name.removesuffix(".zip") in self._pins:
                return False
            try:
                os.rename(self.root / name, doomed)
            except OSError:
                return False
        doomed.unlink(missing_ok=True)
        logger.info("evicted bundle %s from the cache", name)
        return True


async def run_to_completion(func: Callable[..., T], *args: object) -> T:
    """``func(*args)`` in a worker thread. A thread cannot be stopped: if the caller is
    cancelled meanwhile, this still waits for the thread to finish before re-raising, so that
    nothing touches the files afterwards."""
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


# ---------------------------------------------------------------- helpers


async def _download(
    url: str, part: Path, max_bytes: int, transport: httpx.AsyncBaseTransport | None
) -> tuple[int, str]:
    """Stream ``url`` into the new file ``part``; (size, sha256 hex)."""
    timeouts = httpx.Timeout(_READ_TIMEOUT_SECONDS, connect=_CONNECT_TIMEOUT_SECONDS)
    digest = hashlib.sha256()
    size = 0
    try:
        async with (
            httpx.AsyncClient(timeout=timeouts, follow_redirects=True, transport=transport) as http,
            http.stream("GET", url, headers={"accept-encoding": "identity"}) as response,
        ):
            _check_response(response, url, max_bytes)
            descriptor = await run_to_completion(_create, part)
            try:
                buffer = bytearray()
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_large(max_bytes)
                    buffer += chunk
                    if len(buffer) >= _CHUNK:
                        await run_to_completion(_write, descriptor, digest, bytes(buffer))
                        buffer.clear()
                await run_to_completion(_write, descriptor, digest, bytes(buffer))
            finally:
                os.close(descriptor)
    except httpx.HTTPError as error:
        raise BundleFetchError(
            "bundle_download_failed",
            f"Could not download the bundle from {_where(url)}: "
            f"{type(error).__name__}: {str(error) or 'no detail'}",
        ) from None
    except OSError as error:
        raise BundleFetchError(
            "bundle_download_failed", f"Could not store the downloaded bundle: {error}"
        ) from None
    return size, digest.hexdigest()


def _check_response(response: httpx.Response, url: str, max_bytes: int) -> None:
    if response.status_code != 200:
        hint = " (the link may have expired)" if response.status_code in (401, 403) else ""
        raise BundleFetchError(
            "bundle_download_failed",
            f"The bundle could not be downloaded from {_where(url)}: HTTP "
            f"{response.status_code}{hint}.",
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes, declared=int(declared))


def _too_large(max_bytes: int, *, declared: int | None = None) -> BundleFetchError:
    size = format_bytes(declared) if declared is not None else "larger"
    return BundleFetchError(
        "bundle_too_large",
        f"The bundle is {size}; this host accepts bundles of at most {format_bytes(max_bytes)}.",
    )


def _where(url: str) -> str:
    """The URL's scheme and host only: the rest of a pre-signed URL is a credential."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the bundle URL"


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)


def _write(descriptor: int, digest: hashlib._Hash, data: bytes) -> None:
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def _make_private_dir(path: Path) -> None:
    """The cache dir, readable by the agent only (jobs must not swap a bundle for another)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _cached_size(path: Path, sha: str) -> int | None:
    """The size of the cached bundle if it is there and hashes right (it is then marked as
    just used); otherwise it is deleted and ``None`` returned."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return None
    if digest.hexdigest() != sha:
        logger.warning("cached bundle %s is corrupt; downloading it again", path.name)
        path.unlink(missing_ok=True)
        return None
    os.utime(path)  # least recently used goes first
    return size
