"""What the SDK raises. Network and HTTP failures are translated here, at the boundary, so callers
never need to catch httpx's exceptions::

    ClientError                  anything the SDK raises on purpose
    ├── PeerGPUError             the server answered 4xx/5xx; carries status, code, message, details
    ├── PeerGPUUnavailable       the server could not be reached (also a ConnectionError)
    ├── BundleError              a directory cannot be zipped safely (a link out of the tree, ...)
    └── DownloadError            an artifact failed its checks (size, sha256) or was truncated
        └── UnsafePath           an artifact path would land outside the destination folder
"""

from __future__ import annotations

from typing import Any

import httpx


class ClientError(Exception):
    """Base of every error the SDK raises on purpose."""


class PeerGPUError(ClientError):
    """The server refused a request. ``code`` is the server's stable machine code
    (``not_found``, ``token_expired``, ...); ``message`` is meant for people."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}

    @classmethod
    def from_response(cls, response: httpx.Response) -> PeerGPUError:
        """Build from the server's ``{"error": {"code", "message", "details"}}`` body; a body of
        another shape (a proxy's HTML page) still gives a readable error."""
        try:
            error = response.json()["error"]
            return cls(
                response.status_code,
                str(error["code"]),
                str(error["message"]),
                dict(error.get("details") or {}),
            )
        except (ValueError, KeyError, TypeError):
            text = response.text.strip().replace("\n", " ")[:200]
            message = text or response.reason_phrase or "no message"
            return cls(response.status_code, f"http_{response.status_code}", message)


class PeerGPUUnavailable(ClientError, ConnectionError):
    """The server could not be reached (refused, reset, timed out, DNS)."""


class BundleError(ClientError):
    """A directory could not be turned into a bundle; the message names the offending path."""


class DownloadError(ClientError):
    """An artifact could not be downloaded intact; nothing half-written is left behind."""


class UnsafePath(DownloadError):
    """An artifact's path is absolute, contains ``..`` or otherwise escapes the destination."""
