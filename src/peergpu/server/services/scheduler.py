"""The scheduler: match queued jobs to free GPUs, claim them atomically, dispatch manifests.

One pass (``schedule_once``) in one transaction, a fixed number of statements however many
jobs it assigns:

1. Read the cheapest free GPUs of online, unpaused, priced hosts (a few); stop at once if
   there are none.
2. Take a batch of queued jobs in queue order: priority first, then fair share (each renter's
   oldest job before anyone's second), then age. The read is bounded: only the renters whose
   oldest job could make the batch, and only each one's fair share of the batch (their first
   ``batch`` jobs when one renter must fill in for the others), are ranked (the index
   ``ix_jobs_fair_queue`` serves both; see ``job_queue``), never the whole queue. On
   PostgreSQL the chosen rows are then locked with ``FOR UPDATE SKIP LOCKED``, so schedulers
   on other replicas take other jobs. Then read more free GPUs in ranking order if the batch
   wants more (the cheapest few times what it asks for); everything only if a job finds no
   host among those.
3. Match in memory: for each job the cheapest eligible host, then the most reliable, then the
   least loaded, among hosts with enough free GPUs of the right model and VRAM.
   While matching, each job's wallet must cover its hold on the chosen host (price x GPUs x
   max duration, see ``billing.holds``); a job it cannot cover takes no GPU and stays queued
   with a message saying why.
4. Claim every matched GPU with one conditional UPDATE (``WHERE job_id IS NULL``, on
   PostgreSQL over rows locked with ``SKIP LOCKED``) that returns what it claimed. A job whose
   claim came up short (another replica got a GPU first) gives back what it got and waits for
   the next pass.
5. ``queued -> assigned`` for every claimed job in one UPDATE over arrays on PostgreSQL, an
   executemany on SQLite (conditional on ``queued``: a job cancelled meanwhile is noticed
   and its GPUs given back), one
   ``job_events`` INSERT, the holds of the jobs assigned, one commit.
6. After the commit, sign one manifest per assignment and publish them all, with the state
   changes, in one round trip; whichever replica holds a host's socket sends its manifest.

The loop (``run_scheduler``) runs a pass whenever something wakes it (a submit, a freed GPU, a
host joining: ``scheduler:wake`` on the bus) and otherwise every ``scheduler_sweep_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    Text,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from peergpu.errors import PaymentRequired, ServiceUnavailable
from peergpu.protocol.manifest import ManifestLimits
from peergpu.server.agents import dispatch
from peergpu.server.agents.channels import SCHEDULER_WAKE_CHANNEL, host_channel, state_change
from peergpu.server.context import ServerContext
from peergpu.server.db import core
from peergpu.server.db.base import utcnow
from peergpu.server.db.bulk import insert_rows, unnest
from peergpu.server.db.host_models import HostGpuModel, HostModel, taking_jobs
from peergpu.server.db.job_models import JobEventModel, JobModel, JobState
from peergpu.server.services import job_maintenance, job_states
from peergpu.server.services.billing import accounts as billing_accounts
from peergpu.server.services.billing import holds
from peergpu.server.services.bundles import bundle_key
from peergpu.server.services.job_queue import QueuedJob
from peergpu.server.services.job_queue import take_batch as _take_batch

logger = logging.getLogger(__name__)

#: How long a bundle download URL in a manifest stays valid.
BUNDLE_URL_SECONDS = 3600
#: A pass reads the cheapest free GPUs, this many times what its batch asks for (at least
#: ``FREE_READ_MIN``), and everything only when a job found no host among them.
FREE_READ_FACTOR = 4
FREE_READ_MIN = 64
#: Wake-ups read (and dropped) after one, before the next pass: they all ask for the same pass.
MAX_COALESCED_WAKEUPS = 100
#: GPUs per claim statement: keeps SQLite's ``CASE`` form (three bind parameters per GPU) well
#: under the limit of 32,766 bind parameters.
CLAIM_CHUNK = 2000

_QUEUED = JobState.queued.value
_ASSIGNED = JobState.assigned.value

#: A free GPU: (row id, index, model lower-cased, memory MiB).
Gpu = tuple[uuid.UUID, int, str, int]


@dataclass
class _Host:
    id: uuid.UUID
    owner_id: uuid.UUID
    price: int
    reliability: float
    tags: frozenset[str]
    runners: frozenset[str]
    busy: int
    free: list[Gpu] = field(default_factory=list)
    """Free GPUs, by index."""


class _RecentlyUnfunded:
    """Renters whose credit (or spending cap) just fell short of a job's hold. Their queues
    are left out of the next passes for a few seconds, so a renter with many high-priority jobs
    and no credit cannot fill every batch and starve everyone else; after that they are tried
    again (a top-up may have come). Per replica, in memory."""

    SECONDS = 5.0

    def __init__(self) -> None:
        self._until: dict[uuid.UUID, float] = {}

    def note(self, owners: Iterable[uuid.UUID]) -> None:
        until = time.monotonic() + self.SECONDS
        for owner in owners:
            self._until[owner] = until

    def clear(self) -> None:
        self._until.clear()

    def current(self) -> list[uuid.UUID]:
        now = time.monotonic()
        self._until = {owner: t for owner, t in self._until.items() if t > now}
        return list(self._until)


_unfunded = _RecentlyUnfunded()


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


@dataclass
class _Match:
    job: QueuedJob
    host: _Host
    gpus: list[Gpu]
    hold: holds.HoldRequest | None = None
    plan: holds.HoldPlan | None = None


async def schedule_once(context: ServerContext) -> PassResult:
    """One scheduling pass; dispatches what it assigned. See the module docstring."""
    result = await _pass(context)
    await _dispatch(context, result.assigned)
    return result


async def _pass(context: ServerContext) -> PassResult:
    """One pass up to its commit; the caller dispatches what it assigned."""
    async with context.sessionmaker() as session:
        # The cheapest free GPUs first, a few times what the batch asks for: on an idle fleet
        # a pass of a few jobs need not read every free GPU. The first ``FREE_READ_MIN`` of
        # them are read before the queue (none: a full fleet, and the pass stops there), more
        # once the batch says how many it wants, and everything only when a job found no host
        # among those, the batch then matched again from the start.
        hosts, cut = await _free_capacity(session, limit=FREE_READ_MIN)
        if not hosts:
            await session.rollback()
            return PassResult(assigned=[], considered=0)
        jobs = await _take_batch(
            session, context.settings.scheduler_batch_size, _unfunded.current()
        )
        if not jobs:
            await session.rollback()
            return PassResult(assigned=[], considered=0)
        budget = await holds.open_budget(session, {_wallet(job) for job in jobs})
        limit = max(FREE_READ_MIN, FREE_READ_FACTOR * sum(job.gpu_count for job in jobs))
        if cut and limit > FREE_READ_MIN:
            hosts, cut = await _free_capacity(session, limit=limit)
        matches, waiting = _match_all(jobs, hosts, budget.copy())
        if cut and len(matches) + len(waiting) < len(jobs):
            hosts, _ = await _free_capacity(session)
            matches, waiting = _match_all(jobs, hosts, budget)
        await holds.note_waiting(session, waiting)
        _unfunded.note(job.owner_id for job in jobs if job.id in waiting)
        if not matches:
            await (session.commit() if waiting else session.rollback())
            return PassResult(assigned=[], considered=len(jobs))
        matches = await _claim(session, matches)
        now = utcnow()
        deadline = now + timedelta(seconds=context.settings.manifest_ack_timeout_seconds)
        assigned = await _assign(session, matches, now=now, deadline=deadline)
        landed = {a.job_id for a in assigned}
        await holds.place(
            session,
            [(m.hold, m.plan) for m in matches if m.job.id in landed and m.hold and m.plan],
            now=now,
        )
        await session.commit()
    return PassResult(assigned=assigned, considered=len(jobs))


async def run_scheduler(context: ServerContext) -> None:
    """The scheduler loop of one replica; runs until cancelled. On SQLite only one process
    should run it (the embedded server is one process).

    A pass's manifests are signed and published while the next pass reads and matches: at
    most one dispatch is in flight, and a pass's dispatch starts only once the one before it
    is done, so manifests leave in pass order."""
    settings = context.settings
    next_maintenance = next_reliability = 0.0
    dispatching: asyncio.Task[None] | None = None

    async def dispatch_after(previous: asyncio.Task[None] | None, result: PassResult) -> None:
        if previous is not None:
            await asyncio.shield(previous)
        try:
            await _dispatch(context, result.assigned)
        except Exception:  # the ack deadline puts the jobs back in the queue
            logger.exception("dispatching %d manifests failed", len(result.assigned))

    try:
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
                        try:
                            result = await _pass(context)
                        except PaymentRequired as exc:
                            # Another replica spent a wallet's credit during this pass; the
                            # pass was rolled back whole. Go again with fresh balances.
                            logger.info("scheduler pass rolled back: %s", exc.message)
                            await asyncio.sleep(0.05)  # never a tight loop, whatever the cause
                            continue
                        if result.assigned:
                            dispatching = asyncio.create_task(
                                dispatch_after(dispatching, result), name="scheduler-dispatch"
                            )
                        if result.assigned and result.considered >= settings.scheduler_batch_size:
                            continue  # a full batch: there is probably more to do right away
                        await wakeups.get(timeout=settings.scheduler_sweep_seconds)
                        # A burst of wake-ups asks for one pass (bounded: see ``drain``).
                        await wakeups.drain(MAX_COALESCED_WAKEUPS)
            except asyncio.CancelledError:
                raise
            except ServiceUnavailable as exc:
                logger.warning("scheduler: a store is unavailable (%s); retrying", exc)
                await asyncio.sleep(min(settings.scheduler_sweep_seconds, 2.0))
            except Exception:
                logger.exception("scheduler pass failed; retrying")
                await asyncio.sleep(min(settings.scheduler_sweep_seconds, 2.0))
    finally:
        if dispatching is not None:  # what was committed is sent before the loop ends
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(dispatching), timeout=5)


async def _free_capacity(
    session: AsyncSession, *, limit: int | None = None
) -> tuple[dict[uuid.UUID, _Host], bool]:
    """The free GPUs of hosts taking jobs, with each host's count of busy GPUs, in ranking
    order (cheapest, then most reliable, then least loaded); with ``limit``, only the first
    ``limit``. Returns them by host, and whether the limit cut the list short. Only free GPU
    rows are read: on a busy fleet most GPUs are taken, and reading them all (to count them)
    was most of this query's time. The read walks the hosts taking jobs by price through a
    partial index, and each one's free GPUs through another, and stops at the limit: joining
    every registered host's GPUs and sorting them all was 4-14 ms on 10,000 hosts."""
    query = _free_query(limited=limit is not None)
    parameters = {"free_limit": limit + 1} if limit is not None else {}
    rows = list(await core.execute(session, query, parameters))
    cut = limit is not None and len(rows) > limit
    if cut:
        rows = rows[:limit]
    hosts: dict[uuid.UUID, _Host] = {}
    for row in rows:
        gpu_id, host_id, index, model, memory = row[:5]
        host = hosts.get(host_id)
        if host is None:
            host = hosts[host_id] = _Host(
                id=host_id,
                owner_id=row.owner_id,
                price=int(row.price_per_gpu_hour_micros or 0),
                reliability=float(row.reliability or 0.0),
                tags=frozenset(row.tags or ()),
                runners=frozenset(row.runners or ()),
                busy=int(row.busy or 0),
            )
        host.free.append((gpu_id, index, model.lower(), memory))
    return hosts, cut


