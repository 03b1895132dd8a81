"""A rate limiter over Redis, shared by every server process of a deployment.

Each hit is one atomic Lua script (``GET``, ``INCRBY``, ``PEXPIRE``) on the key
``prefix + "rl:" + key``, so concurrent hits from any number of processes never overspend and
the window expires by itself in Redis. A :meth:`~RedisRateLimiter.hit_chain` is the same
script over all its keys: one round trip (on Redis Cluster its keys must share a hash slot, so
callers put a ``{hash tag}`` in them).

**It fails open.** Rate limits must never take the API down: when Redis cannot be reached or
errors, ``hit`` allows the request (``remaining == limit``, ``reset_after == 0.0``) and
``reset`` does nothing. The first failure logs a warning (later ones while Redis stays down
log at debug level, so an outage does not flood the log), and for ``failure_cooldown_seconds``
after a failure Redis is not contacted at all, so requests do not each wait for a connection
timeout. Commands use a short socket timeout and at most one immediate retry for the same
reason.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from peergpu.server.ratelimit.base import Hit, RateLimiter, RateLimitResult, check_hit_arguments

logger = logging.getLogger(__name__)

DEFAULT_SOCKET_TIMEOUT = 1.0
DEFAULT_FAILURE_COOLDOWN = 1.0

# For each of KEYS in turn: ARGV = window in ms, then (limit, cost) per key. Stops after the
# first refusal; returns {allowed, used, pttl_ms} per key tried, flattened. A refused hit
# leaves its counter alone; the first allowed hit of a window sets the expiry (and a counter
# found without one, which a crash between INCRBY and PEXPIRE could leave, gets one).
_HIT_SCRIPT = """
local window_ms = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 * i])
  local cost = tonumber(ARGV[2 * i + 1])
  local used = tonumber(redis.call('GET', key) or '0')
  local allowed = used + cost <= limit
  if allowed then
    used = redis.call('INCRBY', key, cost)
  end
  local ttl = redis.call('PTTL', key)
  if ttl == -1 or (allowed and ttl < 0) then
    redis.call('PEXPIRE', key, window_ms)
    ttl = window_ms
  end
  table.insert(out, allowed and 1 or 0)
  table.insert(out, used)
  table.insert(out, ttl)
  if not allowed then
    return out
  end
end
return out
"""


class RedisRateLimiter(RateLimiter):
    """``RateLimiter`` over Redis that fails open; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "peergpu:",
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        failure_cooldown_seconds: float = DEFAULT_FAILURE_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key_prefix = prefix + "rl:"
        self._redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        self._hit_script = self._redis.register_script(_HIT_SCRIPT)
        self._failure_cooldown = failure_cooldown_seconds
        self._clock = clock
        self._skip_redis_until: float | None = None

    async def hit(
        self, key: str, *, limit: int, window_seconds: float, cost: int = 1
    ) -> RateLimitResult:
        [result] = await self.hit_chain([Hit(key, limit, cost)], window_seconds=window_seconds)
        return result

    async def hit_chain(
        self, hits: Sequence[Hit], *, window_seconds: float
    ) -> list[RateLimitResult]:
        for one in hits:
            check_hit_arguments(limit=one.limit, window_seconds=window_seconds, cost=one.cost)
        if not hits:
            return []
        if self._cooling_down():
            return [_open(one.limit) for one in hits]
        window_ms = max(1, math.ceil(window_seconds * 1000))
        args: list[int] = [window_ms]
        for one in hits:
            args += [one.limit, one.cost]
        try:
            flat = await self._hit_script(
                keys=[self._key_prefix + one.key for one in hits], args=args
            )
        except (RedisError, OSError) as exc:
            self._record_failure("hit", exc)
            return [_open(one.limit) for one in hits]
        self._record_success()
        return [
            _result(one.limit, window_ms, *flat[3 * i : 3 * i + 3])
            for i, one in enumerate(hits[: len(flat) // 3])
        ]

    async def reset(self, key: str) -> None:
        if self._cooling_down():
            return
        try:
            await self._redis.delete(self._key_prefix + key)
        except (RedisError, OSError) as exc:
            self._record_failure("reset", exc)
            return
        self._record_success()

    async def close(self) -> None:
        await self._redis.aclose()

    def _cooling_down(self) -> bool:
        return self._skip_redis_until is not None and self._clock() < self._skip_redis_until

    def _record_failure(self, operation: str, exc: BaseException) -> None:
        first_failure = self._skip_redis_until is None
        self._skip_redis_until = self._clock() + self._failure_cooldown
        log = logger.warning if first_failure else logger.debug
        log(
            "Redis rate limiter unavailable during %s, failing open: %s",
            operation,
            exc,
            exc_info=first_failure,
        )

    def _record_success(self) -> None:
        if self._skip_redis_until is not None:
            logger.info("Redis rate limiter reachable again")
            self._skip_redis_until = None


def _open(limit: int) -> RateLimitResult:
    """The verdict while Redis is unreachable: allowed (the limiter fails open)."""
    return RateLimitResult(allowed=True, limit=limit, remaining=limit, reset_after=0.0)


def _result(limit: int, window_ms: int, allowed: int, used: int, ttl_ms: int) -> RateLimitResult:
    return RateLimitResult(
        allowed=bool(allowed),
        limit=limit,
        remaining=max(0, limit - int(used)),
        reset_after=(int(ttl_ms) if ttl_ms > 0 else window_ms) / 1000,
    )
