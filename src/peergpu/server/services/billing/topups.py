"""Buying credit by card: Stripe Checkout top-ups and automatic top-ups of a saved card.

Neither function credits anything: the ledger is credited by the signed webhook
(:mod:`.webhooks`) once Stripe says the money arrived, exactly once per payment.

Network calls never run inside a database transaction: each function commits what it read or
wrote, calls Stripe, and records the answer in a new transaction.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.config import ServerSettings
from peergpu.errors import InvalidInput, PeerGPUError, PermissionDenied
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import BillingProfileModel, CheckoutSessionModel
from peergpu.server.db.models import OrgRole
from peergpu.server.security.principal import Principal
from peergpu.server.services.billing import accounts, ledger
from peergpu.server.services.billing.ledger import insert_ignoring_duplicates
from peergpu.server.services.billing.postings import MICROS_PER_CENT
from peergpu.server.services.billing.stripe_gateway import (
    PaymentIntentInfo,
    StripeGateway,
    StripeRefused,
    open_gateway,
    require_stripe,
)
from peergpu.server.services.memberships import require_org_role

logger = logging.getLogger(__name__)

#: Pending marks of automatic top-ups whose Stripe outcome is unknown start with this; the
#: mark *is* the PaymentIntent's idempotency key, so re-sending it cannot charge twice.
ATTEMPT_PREFIX = "autotopup:"
#: Marks a wallet whose card was declined: no new automatic top-up until a new card is saved
#: or ``GIVE_UP_AFTER`` has passed (a declined card is not charged after every settlement).
DECLINED_PREFIX = "declined:"
#: An unknown outcome is re-sent (same key) at most this often.
RESEND_AFTER = timedelta(minutes=1)
#: Stripe forgets idempotency keys after 24 hours; a mark older than this is dropped.
GIVE_UP_AFTER = timedelta(hours=23)
#: Stripe's smallest USD charge.
MIN_CHARGE_CENTS = 50


@dataclass(frozen=True)
class Checkout:
    id: str
    url: str
    wallet: str
    amount_micros: int


async def create_checkout(
    *,
    session: AsyncSession,
    settings: ServerSettings,
    principal: Principal,
    amount_micros: int,
    org_id: uuid.UUID | None = None,
    idempotency_key: str | None = None,
) -> Checkout:
    """Start a Stripe Checkout for ``amount_micros`` of credit in the caller's wallet, or in an
    organization's (``org_id``; admins and owners only).

    Idempotent by ``idempotency_key`` within Stripe's 24 hours: the same key and amount return
    the same session; the same key with another amount is a 409. Without a key each call is a
    new session (unpaid sessions expire by themselves). The wallet's Stripe Customer is created
    on first use and reused afterwards.
    """
    _check_amount(settings, amount_micros)
    require_stripe(settings)
    wallet = await _wallet_for(session, principal, org_id)
    profile = await session.get(BillingProfileModel, wallet)
    customer = profile.stripe_customer_id if profile is not None else None
    await session.commit()  # no transaction stays open across the calls to Stripe
    key = idempotency_key or uuid.uuid4().hex
    base = settings.effective_public_url
    async with open_gateway(settings) as gateway:
        if customer is None:
            customer = await _create_customer(session, gateway, wallet, principal)
        info = await gateway.create_checkout_session(
            customer=customer,
            wallet=wallet,
            user_id=str(principal.user_id),
            amount_cents=amount_micros // MICROS_PER_CENT,
            success_url=f"{base}/billing?checkout=success&session_id={{CHECKOUT_SESSION_ID}}",
            cancel_url=f"{base}/billing?checkout=cancelled",
            idempotency_key=f"checkout:{wallet}:{key}",
        )
    await session.execute(
        insert_ignoring_duplicates(session, CheckoutSessionModel, "id"),
        [
            {
                "id": info.id,
                "wallet": wallet,
                "user_id": principal.user_id,
                "amount_micros": amount_micros,
                "status": "open",
                "url": info.url,
                "created_at": utcnow(),
            }
        ],
    )
    await session.commit()
    return Checkout(id=info.id, url=info.url, wallet=wallet, amount_micros=amount_micros)


async def auto_topup_if_low(*, context: ServerContext, wallets: Iterable[str]) -> list[str]:
    """Charge the saved card of each wallet whose available credit fell under its auto top-up
    threshold; the PaymentIntent ids started (the webhook credits them).

    At most one automatic top-up per wallet is in flight: it is claimed by a conditional
    UPDATE of ``auto_topup_pending_id`` before Stripe is called, so concurrent callers (any
    number of replicas) start one. A refusal (declined card) clears the mark and is logged; an
    unknown outcome (Stripe unreachable) keeps it and a later call re-sends the same request
    with the same idempotency key. Never raises: a failure here must not break settlement.
    """
    if not context.settings.stripe_enabled:
        return []
    started: list[str] = []
    for wallet in sorted(set(wallets)):
        try:
            intent = await _auto_topup_one(context, wallet)
        except Exception:  # one wallet's trouble must not stop the others, nor the caller
            logger.exception("automatic top-up of %s failed", wallet)
            continue
        if intent is not None:
            started.append(intent)
    return started


async def ensure_profile(session: AsyncSession, wallet: str) -> None:
    """Create the wallet's billing profile if it has none (concurrent callers are fine)."""
    await session.execute(
        insert_ignoring_duplicates(session, BillingProfileModel, "wallet"),
        [{"wallet": wallet, "updated_at": utcnow()}],
    )