@functools.lru_cache(maxsize=2)
def _free_query(*, limited: bool) -> Any:
    """The statement of :func:`_free_capacity`, built once (building it cost ~0.8 ms of CPU,
    every pass); ``limited`` reads the first ``free_limit`` rows only."""
    # Each host's busy GPUs: ``count(job_id)`` over the host's GPUs (through the index on
    # ``(host_id, index)``). With ``job_id IS NOT NULL`` in the WHERE instead, PostgreSQL
    # scanned every busy GPU (the index on ``job_id``) for each free one: 417 ms a pass on
    # 4,000 free GPUs of 4-GPU hosts.
    taken = aliased(HostGpuModel)
    busy = (
        select(func.count(taken.job_id))
        .where(taken.host_id == HostGpuModel.host_id)
        .scalar_subquery()
        .label("busy")
    )
    query = (
        select(
            HostGpuModel.id,
            HostGpuModel.host_id,
            HostGpuModel.index,
            HostGpuModel.model,
            HostGpuModel.memory_total_mib,
            busy,
            HostModel.price_per_gpu_hour_micros,
            HostModel.reliability,
            HostModel.tags,
            HostModel.runners,
            HostModel.owner_id,
        )
        .join(HostModel, HostModel.id == HostGpuModel.host_id)
        .where(*taking_jobs(), HostGpuModel.job_id.is_(None))
        .order_by(
            # ``ix_hosts_ranking`` gives the hosts by price: PostgreSQL walks it, sorts each
            # run of one price as it comes (an incremental sort) and stops at the limit.
            HostModel.price_per_gpu_hour_micros,
            HostModel.reliability.desc(),
            busy,
            HostGpuModel.host_id,
            HostGpuModel.index,
        )
    )
    return query.limit(bindparam("free_limit", type_=Integer)) if limited else query


