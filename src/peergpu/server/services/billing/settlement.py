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
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import ServiceUnavailable
from peergpu.server.agents.channels import SCHEDULER_WAKE_CHANNEL
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import JobChargeModel
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
    wallets: list[str]


async def settle_open(context: ServerContext, *, limit: int = BATCH) -> SweepResult:
    """Settle up to ``limit`` ended attempts in one transaction; returns how many, and the
    wallets they touched (for automatic top-ups)."""
    now = utcnow()
    async with context.sessionmaker() as session:
        rows = (
            await session.execute(
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
        ).all()
        if not rows:
            return SweepResult(0, [])
        settlements: list[tuple[JobChargeModel, Outcome]] = []
        for charge, state, attempt, failure_reason, started_at, finished_at in rows:
            settlements.append(
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
            )
        await _book(session, settlements, now=now)
        await session.commit()
    return SweepResult(len(settlements), sorted({charge.wallet for charge, _ in settlements}))


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
        if tx_id is not None  # None: another replica settled it already
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
                    await _settle_all(context)
                    await wakeups.get(timeout=settings.billing_settle_seconds)
                    await asyncio.sleep(0.05)  # let a burst of endings land together
                    while await wakeups.get(timeout=0) is not None:
                        pass
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
