"""The object store contract: keys, object metadata, streamed bodies and pre-signed URLs.

Objects (job bundles, artifacts, log chunks, model files) are immutable blobs under a key.
Every implementation (``LocalObjectStore`` now, an S3 one later) honours the same contract:

* **Keys** are checked by ``validate_key`` before anything touches storage: relative,
  ``/``-separated segments of ``[A-Za-z0-9._-]``, no empty, ``.`` or ``..`` segment, at most
  200 characters a segment and 1024 in all. Anything else is ``InvalidInput``.
* **Writes are atomic**: a reader sees the old object or the new one, never a partial one, and a
  failed ``put`` (too large, wrong checksum, the client went away) leaves nothing behind.
* **Pre-signed URLs** are built without I/O (``presign_*`` are plain methods) and carry their
  own authorization, so an agent or a browser can move bytes without holding a credential.
"""

from __future__ import annotations

import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from urllib.parse import quote

from peergpu.errors import InvalidInput

MAX_KEY_LENGTH = 1024
#: Filesystems cap a name at 255 bytes; 200 leaves room for the local store's own suffixes and
#: keeps keys portable between backends (S3 alone would not need it).
MAX_SEGMENT_LENGTH = 200
MAX_FILENAME_LENGTH = 255
#: S3 refuses pre-signed URLs valid for longer than seven days; so do we, on every backend.
MAX_URL_LIFETIME_SECONDS = 7 * 24 * 3600