def _match(job: QueuedJob, ranked: list[_Host], start: int = 0) -> tuple[_Host, list[Gpu]] | None:
    """The first host from ``ranked[start]`` on that can run the job, and the GPUs it gets."""
    runner = "docker" if job.image else "process"
    wanted_models = [m.lower() for m in job.gpu_models or ()]
    required_tags = frozenset(job.tags or ())
    excluded = frozenset(job.excluded_host_ids or ())
    limit = job.max_price_per_gpu_hour_micros
    for host in itertools.islice(ranked, start, None):
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


def _match_all(
    jobs: list[QueuedJob], hosts: dict[uuid.UUID, _Host], budget: holds.Budget
) -> tuple[list[_Match], dict[uuid.UUID, str]]:
    """Match the batch in queue order. A job takes its GPUs only if its wallet can pay the
    hold on the chosen host; otherwise it stays queued with the reason, and its GPUs stay free
    for the jobs behind it."""
    ranked = sorted(hosts.values(), key=lambda h: (h.price, -h.reliability, h.busy))
    matches: list[_Match] = []
    waiting: dict[uuid.UUID, str] = {}
    full = 0  # ranked[:full] have no free GPU left: no job need look at them again
    for job in jobs:
        while full < len(ranked) and not ranked[full].free:
            full += 1
        choice = _match(job, ranked, full)
        if choice is None:
            continue
        host, gpus = choice
        request = holds.HoldRequest(
            job_id=job.id,
            attempt=job.attempt + 1,
            wallet=_wallet(job),
            host_id=host.id,
            host_owner_id=host.owner_id,
            price_per_gpu_hour_micros=host.price,
            gpu_count=job.gpu_count,
            max_duration_seconds=job.max_duration_seconds,
            max_cost_micros=job.max_cost_micros,
        )
        plan = budget.take(request)
        if isinstance(plan, str):
            waiting[job.id] = plan
            continue
        taken = set(gpus)
        host.free = [g for g in host.free if g not in taken]
        host.busy += len(gpus)
        matches.append(_Match(job, host, gpus, request, plan))
    return matches, waiting


