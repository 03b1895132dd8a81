"""What hosts tell the server about jobs, applied to the jobs table.

Only the job's current host is believed: a message about a job that is not (or no longer)
assigned to the sending host changes nothing. Messages may repeat (the agent resends until
acknowledged), so each handler is idempotent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import ServiceUnavailable
from peergpu.protocol.messages import (
    ArtifactReport,
    JobStatus,
    LogBatch,
    ManifestAck,
    UploadGrant,
    UploadRequest,
    UploadTarget,
)
from peergpu.server.agents.channels import SCHEDULER_WAKE, state_change
from peergpu.server.context import ServerContext
from peergpu.server.db import core
from peergpu.server.db.base import utcnow
from peergpu.server.db.bulk import insert_rows, unnest
from peergpu.server.db.host_models import HostGpuModel
from peergpu.server.db.job_models import (
    ACTIVE_STATES,
    FINAL_STATES,
    JobArtifactModel,
    JobEventModel,
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


@dataclass(frozen=True, slots=True)
class Report:
    """One job report from a host: a manifest answer or a job status."""

    host_id: uuid.UUID
    message: ManifestAck | JobStatus


@dataclass
class Applied:
    """What a batch of reports changed, to announce once it is committed (``announce``)."""

    changes: list[tuple[uuid.UUID, JobState]] = field(default_factory=list)
    """Jobs whose state changed, and their new state, in order."""
    freed_gpus: bool = False
    requeued: bool = False
    archive: list[uuid.UUID] = field(default_factory=list)
    """Finished jobs with stored log lines to archive."""


async def apply_reports(session: AsyncSession, reports: Sequence[Report]) -> Applied:
    """Apply many hosts' reports in the caller's transaction, in a handful of statements.

    Reports are applied kind by kind in lifecycle order (manifest answers, then ``running``,
    then final states), so a batch holding several reports about one job ends where applying
    them one by one would. Only the job's current host is believed; every step is a
    conditional UPDATE, so a repeated report, or one about a job that moved on, changes nothing.
    """
    applied = Applied()
    events: list[dict[str, Any]] = []
    now = utcnow()
    acks: list[tuple[uuid.UUID, ManifestAck]] = []
    running: list[tuple[uuid.UUID, JobStatus]] = []
    finals: list[tuple[uuid.UUID, JobStatus]] = []
    for report in reports:
        message = report.message
        if isinstance(message, ManifestAck):
            if message.job_id is not None:
                acks.append((report.host_id, message))
        elif message.state == "running":
            running.append((report.host_id, message))
        else:
            finals.append((report.host_id, message))
    await _apply_acks(session, acks, now, applied)
    await _apply_running(session, running, now, applied, events)
    await _apply_finals(session, finals, now, applied, events)
    if events:
        # One clock for the batch; a microsecond apart keeps one job's events in order.
        for offset, event in enumerate(events):
            event["at"] = now + timedelta(microseconds=offset)
        await insert_rows(session, JobEventModel, events)
    return applied


async def announce(context: ServerContext, applied: Applied) -> None:
    """After the commit: tell followers of every changed job, wake the schedulers if GPUs were
    freed or a job re-queued (one bus round trip), and archive finished jobs' logs."""
    messages = [state_change(job_id, state.value) for job_id, state in applied.changes]
    if applied.freed_gpus or applied.requeued:
        messages.append(SCHEDULER_WAKE)
    if messages:
        try:
            await context.bus.publish_many(messages)
        except ServiceUnavailable as exc:  # committed already; followers re-read on their own
            logger.warning("bus unavailable; %d job changes not broadcast: %s", len(messages), exc)
    for job_id in applied.archive:
        task = asyncio.get_running_loop().create_task(_archive(context, job_id))
        _background.add(task)  # keep a reference until it is done
        task.add_done_callback(_background.discard)


async def _requeue_stopped(
    session: AsyncSession, stopped: list[tuple[uuid.UUID, JobState]], applied: Applied
) -> None:
    """Jobs their host stopped on its own: back to the queue (or failed, without retries)."""
    for job_id, state in stopped:  # rare (an agent shutting down): one at a time is fine
        job = await session.get(JobModel, job_id, populate_existing=True)
        if job is None:
            continue
        new_state = await job_states.requeue_or_fail(
            session,
            job,
            expected=state,
            reason="host_stopped",
            message="The host stopped the job (its agent shut down); it is not charged.",
            exclude_host=False,
        )
        if new_state is not None:
            applied.changes.append((job_id, new_state))
            applied.requeued = applied.requeued or new_state is JobState.queued
            applied.freed_gpus = True


