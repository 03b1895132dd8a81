"""Real test services: a fresh PostgreSQL database per run, and Redis.

With CI=true a missing service fails the run; locally the tests that need it are skipped with
the reason (start it with the commands in shared/services.md).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import NoReturn

import asyncpg
import pytest
import redis

CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_ADMIN_DSN = os.environ.get(
    "PEERGPU_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PEERGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(service: str, reason: object) -> NoReturn:
    message = f"{service} is not reachable ({reason}); the suite needs it"
    if CI:
        pytest.fail(f"{message} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(message)


def create_postgres_database() -> str:
    """Create ``peergpu_test_<random>`` and return its SQLAlchemy URL."""
    name = f"peergpu_test_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    try:
        asyncio.run(create())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable("PostgreSQL at " + POSTGRES_ADMIN_DSN, exc)
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)


def drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def check_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        unavailable("Redis at " + REDIS_URL, exc)


def delete_redis_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)
    client.close()
