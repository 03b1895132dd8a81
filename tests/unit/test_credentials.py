from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from peergpu.errors import AuthenticationFailed
from peergpu.server.security import api_keys
from peergpu.server.security.passwords import PasswordHashing
from peergpu.server.security.scopes import Scope, grants
from peergpu.server.security.tokens import AccessTokens


def test_password_hashing_round_trip() -> None:
    hashing = PasswordHashing(time_cost=1, memory_cost_kib=64)
    stored = hashing.hash("hunter2hunter2")
    assert stored.startswith("$argon2id$")
    assert hashing.verify(stored, "hunter2hunter2")
    assert not hashing.verify(stored, "hunter2hunter3")
    assert not hashing.verify(None, "hunter2hunter2")
    assert not hashing.verify("not a hash", "x")


def test_access_token_round_trip_and_expiry() -> None:
    tokens = AccessTokens(secret="k" * 40, ttl_seconds=60)
    user_id = uuid.uuid4()
    assert tokens.verify(tokens.issue(user_id)).user_id == user_id
    old = tokens.issue(user_id, now=datetime.now(UTC) - timedelta(minutes=5))
    with pytest.raises(AuthenticationFailed) as expired:
        tokens.verify(old)
    assert expired.value.code == "token_expired"


def test_access_token_rejects_other_secrets_and_types() -> None:
    tokens = AccessTokens(secret="k" * 40, ttl_seconds=60)
    forged = AccessTokens(secret="x" * 40, ttl_seconds=60).issue(uuid.uuid4())
    with pytest.raises(AuthenticationFailed):
        tokens.verify(forged)
    now = datetime.now(UTC)
    wrong_type = jwt.encode(
        {
            "sub": str(uuid.uuid4()),
            "iat": now,
            "exp": now + timedelta(minutes=1),
            "iss": "peergpu",
            "typ": "refresh",
        },
        "k" * 40,
        algorithm="HS256",
    )
    with pytest.raises(AuthenticationFailed):
        tokens.verify(wrong_type)
    unsigned = jwt.encode({"sub": str(uuid.uuid4())}, key="", algorithm="none")
    with pytest.raises(AuthenticationFailed):
        tokens.verify(unsigned)


def test_api_key_format() -> None:
    key = api_keys.generate_api_key()
    assert api_keys.looks_like_api_key(key.plaintext)
    assert api_keys.parse_prefix(key.plaintext) == key.prefix
    assert api_keys.matches(key.plaintext, key.secret_hash)
    assert not api_keys.matches(key.plaintext + "x", key.secret_hash)
    assert api_keys.parse_prefix("pgk_short_x") is None
    assert api_keys.parse_prefix("pgk_0123456789ab") is None
    assert key.plaintext not in key.secret_hash


def test_write_scope_implies_read_only() -> None:
    assert grants(frozenset({Scope.write}), Scope.read)
    assert not grants(frozenset({Scope.read}), Scope.write)
    assert not grants(frozenset({Scope.write}), Scope.inference)