async def _apply_acks(
    session: AsyncSession,
    acks: list[tuple[uuid.UUID, ManifestAck]],
    now: datetime,
    applied: Applied,
) -> None:
    accepted = [(host_id, ack) for host_id, ack in acks if ack.accepted]
    with_nonce = [(a.job_id, h, a.nonce) for h, a in accepted if a.nonce is not None]
    without = [(a.job_id, h) for h, a in accepted if a.nonce is None]
    assigned = JobModel.state == JobState.assigned.value
    if with_nonce:
        await core.execute(
            session,
            update(JobModel)
            .where(
                assigned,
                tuple_(JobModel.id, JobModel.host_id, JobModel.manifest_nonce).in_(with_nonce),
            )
            .values(acked_at=now)
            .execution_options(synchronize_session=False),
        )
    if without:
        await core.execute(
            session,
            update(JobModel)
            .where(assigned, tuple_(JobModel.id, JobModel.host_id).in_(without))
            .values(acked_at=now)
            .execution_options(synchronize_session=False),
        )
    for host_id, ack in acks:
        if ack.accepted or ack.job_id is None:
            continue
        job = await _current_job(session, host_id, ack.job_id)
        if job is None or job.state != JobState.assigned.value:
            continue
        if ack.nonce is not None and ack.nonce != job.manifest_nonce:
            continue  # an answer to an older manifest of this job
        state = await job_states.requeue_or_fail(
            session,
            job,
            expected=JobState.assigned,
            reason="manifest_refused",
            message=f"Host {host_id} refused the job: {ack.reason} ({ack.message}).",
        )
        if state is not None:
            applied.changes.append((job.id, state))
            applied.freed_gpus = applied.requeued = True


async def _apply_running(
    session: AsyncSession,
    reports: list[tuple[uuid.UUID, JobStatus]],
    now: datetime,
    applied: Applied,
    events: list[dict[str, Any]],
) -> None:
    if not reports:
        return
    pairs = list({(status.job_id, host_id) for host_id, status in reports})
    started = await core.execute(
        session,
        update(JobModel)
        .where(
            JobModel.state == JobState.assigned.value,
            tuple_(JobModel.id, JobModel.host_id).in_(pairs),
        )
        .values(
            state=JobState.running.value,
            updated_at=now,
            started_at=now,
            acked_at=func.coalesce(JobModel.acked_at, now),
            missing_since=None,
        )
        .returning(JobModel.id, JobModel.host_id)
        .execution_options(synchronize_session=False),
    )
    for job_id, job_host in started:
        applied.changes.append((job_id, JobState.running))
        events.append(
            _event(
                job_id,
                job_host,
                now,
                JobState.assigned,
                JobState.running,
                "started",
                f"Running on host {job_host}.",
            )
        )


