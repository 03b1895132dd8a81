"""Secret key format: ``<marker><prefix>_<secret>``, e.g. ``pgk_...`` (API keys) and
``pgh_...`` (host credentials).

The prefix (12 hex chars) is stored in clear and indexed, so a presented key is found in one
lookup; only the SHA-256 of the whole key is stored, compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from peergpu.server.security.tokens import hash_token

KEY_MARKER = "pgk_"
HOST_CREDENTIAL_MARKER = "pgh_"


@dataclass(frozen=True, slots=True)
class NewApiKey:
    plaintext: str
    prefix: str
    secret_hash: str


def generate_api_key(marker: str = KEY_MARKER) -> NewApiKey:
    prefix = secrets.token_hex(6)
    plaintext = f"{marker}{prefix}_{secrets.token_urlsafe(32)}"
    return NewApiKey(plaintext=plaintext, prefix=prefix, secret_hash=hash_token(plaintext))


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_MARKER)


def parse_prefix(token: str, marker: str = KEY_MARKER) -> str | None:
    """The lookup prefix of a presented key, or None when it is malformed."""
    if not token.startswith(marker):
        return None
    prefix, sep, secret = token[len(marker) :].partition("_")
    if not sep or len(prefix) != 12 or not secret:
        return None
    return prefix


def matches(token: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), secret_hash)
