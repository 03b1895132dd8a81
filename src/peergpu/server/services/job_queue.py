"""The scheduler's queue read: the next batch of queued jobs in queue order, bounded.

Queue order is priority first, then fair share (each renter's oldest job before anyone's
second), then age. The read never ranks the whole queue: only the renter queues whose oldest
job could make the batch, and only their first ``size`` jobs each, are ranked (the index
``ix_jobs_fair_queue`` serves both reads). On PostgreSQL the chosen rows are locked with
``FOR UPDATE SKIP LOCKED`` so schedulers on other replicas take other jobs.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db.job_models import JobModel, JobState

#: Terms per UNION ALL in the queue read (SQLite refuses more than 500).
_UNION_TERMS = 400
_QUEUED = JobState.queued.value


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What the scheduler needs of a queued job, read as plain columns: a pass handles
    hundreds, and ORM objects (identity map, attribute instrumentation) cost more than the
    rest of the read."""

    id: uuid.UUID
    owner_id: uuid.UUID
    org_id: uuid.UUID | None
    image: str | None
    bundle_sha256: str | None
    command: list[str]
    env: dict[str, str]
    gpu_count: int
    min_vram_mib: int
    gpu_models: list[str]
    max_price_per_gpu_hour_micros: int | None
    max_cost_micros: int | None
    tags: list[str]
    max_duration_seconds: int
    network: bool
    attempt: int
    excluded_host_ids: list[str]
    created_at: datetime


_COLUMNS = tuple(getattr(JobModel, name) for name in QueuedJob.__dataclass_fields__)


def heads_statement(size: int, skip_owners: Collection[uuid.UUID] = ()) -> Select[uuid.UUID, int]:
    """The (renter, priority) queues whose oldest job could be among the next ``size`` jobs:
    every job in the batch ranks after its own queue's head, so at most ``size`` heads matter.
    ``skip_owners``' queues are left out (renters whose credit just fell short)."""
    query = (
        select(JobModel.owner_id, JobModel.priority)
        .where(JobModel.state == _QUEUED)
        .group_by(JobModel.owner_id, JobModel.priority)
        .order_by(JobModel.priority.desc(), func.min(JobModel.created_at))
        .limit(size)
    )
    if skip_owners:
        query = query.where(JobModel.owner_id.not_in(list(skip_owners)))
    return query


def order_statement(heads: Sequence[tuple[uuid.UUID, int]], size: int) -> Select[Any]:
    """The next ``size`` queued job ids in queue order, read from the first ``size`` jobs of
    each queue in ``heads`` only (one index range each) and ranked by fair share."""
    firsts = [
        select(JobModel.id, JobModel.owner_id, JobModel.priority, JobModel.created_at)
        .where(JobModel.state == _QUEUED, JobModel.owner_id == owner, JobModel.priority == priority)
        .order_by(JobModel.created_at, JobModel.id)
        .limit(size)
        .subquery()
        .select()
        for owner, priority in heads
    ]
    # SQLite allows 500 terms in one compound SELECT: nest groups of them.
    while len(firsts) > _UNION_TERMS:
        firsts = [
            union_all(*firsts[i : i + _UNION_TERMS]).subquery().select()
            for i in range(0, len(firsts), _UNION_TERMS)
        ]
    candidates = (firsts[0] if len(firsts) == 1 else union_all(*firsts)).subquery("candidates")
    turn = func.row_number().over(
        partition_by=(candidates.c.owner_id, candidates.c.priority),
        order_by=(candidates.c.created_at, candidates.c.id),
    )
    ranked = select(
        candidates.c.id, candidates.c.priority, candidates.c.created_at, turn.label("turn")
    ).subquery("ranked")
    return (
        select(ranked.c.id)
        .order_by(ranked.c.priority.desc(), ranked.c.turn, ranked.c.created_at, ranked.c.id)
        .limit(size)
    )


async def read_jobs(
    session: AsyncSession, ids: Sequence[uuid.UUID], *, lock: bool = False
) -> list[QueuedJob]:
    """The queued jobs among ``ids``, in that order; with ``lock``, locked on PostgreSQL
    (``SKIP LOCKED``: a job another replica's pass holds is left out)."""
    query = select(*_COLUMNS).where(JobModel.id.in_(ids), JobModel.state == _QUEUED)
    if lock:
        query = query.with_for_update(skip_locked=True)
    by_id = {row[0]: QueuedJob(*row) for row in await session.execute(query)}
    return [by_id[i] for i in ids if i in by_id]


async def take_batch(
    session: AsyncSession, size: int, skip_owners: Collection[uuid.UUID] = ()
) -> list[QueuedJob]:
    """Queued jobs in queue order (priority, fair share, age), locked on PostgreSQL."""
    heads = [
        (owner, priority)
        for owner, priority in await session.execute(heads_statement(size, skip_owners))
    ]
    if not heads:
        return []
    ids = list(await session.scalars(order_statement(heads, size)))
    return await read_jobs(session, ids, lock=True)
