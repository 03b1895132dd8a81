"""Billing for renters, hosts and admins: balances, transactions, receipts, estimates,
earnings, wallet settings, grants, refunds and the ledger check."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from peergpu.server.api.deps import Admin, ContextDep, Reader, SessionDep, Writer
from peergpu.server.api.jobs import IdempotencyKey
from peergpu.server.api.responses import AUTHENTICATED, errors
from peergpu.server.schemas.billing import (
    BalancePublic,
    BillingSettingsUpdate,
    ChargePublic,
    EarningDay,
    EarningsPublic,
    GrantCreate,
    JobEstimate,
    LedgerCheckPublic,
    PostedPublic,
    ReceiptPublic,
    RefundCreate,
    TransactionPublic,
    TransactionsPublic,
)
from peergpu.server.schemas.jobs import JobCreate
from peergpu.server.services import jobs
from peergpu.server.services.billing import admin, ledger, reports, wallets
from peergpu.server.services.billing.ledger import format_usd
from peergpu.server.services.jobs import JobSpec

router = APIRouter(tags=["billing"], responses=AUTHENTICATED)

OrgQuery = Annotated[
    uuid.UUID | None, Query(description="an organization's wallet instead of your own")
]


@router.get("/billing/balance", responses=errors(404))
async def get_balance(
    principal: Reader, session: SessionDep, org_id: OrgQuery = None
) -> BalancePublic:
    """Available and held credit, the monthly cap and automatic top-up settings."""
    wallet = await wallets.resolve(session=session, principal=principal, org_id=org_id)
    return _balance(await reports.balance(session=session, wallet=wallet))


@router.put("/billing/settings", responses=errors(403, 404, 422))
async def update_billing_settings(
    body: BillingSettingsUpdate, principal: Writer, session: SessionDep
) -> BalancePublic:
    """Set or clear (null) the monthly spending cap and the automatic top-up. Fields left
    out keep their value. An organization's settings need its admin role."""
    wallet = await wallets.resolve(
        session=session, principal=principal, org_id=body.org_id, manage=True
    )
    changes = body.model_dump(include=body.model_fields_set - {"org_id"})
    await admin.update_settings(session=session, wallet=wallet, changes=changes)
    return _balance(await reports.balance(session=session, wallet=wallet))


@router.get("/billing/transactions", responses=errors(404))
async def list_transactions(
    principal: Reader,
    session: SessionDep,
    org_id: OrgQuery = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    job_id: uuid.UUID | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> TransactionsPublic:
    """The wallet's transactions, newest first (top-ups, grants, holds, settlements,
    refunds), each with its effect on available and held credit."""
    wallet = await wallets.resolve(session=session, principal=principal, org_id=org_id)
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)  # a time without an offset is read as UTC
    lines, count = await reports.transactions(
        session=session,
        wallet=wallet,
        kind=kind,
        job_id=job_id,
        since=since,
        limit=limit,
        offset=offset,
    )
    return TransactionsPublic(
        data=[
            TransactionPublic(
                id=line.id,
                at=line.at,
                kind=line.kind,
                memo=line.memo,
                job_id=line.job_id,
                available_change_micros=line.available_change,
                held_change_micros=line.held_change,
                available_change_usd=format_usd(line.available_change),
            )
            for line in lines
        ],
        count=count,
    )


@router.get("/jobs/{job_id}/receipt", responses=errors(404))
async def job_receipt(job_id: uuid.UUID, principal: Reader, session: SessionDep) -> ReceiptPublic:
    """What the job cost: each attempt's hold, seconds billed and charge, and refunds."""
    job = await jobs.get_job(session=session, principal=principal, job_id=job_id)
    found = await reports.receipt(session=session, job=job)
    total = found.charged - found.refunded
    return ReceiptPublic(
        job_id=job.id,
        wallet=found.wallet,
        state=job.state,
        charges=[ChargePublic.model_validate(c) for c in found.charges],
        held_micros=found.held,
        charged_micros=found.charged,
        refunded_micros=found.refunded,
        total_micros=total,
        total_usd=format_usd(total),
        settled=all(c.settled_at is not None for c in found.charges),
    )