def _assigned_values(now: Any, deadline: Any) -> dict[str, Any]:
    """What ``queued -> assigned`` sets besides each job's own values."""
    return {
        "state": _ASSIGNED,
        "updated_at": now,
        "assigned_at": now,
        "ack_deadline": deadline,
        "message": "",
        "acked_at": None,
        "missing_since": None,
    }


@functools.lru_cache(maxsize=1)
def _assign_each() -> Any:
    """``queued -> assigned`` for one job (SQLite, run as an executemany)."""
    return (
        update(JobModel)
        .where(JobModel.id == bindparam("b_id"), JobModel.state == _QUEUED)
        .values(
            **_assigned_values(bindparam("b_now"), bindparam("b_deadline")),
            host_id=bindparam("b_host_id"),
            gpu_indices=bindparam("b_gpu_indices", type_=JobModel.gpu_indices.type),
            price_per_gpu_hour_micros=bindparam("b_price"),
            attempt=bindparam("b_attempt"),
            manifest_nonce=bindparam("b_nonce"),
        )
    )


@functools.lru_cache(maxsize=1)
def _assign_by_arrays() -> Any:
    """PostgreSQL: ``queued -> assigned`` for every job of a pass in one UPDATE ... FROM
    unnest(...), returning the ids of the jobs it changed."""
    values = unnest(
        "assigned",
        [
            ("id", JobModel.id.type),
            ("host_id", JobModel.host_id.type),
            ("gpu_indices", Text()),  # JSON, as text: a list per row is no array element
            ("price", JobModel.price_per_gpu_hour_micros.type),
            ("attempt", JobModel.attempt.type),
            ("nonce", JobModel.manifest_nonce.type),
        ],
    )
    return (
        update(JobModel)
        .where(JobModel.id == values.c.id, JobModel.state == _QUEUED)
        .values(
            **_assigned_values(
                bindparam("now", type_=JobModel.updated_at.type),
                bindparam("deadline", type_=JobModel.ack_deadline.type),
            ),
            host_id=values.c.host_id,
            gpu_indices=cast(values.c.gpu_indices, JobModel.gpu_indices.type),
            price_per_gpu_hour_micros=values.c.price,
            attempt=values.c.attempt,
            manifest_nonce=values.c.nonce,
        )
        .returning(JobModel.id)
        .execution_options(synchronize_session=False)
    )


