"""The replica's agent inbox: job reports and heartbeats from every socket, group-committed.

A replica holding a thousand agent sockets gets a steady stream of small messages: manifest
answers, job statuses, heartbeats. Applied one transaction each, the per-transaction cost
(a pooled connection, a commit, an ORM session) dominates. The inbox queues them and one
worker applies whatever has queued up in one transaction (``job_reports.apply_reports`` and
``presence.record_heartbeats``, a few set-wise statements), then publishes every resulting
notification and trail entry in one bus round trip each, then answers each waiting socket.

There is no timer: while one batch is in the database the next one fills, so a lone message
goes straight through and a busy replica batches more. On PostgreSQL two workers take turns, so
a batch that has filled need not wait for the one in the database to commit (each job is
three messages in a row, so that wait was most of a GPU's time between jobs); SQLite has one
writer, so one worker. Two batches never hold messages from one socket, so they touch
different hosts' and jobs' rows. Each socket awaits its own message
before reading the next, so one host's messages keep their order. A batch that fails is
retried message by message (one bad report must not fail the others' transactions) unless
the database or bus is unavailable, which fails every waiting message at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from peergpu.errors import ServiceUnavailable
from peergpu.protocol.messages import GpuSampleSpec, JobStatus, ManifestAck
from peergpu.server.agents.channels import TRAIL_MAXLEN, job_events_stream
from peergpu.server.context import ServerContext
from peergpu.server.services import job_reports, presence

logger = logging.getLogger(__name__)

#: Messages applied in one transaction at most.
MAX_BATCH = 1000
#: Batches in the database at once on PostgreSQL (SQLite has one writer: one batch).
WORKERS = 2


@dataclass(slots=True)
class _Pending:
    item: job_reports.Report | presence.Beat
    done: asyncio.Future[bool]


class AgentInbox:
    def __init__(
        self, context: ServerContext, *, max_batch: int = MAX_BATCH, workers: int | None = None
    ) -> None:
        self.context = context
        self.max_batch = max_batch
        self.workers = workers or (1 if context.settings.is_sqlite else WORKERS)
        self._queue: list[_Pending] = []
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def report(self, host_id: uuid.UUID, message: ManifestAck | JobStatus) -> None:
        """Apply a job report; returns once it is committed (and announced)."""
        await self._submit(job_reports.Report(host_id, message))

    async def heartbeat(
        self, host_id: uuid.UUID, connection_id: str, samples: Sequence[GpuSampleSpec]
    ) -> bool:
        """Record a heartbeat; False if the connection has been superseded."""
        return await self._submit(presence.Beat(host_id, connection_id, samples))

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for pending in self._queue:
            if not pending.done.done():
                pending.done.set_exception(ServiceUnavailable("the server is shutting down"))
        self._queue.clear()

    async def _submit(self, item: job_reports.Report | presence.Beat) -> bool:
        if self._closed:
            raise ServiceUnavailable("the server is shutting down")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, done))
        self._ready.set()
        if len(self._tasks) < self.workers or any(t.done() for t in self._tasks):
            self._tasks = [t for t in self._tasks if not t.done()]
            while len(self._tasks) < self.workers:
                self._tasks.append(asyncio.create_task(self._run(), name="agent-inbox"))
        # A socket that goes away while waiting cancels only its wait: the message is applied.
        return await done

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                try:
                    await self._apply(batch)
                except BaseException as exc:  # cancelled (shutdown): nobody may wait forever
                    _fail(batch, ServiceUnavailable("the server is shutting down"))
                    raise exc

    async def _apply(self, batch: list[_Pending]) -> None:
        try:
            results = await self._commit(batch)
        except _UNAVAILABLE as exc:
            # The database or bus is down: one by one would only wait out each timeout.
            _fail(batch, exc if isinstance(exc, ServiceUnavailable) else _unavailable(exc))
            return
        except Exception as exc:
            if len(batch) == 1:
                logger.exception("agent message failed: %r", batch[0].item)
                _fail(batch, exc)
                return
            logger.warning("a batch of %d agent messages failed (%r); one by one", len(batch), exc)
            for pending in batch:
                await self._apply([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.done.done():
                pending.done.set_result(result)

    async def _commit(self, batch: list[_Pending]) -> list[bool]:
        reports = [p.item for p in batch if isinstance(p.item, job_reports.Report)]
        beats = [p.item for p in batch if isinstance(p.item, presence.Beat)]
        async with self.context.sessionmaker() as session:
            current = await presence.record_heartbeats(session, beats)
            applied = await job_reports.apply_reports(session, reports)
            await session.commit()
        await job_reports.announce(self.context, applied)
        await self._trail(reports)
        return [
            (p.item.host_id, p.item.connection_id) in current
            if isinstance(p.item, presence.Beat)
            else True
            for p in batch
        ]

    async def _trail(self, reports: list[job_reports.Report]) -> None:
        """Append each report to its job's bus stream: a live trail for operators and tests."""
        entries = [
            (job_events_stream(r.message.job_id), r.message.model_dump_json().encode())
            for r in reports
            if r.message.job_id is not None
        ]
        if not entries:
            return
        try:
            await self.context.bus.append_many(entries, maxlen=TRAIL_MAXLEN)
        except ServiceUnavailable as exc:  # the trail is a convenience; the database has it
            logger.debug("bus unavailable, %d trail entries not appended: %s", len(entries), exc)


#: Errors that mean a store is unreachable rather than a message being bad.
_UNAVAILABLE = (ServiceUnavailable, OperationalError, InterfaceError, SATimeoutError, OSError)


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"the database is unavailable ({type(exc).__name__})")


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for pending in batch:
        if not pending.done.done():
            pending.done.set_exception(exc)
