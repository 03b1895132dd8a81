"""An in-process rate limiter: exact within one process, not shared between processes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from peergpu.server.ratelimit.base import RateLimiter, RateLimitResult, check_hit_arguments

#: Sweep expired windows at least this often (in hits); see ``InProcessRateLimiter``.
DEFAULT_SWEEP_EVERY = 1000


class InProcessRateLimiter(RateLimiter):
    """Fixed windows kept in a dict, timed with a monotonic clock (``time.monotonic``).

    Expired windows are dropped when their key is hit again, and by a sweep of the whole dict
    once ``max(sweep_every, windows left by the previous sweep)`` hits have passed since that
    sweep. That keeps the amortized cost of a hit constant and the dict below about twice the
    number of live windows plus ``sweep_every``, however many distinct keys pass through.
    ``clock`` can be injected for tests.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sweep_every: int = DEFAULT_SWEEP_EVERY,
    ) -> None:
        if sweep_every < 1:
            raise ValueError(f"sweep_every must be at least 1, got {sweep_every}")
        self._clock = clock
        self._sweep_every = sweep_every
        self._windows: dict[str, _Window] = {}
        self._hits_since_sweep = 0
        self._hits_before_sweep = sweep_every

    async def hit(
        self, key: str, *, limit: int, window_seconds: float, cost: int = 1
    ) -> RateLimitResult:
        check_hit_arguments(limit=limit, window_seconds=window_seconds, cost=cost)
        now = self._clock()
        self._maybe_sweep(now)
        window = self._windows.get(key)
        if window is not None and window.expires_at <= now:
            del self._windows[key]
            window = None
        used = 0 if window is None else window.used
        if used + cost > limit:
            reset_after = window_seconds if window is None else _left(window, now, window_seconds)
            return RateLimitResult(
                allowed=False, limit=limit, remaining=max(0, limit - used), reset_after=reset_after
            )
        if window is None:
            window = self._windows[key] = _Window(used=0, expires_at=now + window_seconds)
        window.used += cost
        return RateLimitResult(
            allowed=True,
            limit=limit,
            remaining=limit - window.used,
            reset_after=_left(window, now, window_seconds),
        )

    async def reset(self, key: str) -> None:
        self._windows.pop(key, None)

    async def close(self) -> None:
        self._windows.clear()

    @property
    def window_count(self) -> int:
        """How many windows are held, expired ones not yet swept included."""
        return len(self._windows)

    def _maybe_sweep(self, now: float) -> None:
        self._hits_since_sweep += 1
        if self._hits_since_sweep < self._hits_before_sweep:
            return
        expired = [key for key, window in self._windows.items() if window.expires_at <= now]
        for key in expired:
            del self._windows[key]
        self._hits_since_sweep = 0
        # Sweeping costs O(windows): wait proportionally long before the next one.
        self._hits_before_sweep = max(self._sweep_every, len(self._windows))


def _left(window: _Window, now: float, window_seconds: float) -> float:
    """Seconds until ``window`` ends. ``(now + w) - now`` can come out a hair above ``w`` in
    floating point (the clock's value decides): never report more than the window."""
    return min(window.expires_at - now, window_seconds)


@dataclass(slots=True)
class _Window:
    used: int
    expires_at: float