def _wallet(job: QueuedJob) -> str:
    return billing_accounts.wallet_of(owner_id=job.owner_id, org_id=job.org_id)


def claim_statement(claims: dict[uuid.UUID, uuid.UUID], *, postgresql: bool) -> tuple[Any, Any]:
    """``UPDATE host_gpus SET job_id = <its job>`` for every free GPU in ``claims`` (GPU row id
    -> job id) that is still free and, on PostgreSQL, not locked by another replica's pass;
    returns ``(statement, parameters)``, and the statement returns ``(gpu id, job id)`` of what
    it claimed.

    On PostgreSQL the statement is always the same (the pairs travel as two arrays), so it is
    built, compiled and prepared once; a ``CASE`` of one branch per GPU was compiled anew every
    pass (about 18% of the scheduler's CPU in a burst, bench/scheduler.py). SQLite, which has
    no arrays, keeps the ``CASE``."""
    if postgresql:
        return _claim_arrays(), {
            "claims_gpu_id": list(claims),
            "claims_job_id": list(claims.values()),
        }
    job_type = HostGpuModel.job_id.type
    statement = (
        update(HostGpuModel)
        .where(HostGpuModel.id.in_(list(claims)), HostGpuModel.job_id.is_(None))
        .values(
            job_id=cast(
                case(*((HostGpuModel.id == g, literal(j, job_type)) for g, j in claims.items())),
                job_type,
            )
        )
        .returning(HostGpuModel.id, HostGpuModel.job_id)
        .execution_options(synchronize_session=False)
    )
    return statement, {}


@functools.lru_cache(maxsize=1)
def _claim_arrays() -> Any:
    """PostgreSQL's claim: ``UPDATE host_gpus SET job_id = claims.job_id FROM
    unnest(:claims_gpu_id, :claims_job_id) AS claims(gpu_id, job_id)`` over the rows still
    free that no other pass has locked (``FOR UPDATE SKIP LOCKED``)."""
    claims = unnest(
        "claims", [("gpu_id", HostGpuModel.id.type), ("job_id", HostGpuModel.job_id.type)]
    )
    gpu_ids = bindparam("claims_gpu_id", type_=pg.ARRAY(HostGpuModel.id.type))  # the same
    lockable = (
        select(HostGpuModel.id)
        .where(HostGpuModel.id == any_(gpu_ids), HostGpuModel.job_id.is_(None))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(HostGpuModel)
        .where(
            HostGpuModel.id == claims.c.gpu_id,
            HostGpuModel.id.in_(lockable),
            HostGpuModel.job_id.is_(None),
        )
        .values(job_id=claims.c.job_id)
        .returning(HostGpuModel.id, HostGpuModel.job_id)
        .execution_options(synchronize_session=False)
    )


async def _claim(session: AsyncSession, matches: list[_Match]) -> list[_Match]:
    """Claim the matched GPUs; returns the matches whose every GPU was claimed. What a short
    match did get is given back (within this transaction)."""
    wanted = {gpu[0]: match.job.id for match in matches for gpu in match.gpus}
    items = list(wanted.items())
    claimed: set[uuid.UUID] = set()
    postgresql = session.get_bind().dialect.name == "postgresql"
    for start in range(0, len(items), CLAIM_CHUNK):
        chunk = dict(items[start : start + CLAIM_CHUNK])
        statement, parameters = claim_statement(chunk, postgresql=postgresql)
        claimed.update(
            gpu_id for gpu_id, _job in await core.execute(session, statement, parameters)
        )
    whole = [m for m in matches if all(g[0] in claimed for g in m.gpus)]
    if len(whole) < len(matches):
        short = [m.job.id for m in matches if not all(g[0] in claimed for g in m.gpus)]
        for job_id in short:  # rare: another replica took a GPU first
            await job_states.release_gpus(session, job_id)
    return whole


