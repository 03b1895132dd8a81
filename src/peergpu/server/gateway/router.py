"""Which host serves a request: online hosts declaring the model, the fewest requests in flight
first, then the lowest price.

Each replica keeps its own view: the hosts serving a model (read from the database at most once
a second per model) and the requests it has in flight on each. A host's ``max_concurrency``
caps what one replica sends it; the agent, which sees every replica's requests, is the
authority and answers ``host_busy`` past it (the gateway then tries another host). When every
host is at its cap, requests wait here in priority order (higher ``priority`` first, then
arrival) until a slot frees or the queue timeout passes.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select

from peergpu.server.context import ServerContext
from peergpu.server.db.host_models import HostModel, HostServedModelModel, taking_work

#: How long a model's host list is reused before the database is asked again.
CANDIDATES_TTL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Candidate:
    host_id: uuid.UUID
    model: str
    kind: str
    max_concurrency: int
    input_price_per_million_micros: int
    output_price_per_million_micros: int

    @property
    def price(self) -> int:
        return self.input_price_per_million_micros + self.output_price_per_million_micros


class NoHost(Exception):
    """No host can take the request: ``served`` when some online host serves the model (all
    of them excluded, or serving it as ``kind``, another kind)."""

    def __init__(self, *, served: bool, kind: str | None) -> None:
        super().__init__(kind)
        self.served, self.kind = served, kind


class QueueTimeout(Exception):
    """Every host serving the model stayed at its concurrency for the whole queue timeout."""


@dataclass(order=True)
class _Waiter:
    rank: tuple[int, int]
    future: asyncio.Future[None] = field(compare=False)


class Router:
    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self._cache: dict[str, tuple[float, list[Candidate]]] = {}
        self._in_flight: Counter[tuple[uuid.UUID, str]] = Counter()
        self._waiters: dict[str, list[_Waiter]] = {}
        self._arrivals = itertools.count()

    def in_flight(self, host_id: uuid.UUID, model: str) -> int:
        return self._in_flight[(host_id, model)]

    async def candidates(self, model: str) -> list[Candidate]:
        cached = self._cache.get(model)
        now = time.monotonic()
        if cached is not None and now - cached[0] < CANDIDATES_TTL_SECONDS:
            return cached[1]
        served = HostServedModelModel
        async with self.context.sessionmaker() as session:
            rows = await session.execute(
                select(
                    served.host_id,
                    served.kind,
                    served.max_concurrency,
                    served.input_price_per_million_micros,
                    served.output_price_per_million_micros,
                )
                .join(HostModel, HostModel.id == served.host_id)
                .where(served.name == model, *taking_work())
            )
            found = [
                Candidate(host_id, model, kind, int(limit), int(price_in), int(price_out))
                for host_id, kind, limit, price_in, price_out in rows
            ]
        self._cache[model] = (now, found)
        return found

    def forget(self, model: str) -> None:
        """Read the model's hosts again on the next request (one of them failed)."""
        self._cache.pop(model, None)

    async def acquire(
        self,
        model: str,
        *,
        kind: str,
        exclude: set[uuid.UUID],
        priority: int = 0,
        queue_timeout: float,
    ) -> Candidate:
        """A slot on the best host for ``model``; :meth:`release` it when the request ends."""
        deadline = time.monotonic() + queue_timeout
        rank = (-priority, next(self._arrivals))  # kept across waits: no losing one's place
        while True:
            everyone = await self.candidates(model)
            usable = [c for c in everyone if c.kind == kind and c.host_id not in exclude]
            if not usable:
                other = [c.kind for c in everyone if c.kind != kind]
                raise NoHost(served=bool(everyone), kind=other[0] if other else None)
            free = [c for c in usable if self._in_flight[(c.host_id, model)] < c.max_concurrency]
            if free:
                best = min(
                    free,
                    key=lambda c: (self._in_flight[(c.host_id, model)], c.price, random.random()),
                )
                self._in_flight[(best.host_id, model)] += 1
                return best
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueueTimeout
            await self._wait_turn(model, rank, min(remaining, CANDIDATES_TTL_SECONDS))

    def release(self, candidate: Candidate) -> None:
        key = (candidate.host_id, candidate.model)
        self._in_flight[key] -= 1
        if self._in_flight[key] <= 0:
            del self._in_flight[key]
        waiters = self._waiters.get(candidate.model)
        while waiters:
            waiter = heapq.heappop(waiters)
            if not waiter.future.done():
                waiter.future.set_result(None)
                break

    async def _wait_turn(self, model: str, rank: tuple[int, int], timeout: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(rank, future)
        heapq.heappush(self._waiters.setdefault(model, []), waiter)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            if not future.done():
                future.cancel()
            waiters = self._waiters.get(model)
            if waiters is not None and not waiters:
                del self._waiters[model]
