"""The scheduler: match queued jobs to free GPUs, claim them atomically, dispatch manifests.

One pass (``schedule_once``) in one transaction:

1. Take a batch of queued jobs in queue order: priority first, then fair share (each renter's
   oldest job before anyone's second), then age. On PostgreSQL the rows are locked with
   ``FOR UPDATE SKIP LOCKED``, so schedulers on other replicas take other jobs.
2. Read a snapshot of free GPUs on online, unpaused, priced hosts.
3. Match in memory: for each job the cheapest eligible host, then the most reliable, then the
   least loaded, among hosts with enough free GPUs of the right model and VRAM.
4. Claim the GPUs with one conditional UPDATE per job (``WHERE job_id IS NULL``, on PostgreSQL
   over rows locked with ``SKIP LOCKED``); a claim that comes up short (another replica got a
   GPU first) is undone and the job waits for the next pass. Then ``queued -> assigned``.
5. After the commit, sign one manifest per assignment and publish it on the host's channel;
   whichever replica holds that host's socket sends it.

The loop (``run_scheduler``) runs a pass whenever something wakes it (a submit, a freed GPU, a
host joining: ``scheduler:wake`` on the bus) and otherwise every ``scheduler_sweep_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import ServiceUnavailable
from peergpu.protocol.manifest import ManifestLimits
from peergpu.server.agents import dispatch
from peergpu.server.agents.channels import SCHEDULER_WAKE_CHANNEL
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel, HostModel, HostStatus
from peergpu.server.db.job_models import JobModel, JobState
from peergpu.server.services import job_maintenance, job_states
from peergpu.server.services.bundles import bundle_key

logger = logging.getLogger(__name__)

#: How long a bundle download URL in a manifest stays valid.
BUNDLE_URL_SECONDS = 3600


@dataclass
class _Host:
    id: uuid.UUID
    price: int
    reliability: float
    tags: frozenset[str]
    runners: frozenset[str]
    busy: int
    free: list[tuple[uuid.UUID, int, str, int]] = field(default_factory=list)
    """Free GPUs as (row id, index, model lower-cased, memory MiB), by index."""


@dataclass(frozen=True)
class Assignment:
    job_id: uuid.UUID
    host_id: uuid.UUID
    gpu_indices: list[int]
    price_per_gpu_hour_micros: int
    nonce: str
    command: list[str]
    env: dict[str, str]
    image: str | None
    bundle_sha256: str | None
    network: bool
    max_duration_seconds: int
    submitted_at: float


@dataclass
class PassResult:
    assigned: list[Assignment]
    considered: int


async def schedule_once(context: ServerContext) -> PassResult:
    """One scheduling pass; dispatches what it assigned. See the module docstring."""
    async with context.sessionmaker() as session:
        hosts = await _free_capacity(session)
        if not hosts:
            return PassResult(assigned=[], considered=0)
        jobs = await _take_batch(session, context.settings.scheduler_batch_size)
        if not jobs:
            await session.rollback()
            return PassResult(assigned=[], considered=0)
        ranked = sorted(hosts.values(), key=lambda h: (h.price, -h.reliability, h.busy))
        assigned: list[Assignment] = []
        deadline = utcnow() + timedelta(seconds=context.settings.manifest_ack_timeout_seconds)
        for job in jobs:
            choice = _match(job, ranked)
            if choice is None:
                continue
            host, gpus = choice
            if not await _claim(session, job.id, [g[0] for g in gpus]):
                # Another replica took one of these GPUs; drop them from our snapshot.
                host.free = [g for g in host.free if g not in gpus]
                continue
            host.free = [g for g in host.free if g not in gpus]
            host.busy += len(gpus)
            nonce = secrets.token_hex(16)
            indices = sorted(g[1] for g in gpus)
            changed = await job_states.transition(
                session,
                job,
                expected=JobState.queued,
                to=JobState.assigned,
                reason="scheduled",
                message=f"Assigned to host {host.id} (GPUs {indices}).",
                values={
                    "host_id": host.id,
                    "gpu_indices": indices,
                    "price_per_gpu_hour_micros": host.price,
                    "attempt": job.attempt + 1,
                    "manifest_nonce": nonce,
                    "assigned_at": utcnow(),
                    "ack_deadline": deadline,
                    "acked_at": None,
                    "missing_since": None,
                },
            )
            if not changed:  # cancelled meanwhile (SQLite has no row locks)
                await job_states.release_gpus(session, job.id)
                continue
            assigned.append(
                Assignment(
                    job_id=job.id,
                    host_id=host.id,
                    gpu_indices=indices,
                    price_per_gpu_hour_micros=host.price,
                    nonce=nonce,
                    command=list(job.command),
                    env=dict(job.env),
                    image=job.image,
                    bundle_sha256=job.bundle_sha256,
                    network=job.network,
                    max_duration_seconds=job.max_duration_seconds,
                    submitted_at=job.created_at.timestamp(),
                )
            )
        await session.commit()
    for assignment in assigned:
        await _dispatch(context, assignment)
        await job_states.notify(context, assignment.job_id, JobState.assigned)
    return PassResult(assigned=assigned, considered=len(jobs))


async def run_scheduler(context: ServerContext) -> None:
    """The scheduler loop of one replica; runs until cancelled. On SQLite only one process
    should run it (the embedded server is one process)."""
    settings = context.settings
    next_maintenance = next_reliability = 0.0
    while True:
        try:
            async with context.bus.subscribe(SCHEDULER_WAKE_CHANNEL) as wakeups:
                while True:
                    now = time.monotonic()
                    if now >= next_maintenance:
                        refresh = now >= next_reliability
                        await job_maintenance.run_once(context, refresh_reliability=refresh)
                        next_maintenance = now + settings.scheduler_sweep_seconds
                        if refresh:
                            next_reliability = now + job_maintenance.RELIABILITY_REFRESH_SECONDS
                    result = await schedule_once(context)
                    if result.assigned and result.considered >= settings.scheduler_batch_size:
                        continue  # a full batch: there is probably more to do right away
                    await wakeups.get(timeout=settings.scheduler_sweep_seconds)
                    while await wakeups.get(timeout=0) is not None:
                        pass  # coalesce a burst of wake-ups into one pass
        except asyncio.CancelledError:
            raise
        except ServiceUnavailable as exc:
            logger.warning("scheduler: a store is unavailable (%s); retrying", exc)
            await asyncio.sleep(min(settings.scheduler_sweep_seconds, 2.0))
        except Exception:
            logger.exception("scheduler pass failed; retrying")
            await asyncio.sleep(min(settings.scheduler_sweep_seconds, 2.0))


async def _free_capacity(session: AsyncSession) -> dict[uuid.UUID, _Host]:
    rows = await session.execute(
        select(
            HostGpuModel.id,
            HostGpuModel.host_id,
            HostGpuModel.index,
            HostGpuModel.model,
            HostGpuModel.memory_total_mib,
            HostGpuModel.job_id,
            HostModel.price_per_gpu_hour_micros,
            HostModel.reliability,
            HostModel.tags,
            HostModel.runners,
        )
        .join(HostModel, HostModel.id == HostGpuModel.host_id)
        .where(
            HostModel.status == HostStatus.online.value,
            HostModel.paused.is_(False),
            HostModel.revoked_at.is_(None),
            HostModel.price_per_gpu_hour_micros.is_not(None),
        )
        .order_by(HostGpuModel.host_id, HostGpuModel.index)
    )
    hosts: dict[uuid.UUID, _Host] = {}
    for gpu_id, host_id, index, model, memory, job_id, price, reliability, tags, runners in rows:
        host = hosts.get(host_id)
        if host is None:
            host = hosts[host_id] = _Host(
                id=host_id,
                price=int(price or 0),
                reliability=float(reliability or 0.0),
                tags=frozenset(tags or ()),
                runners=frozenset(runners or ()),
                busy=0,
            )
        if job_id is None:
            host.free.append((gpu_id, index, model.lower(), memory))
        else:
            host.busy += 1
    return {host_id: host for host_id, host in hosts.items() if host.free}


async def _take_batch(session: AsyncSession, size: int) -> list[JobModel]:
    """Queued jobs in queue order (priority, fair share, age), locked on PostgreSQL."""
    turn = (
        func.row_number()
        .over(
            partition_by=(JobModel.owner_id, JobModel.priority),
            order_by=(JobModel.created_at, JobModel.id),
        )
        .label("turn")
    )
    ranked = (
        select(JobModel.id, JobModel.priority, JobModel.created_at, turn)
        .where(JobModel.state == JobState.queued.value)
        .subquery()
    )
    order = (ranked.c.priority.desc(), ranked.c.turn, ranked.c.created_at, ranked.c.id)
    ids = list(await session.scalars(select(ranked.c.id).order_by(*order).limit(size)))
    if not ids:
        return []
    rows = await session.scalars(
        select(JobModel)
        .where(JobModel.id.in_(ids), JobModel.state == JobState.queued.value)
        .with_for_update(skip_locked=True)
    )
    by_id = {job.id: job for job in rows}
    return [by_id[i] for i in ids if i in by_id]


def _match(
    job: JobModel, ranked: list[_Host]
) -> tuple[_Host, list[tuple[uuid.UUID, int, str, int]]] | None:
    runner = "docker" if job.image else "process"
    wanted_models = [m.lower() for m in job.gpu_models or ()]
    required_tags = frozenset(job.tags or ())
    excluded = frozenset(job.excluded_host_ids or ())
    limit = job.max_price_per_gpu_hour_micros
    for host in ranked:
        if limit is not None and host.price > limit:
            break  # ranked by price: nobody further is cheap enough
        if len(host.free) < job.gpu_count or runner not in host.runners:
            continue
        if not required_tags <= host.tags or str(host.id) in excluded:
            continue
        fitting = [
            gpu
            for gpu in host.free
            if gpu[3] >= job.min_vram_mib
            and (not wanted_models or any(m in gpu[2] for m in wanted_models))
        ]
        if len(fitting) >= job.gpu_count:
            return host, fitting[: job.gpu_count]
    return None


async def _claim(session: AsyncSession, job_id: uuid.UUID, gpu_ids: list[uuid.UUID]) -> bool:
    lockable = (
        select(HostGpuModel.id)
        .where(HostGpuModel.id.in_(gpu_ids), HostGpuModel.job_id.is_(None))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = await session.execute(
        update(HostGpuModel)
        .where(and_(HostGpuModel.id.in_(lockable), HostGpuModel.job_id.is_(None)))
        .values(job_id=job_id)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == len(gpu_ids):  # type: ignore[attr-defined]
        return True
    await job_states.release_gpus(session, job_id)
    return False


async def _dispatch(context: ServerContext, assignment: Assignment) -> None:
    bundle_url = None
    if assignment.bundle_sha256:
        bundle_url = context.storage.presign_get(
            bundle_key(assignment.bundle_sha256), expires_in=BUNDLE_URL_SECONDS
        )
    manifest = dispatch.build_manifest(
        context=context,
        job_id=assignment.job_id,
        host_id=assignment.host_id,
        command=assignment.command,
        env=assignment.env,
        runner="docker" if assignment.image else "process",
        image=assignment.image,
        gpu_indices=assignment.gpu_indices,
        network=assignment.network,
        limits=ManifestLimits(wall_clock_seconds=float(assignment.max_duration_seconds)),
        bundle_url=bundle_url,
        bundle_sha256=assignment.bundle_sha256,
        nonce=assignment.nonce,
    )
    try:
        await dispatch.send_manifest(context=context, host_id=assignment.host_id, manifest=manifest)
    except ServiceUnavailable as exc:
        # The ack deadline puts the job back in the queue.
        logger.warning("could not publish the manifest for job %s: %s", assignment.job_id, exc)
