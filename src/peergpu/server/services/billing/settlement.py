"""Settlement: when a job attempt ends, charge what it used and release the rest of its hold.

An attempt's charge (``job_charges`` row) is open until the attempt is over: the job reached a
final state, or went back to the queue, or moved on to a later attempt. Who pays:

- ``succeeded`` and ``cancelled``: the renter pays the seconds used;
- ``failed`` for a reason of the renter's job (non-zero exit, time limit, memory or other
  limits, a signal): the renter pays the seconds used;
- anything else (the host vanished or refused it, the agent failed, the bundle could not be
  fetched, the job expired, an unknown reason): the renter pays nothing.

Seconds are the server's clock from ``running`` (``started_at``) to the end (``finished_at``),
rounded up to the second, charged at the attempt's price and never more than its hold. The
platform keeps its fee (``platform_fee_bps``) and the host owner is credited the rest.

:func:`settle_open` is a sweep: it finds the attempts that are over, in batches, settles each
exactly once (the posting's key is the attempt; on PostgreSQL the charge rows are locked with
``SKIP LOCKED`` so two replicas share the work) and can run any number of times.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import ServiceUnavailable
from peergpu.server.agents.channels import SCHEDULER_WAKE_CHANNEL
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import JobChargeModel, LedgerTransactionModel
from peergpu.server.db.job_models import JobModel, JobState
from peergpu.server.services.billing import ledger, postings

logger = logging.getLogger(__name__)

#: Failure reasons that are the renter's job's own doing: the renter pays the time used.
RENTER_FAULTS = frozenset(
    {
        "nonzero_exit",
        "timeout",
        "memory_limit",
        "process_limit",
        "cpu_limit",
        "file_size_limit",
        "killed_by_signal",
    }
)
_LIVE = (JobState.assigned.value, JobState.running.value, JobState.lost.value)
#: Charges this process could not settle (logged); later sweeps skip them.
_set_aside: set[tuple[uuid.UUID, int]] = set()
BATCH = 500


@dataclass(frozen=True)
class Outcome:
    seconds: int
    charged: int
    fee: int
    reason: str


def outcome_of(
    *,
    charge: JobChargeModel,
    job_state: str | None,
    failure_reason: str | None,
    started_at: datetime | None,
    finished_at: datetime | None,
    same_attempt: bool,
    fee_bps: int,
) -> Outcome:
    """What an ended attempt costs the renter (see the module docstring)."""
    if job_state is None:
        return Outcome(0, 0, 0, "The job no longer exists; nothing to pay.")
    if not same_attempt or job_state == JobState.queued.value:
        return Outcome(0, 0, 0, "The host lost this attempt; nothing to pay.")
    pays = job_state in (JobState.succeeded.value, JobState.cancelled.value) or (
        job_state == JobState.failed.value and failure_reason in RENTER_FAULTS
    )
    if not pays:
        why = failure_reason or job_state
        return Outcome(0, 0, 0, f"The job ended {job_state} ({why}); nothing to pay.")
    if started_at is None or finished_at is None:
        return Outcome(0, 0, 0, f"The job ended {job_state} before it ran; nothing to pay.")
    seconds = max(math.ceil((finished_at - started_at).total_seconds()), 0)
    cost = postings.usage_cost(
        price_per_gpu_hour_micros=charge.price_per_gpu_hour_micros,
        gpu_count=charge.gpu_count,
        seconds=seconds,
    )
    charged = min(cost, charge.hold_micros)
    fee, _host = postings.split_fee(charged, fee_bps)
    return Outcome(seconds, charged, fee, f"{seconds} s x {charge.gpu_count} GPU ({job_state}).")


@dataclass(frozen=True)
class SweepResult:
    settled: int


async def settle_open(context: ServerContext, *, limit: int = BATCH) -> SweepResult:
    """Settle up to ``limit`` ended attempts in one transaction; returns how many. If the
    batch fails (a row the books refuse), its attempts are settled one by one so that the
    others go through, and one that keeps failing is left aside (logged) for this process's
    later sweeps instead of blocking them."""
    async with context.sessionmaker() as session:
        settlements = await _read_ended(context, session, limit=limit)
        if not settlements:
            return SweepResult(0)
        keys = [(charge.job_id, charge.attempt) for charge, _ in settlements]
        try:
            await _book(session, settlements, now=utcnow())
            await session.commit()
        except (DBAPIError, ServiceUnavailable):
            raise  # the database itself is in trouble: the loop retries later
        except Exception:
            await session.rollback()
            logger.exception("settling %d charges at once failed; one by one", len(keys))
            settlements = [s for key in keys if (s := await _settle_one(context, key))]
    return SweepResult(len(settlements))


async def _read_ended(
    context: ServerContext,
    session: AsyncSession,
    *,
    limit: int,
    only: tuple[uuid.UUID, int] | None = None,
) -> list[tuple[JobChargeModel, Outcome]]:
    query = (
        select(
            JobChargeModel,
            JobModel.state,
            JobModel.attempt,
            JobModel.failure_reason,
            JobModel.started_at,
            JobModel.finished_at,
        )
        .outerjoin(JobModel, JobModel.id == JobChargeModel.job_id)
        .where(JobChargeModel.settled_at.is_(None), _ended())
        .order_by(JobChargeModel.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=JobChargeModel)
    )
    if only is not None:
        query = query.where(JobChargeModel.job_id == only[0], JobChargeModel.attempt == only[1])
    elif _set_aside:
        query = query.where(
            tuple_(JobChargeModel.job_id, JobChargeModel.attempt).not_in(list(_set_aside))
        )
    rows = (await session.execute(query)).all()
    return [
        (
            charge,
            outcome_of(
                charge=charge,
                job_state=state,
                failure_reason=failure_reason,
                started_at=started_at,
                finished_at=finished_at,
                same_attempt=attempt == charge.attempt,
                fee_bps=context.settings.platform_fee_bps,
            ),
        )
        for charge, state, attempt, failure_reason, started_at, finished_at in rows
    ]


async def _settle_one(
    context: ServerContext, key: tuple[uuid.UUID, int]
) -> tuple[JobChargeModel, Outcome] | None:
    async with context.sessionmaker() as session:
        found = await _read_ended(context, session, limit=1, only=key)
        if not found:
            return None
        try:
            await _book(session, found, now=utcnow())
            await session.commit()
        except (DBAPIError, ServiceUnavailable):
            raise
        except Exception:
            await session.rollback()
            _set_aside.add(key)
            logger.exception("charge %s (attempt %s) cannot be settled; set aside", *key)
            return None
    return found[0]


def _ended() -> Any:
    """The charge's attempt is over: its job is gone, or past this attempt, or not live."""
    return (
        (JobModel.id.is_(None))
        | (JobModel.attempt != JobChargeModel.attempt)
        | (JobModel.state.not_in(_LIVE))
    )


