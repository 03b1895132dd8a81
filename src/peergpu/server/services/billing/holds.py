"""Holds: credit set aside when the scheduler assigns a job, inside the scheduler's pass.

A job attempt may start only if its wallet can cover the worst case: the host's price x GPUs x
the job's maximum duration, cut to the job's own cost cap (``max_cost_micros``, which then
also shortens the run time sent to the host so the job stops at the cap). A wallet with a
monthly spending cap must also stay under it, counting what it was charged this month and
what it holds now.

:func:`open_budget` reads the credit of a pass's wallets (and, for wallets with a monthly
cap, takes a per-wallet lock so that replicas take turns with the cap); the scheduler asks the
:class:`Budget` for each job as it matches it, in queue order, so a wallet's first jobs get
its credit first and a job nobody pays for never takes a GPU from one that is paid for.
:func:`place` books the holds and the ``job_charges`` rows of the jobs really assigned, in the
scheduler's transaction; the ledger refuses a hold the credit no longer covers (see
:func:`open_budget`). Jobs that cannot be paid for stay queued, with a message saying why
(:func:`note_waiting`).
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db import core
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import BillingProfileModel, JobChargeModel
from peergpu.server.db.bulk import insert_rows
from peergpu.server.db.job_models import JobModel
from peergpu.server.services.billing import accounts, ledger, postings


@dataclass(frozen=True)
class HoldRequest:
    job_id: uuid.UUID
    attempt: int
    wallet: str
    host_id: uuid.UUID
    host_owner_id: uuid.UUID
    price_per_gpu_hour_micros: int
    gpu_count: int
    max_duration_seconds: int
    max_cost_micros: int | None


@dataclass(frozen=True)
class HoldPlan:
    amount: int
    #: The run time the host is told: the job's maximum, or less when its cost cap is lower.
    run_seconds: int


def plan(request: HoldRequest) -> HoldPlan | None:
    """The hold and run time for one attempt; None when the job's cost cap buys no time at
    all on this host."""
    price = request.price_per_gpu_hour_micros
    run_seconds = request.max_duration_seconds
    cap = request.max_cost_micros
    if cap is not None and price > 0:
        affordable = cap * postings.SECONDS_PER_HOUR // (price * request.gpu_count)
        run_seconds = min(run_seconds, affordable)
        if run_seconds < 1:
            return None
    amount = postings.usage_cost(
        price_per_gpu_hour_micros=price, gpu_count=request.gpu_count, seconds=run_seconds
    )
    return HoldPlan(amount=amount, run_seconds=run_seconds)


class Budget:
    """The credit and monthly-cap room of a pass's wallets, spent in queue order."""

    def __init__(self, available: dict[str, int], room: dict[str, int]) -> None:
        self._left = dict(available)
        self._room = dict(room)

    def copy(self) -> Budget:
        """The same budget, to spend on a trial match."""
        return Budget(self._left, self._room)

    def take(self, request: HoldRequest) -> HoldPlan | str:
        """The attempt's plan, its hold now spent from the wallet; or why it must wait."""
        hold = plan(request)
        if hold is None:
            return "Waiting: the job's cost cap buys no time on the cheapest free host."
        wallet = request.wallet
        left = self._left.get(wallet, 0)
        if hold.amount > left:
            return (
                f"Waiting for credit: this job needs a hold of {ledger.format_usd(hold.amount)}"
                f" and {ledger.format_usd(max(left, 0))} is available. Top up with"
                " `peergpu billing topup`."
            )
        room = self._room.get(wallet)
        if room is not None and hold.amount > room:
            return (
                f"Waiting: the monthly spending cap leaves {ledger.format_usd(room)}"
                f" and this job needs a hold of {ledger.format_usd(hold.amount)}."
            )
        self._left[wallet] = left - hold.amount
        if room is not None:
            self._room[wallet] = room - hold.amount
        return hold