async def _assign(
    session: AsyncSession, matches: list[_Match], *, now: datetime, deadline: datetime
) -> list[Assignment]:
    """``queued -> assigned`` for every match: one UPDATE (an executemany on SQLite), one
    events INSERT."""
    if not matches:
        return []
    rows: list[dict[str, Any]] = []
    for match in matches:
        rows.append(
            {
                "b_id": match.job.id,
                "b_host_id": match.host.id,
                "b_gpu_indices": sorted(g[1] for g in match.gpus),
                "b_price": match.host.price,
                "b_attempt": match.job.attempt + 1,
                "b_nonce": secrets.token_hex(16),
            }
        )
    if session.get_bind().dialect.name == "postgresql":
        # One UPDATE over arrays, returning the jobs it changed: an executemany was one
        # statement per job inside PostgreSQL, and reports no count, so every pass then read
        # the nonces back to see which landed.
        landed = set(
            (
                await core.execute(
                    session,
                    _assign_by_arrays(),
                    {
                        "now": now,
                        "deadline": deadline,
                        "assigned_id": [r["b_id"] for r in rows],
                        "assigned_host_id": [r["b_host_id"] for r in rows],
                        "assigned_gpu_indices": [json.dumps(r["b_gpu_indices"]) for r in rows],
                        "assigned_price": [r["b_price"] for r in rows],
                        "assigned_attempt": [r["b_attempt"] for r in rows],
                        "assigned_nonce": [r["b_nonce"] for r in rows],
                    },
                )
            ).scalars()
        )
    else:
        # Core executemany (the ORM would read a list of rows as an update by primary key).
        connection = await session.connection()
        result = await connection.execute(
            _assign_each(), [{**r, "b_now": now, "b_deadline": deadline} for r in rows]
        )
        landed = {r["b_id"] for r in rows}
        if result.rowcount != len(rows):
            # Short: a job was cancelled between the read and the write (SQLite has no row
            # locks). Believe only the nonces that landed.
            landed = set(
                await session.scalars(
                    select(JobModel.id).where(
                        JobModel.id.in_([r["b_id"] for r in rows]),
                        JobModel.manifest_nonce.in_([r["b_nonce"] for r in rows]),
                        JobModel.state == _ASSIGNED,
                    )
                )
            )
    if len(landed) < len(rows):
        for row in rows:
            if row["b_id"] not in landed:
                await job_states.release_gpus(session, row["b_id"])
        keep = [i for i, r in enumerate(rows) if r["b_id"] in landed]
        rows = [rows[i] for i in keep]
        matches = [matches[i] for i in keep]
    if not rows:
        return []
    await insert_rows(
        session,
        JobEventModel,
        [
            {
                "job_id": row["b_id"],
                "at": now,
                "from_state": _QUEUED,
                "to_state": _ASSIGNED,
                "reason": "scheduled",
                "message": f"Assigned to host {row['b_host_id']} (GPUs {row['b_gpu_indices']}).",
                "host_id": row["b_host_id"],
            }
            for row in rows
        ],
    )
    return [
        Assignment(
            job_id=match.job.id,
            host_id=match.host.id,
            gpu_indices=row["b_gpu_indices"],
            price_per_gpu_hour_micros=match.host.price,
            nonce=row["b_nonce"],
            command=list(match.job.command),
            env=dict(match.job.env),
            image=match.job.image,
            bundle_sha256=match.job.bundle_sha256,
            network=match.job.network,
            max_duration_seconds=(
                match.plan.run_seconds if match.plan else match.job.max_duration_seconds
            ),
            submitted_at=match.job.created_at.timestamp(),
        )
        for match, row in zip(matches, rows, strict=True)
    ]


async def _dispatch(context: ServerContext, assigned: list[Assignment]) -> None:
    """Sign every manifest, then publish them and the jobs' state changes in one round trip.
    A publish that fails is not retried here: the ack deadline puts the jobs back in the queue."""
    if not assigned:
        return
    messages: list[tuple[str, bytes]] = []
    for assignment in assigned:
        try:
            delivery = _delivery(context, assignment)
        except Exception:  # one manifest that cannot be built must not hold back the rest
            logger.exception("could not build the manifest for job %s", assignment.job_id)
            continue
        messages.append((host_channel(assignment.host_id), delivery))
    messages.extend(state_change(a.job_id, _ASSIGNED) for a in assigned)
    try:
        await context.bus.publish_many(messages)
    except ServiceUnavailable as exc:
        logger.warning("could not publish %d manifests: %s", len(assigned), exc)


def _delivery(context: ServerContext, assignment: Assignment) -> bytes:
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
    return dispatch.manifest_delivery(manifest)
