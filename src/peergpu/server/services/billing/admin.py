"""Admin money actions: promotional grants, refunds of settled job charges, wallet settings."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import Conflict, NotFound
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import BillingProfileModel, JobChargeModel
from peergpu.server.db.job_models import JobModel
from peergpu.server.db.models import OrganizationModel, UserModel
from peergpu.server.services.accounts import normalize_email
from peergpu.server.services.billing import accounts, ledger, postings


async def grant_wallet(
    *,
    session: AsyncSession,
    email: str | None = None,
    user_id: uuid.UUID | None = None,
    org_id: uuid.UUID | None = None,
) -> str:
    """The wallet an admin names by a user's e-mail or id, or an organization's id."""
    if org_id is not None:
        if await session.get(OrganizationModel, org_id) is None:
            raise NotFound("No such organization.", details={"id": str(org_id)})
        return accounts.org_wallet(org_id)
    user = (
        await session.get(UserModel, user_id)
        if user_id is not None
        else await session.scalar(
            select(UserModel).where(UserModel.email == normalize_email(email or ""))
        )
    )
    if user is None:
        raise NotFound("No such user.", details={"email": email, "user_id": str(user_id)})
    return accounts.user_wallet(user.id)


async def grant(
    *,
    session: AsyncSession,
    wallet: str,
    amount: int,
    memo: str,
    actor_id: uuid.UUID | None,
    idempotency_key: str | None = None,
) -> uuid.UUID | None:
    """Promotional credit; with an idempotency key a retried grant is booked once. Commits."""
    if idempotency_key:  # hashed: any client key fits the column, and a key is per admin
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]
        key = f"grant:{actor_id}:{digest}"
    else:
        key = f"grant:{uuid.uuid4()}"
    tx = await ledger.post(
        session,
        postings.grant(
            wallet=wallet,
            amount=amount,
            key=key,
            memo=memo or "Credit from an admin.",
            actor_id=actor_id,
        ),
    )
    await session.commit()
    return tx


async def refund_job(
    *,
    session: AsyncSession,
    job_id: uuid.UUID,
    memo: str,
    actor_id: uuid.UUID | None,
    platform_pays: bool = False,
) -> tuple[list[uuid.UUID], int, str]:
    """Refund every charged attempt of a job: by reversing its charge (the host's share comes
    back out of host payable, the fee out of the platform's), or, with ``platform_pays``, out
    of ``platform:refunds`` with the host keeping its earnings. A refunded attempt is not
    refunded twice (either way: both postings share the key). Returns the new transactions,
    the amount and the wallet. Commits."""
    job = await session.get(JobModel, job_id)
    charges = list(
        await session.scalars(
            select(JobChargeModel).where(JobChargeModel.job_id == job_id).with_for_update()
        )
    )
    if job is None and not charges:
        raise NotFound("No such job.", details={"id": str(job_id)})
    due = [c for c in charges if c.outcome == "charged" and c.settle_transaction_id]
    if not due:
        raise Conflict(
            "Nothing to refund: the job has no settled charge (not yet settled, nothing "
            "charged, or refunded already).",
            code="nothing_to_refund",
            details={"job_id": str(job_id)},
        )
    wallet = due[0].wallet
    posted = await ledger.post_many(
        session,
        [
            postings.refund_job_by_platform(
                wallet=c.wallet,
                job_id=job_id,
                settle_transaction_id=c.settle_transaction_id,  # type: ignore[arg-type]
                charged_micros=c.charged_micros,
                actor_id=actor_id,
                memo=memo or f"Refund of job {job_id} (attempt {c.attempt}), paid by the platform.",
            )
            if platform_pays
            else postings.refund_job(
                wallet=c.wallet,
                job_id=job_id,
                settle_transaction_id=c.settle_transaction_id,  # type: ignore[arg-type]
                charged_micros=c.charged_micros,
                fee_micros=c.fee_micros,
                host_owner_id=c.host_owner_id,
                actor_id=actor_id,
                memo=memo or f"Refund of job {job_id} (attempt {c.attempt}).",
            )
            for c in due
        ],
    )
    await session.execute(
        update(JobChargeModel)
        .where(
            JobChargeModel.job_id == job_id,
            JobChargeModel.attempt.in_([c.attempt for c in due]),
        )
        .values(outcome="refunded")
    )
    await session.commit()
    return [tx for tx in posted if tx is not None], sum(c.charged_micros for c in due), wallet


async def update_settings(
    *, session: AsyncSession, wallet: str, changes: dict[str, Any]
) -> BillingProfileModel:
    """Set (or clear, with None) a wallet's spending cap and automatic top-up. Commits."""
    profile = await session.get(BillingProfileModel, wallet, with_for_update=True)
    if profile is None:
        profile = BillingProfileModel(wallet=wallet)
        session.add(profile)
    for name, value in changes.items():
        setattr(profile, name, value)
    profile.updated_at = utcnow()
    await session.commit()
    return profile
