"""Group commit: many small writes that arrive together share one transaction.

A replica gets steady streams of small writes (agent reports and heartbeats, new jobs).
Applied one transaction each, the per-transaction cost (a pooled connection, BEGIN, COMMIT
and its WAL flush, a bus round trip) dominates. A :class:`GroupCommit` queues each item and
a worker applies whatever has queued up in one call of :meth:`GroupCommit._commit`. There is
no timer: a lone item goes straight through, and while one batch is in the database the next
one fills. ``workers`` batches may be in the database at once (two on PostgreSQL, so a batch
that has filled need not wait for the one committing; one on SQLite, its single writer).

Each caller awaits its own item. A batch that fails is applied again item by item, so one
bad item fails only its own caller; when a store is unreachable, every item of the batch
fails at once (one by one would only wait out each timeout). A caller that stops waiting
(cancelled) does not take its item back: it is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from peergpu.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Errors that mean a store is unreachable rather than an item being bad.
UNAVAILABLE = (ServiceUnavailable, OperationalError, InterfaceError, SATimeoutError, OSError)


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    done: asyncio.Future[R]


class GroupCommit(Generic[T, R]):
    """Subclasses implement :meth:`_commit` (apply a batch, return one result per item)."""

    #: The workers' task name, and what the log calls the items.
    name = "group-commit"
    #: How loud a failed batch (then applied item by item) is logged.
    batch_failure_level = logging.WARNING

    def __init__(self, *, workers: int, max_batch: int) -> None:
        self.workers = workers
        self.max_batch = max_batch
        self._queue: list[_Pending[T, R]] = []
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._busy = 0  # batches being applied

    async def _commit(self, items: list[T]) -> list[R]:
        raise NotImplementedError

    def _failed_alone(self, item: T, exc: Exception) -> None:
        """An item that failed by itself (after its batch did); for the subclass to log."""

    async def submit(self, item: T) -> R:
        """Apply ``item`` with whatever else is waiting; returns its result once committed."""
        if self._closed:
            raise ServiceUnavailable("the server is shutting down")
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, done))
        self._ready.set()
        if len(self._tasks) < self.workers or any(t.done() for t in self._tasks):
            self._tasks = [t for t in self._tasks if not t.done()]
            while len(self._tasks) < self.workers:
                self._tasks.append(asyncio.create_task(self._run(), name=self.name))
        return await done

    async def close(self, *, drain_seconds: float = 0.0) -> None:
        """Stop taking items; apply what is queued for up to ``drain_seconds``, then fail the
        rest (the server is shutting down)."""
        self._closed = True
        if drain_seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_seconds):
                    while self._queue or self._busy:
                        await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        _fail(self._queue, ServiceUnavailable("the server is shutting down"))
        self._queue.clear()

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                self._busy += 1
                try:
                    await self._apply(batch)
                except BaseException as exc:  # cancelled (shutdown): nobody may wait forever
                    _fail(batch, ServiceUnavailable("the server is shutting down"))
                    raise exc
                finally:
                    self._busy -= 1

    async def _apply(self, batch: list[_Pending[T, R]]) -> None:
        try:
            results = await self._commit([p.item for p in batch])
        except UNAVAILABLE as exc:
            _fail(batch, exc if isinstance(exc, ServiceUnavailable) else _unavailable(exc))
            return
        except Exception as exc:
            if len(batch) == 1:
                self._failed_alone(batch[0].item, exc)
                _fail(batch, exc)
                return
            logger.log(
                self.batch_failure_level,
                "%s: a batch of %d failed (%r); one by one",
                self.name,
                len(batch),
                exc,
            )
            for pending in batch:
                await self._apply([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.done.done():
                pending.done.set_result(result)


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"the database is unavailable ({type(exc).__name__})")


def _fail(batch: list[_Pending[T, R]], exc: BaseException) -> None:
    for pending in batch:
        if not pending.done.done():
            pending.done.set_exception(exc)
