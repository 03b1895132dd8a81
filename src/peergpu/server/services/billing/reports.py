"""Read side of billing: balances, a wallet's transactions, job receipts, host earnings."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import (
    BillingProfileModel,
    JobChargeModel,
    LedgerEntryModel,
    LedgerTransactionModel,
    PayoutModel,
)
from peergpu.server.db.job_models import JobModel
from peergpu.server.services.billing import accounts, holds, ledger, usage_reports


@dataclass(frozen=True)
class Balance:
    wallet: str
    available: int
    held: int
    profile: BillingProfileModel | None
    cap_left: int | None


@dataclass(frozen=True)
class TransactionLine:
    id: uuid.UUID
    at: datetime
    kind: str
    memo: str
    job_id: uuid.UUID | None
    available_change: int
    held_change: int


@dataclass(frozen=True)
class Receipt:
    job: JobModel
    wallet: str
    charges: list[JobChargeModel]
    refunded: int

    @property
    def held(self) -> int:
        return sum(c.hold_micros for c in self.charges if c.settled_at is None)

    @property
    def charged(self) -> int:
        return sum(c.charged_micros for c in self.charges)


@dataclass
class EarningDay:
    day: date
    jobs: int = 0
    gpu_seconds: int = 0
    earned: int = 0


@dataclass
class Earnings:
    payable: int
    paid_out: int
    days: list[EarningDay] = field(default_factory=list)


async def balance(*, session: AsyncSession, wallet: str) -> Balance:
    codes = [accounts.available(wallet), accounts.held(wallet)]
    found = await ledger.balances(session, codes)
    profile = await session.get(BillingProfileModel, wallet)
    room = await holds.cap_room(session, [wallet])
    return Balance(
        wallet=wallet,
        available=found[codes[0]],
        held=found[codes[1]],
        profile=profile,
        cap_left=room.get(wallet),
    )


async def transactions(
    *,
    session: AsyncSession,
    wallet: str,
    kind: str | None = None,
    job_id: uuid.UUID | None = None,
    since: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[TransactionLine], int]:
    """The wallet's transactions, newest first, each with its effect on available and held
    credit; filtered by kind, job or start time."""
    available, held = accounts.available(wallet), accounts.held(wallet)
    conditions: list[ColumnElement[bool]] = [LedgerEntryModel.account_code.in_([available, held])]
    if kind is not None:
        conditions.append(LedgerTransactionModel.kind == kind)
    if job_id is not None:
        conditions.append(LedgerTransactionModel.job_id == job_id)
    if since is not None:
        conditions.append(LedgerTransactionModel.created_at >= since)
    base = (
        select(
            LedgerTransactionModel.id,
            LedgerTransactionModel.created_at,
            LedgerTransactionModel.kind,
            LedgerTransactionModel.memo,
            LedgerTransactionModel.job_id,
            func.sum(
                case(
                    (LedgerEntryModel.account_code == available, LedgerEntryModel.amount_micros),
                    else_=0,
                )
            ).label("available_change"),
            func.sum(
                case(
                    (LedgerEntryModel.account_code == held, LedgerEntryModel.amount_micros), else_=0
                )
            ).label("held_change"),
        )
        .join(LedgerEntryModel, LedgerEntryModel.transaction_id == LedgerTransactionModel.id)
        .where(*conditions)
        .group_by(
            LedgerTransactionModel.id,
            LedgerTransactionModel.created_at,
            LedgerTransactionModel.kind,
            LedgerTransactionModel.memo,
            LedgerTransactionModel.job_id,
        )
    )
    total = await session.scalar(select(func.count()).select_from(base.subquery()))
    rows = await session.execute(
        base.order_by(LedgerTransactionModel.created_at.desc(), LedgerTransactionModel.id.desc())
        .limit(limit)
        .offset(offset)
    )
    lines = [
        TransactionLine(
            id=row.id,
            at=row.created_at,
            kind=row.kind,
            memo=row.memo,
            job_id=row.job_id,
            available_change=int(row.available_change or 0),
            held_change=int(row.held_change or 0),
        )
        for row in rows
    ]
    return lines, int(total or 0)


async def receipt(*, session: AsyncSession, job: JobModel) -> Receipt:
    charges = list(
        await session.scalars(
            select(JobChargeModel)
            .where(JobChargeModel.job_id == job.id)
            .order_by(JobChargeModel.attempt)
        )
    )
    wallet = accounts.wallet_of(owner_id=job.owner_id, org_id=job.org_id)
    refunded = await session.scalar(
        select(func.coalesce(func.sum(LedgerEntryModel.amount_micros), 0))
        .join(LedgerTransactionModel, LedgerTransactionModel.id == LedgerEntryModel.transaction_id)
        .where(
            LedgerTransactionModel.job_id == job.id,
            LedgerTransactionModel.kind == "refund",
            LedgerEntryModel.account_code == accounts.available(wallet),
        )
    )
    return Receipt(job=job, wallet=wallet, charges=charges, refunded=int(refunded or 0))


async def earnings(*, session: AsyncSession, user_id: uuid.UUID, days: int) -> Earnings:
    """A host owner's earnings per day (UTC) over the last ``days`` days, by settlement
    time, net of the platform fee: jobs, and inference requests (in ``earned`` only: they add
    no jobs or GPU-seconds); refunds show in ``payable``, not in past days."""
    since = utcnow() - timedelta(days=days)
    by_day: dict[date, EarningDay] = {}
    counted: dict[date, set[uuid.UUID]] = defaultdict(set)
    rows = await session.execute(
        select(
            JobChargeModel.job_id,
            JobChargeModel.settled_at,
            JobChargeModel.charged_micros,
            JobChargeModel.fee_micros,
            JobChargeModel.billed_seconds,
            JobChargeModel.gpu_count,
        ).where(
            JobChargeModel.host_owner_id == user_id,
            JobChargeModel.settled_at >= since,
            JobChargeModel.charged_micros > 0,
        )
    )
    for job_id, settled_at, charged, fee, seconds, gpus in rows:
        if settled_at is None:  # excluded by the query; keeps the type checker honest
            continue
        day = settled_at.date()
        entry = by_day.setdefault(day, EarningDay(day=day))
        if job_id not in counted[day]:
            counted[day].add(job_id)
            entry.jobs += 1
        entry.gpu_seconds += int(seconds) * int(gpus)
        entry.earned += int(charged) - int(fee)
    served = await usage_reports.inference_earnings(session=session, user_id=user_id, since=since)
    for day, earned in served.items():
        by_day.setdefault(day, EarningDay(day=day)).earned += earned
    payable_code = accounts.host_payable(user_id)
    payable = (await ledger.balances(session, [payable_code]))[payable_code]
    paid = await session.scalar(
        select(
            func.coalesce(func.sum(PayoutModel.amount_micros - PayoutModel.reversed_micros), 0)
        ).where(PayoutModel.user_id == user_id, PayoutModel.state.in_(["paid", "reversed"]))
    )
    return Earnings(
        payable=payable,
        paid_out=int(paid or 0),
        days=[by_day[d] for d in sorted(by_day, reverse=True)],
    )