async def _apply_finals(
    session: AsyncSession,
    reports: list[tuple[uuid.UUID, JobStatus]],
    now: datetime,
    applied: Applied,
    events: list[dict[str, Any]],
) -> None:
    if not reports:
        return
    current = {
        job_id: (host_id, JobState(state), started_at)
        for job_id, host_id, state, started_at in await core.execute(
            session,
            select(JobModel.id, JobModel.host_id, JobModel.state, JobModel.started_at).where(
                JobModel.id.in_({status.job_id for _host, status in reports})
            ),
        )
    }
    ended: list[tuple[uuid.UUID, uuid.UUID]] = []
    stopped: list[tuple[uuid.UUID, JobState]] = []
    rows: list[dict[str, Any]] = []
    endings: list[tuple[uuid.UUID, JobStatus, JobState, JobState]] = []
    for host_id, status in reports:
        found = current.get(status.job_id)
        if found is None or found[0] != host_id:
            continue  # not (or no longer) this host's job
        _host, state, started_at = found
        final = _FINAL_STATE_BY_AGENT[status.state]
        outcome = {
            "exit_code": status.exit_code,
            "duration_seconds": status.duration_seconds,
            "peak_memory_bytes": status.peak_memory_bytes,
            "cpu_seconds": status.cpu_seconds,
            "last_log_seq": status.last_log_seq,
        }
        if state in ACTIVE_STATES and final is JobState.cancelled:
            # The renter's cancel ends the job on the server first; a job still active that
            # its host reports cancelled was stopped by the host (its agent shut down): a host
            # fault, so it goes back to the queue and the renter pays nothing.
            stopped.append((status.job_id, state))
            current[status.job_id] = (host_id, JobState.lost, started_at)
        elif state in ACTIVE_STATES:
            failure = status.failure_reason if final is not JobState.succeeded else None
            rows.append(
                {
                    **outcome,
                    "b_id": status.job_id,
                    "b_expected": state.value,
                    "state": final.value,
                    "failure_reason": failure,
                    "message": status.message[:4000],
                    "started_at": started_at or now,
                }
            )
            endings.append((host_id, status, state, final))
            current[status.job_id] = (host_id, final, started_at or now)  # a resend: no-op
        elif state in FINAL_STATES:
            known = {k: v for k, v in outcome.items() if v is not None}
            if known:
                await core.execute(
                    session,
                    update(JobModel)
                    .where(JobModel.id == status.job_id)
                    .values(**known)
                    .execution_options(synchronize_session=False),
                )
        ended.append((status.job_id, host_id))
    await _requeue_stopped(session, stopped, applied)
    for host_id, status, state, final in await _end_jobs(session, rows, endings, now):
        applied.changes.append((status.job_id, final))
        events.append(
            _event(
                status.job_id,
                host_id,
                now,
                state,
                final,
                status.failure_reason or status.state,
                status.message,
            )
        )
    if not ended:
        return
    # Only the reporting host's GPUs: the job may have been re-queued and claimed elsewhere.
    released = await core.execute(
        session,
        update(HostGpuModel)
        .where(tuple_(HostGpuModel.job_id, HostGpuModel.host_id).in_(ended))
        .values(job_id=None)
        .execution_options(synchronize_session=False),
    )
    if released.rowcount:  # type: ignore[attr-defined]
        applied.freed_gpus = True
    requeued = {job_id for job_id, _state in stopped}  # they run again: not archived yet
    applied.archive.extend(
        await _scalars(
            session,
            select(JobLogChunkModel.job_id)
            .where(
                JobLogChunkModel.job_id.in_(
                    [job_id for job_id, _host in ended if job_id not in requeued]
                ),
                JobLogChunkModel.line_count > 0,
            )
            .distinct(),
        )
    )


async def _end_jobs(
    session: AsyncSession,
    rows: list[dict[str, Any]],
    endings: list[tuple[uuid.UUID, JobStatus, JobState, JobState]],
    now: datetime,
) -> list[tuple[uuid.UUID, JobStatus, JobState, JobState]]:
    """Active -> final for every row in one executemany UPDATE, each conditional on the state
    read before; returns the endings that landed (a job that moved on meanwhile did not)."""
    if not rows:
        return []
    if session.get_bind().dialect.name == "postgresql":
        # One UPDATE over arrays, returning the jobs it ended: an executemany reports no
        # count on asyncpg, so every batch then read back what had landed.
        parameters: dict[str, Any] = {"now": now}
        for name, _kind in _ENDED_COLUMNS:
            parameters[f"ended_{name}"] = [row[_ENDED_KEYS.get(name, name)] for row in rows]
        landed = set((await core.execute(session, _end_by_arrays(), parameters)).scalars())
        return [ending for ending in endings if ending[1].job_id in landed]
    # Core executemany (the ORM would read a list of rows as an update by primary key).
    connection = await session.connection()
    result = await connection.execute(
        update(JobModel)
        .where(JobModel.id == bindparam("b_id"), JobModel.state == bindparam("b_expected"))
        .values(updated_at=now, finished_at=now, missing_since=None),
        rows,
    )
    if result.rowcount == len(rows):
        return endings
    # Unknown (asyncpg reports no executemany count) or short: look at what landed; this
    # batch's clock is in ``finished_at`` of exactly the rows it ended.
    landed = set(
        await _scalars(
            session,
            select(JobModel.id).where(
                JobModel.id.in_([row["b_id"] for row in rows]), JobModel.finished_at == now
            ),
        )
    )
    return [ending for ending in endings if ending[1].job_id in landed]


#: What ``_end_jobs`` sets from each row on PostgreSQL, as (array column, type); the row's
#: key is the column's name but for ``_ENDED_KEYS``.
_ENDED_COLUMNS = (
    ("id", JobModel.id.type),
    ("expected", JobModel.state.type),
    ("state", JobModel.state.type),
    ("failure_reason", JobModel.failure_reason.type),
    ("message", JobModel.message.type),
    ("started_at", JobModel.started_at.type),
    ("exit_code", JobModel.exit_code.type),
    ("duration_seconds", JobModel.duration_seconds.type),
    ("peak_memory_bytes", JobModel.peak_memory_bytes.type),
    ("cpu_seconds", JobModel.cpu_seconds.type),
    ("last_log_seq", JobModel.last_log_seq.type),
)
_ENDED_KEYS = {"id": "b_id", "expected": "b_expected"}


