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

import logging
import uuid
from collections.abc import Sequence

from peergpu.errors import ServiceUnavailable
from peergpu.protocol.messages import GpuSampleSpec, JobStatus, ManifestAck
from peergpu.server.agents.channels import TRAIL_MAXLEN, job_events_stream
from peergpu.server.context import ServerContext
from peergpu.server.group_commit import GroupCommit
from peergpu.server.services import job_reports, presence

logger = logging.getLogger(__name__)

#: Messages applied in one transaction at most.
MAX_BATCH = 1000
#: Batches in the database at once on PostgreSQL (SQLite has one writer: one batch).
WORKERS = 2


Item = job_reports.Report | presence.Beat


#: A heartbeat's answer: None if its connection was superseded, else the jobs the host runs
#: that are not its to run (empty unless the beat asked for a reconcile). A report's: None.
Answer = list[uuid.UUID] | None


class AgentInbox(GroupCommit[Item, Answer]):
    name = "agent-inbox"

    def __init__(
        self, context: ServerContext, *, max_batch: int = MAX_BATCH, workers: int | None = None
    ) -> None:
        super().__init__(
            workers=workers or (1 if context.settings.is_sqlite else WORKERS),
            max_batch=max_batch,
        )
        self.context = context

    async def report(self, host_id: uuid.UUID, message: ManifestAck | JobStatus) -> None:
        """Apply a job report; returns once it is committed (and announced)."""
        await self.submit(job_reports.Report(host_id, message))

    async def heartbeat(
        self,
        host_id: uuid.UUID,
        connection_id: str,
        samples: Sequence[GpuSampleSpec],
        running: Sequence[uuid.UUID] | None = None,
    ) -> list[uuid.UUID] | None:
        """Record a heartbeat, and with ``running`` reconcile what the host says it runs
        (``job_reports.reconcile_hosts``, after the batch's reports). Returns None if the
        connection has been superseded, else the jobs the host should stop."""
        return await self.submit(presence.Beat(host_id, connection_id, samples, running))

    def _failed_alone(self, item: Item, exc: Exception) -> None:
        logger.error("agent message failed: %r", item, exc_info=exc)

    async def _commit(self, items: list[Item]) -> list[Answer]:
        reports = [item for item in items if isinstance(item, job_reports.Report)]
        beats = [item for item in items if isinstance(item, presence.Beat)]
        async with self.context.sessionmaker() as session:
            current = await presence.record_heartbeats(session, beats)
            applied = await job_reports.apply_reports(session, reports)
            # After the reports: a job whose final status is in this batch is not missing.
            # Two batches never hold one socket's messages, so no earlier report is pending.
            stop = await job_reports.reconcile_hosts(
                session,
                {
                    beat.host_id: beat.running
                    for beat in beats
                    if beat.running is not None and (beat.host_id, beat.connection_id) in current
                },
            )
            await session.commit()
        await job_reports.announce(self.context, applied)
        await self._trail(reports)
        answers: list[Answer] = []
        for item in items:
            if isinstance(item, presence.Beat):
                current_beat = (item.host_id, item.connection_id) in current
                answers.append(stop.get(item.host_id, []) if current_beat else None)
            else:
                answers.append(None)
        return answers

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