_KEY = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*", re.ASCII)
_PREFIX_CHARS = re.compile(r"[A-Za-z0-9._/-]*", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What is known about a stored object. ``sha256`` is lowercase hex, or ``None`` when the
    backend cannot vouch for it; ``created_at`` is when this version was written (UTC)."""

    key: str
    size: int
    sha256: str | None
    created_at: datetime | None


class ObjectStream(AsyncIterator[bytes]):
    """The body of one object, as chunks of at most a few MiB, plus its metadata.

    It is a snapshot: the object being replaced or deleted while it is read changes nothing,
    and ``info`` describes exactly the bytes that will be yielded (so a server can send an
    exact Content-Length). Iterating to the end releases it; so does ``aclose`` (idempotent)
    or leaving ``async with``. Single consumer.
    """

    info: ObjectInfo

    async def __aenter__(self) -> ObjectStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def read_all(self) -> bytes:
        """The whole body in memory: only for objects known to be small."""
        async with self:
            return b"".join([chunk async for chunk in self])

    @abstractmethod
    async def aclose(self) -> None:
        """Release the underlying file or connection. Idempotent."""


class ObjectStore(ABC):
    """Blob storage behind one interface; see the module docstring for the shared contract."""

    @abstractmethod
    async def put(
        self,
        key: str,
        data: AsyncIterator[bytes] | bytes,
        *,
        max_bytes: int | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Store ``data`` under ``key``, replacing any object there, and return its info.

        The size and SHA-256 are computed while streaming; memory stays bounded whatever the
        size. Past ``max_bytes`` it raises ``PayloadTooLarge``; when ``sha256`` is given and
        the body hashes differently it raises ``InvalidInput`` (code ``checksum_mismatch``).
        Either way, and on any other failure or cancellation, nothing is stored and the
        previous object, if any, is untouched.
        """

    @abstractmethod
    async def get(self, key: str) -> ObjectStream:
        """Open the object for reading; ``NotFound`` if there is none (raised here, before any
        byte is read, so an HTTP layer can still answer 404)."""

    @abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or ``None`` if there is none."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object. Idempotent: deleting a missing key is not an error."""

    @abstractmethod
    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a plain string prefix, as on S3:
        ``"jobs/1"`` matches ``jobs/1/a`` and ``jobs/12/b``), sorted by key. ``""`` lists all.
        Not paginated: meant for the bounded sets under one job or one model version."""

    @abstractmethod
    def presign_put(
        self, key: str, *, expires_in: int, max_bytes: int, sha256: str | None = None
    ) -> str:
        """An absolute URL to which a client can ``PUT`` the raw body for ``key`` within
        ``expires_in`` seconds. Bodies over ``max_bytes`` are refused; with ``sha256`` the
        upload is refused unless the body hashes to it. No I/O."""

    @abstractmethod
    def presign_get(self, key: str, *, expires_in: int, filename: str | None = None) -> str:
        """An absolute URL from which a client can ``GET`` the object within ``expires_in``
        seconds; with ``filename`` the download is offered under that name. No I/O; the URL
        is valid whether or not the object exists yet."""

    async def check(self) -> None:  # noqa: B027 - optional hook, nothing to check by default
        """Raise ``ServiceUnavailable`` if the store cannot be used (readiness, startup)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release connections (an S3 client); call once when the server stops."""


def is_valid_key(key: str) -> bool:
    return (
        len(key) <= MAX_KEY_LENGTH
        and _KEY.fullmatch(key) is not None
        and not any(
            segment in (".", "..") or len(segment) > MAX_SEGMENT_LENGTH
            for segment in key.split("/")
        )
    )


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``InvalidInput``."""
    if not is_valid_key(key):
        raise InvalidInput(
            "Object keys are '/'-separated segments of letters, digits, '.', '_' and '-' "
            f"(no empty, '.' or '..' segment, at most {MAX_SEGMENT_LENGTH} characters a "
            f"segment and {MAX_KEY_LENGTH} in all).",
            code="invalid_key",
            details={"key": key[:MAX_KEY_LENGTH]},
        )
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if every key it could match is valid, else raise ``InvalidInput``.

    ``""`` is valid. Every segment but the last must be a valid key segment; the last one is
    only a string prefix of a segment (``"runs/.l"`` may match ``runs/.log``)."""
    *directories, partial = prefix.split("/")
    if (
        len(prefix) > MAX_KEY_LENGTH
        or len(partial) > MAX_SEGMENT_LENGTH
        or not _PREFIX_CHARS.fullmatch(prefix)
        or any(
            segment in ("", ".", "..") or len(segment) > MAX_SEGMENT_LENGTH
            for segment in directories
        )
    ):
        raise InvalidInput(
            "A listing prefix must be the start of a valid object key.",
            code="invalid_key",
            details={"prefix": prefix[:MAX_KEY_LENGTH]},
        )
    return prefix


def validate_sha256(sha256: str) -> str:
    """Return the digest in lowercase hex if it is 64 hex digits, else raise ``InvalidInput``."""
    normalized = sha256.lower()
    if not _SHA256.fullmatch(normalized):
        raise InvalidInput(
            "sha256 must be 64 hexadecimal digits.", details={"sha256": sha256[:100]}
        )
    return normalized


def validate_filename(filename: str) -> str:
    """A download name for Content-Disposition: 1-255 characters, no path separator, no
    control character (which could split a header)."""
    if (
        not 1 <= len(filename) <= MAX_FILENAME_LENGTH
        or filename in (".", "..")
        or any(char in "/\\" or unicodedata.category(char) == "Cc" for char in filename)
    ):
        raise InvalidInput(
            f"A download filename has 1 to {MAX_FILENAME_LENGTH} characters, without '/', "
            "'\\' or control characters.",
            details={"filename": filename[:MAX_FILENAME_LENGTH]},
        )
    return filename


def content_disposition(filename: str | None) -> str:
    """``attachment``, with the name as RFC 6266 wants it: an ASCII fallback plus the exact
    UTF-8 name in ``filename*``. The same header on every backend (the local store's route
    sends it; S3 is asked to, through ``ResponseContentDisposition``)."""
    if filename is None:
        return "attachment"
    fallback = "".join(
        char if char.isascii() and char.isprintable() and char not in '"\\' else "_"
        for char in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def validate_lifetime(expires_in: int) -> int:
    if not 1 <= expires_in <= MAX_URL_LIFETIME_SECONDS:
        raise InvalidInput(
            f"expires_in must be between 1 and {MAX_URL_LIFETIME_SECONDS} seconds.",
            details={"expires_in": expires_in},
        )
    return expires_in