async def _book(
    session: AsyncSession, settlements: list[tuple[JobChargeModel, Outcome]], *, now: datetime
) -> None:
    posted = await ledger.post_many(
        session,
        [
            postings.settle(
                wallet=charge.wallet,
                job_id=charge.job_id,
                attempt=charge.attempt,
                hold_micros=charge.hold_micros,
                charged_micros=outcome.charged,
                fee_micros=outcome.fee,
                host_owner_id=charge.host_owner_id,
                memo=f"Job {charge.job_id}: {outcome.reason}",
                details={
                    "seconds": outcome.seconds,
                    "price_per_gpu_hour_micros": charge.price_per_gpu_hour_micros,
                    "gpu_count": charge.gpu_count,
                    "host_id": str(charge.host_id),
                },
            )
            for charge, outcome in settlements
        ],
    )
    missing = [
        f"settle:{charge.job_id}:{charge.attempt}"
        for (charge, _), tx_id in zip(settlements, posted, strict=True)
        if tx_id is None
    ]
    if missing:  # posted before, yet the charge is open: mark it with that transaction
        found = dict(
            (
                await session.execute(
                    select(LedgerTransactionModel.idempotency_key, LedgerTransactionModel.id).where(
                        LedgerTransactionModel.idempotency_key.in_(missing)
                    )
                )
            ).all()
        )
        posted = [
            tx_id or found.get(f"settle:{charge.job_id}:{charge.attempt}")
            for (charge, _), tx_id in zip(settlements, posted, strict=True)
        ]
    rows = [
        {
            "c_job": charge.job_id,
            "c_attempt": charge.attempt,
            "c_tx": tx_id,
            "c_outcome": "charged" if outcome.charged else "released",
            "c_seconds": outcome.seconds,
            "c_charged": outcome.charged,
            "c_fee": outcome.fee,
            "c_reason": outcome.reason[:200],
        }
        for (charge, outcome), tx_id in zip(settlements, posted, strict=True)
        if tx_id is not None
    ]
    if not rows:
        return
    connection = await session.connection()
    await connection.execute(
        update(JobChargeModel)
        .where(
            JobChargeModel.job_id == bindparam("c_job"),
            JobChargeModel.attempt == bindparam("c_attempt"),
            JobChargeModel.settled_at.is_(None),
        )
        .values(
            settled_at=now,
            settle_transaction_id=bindparam("c_tx"),
            outcome=bindparam("c_outcome"),
            billed_seconds=bindparam("c_seconds"),
            charged_micros=bindparam("c_charged"),
            fee_micros=bindparam("c_fee"),
            reason=bindparam("c_reason"),
        ),
        rows,
    )


async def run_settlement(context: ServerContext) -> None:
    """The settlement loop of one replica: settles whenever something may have ended (the
    scheduler's wake-ups: freed GPUs, re-queued jobs) and at least every
    ``billing_settle_seconds``. It never calls Stripe (``upkeep`` does, in its own loop), so a
    slow Stripe cannot hold up settlement. Runs until cancelled."""
    settings = context.settings
    while True:
        try:
            async with context.bus.subscribe(SCHEDULER_WAKE_CHANNEL) as wakeups:
                while True:
                    # Wait first: at start-up nothing has ended yet that cannot wait one
                    # interval, and a server that stops right away is not caught mid-query.
                    await wakeups.get(timeout=settings.billing_settle_seconds)
                    await asyncio.sleep(0.05)  # let a burst of endings land together
                    await wakeups.drain()  # bounded: a stream of submits never ends
                    await _settle_all(context)
        except asyncio.CancelledError:
            raise
        except ServiceUnavailable as exc:
            logger.warning("settlement: a store is unavailable (%s); retrying", exc)
            await asyncio.sleep(min(settings.billing_settle_seconds, 2.0))
        except Exception:
            logger.exception("settlement pass failed; retrying")
            await asyncio.sleep(min(settings.billing_settle_seconds, 2.0))


async def _settle_all(context: ServerContext) -> None:
    while True:
        result = await settle_open(context)
        if result.settled < BATCH:
            return  # a short batch: nothing else has ended