async def open_budget(session: AsyncSession, wallets: Iterable[str]) -> Budget:
    """The wallets' credit and cap room, read without locking: settlement and top-ups only
    ever add to available credit, so the read can only be short by what another replica's
    pass (or a dispute) spent meanwhile — and then booking the holds overdraws, the ledger
    refuses it, and the whole pass rolls back and is tried again. Not locking keeps the
    wallets free for settlement while the pass matches and claims."""
    ordered = sorted(set(wallets))
    balance = await ledger.balances(session, [accounts.available(w) for w in ordered])
    available = {w: balance.get(accounts.available(w), 0) for w in ordered}
    return Budget(available, await cap_room(session, ordered, lock=True))


async def place(
    session: AsyncSession,
    placed: Sequence[tuple[HoldRequest, HoldPlan]],
    *,
    now: datetime | None = None,
) -> None:
    """Book the holds of the attempts that were assigned, and their ``job_charges`` rows."""
    if not placed:
        return
    now = now or utcnow()
    await ledger.post_many(
        session,
        [
            postings.hold(wallet=r.wallet, job_id=r.job_id, attempt=r.attempt, amount=hold.amount)
            for r, hold in placed
            if hold.amount
        ],
    )
    await insert_rows(
        session,
        JobChargeModel,
        [
            {
                "job_id": r.job_id,
                "attempt": r.attempt,
                "wallet": r.wallet,
                "host_id": r.host_id,
                "host_owner_id": r.host_owner_id,
                "price_per_gpu_hour_micros": r.price_per_gpu_hour_micros,
                "gpu_count": r.gpu_count,
                "hold_micros": hold.amount,
                "created_at": now,
            }
            for r, hold in placed
        ],
    )


async def note_waiting(session: AsyncSession, waiting: dict[uuid.UUID, str]) -> None:
    """Tell the renter why a job is still queued (written only when the reason changed)."""
    if not waiting:
        return
    connection = await session.connection()
    await connection.execute(
        update(JobModel)
        .where(
            JobModel.id == bindparam("w_id"),
            JobModel.state == "queued",
            JobModel.message != bindparam("w_message"),
        )
        .values(message=bindparam("w_message")),
        [{"w_id": job_id, "w_message": message} for job_id, message in waiting.items()],
    )


async def cap_room(
    session: AsyncSession, wallets: Sequence[str], *, lock: bool = False
) -> dict[str, int]:
    """For each wallet with a monthly cap: how much more it may spend this calendar month
    (the cap minus this month's charges minus its open holds). With ``lock`` (the scheduler),
    each capped wallet's advisory lock is taken first, in wallet order, until the transaction
    ends (PostgreSQL): the ledger guards the credit but not the cap, so two replicas' passes
    take turns with a capped wallet instead of both spending the same room."""
    rows = await core.execute(session, _caps_query(), {"wallets": list(wallets)})
    caps = {wallet: int(cap) for wallet, cap in rows if cap is not None}
    if not caps:
        return {}
    if lock and session.get_bind().dialect.name == "postgresql":
        for wallet in sorted(caps):  # only schedulers take these: one order, no cycle
            await session.execute(select(func.pg_advisory_xact_lock(func.hashtext(wallet))))
    used: dict[str, int] = defaultdict(int)
    open_or_charged = case(
        (JobChargeModel.settled_at.is_(None), JobChargeModel.hold_micros),
        else_=JobChargeModel.charged_micros,
    )
    for wallet, amount in await session.execute(
        select(JobChargeModel.wallet, func.sum(open_or_charged))
        .where(
            JobChargeModel.wallet.in_(list(caps)),
            or_(
                JobChargeModel.created_at >= month_start(utcnow()),
                JobChargeModel.settled_at.is_(None),
            ),
        )
        .group_by(JobChargeModel.wallet)
    ):
        used[wallet] = int(amount or 0)
    return {wallet: max(cap - used[wallet], 0) for wallet, cap in caps.items()}


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


@functools.lru_cache(maxsize=1)
def _caps_query() -> Any:
    """The monthly caps of some wallets (those that have one), built once: every scheduler
    pass reads it."""
    return select(BillingProfileModel.wallet, BillingProfileModel.monthly_cap_micros).where(
        BillingProfileModel.wallet.in_(bindparam("wallets", expanding=True)),
        BillingProfileModel.monthly_cap_micros.is_not(None),
    )