def _check_amount(settings: ServerSettings, amount_micros: int) -> None:
    details = {
        "amount_micros": amount_micros,
        "min_micros": settings.topup_min_micros,
        "max_micros": settings.topup_max_micros,
    }
    if amount_micros % MICROS_PER_CENT:
        raise InvalidInput(
            "A top-up is a whole number of cents (amount_micros a multiple of 10000).",
            code="invalid_amount",
            details=details,
        )
    if not settings.topup_min_micros <= amount_micros <= settings.topup_max_micros:
        raise InvalidInput(
            f"A top-up is between {ledger.format_usd(settings.topup_min_micros)} and "
            f"{ledger.format_usd(settings.topup_max_micros)}.",
            code="invalid_amount",
            details=details,
        )


async def _wallet_for(session: AsyncSession, principal: Principal, org_id: uuid.UUID | None) -> str:
    if org_id is not None:
        await require_org_role(
            session=session, principal=principal, organization_id=org_id, at_least=OrgRole.admin
        )
        return accounts.org_wallet(org_id)
    if principal.organization_id is not None:
        raise PermissionDenied(
            "This API key acts for an organization: pass its org_id to top it up.",
            code="organization_key",
            details={"org_id": str(principal.organization_id)},
        )
    return accounts.user_wallet(principal.user_id)


async def _create_customer(
    session: AsyncSession, gateway: StripeGateway, wallet: str, principal: Principal
) -> str:
    """Create the wallet's Customer and keep it; if a concurrent request kept another first,
    that one wins and is returned (the loser is an unused Customer, harmless)."""
    created = await gateway.create_customer(
        wallet=wallet,
        email=principal.user.email,
        idempotency_key=f"customer:{wallet}:{principal.user_id}",
    )
    await ensure_profile(session, wallet)
    await session.execute(
        update(BillingProfileModel)
        .where(
            BillingProfileModel.wallet == wallet, BillingProfileModel.stripe_customer_id.is_(None)
        )
        .values(stripe_customer_id=created, updated_at=utcnow())
    )
    kept = await session.scalar(
        select(BillingProfileModel.stripe_customer_id).where(BillingProfileModel.wallet == wallet)
    )
    await session.commit()
    return kept or created


@dataclass(frozen=True)
class _Attempt:
    key: str
    customer: str
    payment_method: str
    amount_cents: int


async def _auto_topup_one(context: ServerContext, wallet: str) -> str | None:
    async with context.sessionmaker() as session:
        attempt = await _claim_attempt(session, wallet)
    if attempt is None:
        return None
    intent: PaymentIntentInfo | None = None
    try:
        async with open_gateway(context.settings) as gateway:
            intent = await gateway.create_payment_intent(
                customer=attempt.customer,
                payment_method=attempt.payment_method,
                amount_cents=attempt.amount_cents,
                metadata={"purpose": "auto_topup", "wallet": wallet, "attempt": attempt.key},
                idempotency_key=attempt.key,
            )
    except StripeRefused as exc:
        logger.warning("automatic top-up of %s refused by Stripe: %s", wallet, exc.message)
    except PeerGPUError as exc:
        logger.warning("automatic top-up of %s: outcome unknown (%s); will re-send", wallet, exc)
        return None
    async with context.sessionmaker() as session:
        await _finish_attempt(session, wallet, attempt.key, intent)
    return intent.id if intent is not None and intent.status in _UNDER_WAY else None


