"""The domain error hierarchy.

Services raise these; the HTTP layer maps each class to a status code in exactly one place
(``peergpu.server.api.errors``). Every error carries a machine-readable ``code``::

    PeerGPUError
    ├── InvalidInput          (422) input that parsed but makes no sense
    ├── AuthenticationFailed  (401) no or bad credentials
    ├── PermissionDenied      (403) known caller, not allowed
    ├── PaymentRequired       (402) not enough credit, or a spending cap reached
    ├── NotFound              (404) missing, or not visible to the caller
    ├── Conflict              (409) clashes with the current state (duplicate, race lost)
    ├── PayloadTooLarge       (413)
    ├── RateLimited           (429) carries ``retry_after`` seconds
    └── ServiceUnavailable    (503) a dependency (database, bus) is down; retry later
"""

from __future__ import annotations

from typing import Any


class PeerGPUError(Exception):
    code = "error"

    def __init__(
        self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details or {}


class InvalidInput(PeerGPUError):
    code = "invalid_input"


class AuthenticationFailed(PeerGPUError):
    code = "authentication_failed"


class PermissionDenied(PeerGPUError):
    code = "permission_denied"


class PaymentRequired(PeerGPUError):
    code = "payment_required"


class NotFound(PeerGPUError):
    code = "not_found"


class Conflict(PeerGPUError):
    code = "conflict"


class PayloadTooLarge(PeerGPUError):
    code = "payload_too_large"


class RateLimited(PeerGPUError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServiceUnavailable(PeerGPUError):
    code = "service_unavailable"
