"""The ``RateLimiter`` contract, run against the in-process and Redis limiters (see conftest)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from peergpu.config import ServerSettings
from peergpu.server.ratelimit import (
    Hit,
    InProcessRateLimiter,
    RateLimiter,
    RateLimitResult,
    RedisRateLimiter,
    create_rate_limiter,
)

#: Nothing listens on port 1: connections are refused at once.
UNREACHABLE_REDIS_URL = "redis://127.0.0.1:1/0"
WINDOW = 60.0


async def test_allows_up_to_the_limit_then_refuses(rate_limiter: RateLimiter) -> None:
    results = [await rate_limiter.hit("ip:1", limit=3, window_seconds=WINDOW) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, True]
    assert [r.remaining for r in results] == [2, 1, 0]
    assert all(r.limit == 3 and r.retry_after == 0.0 for r in results)
    assert all(0 < r.reset_after <= WINDOW for r in results)

    refused = await rate_limiter.hit("ip:1", limit=3, window_seconds=WINDOW)
    assert not refused.allowed
    assert refused.remaining == 0
    assert 0 < refused.retry_after <= WINDOW
    assert refused.retry_after == refused.reset_after


async def test_refused_hits_do_not_consume_and_cost_counts(rate_limiter: RateLimiter) -> None:
    first = await rate_limiter.hit("user:7", limit=5, window_seconds=WINDOW, cost=3)
    assert (first.allowed, first.remaining) == (True, 2)
    for _ in range(3):  # refused again and again, but nothing is spent
        refused = await rate_limiter.hit("user:7", limit=5, window_seconds=WINDOW, cost=3)
        assert (refused.allowed, refused.remaining) == (False, 2)
    last = await rate_limiter.hit("user:7", limit=5, window_seconds=WINDOW, cost=2)
    assert (last.allowed, last.remaining) == (True, 0)
    assert not (await rate_limiter.hit("user:7", limit=5, window_seconds=WINDOW)).allowed


async def test_cost_above_limit_is_refused_without_opening_a_window(
    rate_limiter: RateLimiter,
) -> None:
    refused = await rate_limiter.hit("big", limit=2, window_seconds=WINDOW, cost=3)
    assert not refused.allowed
    assert refused.retry_after > 0
    allowed = await rate_limiter.hit("big", limit=2, window_seconds=WINDOW)
    assert (allowed.allowed, allowed.remaining) == (True, 1)


async def test_window_resets_after_expiry(rate_limiter: RateLimiter) -> None:
    assert (await rate_limiter.hit("short", limit=1, window_seconds=0.2)).allowed
    refused = await rate_limiter.hit("short", limit=1, window_seconds=0.2)
    assert not refused.allowed
    assert 0 < refused.retry_after <= 0.2
    await asyncio.sleep(0.25)  # the window itself is wall-clock time: nothing to await instead
    again = await rate_limiter.hit("short", limit=1, window_seconds=0.2)
    assert (again.allowed, again.remaining) == (True, 0)


async def test_keys_are_independent(rate_limiter: RateLimiter) -> None:
    assert (await rate_limiter.hit("a", limit=1, window_seconds=WINDOW)).allowed
    assert not (await rate_limiter.hit("a", limit=1, window_seconds=WINDOW)).allowed
    assert (await rate_limiter.hit("b", limit=1, window_seconds=WINDOW)).allowed


async def test_reset_starts_a_fresh_window(rate_limiter: RateLimiter) -> None:
    for _ in range(2):
        await rate_limiter.hit("login:bob", limit=2, window_seconds=WINDOW)
    assert not (await rate_limiter.hit("login:bob", limit=2, window_seconds=WINDOW)).allowed
    await rate_limiter.reset("login:bob")
    fresh = await rate_limiter.hit("login:bob", limit=2, window_seconds=WINDOW)
    assert (fresh.allowed, fresh.remaining) == (True, 1)
    await rate_limiter.reset("never-seen")  # idempotent, no error


async def test_concurrent_hits_never_overspend(rate_limiter: RateLimiter) -> None:
    results = await asyncio.gather(
        *(rate_limiter.hit("burst", limit=10, window_seconds=WINDOW) for _ in range(50))
    )
    assert sum(r.allowed for r in results) == 10


async def test_a_chain_spends_in_order_and_stops_at_the_first_refusal(
    rate_limiter: RateLimiter,
) -> None:
    chain = [Hit("req", limit=2), Hit("tok", limit=10, cost=4)]
    first = await rate_limiter.hit_chain(chain, window_seconds=WINDOW)
    assert [(r.allowed, r.remaining, r.limit) for r in first] == [(True, 1, 2), (True, 6, 10)]
    assert all(0 < r.reset_after <= WINDOW for r in first)
    # The second budget refuses: the first stays spent, the second spends nothing.
    second = await rate_limiter.hit_chain(
        [Hit("req", limit=2), Hit("tok", limit=10, cost=7)], window_seconds=WINDOW
    )
    assert [(r.allowed, r.remaining) for r in second] == [(True, 0), (False, 6)]
    assert second[1].retry_after > 0
    # The first refuses: the chain stops there and the second is not even tried.
    third = await rate_limiter.hit_chain(chain, window_seconds=WINDOW)
    assert [(r.allowed, r.remaining) for r in third] == [(False, 0)]
    assert (await rate_limiter.hit("tok", limit=10, window_seconds=WINDOW, cost=6)).remaining == 0
    assert await rate_limiter.hit_chain([], window_seconds=WINDOW) == []


async def test_a_chain_with_a_bad_hit_spends_nothing(rate_limiter: RateLimiter) -> None:
    with pytest.raises(ValueError):
        await rate_limiter.hit_chain(
            [Hit("ok", limit=5), Hit("bad", limit=5, cost=0)], window_seconds=WINDOW
        )
    assert (await rate_limiter.hit("ok", limit=5, window_seconds=WINDOW)).remaining == 4


async def test_concurrent_chains_never_overspend(rate_limiter: RateLimiter) -> None:
    results = await asyncio.gather(
        *(
            rate_limiter.hit_chain(
                [Hit("c-req", limit=30), Hit("c-tok", limit=10)], window_seconds=WINDOW
            )
            for _ in range(50)
        )
    )
    assert sum(len(r) == 2 and r[1].allowed for r in results) == 10
    assert sum(r[0].allowed for r in results) == 30


@pytest.mark.parametrize(
    ("limit", "window_seconds", "cost"), [(0, 1.0, 1), (1, 0.0, 1), (1, -1.0, 1), (1, 1.0, 0)]
)
async def test_rejects_bad_arguments(
    rate_limiter: RateLimiter, limit: int, window_seconds: float, cost: int
) -> None:
    with pytest.raises(ValueError):
        await rate_limiter.hit("k", limit=limit, window_seconds=window_seconds, cost=cost)


def test_retry_after_is_zero_when_allowed() -> None:
    allowed = RateLimitResult(allowed=True, limit=1, remaining=0, reset_after=3.0)
    refused = RateLimitResult(allowed=False, limit=1, remaining=0, reset_after=3.0)
    assert (allowed.retry_after, refused.retry_after) == (0.0, 3.0)


# --- implementation specifics --------------------------------------------------------------


async def test_redis_limiter_fails_open_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisRateLimiter(UNREACHABLE_REDIS_URL, prefix="peergpu-test-unreachable:")
    try:
        with caplog.at_level(logging.WARNING, logger="peergpu.server.ratelimit.redis"):
            results = [await limiter.hit("ip", limit=1, window_seconds=WINDOW) for _ in range(3)]
            chained = await limiter.hit_chain(
                [Hit("ip", limit=1), Hit("tok", limit=1)], window_seconds=WINDOW
            )
            await limiter.reset("ip")
        assert all(r.allowed and r.remaining == 1 for r in results + chained)
        assert len(chained) == 2
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, "one warning per outage, not one per request"
        assert "failing open" in warnings[0].getMessage()
    finally:
        await limiter.close()


async def test_in_process_limiter_sweeps_expired_windows() -> None:
    now = 0.0
    limiter = InProcessRateLimiter(clock=lambda: now, sweep_every=100)
    for number in range(1000):
        await limiter.hit(f"old:{number}", limit=1, window_seconds=1.0)
    assert limiter.window_count == 1000
    now = 10.0  # every window above has expired; none of those keys is hit again
    for _ in range(1000):
        await limiter.hit("hot", limit=10**6, window_seconds=1.0)
    assert limiter.window_count == 1


async def test_in_process_limiter_stays_bounded_under_key_churn() -> None:
    now = 0.0
    limiter = InProcessRateLimiter(clock=lambda: now, sweep_every=100)
    largest = 0
    for number in range(20_000):
        now += 0.01  # with a 1 s window about 100 windows are live at any moment
        await limiter.hit(f"client:{number}", limit=1, window_seconds=1.0)
        largest = max(largest, limiter.window_count)
    assert largest <= 2 * 101 + 100


async def test_create_rate_limiter_follows_settings() -> None:
    in_process = create_rate_limiter(ServerSettings(redis_url=""))
    assert isinstance(in_process, InProcessRateLimiter)
    await in_process.close()
    shared = create_rate_limiter(ServerSettings(redis_url=UNREACHABLE_REDIS_URL))
    assert isinstance(shared, RedisRateLimiter)
    await shared.close()


async def test_in_process_limiter_never_reports_more_than_the_window() -> None:
    # Just below a power of two, ``(now + 60) - now`` is 60 plus a rounding error in floating
    # point: the contract test above failed that way when the machine's uptime was ~1,000 s.
    now = 1000.0
    limiter = InProcessRateLimiter(clock=lambda: now)
    for step in range(200):
        now = 964.0 + step * 0.3
        result = await limiter.hit(f"k{step}", limit=1, window_seconds=WINDOW)
        refused = await limiter.hit(f"k{step}", limit=1, window_seconds=WINDOW)
        assert 0 < result.reset_after <= WINDOW
        assert 0 < refused.reset_after <= WINDOW
