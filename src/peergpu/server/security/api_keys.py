"""API key format: ``pgk_<prefix>_<secret>``.

The prefix (12 hex chars) is stored in clear and indexed, so a presented key is found in one
lookup; only the SHA-256 of the whole key is stored, compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from peergpu.server.security.tokens import hash_token

KEY_MARKER = "pgk_"


@dataclass(frozen=True, slots=True)
class NewApiKey:
    plaintext: str
    prefix: str
    secret_hash: str


def generate_api_key() -> NewApiKey:
    prefix = secrets.token_hex(6)
    plaintext = f"{KEY_MARKER}{prefix}_{secrets.token_urlsafe(32)}"
    return NewApiKey(plaintext=plaintext, prefix=prefix, secret_hash=hash_token(plaintext))


def looks_like_api_key(token: str) -> bool:
    return token.startswith(KEY_MARKER)


def parse_prefix(token: str) -> str | None:
    """The lookup prefix of a presented key, or None when it is malformed."""
    body = token[len(KEY_MARKER) :]
    prefix, sep, secret = body.partition("_")
    if not sep or len(prefix) != 12 or not secret:
        return None
    return prefix


def matches(token: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), secret_hash)