@router.post("/jobs/estimate", responses=errors(404, 413, 422))
async def estimate_job(
    body: JobCreate, principal: Reader, session: SessionDep, context: ContextDep
) -> JobEstimate:
    """What a job would cost if submitted now, and whether the credit covers its hold.
    Nothing is queued (``peergpu jobs submit --dry-run``)."""
    found = await jobs.estimate(
        context=context, session=session, principal=principal, spec=JobSpec(**body.model_dump())
    )
    return JobEstimate(
        wallet=found.wallet,
        eligible_hosts=found.eligible_hosts,
        free_hosts=found.free_hosts,
        price_per_gpu_hour_micros=found.price_per_gpu_hour_micros,
        cost_per_hour_micros=found.cost_per_hour_micros,
        run_seconds=found.run_seconds,
        hold_micros=found.hold_micros,
        hold_usd=format_usd(found.hold_micros) if found.hold_micros is not None else None,
        available_micros=found.available_micros,
        monthly_cap_left_micros=found.monthly_cap_left_micros,
        enough_credit=found.enough_credit,
        message=found.message,
    )


@router.get("/host/earnings")
async def host_earnings(
    principal: Reader,
    session: SessionDep,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> EarningsPublic:
    """Your hosts' earnings per day (after the platform fee), what is payable now and what
    was paid out."""
    found = await reports.earnings(session=session, user_id=principal.user_id, days=days)
    return EarningsPublic(
        payable_micros=found.payable,
        payable_usd=format_usd(found.payable),
        paid_out_micros=found.paid_out,
        days=[
            EarningDay(
                day=d.day,
                jobs=d.jobs,
                gpu_seconds=d.gpu_seconds,
                earned_micros=d.earned,
                earned_usd=format_usd(d.earned),
            )
            for d in found.days
        ],
    )


@router.post("/admin/billing/grants", status_code=201, responses=errors(403, 404, 422))
async def grant_credit(
    body: GrantCreate,
    principal: Admin,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> PostedPublic:
    """Promotional credit for a user or an organization (a ledger transaction)."""
    wallet = await admin.grant_wallet(
        session=session, email=body.email, user_id=body.user_id, org_id=body.org_id
    )
    tx = await admin.grant(
        session=session,
        wallet=wallet,
        amount=body.amount_micros,
        memo=body.memo,
        actor_id=principal.user_id,
        idempotency_key=idempotency_key,
    )
    return PostedPublic(
        transaction_ids=[tx] if tx else [],
        amount_micros=body.amount_micros,
        amount_usd=format_usd(body.amount_micros),
        wallet=wallet,
    )


@router.post("/admin/billing/refunds", status_code=201, responses=errors(403, 404, 409))
async def refund_job(body: RefundCreate, principal: Admin, session: SessionDep) -> PostedPublic:
    """Refund what a job was charged, as reversing transactions (the host's share and the
    fee come back)."""
    txs, amount, wallet = await admin.refund_job(
        session=session,
        job_id=body.job_id,
        memo=body.memo,
        actor_id=principal.user_id,
        platform_pays=body.platform_pays,
    )
    return PostedPublic(
        transaction_ids=txs, amount_micros=amount, amount_usd=format_usd(amount), wallet=wallet
    )


@router.get("/admin/billing/ledger-check", responses=errors(403))
async def ledger_check(_principal: Admin, session: SessionDep) -> LedgerCheckPublic:
    """Re-derive every balance from the entries and report any disagreement."""
    await session.rollback()  # end the transaction authentication began: one fresh snapshot
    report = await ledger.check(session)
    return LedgerCheckPublic(
        ok=report.ok,
        transactions=report.transactions,
        accounts=report.accounts,
        total_micros=report.total_micros,
        unbalanced_transactions=report.unbalanced_transactions,
        unknown_accounts=report.unknown_accounts,
        stale_balances=report.stale_balances,
        holds_mismatched=report.holds_mismatched,
        negative_accounts=report.negative_accounts,
    )


def _balance(found: reports.Balance) -> BalancePublic:
    profile = found.profile
    return BalancePublic(
        wallet=found.wallet,
        available_micros=found.available,
        held_micros=found.held,
        available_usd=format_usd(found.available),
        held_usd=format_usd(found.held),
        monthly_cap_micros=profile.monthly_cap_micros if profile else None,
        monthly_cap_left_micros=found.cap_left,
        auto_topup_below_micros=profile.auto_topup_below_micros if profile else None,
        auto_topup_amount_micros=profile.auto_topup_amount_micros if profile else None,
        card_saved=bool(profile and profile.payment_method_id),
    )