@functools.lru_cache(maxsize=1)
def _end_by_arrays() -> Any:
    """PostgreSQL: active -> final for a batch of jobs in one ``UPDATE ... FROM
    unnest(...)``, each conditional on the state read before, returning the ids it ended."""
    ended = unnest("ended", _ENDED_COLUMNS)
    now = bindparam("now", type_=JobModel.updated_at.type)
    return (
        update(JobModel)
        .where(JobModel.id == ended.c.id, JobModel.state == ended.c.expected)
        .values(
            updated_at=now,
            finished_at=now,
            missing_since=None,
            **{name: ended.c[name] for name, _kind in _ENDED_COLUMNS[2:]},
        )
        .returning(JobModel.id)
        .execution_options(synchronize_session=False)
    )


async def _scalars(session: AsyncSession, statement: Any) -> list[Any]:
    return list((await core.execute(session, statement)).scalars())


def _event(
    job_id: uuid.UUID,
    host_id: uuid.UUID | None,
    at: datetime,
    from_state: JobState,
    to_state: JobState,
    reason: str,
    message: str,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "at": at,
        "from_state": from_state.value,
        "to_state": to_state.value,
        "reason": reason,
        "message": message[:4000],
        "host_id": host_id,
    }


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
    """:func:`reconcile_hosts` for one host in a transaction of its own (its ``hello``)."""
    async with context.sessionmaker() as session:
        stop = await reconcile_hosts(session, {host_id: running})
        await session.commit()
    return stop.get(host_id, [])


async def reconcile_hosts(
    session: AsyncSession, reported: dict[uuid.UUID, Sequence[uuid.UUID]]
) -> dict[uuid.UUID, list[uuid.UUID]]:
    """Compare what hosts say they run (``hello``/``heartbeat``) with the jobs table, in the
    caller's transaction: one read and at most two UPDATEs for all of them.

    A job the table has active on a host but the host does not mention starts a
    ``missing_since`` clock (the sweeper declares it lost after the grace period; a final
    status still on its way stops the clock). A job a host runs that is not active on it
    here (cancelled, re-queued elsewhere, unknown) is returned under its host: the caller
    tells the host to stop it, so nothing runs twice and nothing is orphaned.
    """
    if not reported:
        return {}
    active: dict[uuid.UUID, dict[uuid.UUID, tuple[str, Any]]] = {h: {} for h in reported}
    for job_id, host_id, state, acked in await core.execute(
        session, _active_on_hosts(), {"hosts": list(reported)}
    ):
        active[host_id][job_id] = (state, acked)
    present: list[uuid.UUID] = []
    absent: list[uuid.UUID] = []
    stop: dict[uuid.UUID, list[uuid.UUID]] = {}
    for host_id, running in reported.items():
        says = set(running)
        jobs = active[host_id]
        for job_id, (state, acked) in jobs.items():
            if job_id in says:
                present.append(job_id)
            elif state == JobState.running.value or acked is not None:
                # A manifest in flight is not "missing": only acknowledged jobs start the clock.
                absent.append(job_id)
        strays = [job_id for job_id in running if job_id not in jobs]
        if strays:
            stop[host_id] = strays
    if present:
        await core.execute(session, _clear_missing(), {"ids": present})
    if absent:
        await core.execute(session, _start_missing(), {"ids": absent, "now": utcnow()})
    return stop


@functools.cache
def _active_on_hosts() -> Any:
    return select(JobModel.id, JobModel.host_id, JobModel.state, JobModel.acked_at).where(
        JobModel.host_id.in_(bindparam("hosts", expanding=True)),
        JobModel.state.in_([s.value for s in ACTIVE_STATES]),
    )


@functools.cache
def _clear_missing() -> Any:
    return (
        update(JobModel)
        .where(JobModel.id.in_(bindparam("ids", expanding=True)))
        .where(JobModel.missing_since.is_not(None))
        .values(missing_since=None)
    )


@functools.cache
def _start_missing() -> Any:
    return (
        update(JobModel)
        .where(JobModel.id.in_(bindparam("ids", expanding=True)))
        .where(JobModel.missing_since.is_(None))
        .values(missing_since=bindparam("now"))
    )


async def _archive(context: ServerContext, job_id: uuid.UUID) -> None:
    try:
        async with context.sessionmaker() as session:
            await job_logs.archive(context, session, job_id)
    except Exception:  # noqa: BLE001 - the sweep retries it; never kills the socket
        logger.exception("job %s: archiving logs failed", job_id)
