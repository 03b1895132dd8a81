"""New jobs, group-committed: the submits that arrive together share one transaction.

``POST /api/v1/jobs`` is the busiest write of the API. One transaction per submit paid, every
time, for a pooled connection, BEGIN, two INSERTs, COMMIT (a WAL flush) and a bus round trip
for the wake-up. The writer queues each new job (its row and its first event) and one worker
writes whatever has queued up: one INSERT of every job, one of every event, one commit, then
one bus round trip that tells each job's followers and wakes the schedulers once. As in the
agent inbox (``agents.inbox``) there is no timer: a lone submit goes straight through, and
while one batch is in the database the next one fills. On PostgreSQL two workers take turns;
SQLite has one writer, so one.

A submit returns only once its job is committed, as before. A batch that fails is written
again job by job, so one bad row (two submits racing for one idempotency key) fails only its
own submit; when the database is unreachable every waiting submit fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from peergpu.errors import ServiceUnavailable
from peergpu.server.agents.channels import SCHEDULER_WAKE, job_channel
from peergpu.server.bus import Bus
from peergpu.server.db.bulk import insert_rows
from peergpu.server.db.job_models import JobEventModel, JobModel, JobState

logger = logging.getLogger(__name__)

#: Jobs written in one transaction at most.
MAX_BATCH = 500
#: Batches in the database at once on PostgreSQL (SQLite has one writer: one batch).
WORKERS = 2
#: Seconds ``close`` lets the workers finish what is queued before it gives up on it.
CLOSE_SECONDS = 5.0

_QUEUED_STATE = json.dumps({"kind": "state", "state": JobState.queued.value}).encode()
#: Errors that mean the database is unreachable rather than a row being bad.
_UNAVAILABLE = (ServiceUnavailable, OperationalError, InterfaceError, SATimeoutError, OSError)


@dataclass(slots=True)
class _Pending:
    job: dict[str, Any]
    event: dict[str, Any]
    done: asyncio.Future[None]


class JobWriter:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        bus: Bus,
        *,
        sqlite: bool,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._bus = bus
        self.max_batch = max_batch
        self.workers = 1 if sqlite else WORKERS
        self._queue: list[_Pending] = []
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._busy = 0  # batches being written

    async def write(self, job: dict[str, Any], event: dict[str, Any]) -> None:
        """Insert the job's row and its first event; returns once both are committed (and
        announced). Raises what the INSERT raised (``IntegrityError`` for a used key)."""
        if self._closed:
            raise ServiceUnavailable("the server is shutting down")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(job, event, done))
        self._ready.set()
        if len(self._tasks) < self.workers or any(t.done() for t in self._tasks):
            self._tasks = [t for t in self._tasks if not t.done()]
            while len(self._tasks) < self.workers:
                self._tasks.append(asyncio.create_task(self._run(), name="job-writer"))
        # A client that goes away while waiting cancels only its wait: the job is written.
        await asyncio.shield(done)

    async def close(self) -> None:
        """Write what is queued (for up to ``CLOSE_SECONDS``), then stop; later submits fail."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
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

    async def _apply(self, batch: list[_Pending]) -> None:
        try:
            await self._commit(batch)
        except _UNAVAILABLE as exc:
            _fail(batch, exc if isinstance(exc, ServiceUnavailable) else _unavailable(exc))
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            logger.info("a batch of %d new jobs failed (%r); one by one", len(batch), exc)
            for pending in batch:
                await self._apply([pending])
            return
        for pending in batch:
            if not pending.done.done():
                pending.done.set_result(None)

    async def _commit(self, batch: list[_Pending]) -> None:
        async with self._sessionmaker() as session:
            await insert_rows(session, JobModel, [p.job for p in batch])
            await insert_rows(session, JobEventModel, [p.event for p in batch])
            await session.commit()
        await self._announce([p.job["id"] for p in batch])

    async def _announce(self, job_ids: list[uuid.UUID]) -> None:
        """After the commit: tell each job's followers, and wake every scheduler loop once.
        Best effort: the bus being down must not fail jobs that are committed (the
        schedulers' sweep finds them)."""
        messages = [(job_channel(job_id), _QUEUED_STATE) for job_id in job_ids]
        messages.append(SCHEDULER_WAKE)
        try:
            await self._bus.publish_many(messages)
        except ServiceUnavailable as exc:
            logger.warning("bus unavailable; %d new jobs not broadcast: %s", len(job_ids), exc)


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"the database is unavailable ({type(exc).__name__})")


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for pending in batch:
        if not pending.done.done():
            pending.done.set_exception(exc)
