"""HMAC-SHA256 signatures for the object URLs the server hands out and serves itself.

A signed URL is a ``UrlGrant`` (one method on one key until a unix time, with the limits that
were granted) plus a signature in the query string::

    /storage/o/<key>?expires=1767225600&max_bytes=1048576&sha256=<hex>&signature=<b64url>

The MAC covers the JSON array ``["peergpu-storage-url/1", method, key, expires, max_bytes,
sha256, filename]`` (absent values are ``null``): JSON, so that no key or filename can make two
different grants encode to the same bytes. ``verify`` checks the signature first, in constant
time, and only then the expiry, so a URL whose ``expires`` was edited is ``invalid_signature``
and a genuine one that ran out is ``url_expired`` (both 403).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from peergpu.errors import PermissionDenied

Method = Literal["GET", "PUT"]

_VERSION = "peergpu-storage-url/1"
_DERIVATION_LABEL = b"peergpu/storage-url-signing/v1"
MIN_SECRET_BYTES = 16


def derive_storage_secret(server_secret: str | bytes) -> bytes:
    """The URL-signing key, derived from the server secret with a fixed label, so the key
    that signs access tokens signs nothing else."""
    raw = server_secret.encode() if isinstance(server_secret, str) else server_secret
    return hmac.new(raw, _DERIVATION_LABEL, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class UrlGrant:
    """What one signed URL allows. ``max_bytes`` and ``sha256`` apply to uploads,
    ``filename`` to downloads; ``expires`` is a unix timestamp, valid while ``now < expires``."""

    method: Method
    key: str
    expires: int
    max_bytes: int | None = None
    sha256: str | None = None
    filename: str | None = None

    def message(self) -> bytes:
        fields = [
            _VERSION,
            self.method,
            self.key,
            self.expires,
            self.max_bytes,
            self.sha256,
            self.filename,
        ]
        return json.dumps(fields, separators=(",", ":")).encode()


class UrlSigner:
    """Signs and checks ``UrlGrant`` s with one secret and one clock (injected for tests)."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the URL signing secret needs at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._clock = clock

    def grant(
        self,
        method: Method,
        key: str,
        *,
        expires_in: int,
        max_bytes: int | None = None,
        sha256: str | None = None,
        filename: str | None = None,
    ) -> UrlGrant:
        """A grant that runs out ``expires_in`` seconds from now."""
        expires = int(self._clock()) + expires_in
        return UrlGrant(method, key, expires, max_bytes, sha256, filename)

    def sign(self, grant: UrlGrant) -> str:
        digest = hmac.new(self._secret, grant.message(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def query(self, grant: UrlGrant) -> dict[str, str]:
        """The query parameters that carry ``grant`` and its signature (absent values left out)."""
        params = {"expires": str(grant.expires)}
        if grant.max_bytes is not None:
            params["max_bytes"] = str(grant.max_bytes)
        if grant.sha256 is not None:
            params["sha256"] = grant.sha256
        if grant.filename is not None:
            params["filename"] = grant.filename
        params["signature"] = self.sign(grant)
        return params

    def verify(self, grant: UrlGrant, signature: str) -> None:
        """Raise ``PermissionDenied`` unless ``signature`` signs ``grant`` and it is unexpired."""
        expected = self.sign(grant).encode()
        # Encoded with "replace" so that any text compares (compare_digest refuses non-ASCII str).
        if not hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
            raise PermissionDenied(
                "The URL's signature does not match; ask for a new URL.",
                code="invalid_signature",
            )
        if self._clock() >= grant.expires:
            raise PermissionDenied(
                "The URL has expired; ask for a new one.",
                code="url_expired",
                details={"expired_at": grant.expires},
            )
