"""New jobs, group-committed: the submits that arrive together share one transaction.

``POST /api/v1/jobs`` is the busiest write of the API. One transaction per submit paid, every
time, for a pooled connection, BEGIN, two INSERTs, COMMIT (a WAL flush) and a bus round trip
for the wake-up. The writer queues each new job (its row and its first event) and one worker
writes whatever has queued up: one INSERT of every job, one of every event, one commit, then
one bus round trip that tells each job's followers and wakes the schedulers once. As in the
agent inbox (both are a ``group_commit.GroupCommit``) there is no timer: a lone submit goes
straight through, and while one batch is in the database the next one fills. On PostgreSQL
two workers take turns; SQLite has one writer, so one.

A submit returns only once its job is committed, as before. A batch that fails is written
again job by job, so one bad row (two submits racing for one idempotency key) fails only its
own submit; when the database is unreachable every waiting submit fails at once.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from peergpu.errors import ServiceUnavailable
from peergpu.server.agents.channels import SCHEDULER_WAKE, state_change
from peergpu.server.bus import Bus
from peergpu.server.db.bulk import insert_rows
from peergpu.server.db.job_models import JobEventModel, JobModel, JobState
from peergpu.server.group_commit import GroupCommit

logger = logging.getLogger(__name__)

#: Jobs written in one transaction at most.
MAX_BATCH = 500
#: Batches in the database at once on PostgreSQL (SQLite has one writer: one batch).
WORKERS = 2
#: Seconds ``close`` lets the workers finish what is queued before it gives up on it.
CLOSE_SECONDS = 5.0

#: A new job's row and its first event.
NewJob = tuple[dict[str, Any], dict[str, Any]]


class JobWriter(GroupCommit[NewJob, None]):
    name = "job-writer"
    batch_failure_level = logging.INFO  # two submits racing for one idempotency key

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        bus: Bus,
        *,
        sqlite: bool,
        max_batch: int = MAX_BATCH,
    ) -> None:
        super().__init__(workers=1 if sqlite else WORKERS, max_batch=max_batch)
        self._sessionmaker = sessionmaker
        self._bus = bus

    async def write(self, job: dict[str, Any], event: dict[str, Any]) -> None:
        """Insert the job's row and its first event; returns once both are committed (and
        announced). Raises what the INSERT raised (``IntegrityError`` for a used key)."""
        await self.submit((job, event))

    async def close(self, *, drain_seconds: float = CLOSE_SECONDS) -> None:
        """Write what is queued (for up to ``CLOSE_SECONDS``), then stop; later submits fail."""
        await super().close(drain_seconds=drain_seconds)

    async def _commit(self, items: list[NewJob]) -> list[None]:
        async with self._sessionmaker() as session:
            await insert_rows(session, JobModel, [job for job, _event in items])
            await insert_rows(session, JobEventModel, [event for _job, event in items])
            await session.commit()
        await self._announce([job["id"] for job, _event in items])
        return [None] * len(items)

    async def _announce(self, job_ids: list[uuid.UUID]) -> None:
        """After the commit: tell each job's followers, and wake every scheduler loop once.
        Best effort: the bus being down must not fail jobs that are committed (the
        schedulers' sweep finds them)."""
        messages = [state_change(job_id, JobState.queued.value) for job_id in job_ids]
        messages.append(SCHEDULER_WAKE)
        try:
            await self._bus.publish_many(messages)
        except ServiceUnavailable as exc:
            logger.warning("bus unavailable; %d new jobs not broadcast: %s", len(job_ids), exc)
