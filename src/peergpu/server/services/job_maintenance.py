"""The scheduler's slow sweep: everything that happens because time passed.

* a manifest not acknowledged by its deadline -> the job is lost (re-queued or failed);
* a host offline longer than the grace period, or silent about a job it should be running
  for that long -> its jobs are lost;
* a queued job past its queue deadline -> expired;
* GPUs still held by a job that ended (its host never confirmed) -> freed after the grace;
* each host's reliability (its 30-day uptime) refreshed for the scheduler's ranking.

Every change is a conditional transition, so replicas sweeping at the same time do no harm.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.agents import dispatch
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel, HostModel, HostStatus
from peergpu.server.db.job_models import FINAL_STATES, JobLogChunkModel, JobModel, JobState
from peergpu.server.services import hosts as host_service
from peergpu.server.services import job_logs, job_states

logger = logging.getLogger(__name__)

RELIABILITY_REFRESH_SECONDS = 300.0
#: The job-end path archives logs at once; the sweep picks up what it missed after this long.
ARCHIVE_RETRY_AFTER_SECONDS = 60.0
_ARCHIVE_BATCH = 20
_BATCH = 500


async def run_once(context: ServerContext, *, refresh_reliability: bool = False) -> int:
    """One sweep; returns how many jobs changed state. With ``refresh_reliability`` it also
    recomputes every host's cached 30-day uptime (the caller does that every few minutes)."""
    changed: list[tuple[uuid.UUID, JobState, uuid.UUID | None]] = []
    async with context.sessionmaker() as session:
        changed += await _unacknowledged(context, session)
        changed += await _lost(context, session)
        changed += await _expired(session)
        freed = await _stale_gpu_claims(context, session)
        await session.commit()
        if refresh_reliability:
            await _refresh_reliability(session)
    await _archive_leftover_logs(context)
    for job_id, state, host_id in changed:
        if host_id is not None:
            await dispatch.send_cancel(
                context=context, host_id=host_id, job_id=job_id, reason="the server gave up on it"
            )
        await job_states.notify(context, job_id, state)
    if changed or freed:
        await job_states.wake_schedulers(context)
    return len(changed)


async def _unacknowledged(
    context: ServerContext, session: AsyncSession
) -> list[tuple[uuid.UUID, JobState, uuid.UUID | None]]:
    now = utcnow()
    jobs = await session.scalars(
        select(JobModel)
        .where(
            JobModel.state == JobState.assigned.value,
            JobModel.acked_at.is_(None),
            JobModel.ack_deadline < now,
        )
        .limit(_BATCH)
    )
    changed = []
    for job in list(jobs):
        host_id = job.host_id
        state = await job_states.requeue_or_fail(
            session,
            job,
            expected=JobState.assigned,
            reason="no_ack",
            message=(
                f"Host {host_id} did not acknowledge the job within "
                f"{context.settings.manifest_ack_timeout_seconds:g} s."
            ),
        )
        if state is not None:
            changed.append((job.id, state, host_id))
    return changed


async def _lost(
    context: ServerContext, session: AsyncSession
) -> list[tuple[uuid.UUID, JobState, uuid.UUID | None]]:
    cutoff = utcnow() - timedelta(seconds=context.settings.host_lost_grace_seconds)
    gone_hosts = select(HostModel.id).where(
        HostModel.status == HostStatus.offline.value,
        or_(HostModel.last_seen_at.is_(None), HostModel.last_seen_at < cutoff),
    )
    jobs = await session.scalars(
        select(JobModel)
        .where(
            JobModel.state.in_([JobState.assigned.value, JobState.running.value]),
            or_(
                JobModel.host_id.in_(gone_hosts),
                JobModel.host_id.is_(None),
                JobModel.missing_since < cutoff,
            ),
        )
        .limit(_BATCH)
    )
    changed = []
    for job in list(jobs):
        host_id = job.host_id
        missing = job.missing_since is not None and job.missing_since < cutoff
        message = (
            f"Host {host_id} stopped reporting the job."
            if missing
            else f"Host {host_id} went offline and did not come back within "
            f"{context.settings.host_lost_grace_seconds:g} s."
        )
        state = await job_states.requeue_or_fail(
            session,
            job,
            expected=JobState(job.state),
            reason="host_lost",
            message=message,
        )
        if state is not None:
            changed.append((job.id, state, host_id))
    return changed


async def _expired(session: AsyncSession) -> list[tuple[uuid.UUID, JobState, uuid.UUID | None]]:
    now = utcnow()
    changed: list[tuple[uuid.UUID, JobState, uuid.UUID | None]] = []
    jobs = await session.scalars(
        select(JobModel)
        .where(JobModel.state == JobState.queued.value, JobModel.queue_expires_at < now)
        .limit(_BATCH)
    )
    for job in list(jobs):
        if await job_states.transition(
            session,
            job,
            expected=JobState.queued,
            to=JobState.expired,
            reason="expired",
            message="No eligible host could run the job before its queue deadline.",
            values={"finished_at": now, "failure_reason": "expired"},
        ):
            changed.append((job.id, JobState.expired, None))
    return changed


async def _stale_gpu_claims(context: ServerContext, session: AsyncSession) -> int:
    """Free GPUs held by jobs that are no longer active on them, once the host has had the
    grace period to confirm (a cancelled job keeps its GPUs until its host says it stopped)."""
    cutoff = utcnow() - timedelta(seconds=context.settings.host_lost_grace_seconds)
    stale = select(JobModel.id).where(
        JobModel.state.in_([s.value for s in FINAL_STATES] + [JobState.queued.value]),
        JobModel.updated_at < cutoff,
    )
    result = await session.execute(
        update(HostGpuModel)
        .where(HostGpuModel.job_id.in_(stale))
        .values(job_id=None)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def _archive_leftover_logs(context: ServerContext) -> None:
    """Archive the logs of ended jobs whose archive at job end failed (or never ran, as for a
    job cancelled while its host was away), a few at a time."""
    cutoff = utcnow() - timedelta(seconds=ARCHIVE_RETRY_AFTER_SECONDS)
    async with context.sessionmaker() as session:
        pending = select(JobLogChunkModel.job_id).where(JobLogChunkModel.line_count > 0)
        job_ids = list(
            await session.scalars(
                select(JobModel.id)
                .where(
                    JobModel.state.in_([s.value for s in FINAL_STATES]),
                    JobModel.finished_at < cutoff,
                    JobModel.id.in_(pending),
                )
                .limit(_ARCHIVE_BATCH)
            )
        )
    for job_id in job_ids:
        try:
            async with context.sessionmaker() as session:
                await job_logs.archive(context, session, job_id)
        except Exception:  # noqa: BLE001 - one bad archive must not stop the sweep
            logger.exception("job %s: archiving logs failed again", job_id)


async def _refresh_reliability(session: AsyncSession) -> None:
    """One read and one batched write for all hosts."""
    online = await host_service.uptimes(session=session)
    host_ids = list(
        await session.scalars(select(HostModel.id).where(HostModel.revoked_at.is_(None)))
    )
    if host_ids:
        await session.execute(
            update(HostModel),
            [
                {
                    "id": host_id,
                    "reliability": online.get(host_id, 0.0),
                }
                for host_id in host_ids
            ],
        )
    await session.commit()
