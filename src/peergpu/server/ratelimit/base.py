"""The rate limiter contract: a fixed-window counter per key.

A window opens at the first allowed hit on a key and lasts ``window_seconds``; within it at
most ``limit`` units may be spent. A hit is allowed iff ``used + cost <= limit`` and only an
allowed hit spends its ``cost``, so a client hammering a refused endpoint does not push its own
recovery further away. When the window expires the count starts again from zero.

Every implementation (``InProcessRateLimiter``, ``RedisRateLimiter``) is held to the same
contract by ``tests/bus/test_ratelimit_contract.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    """The verdict on one hit.

    ``remaining`` is what may still be spent in the current window after this hit;
    ``reset_after`` is the number of seconds until the window resets (the full window length
    when no window is open, which only happens for a refused hit whose ``cost`` exceeds
    ``limit``).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float

    @property
    def retry_after(self) -> float:
        """Seconds to wait before trying again: ``reset_after`` when refused, else ``0.0``."""
        return 0.0 if self.allowed else self.reset_after


@dataclass(frozen=True, slots=True)
class Hit:
    """One hit of a :meth:`RateLimiter.hit_chain`: ``cost`` units of ``key``'s ``limit``."""

    key: str
    limit: int
    cost: int = 1


class RateLimiter(ABC):
    """Counts hits per key; see the module docstring for the exact semantics."""

    @abstractmethod
    async def hit(
        self, key: str, *, limit: int, window_seconds: float, cost: int = 1
    ) -> RateLimitResult:
        """Try to spend ``cost`` units of ``key``'s budget of ``limit`` per window.

        Atomic per key: concurrent hits never overspend. Raises ``ValueError`` when
        ``limit < 1``, ``window_seconds <= 0`` or ``cost < 1``.
        """

    async def hit_chain(
        self, hits: Sequence[Hit], *, window_seconds: float
    ) -> list[RateLimitResult]:
        """``hit`` each of ``hits`` in order, stopping at the first refused one: the results
        of the hits tried, so the last one is refused iff the list is shorter than ``hits``
        or its last verdict is a refusal. Hits after a refusal spend nothing; hits before it
        stay spent. Each hit is atomic on its key (not the chain as a whole). An
        implementation may do it all in one round trip (Redis does)."""
        for hit in hits:
            check_hit_arguments(limit=hit.limit, window_seconds=window_seconds, cost=hit.cost)
        results: list[RateLimitResult] = []
        for hit in hits:
            result = await self.hit(
                hit.key, limit=hit.limit, window_seconds=window_seconds, cost=hit.cost
            )
            results.append(result)
            if not result.allowed:
                break
        return results

    @abstractmethod
    async def reset(self, key: str) -> None:
        """Forget ``key``'s window, so its next hit starts a fresh one. Idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Release resources; the limiter is not used afterwards."""


def check_hit_arguments(*, limit: int, window_seconds: float, cost: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be positive, got {window_seconds}")
    if cost < 1:
        raise ValueError(f"cost must be at least 1, got {cost}")
