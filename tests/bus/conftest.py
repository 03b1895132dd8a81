"""Fixtures that run every contract test against each implementation.

``bus`` and ``rate_limiter`` are parametrized ``memory`` / ``redis``. The Redis variants use
``PEERGPU_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) with a fresh key prefix per
test and delete their keys afterwards. Without a reachable Redis they skip, except under CI
(``CI=true``) where they fail, so a broken CI service cannot silently hide half the suite.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from uuid import uuid4

import pytest
import redis

from peergpu.server.bus import Bus, InProcessBus, RedisBus
from peergpu.server.ratelimit import InProcessRateLimiter, RateLimiter, RedisRateLimiter

REDIS_URL = os.environ.get("PEERGPU_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """``REDIS_URL`` once it answers PING; skips (or fails under CI) when it does not."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"Redis is not reachable at {REDIS_URL}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: the Redis service must be running)", pytrace=False)
        pytest.skip(message)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[Callable[[], str]]:
    """A factory of unique key prefixes; every key under them is deleted after the test."""
    prefixes: list[str] = []

    def new_prefix() -> str:
        prefixes.append(f"peergpu-test-{uuid4().hex}:")
        return prefixes[-1]

    yield new_prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for prefix in prefixes:
            keys = list(client.scan_iter(match=f"{prefix}*", count=500))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    instance: Bus
    if request.param == "memory":
        instance = InProcessBus()
    else:
        new_prefix: Callable[[], str] = request.getfixturevalue("redis_prefix")
        instance = RedisBus(request.getfixturevalue("redis_url"), prefix=new_prefix())
    yield instance
    await instance.close()


@pytest.fixture(params=["memory", "redis"])
async def rate_limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    instance: RateLimiter
    if request.param == "memory":
        instance = InProcessRateLimiter()
    else:
        new_prefix: Callable[[], str] = request.getfixturevalue("redis_prefix")
        instance = RedisRateLimiter(request.getfixturevalue("redis_url"), prefix=new_prefix())
    yield instance
    await instance.close()
