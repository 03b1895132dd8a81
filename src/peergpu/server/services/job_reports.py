"""What hosts tell the server about jobs, applied to the jobs table.

Only the job's current host is believed: a message about a job that is not (or no longer)
assigned to the sending host changes nothing. Messages may repeat (the agent resends until
acknowledged), so each handler is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.protocol.messages import (
    ArtifactReport,
    JobStatus,
    LogBatch,
    ManifestAck,
    UploadGrant,
    UploadRequest,
    UploadTarget,
)
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.job_models import (
    ACTIVE_STATES,
    FINAL_STATES,
    JobArtifactModel,
    JobLogChunkModel,
    JobModel,
    JobState,
)
from peergpu.server.services import job_logs, job_states
from peergpu.server.storage.base import is_valid_key

logger = logging.getLogger(__name__)

UPLOAD_URL_SECONDS = 3600
_background: set[asyncio.Task[None]] = set()
_FINAL_STATE_BY_AGENT = {
    "succeeded": JobState.succeeded,
    "failed": JobState.failed,
    "cancelled": JobState.cancelled,
}


def artifact_key(job_id: uuid.UUID, path: str) -> str:
    return f"jobs/{job_id}/outputs/{path}"


async def _current_job(
    session: AsyncSession, host_id: uuid.UUID, job_id: uuid.UUID
) -> JobModel | None:
    job = await session.get(JobModel, job_id, populate_existing=True)
    if job is None or job.host_id != host_id:
        return None
    return job


async def on_manifest_ack(context: ServerContext, host_id: uuid.UUID, ack: ManifestAck) -> None:
    if ack.job_id is None:
        return
    async with context.sessionmaker() as session:
        job = await _current_job(session, host_id, ack.job_id)
        if job is None or job.state != JobState.assigned.value:
            return
        if ack.nonce is not None and ack.nonce != job.manifest_nonce:
            return  # an answer to an older manifest of this job
        if ack.accepted:
            await session.execute(
                update(JobModel)
                .where(JobModel.id == job.id, JobModel.state == JobState.assigned.value)
                .values(acked_at=utcnow())
            )
            await session.commit()
            return
        state = await job_states.requeue_or_fail(
            session,
            job,
            expected=JobState.assigned,
            reason="manifest_refused",
            message=f"Host {host_id} refused the job: {ack.reason} ({ack.message}).",
        )
        await session.commit()
    if state is not None:
        await job_states.notify(context, ack.job_id, state, wake_scheduler=True)


async def on_status(context: ServerContext, host_id: uuid.UUID, status: JobStatus) -> None:
    """``running`` moves an assigned job to running; a final state ends it and frees its GPUs
    (also when the renter had cancelled it already: the host confirms it stopped)."""
    new_state: JobState | None = None
    freed = False
    async with context.sessionmaker() as session:
        job = await _current_job(session, host_id, status.job_id)
        if job is None:
            return
        current = JobState(job.state)
        now = utcnow()
        if status.state == "running":
            if current is JobState.assigned and await job_states.transition(
                session,
                job,
                expected=JobState.assigned,
                to=JobState.running,
                reason="started",
                message=f"Running on host {host_id}.",
                values={"started_at": now, "acked_at": job.acked_at or now, "missing_since": None},
            ):
                new_state = JobState.running
            await session.commit()
        else:
            final = _FINAL_STATE_BY_AGENT[status.state]
            outcome = {
                "exit_code": status.exit_code,
                "duration_seconds": status.duration_seconds,
                "peak_memory_bytes": status.peak_memory_bytes,
                "cpu_seconds": status.cpu_seconds,
                "last_log_seq": status.last_log_seq,
            }
            if current in ACTIVE_STATES:
                failure = status.failure_reason if final is not JobState.succeeded else None
                if await job_states.transition(
                    session,
                    job,
                    expected=current,
                    to=final,
                    reason=status.failure_reason or status.state,
                    message=status.message,
                    values={
                        **outcome,
                        "finished_at": now,
                        "failure_reason": failure,
                        "message": status.message[:4000],
                        "missing_since": None,
                        "started_at": job.started_at or now,
                    },
                ):
                    new_state = final
            elif current in FINAL_STATES:
                await session.execute(
                    update(JobModel)
                    .where(JobModel.id == job.id)
                    .values(**{k: v for k, v in outcome.items() if v is not None})
                )
            freed = await job_states.release_gpus(session, job.id) > 0
            has_logs = await session.scalar(
                select(JobLogChunkModel.id)
                .where(JobLogChunkModel.job_id == job.id, JobLogChunkModel.line_count > 0)
                .limit(1)
            )
            await session.commit()
            if has_logs is not None:
                task = asyncio.get_running_loop().create_task(_archive(context, job.id))
                _background.add(task)  # keep a reference until it is done
                task.add_done_callback(_background.discard)
    if new_state is not None:
        await job_states.notify(context, status.job_id, new_state, wake_scheduler=freed)
    elif freed:
        await job_states.wake_schedulers(context)


async def on_logs(context: ServerContext, host_id: uuid.UUID, batch: LogBatch) -> int | None:
    """Store the lines durably; returns the seq to acknowledge (None: not this host's job)."""
    async with context.sessionmaker() as session:
        job = await _current_job(session, host_id, batch.job_id)
        if job is None:
            return None
        stored: int | None = await job_logs.store_batch(context, session, job, list(batch.lines))
        return stored


async def grant_uploads(
    context: ServerContext, host_id: uuid.UUID, request: UploadRequest
) -> UploadGrant:
    """One pre-signed PUT per output file, bound to its declared size and sha256 — only for the
    host currently running the job."""
    async with context.sessionmaker() as session:
        job = await _current_job(session, host_id, request.job_id)
    if job is None or JobState(job.state) not in ACTIVE_STATES | {JobState.cancelled}:
        return UploadGrant(
            job_id=request.job_id,
            uploads=[],
            refused={spec.path: "the job is not running on this host" for spec in request.files},
        )
    uploads: list[UploadTarget] = []
    refused: dict[str, str] = {}
    for spec in request.files:
        key = artifact_key(request.job_id, spec.path)
        if not is_valid_key(key):
            refused[spec.path] = "the file name is not allowed in object storage"
            continue
        url = context.storage.presign_put(
            key, expires_in=UPLOAD_URL_SECONDS, max_bytes=spec.size, sha256=spec.sha256
        )
        uploads.append(UploadTarget(path=spec.path, url=url))
    return UploadGrant(job_id=request.job_id, uploads=uploads, refused=refused)


async def on_artifacts(context: ServerContext, host_id: uuid.UUID, report: ArtifactReport) -> None:
    """Record the files that really landed in storage (checked with a HEAD, not believed)."""
    async with context.sessionmaker() as session:
        job = await _current_job(session, host_id, report.job_id)
        if job is None:
            return
        for spec in report.files:
            key = artifact_key(job.id, spec.path)
            if not is_valid_key(key):
                continue
            info = await context.storage.head(key)
            if (
                info is None
                or info.size != spec.size
                or (info.sha256 is not None and info.sha256 != spec.sha256)
            ):
                logger.warning("job %s: artifact %s reported but not stored", job.id, spec.path)
                continue
            await session.execute(
                delete(JobArtifactModel).where(
                    JobArtifactModel.job_id == job.id, JobArtifactModel.path == spec.path
                )
            )
            session.add(
                JobArtifactModel(
                    job_id=job.id, path=spec.path, size=spec.size, sha256=spec.sha256, key=key
                )
            )
        await session.commit()


async def reconcile(
    context: ServerContext, host_id: uuid.UUID, running: list[uuid.UUID]
) -> list[uuid.UUID]:
    """Compare what the host says it runs (``hello``/``heartbeat``) with the jobs table.

    A job the table has active on this host but the host does not mention starts a
    ``missing_since`` clock (the sweeper declares it lost after the grace period; a final
    status still on its way stops the clock). A job the host runs that is not active on it
    here (cancelled, re-queued elsewhere, unknown) is returned: the caller tells the host to
    stop it, so nothing runs twice and nothing is orphaned.
    """
    reported = set(running)
    async with context.sessionmaker() as session:
        active = {
            job_id: (state, acked)
            for job_id, state, acked in await session.execute(
                select(JobModel.id, JobModel.state, JobModel.acked_at).where(
                    JobModel.host_id == host_id,
                    JobModel.state.in_([s.value for s in ACTIVE_STATES]),
                )
            )
        }
        now = utcnow()
        present = [job_id for job_id in active if job_id in reported]
        # A manifest in flight is not "missing": only acknowledged jobs start the clock.
        absent = [
            job_id
            for job_id, (state, acked) in active.items()
            if job_id not in reported and (state == JobState.running.value or acked is not None)
        ]
        if present:
            await session.execute(
                update(JobModel)
                .where(JobModel.id.in_(present), JobModel.missing_since.is_not(None))
                .values(missing_since=None)
            )
        if absent:
            await session.execute(
                update(JobModel)
                .where(JobModel.id.in_(absent), JobModel.missing_since.is_(None))
                .values(missing_since=now)
            )
        await session.commit()
    return [job_id for job_id in reported if job_id not in active]


async def _archive(context: ServerContext, job_id: uuid.UUID) -> None:
    try:
        async with context.sessionmaker() as session:
            await job_logs.archive(context, session, job_id)
    except Exception:  # noqa: BLE001 - the sweep retries it; never kills the socket
        logger.exception("job %s: archiving logs failed", job_id)
