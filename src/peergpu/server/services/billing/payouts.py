"""Host payouts: Stripe Connect Express onboarding, and Transfers of host payable.

A payout is booked before it is sent: host payable -> Stripe clearing and a ``pending``
:class:`PayoutModel` are committed together, then the Transfer is created with the payout's id as
its idempotency key. Then:

- Stripe accepts -> ``paid`` with the transfer id;
- Stripe refuses (no balance, account restricted) -> ``failed``, and the amount is payable
  again (``postings.payout_failed``), applied once by a conditional state change;
- no answer (network, Stripe down) -> stays ``pending``; :func:`retry_pending_payouts` re-sends
  it with the same idempotency key, so however often it is re-sent, at most one transfer exists.

Reversals arrive later as ``transfer.reversed`` webhooks (:mod:`.webhooks`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.config import ServerSettings
from peergpu.errors import Conflict, InvalidInput, PaymentRequired, PeerGPUError, PermissionDenied
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import LedgerAccountModel, PayoutAccountModel, PayoutModel
from peergpu.server.security.principal import Principal
from peergpu.server.services.billing import accounts, ledger, postings
from peergpu.server.services.billing.accounts import AccountKind
from peergpu.server.services.billing.ledger import insert_ignoring_duplicates
from peergpu.server.services.billing.postings import MICROS_PER_CENT
from peergpu.server.services.billing.stripe_gateway import (
    AccountInfo,
    StripeRefused,
    open_gateway,
    require_stripe,
)

logger = logging.getLogger(__name__)

#: A pending payout younger than this is probably still being sent by its own request.
RETRY_MIN_AGE = timedelta(seconds=60)
_PENDING_MESSAGE = "Stripe did not confirm the transfer yet; it is retried automatically."


@dataclass(frozen=True)
class PayoutAccountStatus:
    onboarded: bool
    stripe_account_id: str | None
    details_submitted: bool
    payouts_enabled: bool
    payable_micros: int
    payout_min_micros: int


@dataclass(frozen=True)
class OnboardingLink:
    url: str
    stripe_account_id: str
    expires_at: datetime | None


async def start_onboarding(
    *, session: AsyncSession, settings: ServerSettings, principal: Principal
) -> OnboardingLink:
    """A Stripe onboarding link for the caller's Express account, created on first use.

    The account is created once per user (an idempotency key per user covers concurrent first
    calls); every call returns a fresh link, since links are single-use and short-lived.
    """
    require_host(principal)
    require_stripe(settings)
    existing = await session.get(PayoutAccountModel, principal.user_id)
    account_id = existing.stripe_account_id if existing is not None else None
    await session.commit()  # no transaction stays open across the calls to Stripe
    base = settings.effective_public_url
    async with open_gateway(settings) as gateway:
        if account_id is None:
            created = await gateway.create_express_account(
                email=principal.user.email,
                user_id=str(principal.user_id),
                idempotency_key=f"connect-account:{principal.user_id}",
            )
            account_id = await _remember_account(session, principal.user_id, created)
        link = await gateway.create_account_link(
            account_id=account_id,
            refresh_url=f"{base}/host/payouts?onboarding=refresh",
            return_url=f"{base}/host/payouts?onboarding=done",
        )
    return OnboardingLink(url=link.url, stripe_account_id=account_id, expires_at=link.expires_at)


async def payout_account_status(
    *, session: AsyncSession, settings: ServerSettings, principal: Principal
) -> PayoutAccountStatus:
    """The caller's payout account, refreshed from Stripe when it can be reached (the stored
    flags otherwise), with what is payable now."""
    require_host(principal)
    account = await session.get(PayoutAccountModel, principal.user_id)
    if account is not None and settings.stripe_enabled:
        account_id = account.stripe_account_id
        await session.commit()
        try:
            async with open_gateway(settings) as gateway:
                fresh = await gateway.retrieve_account(account_id)
        except PeerGPUError as exc:
            logger.warning("could not refresh payout account %s: %s", account_id, exc.message)
        else:
            account.details_submitted = fresh.details_submitted
            account.payouts_enabled = fresh.payouts_enabled
            account.updated_at = utcnow()
            await session.commit()
    payable = await _payable(session, principal.user_id)
    return PayoutAccountStatus(
        onboarded=account is not None and account.details_submitted,
        stripe_account_id=account.stripe_account_id if account is not None else None,
        details_submitted=account is not None and account.details_submitted,
        payouts_enabled=account is not None and account.payouts_enabled,
        payable_micros=payable,
        payout_min_micros=settings.payout_min_micros,
    )


async def request_payout(
    *,
    session: AsyncSession,
    settings: ServerSettings,
    principal: Principal,
    amount_micros: int | None = None,
) -> PayoutModel:
    """Pay ``amount_micros`` (default: all of it, in whole cents) of the caller's host payable
    to their connected account.

    Returns the payout, ``paid`` or ``pending`` (Stripe did not answer; it is retried). A
    refusal by Stripe restores the amount to host payable and raises :class:`Conflict` with
    Stripe's message. Two concurrent requests cannot both spend the same balance: the payable
    account is locked while the payout is booked, and the ledger refuses an overdraft.
    """
    require_host(principal)
    require_stripe(settings)
    account = await session.get(PayoutAccountModel, principal.user_id)
    if account is None or not account.payouts_enabled:
        raise Conflict(
            "Payouts are not enabled for you yet: finish Stripe onboarding first "
            "(POST /api/v1/host/payout-account).",
            code="payouts_not_enabled",
        )
    payout = await _book_and_send(session, settings, account=account, amount_micros=amount_micros)
    if payout.state == "failed":
        raise Conflict(
            payout.message,
            code="payout_failed",
            details={"payout_id": str(payout.id), "amount_micros": payout.amount_micros},
        )
    return payout


async def pay_out_above_threshold(*, context: ServerContext, limit: int = 100) -> int:
    """Automatic payouts: every onboarded host owner whose payable balance reached
    ``payout_auto_threshold_micros`` is paid all of it (whole cents). Returns how many payouts
    were started. Off when the threshold is 0. Safe on every replica at once: the payable
    account is locked while a payout is booked, and the ledger refuses an overdraft."""
    settings = context.settings
    threshold = settings.payout_auto_threshold_micros
    if not threshold or not settings.stripe_enabled:
        return 0
    started = 0
    async with context.sessionmaker() as session:
        owners = list(
            await session.scalars(
                select(LedgerAccountModel.owner)
                .where(
                    LedgerAccountModel.kind == AccountKind.host_payable.value,
                    LedgerAccountModel.balance_micros >= max(threshold, settings.payout_min_micros),
                )
                .limit(limit)
            )
        )
        user_ids = [uuid.UUID(owner.removeprefix("user:")) for owner in owners]
        refused_lately = select(PayoutModel.user_id).where(
            PayoutModel.state == "failed", PayoutModel.updated_at > utcnow() - REFUSED_PAUSE
        )
        ready = list(
            await session.scalars(
                select(PayoutAccountModel).where(
                    PayoutAccountModel.user_id.in_(user_ids),
                    PayoutAccountModel.payouts_enabled.is_(True),
                    # Stripe refused this host's last transfer: an operator or the host must
                    # act; asking again every few seconds would only pile up failures.
                    PayoutAccountModel.user_id.not_in(refused_lately),
                )
            )
        )
        await session.commit()
        for account in ready:
            try:
                await _book_and_send(session, settings, account=account, amount_micros=None)
                started += 1
            except PeerGPUError as exc:  # below the minimum after a race; try again later
                await session.rollback()
                logger.info("automatic payout to %s skipped: %s", account.user_id, exc.message)
    return started


async def _book_and_send(
    session: AsyncSession,
    settings: ServerSettings,
    *,
    account: PayoutAccountModel,
    amount_micros: int | None,
) -> PayoutModel:
    """Book ``host payable -> clearing`` with the payout row, commit, then send the Transfer."""
    user_id = account.user_id
    payable_code = accounts.host_payable(user_id)
    # Lock every account the payout posting touches, in order (see ledger.lock_accounts).
    locked = await ledger.lock_accounts(session, [payable_code, accounts.STRIPE_CLEARING])
    payable = locked[payable_code]
    amount = _check_amount(settings, amount_micros, payable)
    payout = PayoutModel(
        id=uuid.uuid4(),
        user_id=user_id,
        stripe_account_id=account.stripe_account_id,
        amount_micros=amount,
        state="pending",
    )
    session.add(payout)
    await ledger.post(session, postings.payout(user_id=user_id, amount=amount, payout_id=payout.id))
    await session.commit()
    return await _send(session, settings, payout)


#: After Stripe refuses a host's transfer, automatic payouts leave that host alone this long.
REFUSED_PAUSE = timedelta(hours=24)
#: How long after booking a pending payout may be re-sent (inside Stripe's idempotency window).
RESEND_WINDOW = timedelta(hours=23)


async def retry_pending_payouts(
    *, context: ServerContext, min_age: timedelta = RETRY_MIN_AGE, limit: int = 100
) -> int:
    """Re-send pending payouts (same idempotency key, so never a second transfer); returns how
    many got a definitive answer. Safe to run on every replica at once."""
    now = utcnow()
    cutoff = now - min_age
    async with context.sessionmaker() as session:
        pending = list(
            await session.scalars(
                select(PayoutModel)
                .where(
                    PayoutModel.state == "pending",
                    PayoutModel.created_at <= cutoff,
                    # Stripe keeps idempotency keys for 24 hours: an older payout re-sent
                    # could make a second transfer, so it is left for an operator.
                    PayoutModel.created_at > now - RESEND_WINDOW,
                )
                .order_by(PayoutModel.created_at)
                .limit(limit)
            )
        )
        await session.commit()
        settled = 0
        for payout in pending:
            result = await _send(session, context.settings, payout)
            settled += result.state != "pending"
    return settled


async def list_payouts(
    *, session: AsyncSession, principal: Principal, limit: int, offset: int
) -> tuple[list[PayoutModel], int]:
    """The caller's payouts, newest first, and how many there are in all."""
    require_host(principal)
    mine = PayoutModel.user_id == principal.user_id
    total = await session.scalar(select(func.count()).select_from(PayoutModel).where(mine))
    rows = await session.scalars(
        select(PayoutModel)
        .where(mine)
        .order_by(PayoutModel.created_at.desc(), PayoutModel.id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows), int(total or 0)


def require_host(principal: Principal) -> None:
    if not principal.user.is_host:
        raise PermissionDenied(
            "Payouts are for users with the host role; add it with PATCH /api/v1/users/me.",
            code="host_role_required",
        )


def _check_amount(settings: ServerSettings, amount_micros: int | None, payable: int) -> int:
    whole_cents = max(0, payable - payable % MICROS_PER_CENT)
    amount = whole_cents if amount_micros is None else amount_micros
    details = {
        "amount_micros": amount,
        "payable_micros": payable,
        "min_micros": settings.payout_min_micros,
    }
    if amount % MICROS_PER_CENT:
        raise InvalidInput(
            "A payout is a whole number of cents (amount_micros a multiple of 10000).",
            code="invalid_amount",
            details=details,
        )
    if amount > payable:
        raise PaymentRequired(
            f"You can pay out at most {ledger.format_usd(payable)}; "
            f"{ledger.format_usd(amount)} was asked.",
            code="insufficient_payable",
            details=details,
        )
    if amount < settings.payout_min_micros:
        raise Conflict(
            f"The smallest payout is {ledger.format_usd(settings.payout_min_micros)}; "
            f"{ledger.format_usd(amount)} was asked ({ledger.format_usd(payable)} payable).",
            code="payout_below_minimum",
            details=details,
        )
    return amount


async def _payable(session: AsyncSession, user_id: uuid.UUID) -> int:
    code = accounts.host_payable(user_id)
    return (await ledger.balances(session, [code]))[code]


async def _remember_account(session: AsyncSession, user_id: uuid.UUID, info: AccountInfo) -> str:
    """Keep the new account; a concurrent first call that kept one already wins."""
    now = utcnow()
    await session.execute(
        insert_ignoring_duplicates(session, PayoutAccountModel, "user_id"),
        [
            {
                "user_id": user_id,
                "stripe_account_id": info.id,
                "details_submitted": info.details_submitted,
                "payouts_enabled": info.payouts_enabled,
                "created_at": now,
                "updated_at": now,
            }
        ],
    )
    kept = await session.scalar(
        select(PayoutAccountModel.stripe_account_id).where(PayoutAccountModel.user_id == user_id)
    )
    await session.commit()
    return kept or info.id


async def _send(
    session: AsyncSession, settings: ServerSettings, payout: PayoutModel
) -> PayoutModel:
    """Create the payout's Transfer (its id is the idempotency key) and record the answer.
    Called with no transaction open; returns the payout as stored afterwards."""
    try:
        async with open_gateway(settings) as gateway:
            transfer = await gateway.create_transfer(
                amount_cents=payout.amount_micros // MICROS_PER_CENT,
                destination=payout.stripe_account_id,
                metadata={"payout_id": str(payout.id), "user_id": str(payout.user_id)},
                idempotency_key=f"payout:{payout.id}",
            )
    except StripeRefused as exc:
        await _mark_failed(session, payout, exc.message)
    except PeerGPUError as exc:
        logger.warning("payout %s: transfer outcome unknown (%s)", payout.id, exc.message)
        await _update_pending(session, payout, message=_PENDING_MESSAGE)
    else:
        await _update_pending(
            session, payout, state="paid", stripe_transfer_id=transfer, message=""
        )
    stored = await session.get(PayoutModel, payout.id, populate_existing=True)
    await session.commit()
    return stored or payout


async def _mark_failed(session: AsyncSession, payout: PayoutModel, message: str) -> None:
    """Refused: the amount is payable again. The state change is conditional, so a payout
    that two callers saw refused is restored once."""
    if await _update_pending(session, payout, state="failed", message=message, commit=False):
        await ledger.post(
            session,
            postings.payout_failed(
                user_id=payout.user_id, amount=payout.amount_micros, payout_id=payout.id
            ),
        )
    await session.commit()
    logger.warning("payout %s refused by Stripe: %s", payout.id, message)


async def _update_pending(
    session: AsyncSession, payout: PayoutModel, *, commit: bool = True, **values: object
) -> bool:
    """Change a payout that is still pending; False when it no longer is."""
    changed = await session.execute(
        update(PayoutModel)
        .where(PayoutModel.id == payout.id, PayoutModel.state == "pending")
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if commit:
        await session.commit()
    return bool(changed.rowcount)  # type: ignore[attr-defined]
