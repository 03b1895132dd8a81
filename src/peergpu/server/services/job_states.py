"""The job state machine's primitives: conditional transitions, GPU release, re-queueing.

Every state change is ``UPDATE jobs SET state = :to ... WHERE id = :id AND state = :expected``
plus one ``job_events`` row, in the caller's transaction. A transition whose expected state no
longer holds (another replica, the host or the renter got there first) changes nothing and
returns False; the caller decides whether to look again.

    queued -> assigned -> running -> succeeded | failed | cancelled
    queued -> cancelled | expired        assigned|running -> lost -> queued | failed
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import ServiceUnavailable
from peergpu.server.agents.channels import SCHEDULER_WAKE, state_change
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel
from peergpu.server.db.job_models import JobEventModel, JobModel, JobState

logger = logging.getLogger(__name__)


async def transition(
    session: AsyncSession,
    job: JobModel,
    *,
    expected: JobState,
    to: JobState,
    reason: str,
    message: str = "",
    values: dict[str, Any] | None = None,
) -> bool:
    """Move ``job`` from ``expected`` to ``to`` if it is still in ``expected``; record it."""
    now = utcnow()
    result = await session.execute(
        update(JobModel)
        .where(JobModel.id == job.id, JobModel.state == expected.value)
        .values(state=to.value, updated_at=now, **(values or {}))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(
        JobEventModel(
            job_id=job.id,
            at=now,
            from_state=expected.value,
            to_state=to.value,
            reason=reason,
            message=message[:4000],
            host_id=job.host_id,
        )
    )
    return True


async def release_gpus(session: AsyncSession, job_id: uuid.UUID) -> int:
    """Free every GPU the job holds; returns how many."""
    result = await session.execute(
        update(HostGpuModel).where(HostGpuModel.job_id == job_id).values(job_id=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def requeue_or_fail(
    session: AsyncSession,
    job: JobModel,
    *,
    expected: JobState,
    reason: str,
    message: str,
    exclude_host: bool = True,
) -> JobState | None:
    """The job's host lost it (vanished, refused it, never acknowledged it): ``lost``, then back
    to ``queued`` while retries remain, else ``failed``. Frees its GPUs. Returns the new state,
    or None if the job had already moved on."""
    host_id = job.host_id
    if not await transition(
        session, job, expected=expected, to=JobState.lost, reason=reason, message=message
    ):
        return None
    await release_gpus(session, job.id)
    excluded = list(job.excluded_host_ids or [])
    if exclude_host and host_id is not None and str(host_id) not in excluded:
        excluded.append(str(host_id))
    retries_used = max(job.attempt - 1, 0)
    if retries_used < job.max_retries:
        await transition(
            session,
            job,
            expected=JobState.lost,
            to=JobState.queued,
            reason="requeued",
            message=f"Retry {retries_used + 1} of {job.max_retries}.",
            values={
                "host_id": None,
                "gpu_indices": [],
                "manifest_nonce": None,
                "ack_deadline": None,
                "acked_at": None,
                "started_at": None,
                "missing_since": None,
                "excluded_host_ids": excluded,
            },
        )
        return JobState.queued
    await transition(
        session,
        job,
        expected=JobState.lost,
        to=JobState.failed,
        reason=reason,
        message=f"{message} No retries left ({job.max_retries} allowed).",
        values={
            "finished_at": utcnow(),
            "failure_reason": reason,
            "message": message,
            "missing_since": None,
            "excluded_host_ids": excluded,
        },
    )
    return JobState.failed


async def notify(
    context: ServerContext, job_id: uuid.UUID, state: JobState, *, wake_scheduler: bool = False
) -> None:
    """After a commit: tell followers of the job, and (optionally) every scheduler loop.
    Best effort: the bus being down must not fail a change that is already committed."""
    messages = [state_change(job_id, state.value)]
    if wake_scheduler:
        messages.append(SCHEDULER_WAKE)
    try:
        await context.bus.publish_many(messages)  # one round trip
    except ServiceUnavailable as exc:
        logger.warning("bus unavailable; job %s change not broadcast: %s", job_id, exc)


async def wake_schedulers(context: ServerContext) -> None:
    try:
        await context.bus.publish(*SCHEDULER_WAKE)
    except ServiceUnavailable as exc:
        logger.warning("bus unavailable; schedulers will find the work on their sweep: %s", exc)
