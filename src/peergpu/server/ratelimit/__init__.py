"""Rate limiting: fixed-window counters per key.

``create_rate_limiter`` picks the implementation from settings: ``RedisRateLimiter`` (shared
by all server processes, fails open) when ``redis_url`` is set, else ``InProcessRateLimiter``.
"""

from __future__ import annotations

from peergpu.config import ServerSettings
from peergpu.server.ratelimit.base import Hit, RateLimiter, RateLimitResult
from peergpu.server.ratelimit.memory import InProcessRateLimiter
from peergpu.server.ratelimit.redis import RedisRateLimiter

__all__ = [
    "Hit",
    "InProcessRateLimiter",
    "RateLimitResult",
    "RateLimiter",
    "RedisRateLimiter",
    "create_rate_limiter",
]


def create_rate_limiter(settings: ServerSettings) -> RateLimiter:
    """``RedisRateLimiter`` on ``settings.redis_url`` (keys ``redis_prefix + "rl:"``), else
    an ``InProcessRateLimiter``. Creating either does no I/O."""
    if settings.redis_url:
        return RedisRateLimiter(settings.redis_url, prefix=settings.redis_prefix)
    return InProcessRateLimiter()
