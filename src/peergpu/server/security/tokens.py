"""Short-lived JWT access tokens and opaque random tokens (refresh tokens, invites)."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from peergpu.errors import AuthenticationFailed

_ALGORITHM = "HS256"
_ACCESS = "access"


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: uuid.UUID
    expires_at: datetime


class AccessTokens:
    def __init__(self, *, secret: str, ttl_seconds: int, issuer: str = "peergpu") -> None:
        self._secret = secret
        self._ttl = timedelta(seconds=ttl_seconds)
        self._issuer = issuer

    @property
    def ttl_seconds(self) -> int:
        return int(self._ttl.total_seconds())

    def issue(self, user_id: uuid.UUID, *, now: datetime | None = None) -> str:
        issued = now or datetime.now(UTC)
        claims = {
            "sub": str(user_id),
            "iat": issued,
            "exp": issued + self._ttl,
            "iss": self._issuer,
            "typ": _ACCESS,
            "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        """Return the claims of a valid token; raise AuthenticationFailed otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=self._issuer,
                options={"require": ["exp", "sub", "iat"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationFailed(
                "The access token has expired; refresh it.", code="token_expired"
            ) from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed(
                "The access token is invalid.", code="invalid_token"
            ) from exc
        if claims.get("typ") != _ACCESS:
            raise AuthenticationFailed("Not an access token.", code="invalid_token")
        try:
            user_id = uuid.UUID(claims["sub"])
        except ValueError as exc:
            raise AuthenticationFailed(
                "The access token is invalid.", code="invalid_token"
            ) from exc
        return AccessClaims(user_id=user_id, expires_at=datetime.fromtimestamp(claims["exp"], UTC))


def new_opaque_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    """SHA-256 of a high-entropy token; enough for random secrets (no salt or KDF needed)."""
    return hashlib.sha256(token.encode()).hexdigest()