#: PaymentIntent states in which the money is (or will be) on its way: the webhook credits it.
_UNDER_WAY = frozenset({"succeeded", "processing"})


async def _claim_attempt(session: AsyncSession, wallet: str) -> _Attempt | None:
    """Claim the wallet's next automatic top-up (committed), or None when none is due."""
    profile = await session.get(BillingProfileModel, wallet)
    if profile is None or not _configured(profile):
        return None
    assert profile.stripe_customer_id and profile.payment_method_id
    amount_cents = (profile.auto_topup_amount_micros or 0) // MICROS_PER_CENT
    if amount_cents < MIN_CHARGE_CENTS:
        return None
    now = utcnow()
    pending, since = profile.auto_topup_pending_id, profile.auto_topup_pending_at
    if pending is not None and not _abandoned(since, now):
        if not _resend_due(pending, since, now):
            return None  # one is under way (or was re-sent a moment ago)
        key = pending  # the outcome is unknown: ask again with the same idempotency key
    else:
        if pending is not None:
            logger.warning("dropping stale automatic top-up %s of %s", pending, wallet)
        code = accounts.available(wallet)
        available = (await ledger.balances(session, [code]))[code]
        if available >= (profile.auto_topup_below_micros or 0):
            return None
        key = f"{ATTEMPT_PREFIX}{wallet}:{uuid.uuid4().hex}"
    claimed = await session.execute(
        update(BillingProfileModel)
        .where(
            BillingProfileModel.wallet == wallet,
            _pending_is(pending),
        )
        .values(auto_topup_pending_id=key, auto_topup_pending_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    await session.commit()
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None  # another caller claimed it first
    return _Attempt(
        key=key,
        customer=profile.stripe_customer_id,
        payment_method=profile.payment_method_id,
        amount_cents=amount_cents,
    )


def _configured(profile: BillingProfileModel) -> bool:
    return bool(
        profile.auto_topup_below_micros
        and profile.auto_topup_amount_micros
        and profile.stripe_customer_id
        and profile.payment_method_id
    )


def _pending_is(pending: str | None) -> Any:
    column = BillingProfileModel.auto_topup_pending_id
    return column.is_(None) if pending is None else column == pending


def _resend_due(pending: str, since: datetime | None, now: datetime) -> bool:
    """An attempt whose outcome is unknown is re-sent with its own key, now and then; one
    that Stripe accepted (its PaymentIntent id) waits for the webhook."""
    return pending.startswith(ATTEMPT_PREFIX) and since is not None and now - since >= RESEND_AFTER


def _abandoned(since: datetime | None, now: datetime) -> bool:
    """A mark left this long (a lost webhook, a crash) no longer blocks new top-ups."""
    return since is None or now - since >= GIVE_UP_AFTER


async def _finish_attempt(
    session: AsyncSession, wallet: str, key: str, intent: PaymentIntentInfo | None
) -> None:
    """Record Stripe's answer: an intent under way waits for its webhook under its own id;
    anything else (a declined card) blocks new attempts until a new card is saved or a day has
    passed. A webhook that already cleared the mark wins (the conditional UPDATE then changes
    nothing)."""
    if intent is not None and intent.status in _UNDER_WAY:
        values: dict[str, Any] = {"auto_topup_pending_id": intent.id}
    else:
        if intent is not None:
            logger.warning(
                "automatic top-up %s of %s stopped in state %s", intent.id, wallet, intent.status
            )
        values = {
            "auto_topup_pending_id": f"{DECLINED_PREFIX}{key}"[:255],
            "auto_topup_pending_at": utcnow(),
        }
    await session.execute(
        update(BillingProfileModel)
        .where(
            BillingProfileModel.wallet == wallet,
            BillingProfileModel.auto_topup_pending_id == key,
        )
        .values(**values, updated_at=utcnow())
    )
    await session.commit()
