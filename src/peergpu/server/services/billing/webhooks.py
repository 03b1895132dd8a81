"""Stripe webhooks: verified, then applied to the ledger exactly once per event.

Contract of :func:`handle`:

- the body must carry a valid ``Stripe-Signature`` (HMAC-SHA256 with the endpoint's secret,
  checked by the Stripe SDK) no older than ``stripe_webhook_tolerance_seconds``; otherwise
  :class:`InvalidSignature` (the router answers 400, so Stripe shows the delivery as failed).
  ``stripe_webhook_secret`` may list several secrets separated by commas: the platform
  endpoint's and the Connect endpoint's (``account.updated`` comes from the latter);
- the event's id is inserted into ``stripe_events`` in the same transaction as its effects, so
  a replay (Stripe retries, or the same delivery twice at once) changes nothing and reports
  ``duplicate``; the ledger's idempotency keys, named after the Stripe object, also make a
  second event about the same object harmless;
- an event that names something we do not know (another integration's checkout, an amount that
  does not match) is recorded with its outcome and acknowledged with 200, so Stripe stops
  retrying; an error of ours (the database is down) is not recorded and Stripe retries it.

Amounts in events are cents; the ledger counts micro-dollars.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import stripe
from sqlalchemy import case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.config import ServerSettings
from peergpu.errors import InvalidInput
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import (
    BillingProfileModel,
    CheckoutSessionModel,
    LedgerEntryModel,
    LedgerTransactionModel,
    PayoutAccountModel,
    PayoutModel,
    StripeEventModel,
)
from peergpu.server.services.billing import accounts, ledger, postings
from peergpu.server.services.billing.ledger import insert_ignoring_duplicates
from peergpu.server.services.billing.postings import MICROS_PER_CENT
from peergpu.server.services.billing.topups import DECLINED_PREFIX

logger = logging.getLogger(__name__)

Event = dict[str, Any]
StripeObject = dict[str, Any]


class WebhookRejected(InvalidInput):
    """The delivery is refused as a whole (the router answers 400)."""

    code = "invalid_webhook"


class InvalidSignature(WebhookRejected):
    code = "invalid_signature"


@dataclass(frozen=True)
class WebhookResult:
    event_id: str
    type: str
    duplicate: bool
    outcome: str


async def handle(*, context: ServerContext, payload: bytes, signature: str | None) -> WebhookResult:
    """Verify one delivery and apply it once (see the module docstring)."""
    event = verify(context.settings, payload, signature)
    async with context.sessionmaker() as session:
        return await apply_event(session, event)


def verify(settings: ServerSettings, payload: bytes, signature: str | None) -> Event:
    """The event in a correctly signed, recent body; :class:`WebhookRejected` otherwise."""
    secrets = [
        s.strip() for s in settings.stripe_webhook_secret.get_secret_value().split(",") if s.strip()
    ]
    if not secrets:
        raise InvalidSignature("Stripe webhooks are not configured on this server.")
    reason = "No Stripe-Signature header."
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(
                payload, signature, secret, settings.stripe_webhook_tolerance_seconds
            )
            break
        except stripe.SignatureVerificationError as exc:
            reason = str(exc.user_message or "The signature does not match.")
        except UnicodeDecodeError:
            reason = "The body is not UTF-8."
    else:
        raise InvalidSignature(f"The Stripe-Signature does not verify: {reason}")
    try:
        event = json.loads(payload)
    except ValueError as exc:
        raise WebhookRejected("The body is not JSON.", code="invalid_event") from exc
    if not (
        isinstance(event, dict)
        and isinstance(event.get("id"), str)
        and isinstance(event.get("type"), str)
        and isinstance(event.get("data"), dict)
        and isinstance(event["data"].get("object"), dict)
    ):
        raise WebhookRejected("The body is not a Stripe event.", code="invalid_event")
    return event


async def apply_event(session: AsyncSession, event: Event) -> WebhookResult:
    """Apply a verified event once, committing its record and effects together."""
    event_id, event_type = str(event["id"])[:255], str(event["type"])[:64]
    inserted = await session.execute(
        insert_ignoring_duplicates(session, StripeEventModel, "id").returning(StripeEventModel.id),
        [{"id": event_id, "type": event_type, "received_at": utcnow(), "outcome": ""}],
    )
    if inserted.scalar() is None:
        await session.rollback()
        outcome = await session.scalar(
            select(StripeEventModel.outcome).where(StripeEventModel.id == event_id)
        )
        return WebhookResult(event_id, event_type, duplicate=True, outcome=outcome or "")
    handler = _HANDLERS.get(event_type)
    if event.get("account") and event_type not in _CONNECT_EVENTS:
        # Events from connected accounts (hosts' Express accounts) never move renters' money.
        outcome = "ignored: a connected account's event"
    else:
        outcome = await handler(session, event["data"]["object"]) if handler else "ignored"
    await session.execute(
        update(StripeEventModel)
        .where(StripeEventModel.id == event_id)
        .values(outcome=outcome[:200])
    )
    await session.commit()
    logger.info("stripe event %s (%s): %s", event_id, event_type, outcome)
    return WebhookResult(event_id, event_type, duplicate=False, outcome=outcome)


#: Event types we accept from connected accounts (the Connect endpoint).
_CONNECT_EVENTS = frozenset({"account.updated"})


# --- checkout -------------------------------------------------------------------------------


async def _checkout_paid(session: AsyncSession, obj: StripeObject) -> str:
    """``checkout.session.completed`` / ``async_payment_succeeded``: credit what we recorded,
    if Stripe says it was paid in full, in USD."""
    record = await session.get(CheckoutSessionModel, _str(obj, "id"), with_for_update=True)
    if record is None:
        return "unknown checkout session"
    payment_intent = _ref(obj, "payment_intent")
    if payment_intent and not record.payment_intent_id:
        record.payment_intent_id = payment_intent
    if obj.get("payment_status") != "paid":
        return f"awaiting payment ({obj.get('payment_status')})"
    if record.status == "completed":
        return "already credited"
    paid = _int(obj, "amount_total") * MICROS_PER_CENT
    currency = _str(obj, "currency")
    if paid != record.amount_micros or currency != "usd":
        record.status = "mismatch"
        logger.error(
            "checkout %s paid %s %s but %s was expected; not credited",
            record.id,
            paid,
            currency,
            record.amount_micros,
        )
        return f"amount mismatch: paid {paid} {currency}, expected {record.amount_micros} usd"
    await ledger.post(
        session,
        postings.topup(
            wallet=record.wallet,
            amount=paid,
            key=f"stripe:{record.id}:topup",
            details={
                "wallet": record.wallet,
                "checkout_session": record.id,
                "payment_intent": payment_intent,
            },
        ),
    )
    record.status, record.completed_at = "completed", utcnow()
    return f"credited {ledger.format_usd(paid)} to {record.wallet}"


def _checkout_closed(status: str) -> Callable[[AsyncSession, StripeObject], Awaitable[str]]:
    """``checkout.session.expired`` / ``async_payment_failed``: an open session ends unpaid."""

    async def close(session: AsyncSession, obj: StripeObject) -> str:
        closed = await session.execute(
            update(CheckoutSessionModel)
            .where(CheckoutSessionModel.id == _str(obj, "id"))
            .where(CheckoutSessionModel.status == "open")
            .values(status=status)
        )
        return status if closed.rowcount else "not open"  # type: ignore[attr-defined]

    return close


# --- payment intents (automatic top-ups, saved cards) ----------------------------------------


async def _payment_intent_succeeded(session: AsyncSession, obj: StripeObject) -> str:
    """Credit an automatic top-up; keep a card that was set up for later off-session use."""
    intent, metadata = _str(obj, "id"), _metadata(obj)
    wallet = _wallet(metadata.get("wallet"))
    if wallet is None:
        return "ignored: no wallet in metadata"
    outcomes = []
    amount = _int(obj, "amount_received") * MICROS_PER_CENT
    customer = await session.scalar(
        select(BillingProfileModel.stripe_customer_id).where(BillingProfileModel.wallet == wallet)
    )
    if customer is None or customer != _ref(obj, "customer"):
        # Metadata is not proof: only a payment by the customer we created for this wallet
        # credits it.
        return "ignored: not this wallet's customer"
    if metadata.get("purpose") == "auto_topup" and _str(obj, "currency") == "usd" and amount > 0:
        posted = await ledger.post(
            session,
            postings.topup(
                wallet=wallet,
                amount=amount,
                key=f"stripe:{intent}:topup",
                details={"wallet": wallet, "payment_intent": intent, "auto_topup": True},
            ),
        )
        await _clear_pending(session, wallet, intent, metadata)
        outcomes.append(f"auto top-up {'credited' if posted else 'already credited'}")
    method = _ref(obj, "payment_method")
    pending = BillingProfileModel.auto_topup_pending_id
    if obj.get("setup_future_usage") == "off_session" and method:
        saved = await session.execute(
            update(BillingProfileModel)
            .where(BillingProfileModel.wallet == wallet)
            .where(BillingProfileModel.stripe_customer_id == _ref(obj, "customer"))
            .values(
                payment_method_id=method,
                updated_at=utcnow(),
                # A new card lifts the pause a declined one put on automatic top-ups.
                auto_topup_pending_id=case(
                    (pending.startswith(DECLINED_PREFIX), None), else_=pending
                ),
            )
        )
        kept = bool(saved.rowcount)  # type: ignore[attr-defined]
        outcomes.append("card saved" if kept else "card not saved: another customer")
    return "; ".join(outcomes) or "ignored"


async def _payment_intent_failed(session: AsyncSession, obj: StripeObject) -> str:
    metadata = _metadata(obj)
    wallet = _wallet(metadata.get("wallet"))
    if metadata.get("purpose") != "auto_topup" or wallet is None:
        return "ignored"
    await _clear_pending(session, wallet, _str(obj, "id"), metadata, declined=True)
    error = obj.get("last_payment_error")
    reason = error.get("message") if isinstance(error, dict) else None
    logger.warning("automatic top-up of %s failed: %s", wallet, reason)
    return f"auto top-up failed: {reason or 'no reason given'}"


async def _clear_pending(
    session: AsyncSession,
    wallet: str,
    intent: str,
    metadata: dict[str, str],
    *,
    declined: bool = False,
) -> None:
    """Free the wallet for its next automatic top-up if this intent was the pending one
    (known by its id, or by its attempt key when the webhook beat our own bookkeeping); a
    declined payment leaves the pause a declined card gets instead (see ``topups``)."""
    marks = [intent] + ([metadata["attempt"]] if metadata.get("attempt") else [])
    now = utcnow()
    mark = f"{DECLINED_PREFIX}{intent}"[:255]
    values: dict[str, object] = (
        {"auto_topup_pending_id": mark, "auto_topup_pending_at": now}
        if declined
        else {"auto_topup_pending_id": None, "auto_topup_pending_at": None}
    )
    await session.execute(
        update(BillingProfileModel)
        .where(BillingProfileModel.wallet == wallet)
        .where(BillingProfileModel.auto_topup_pending_id.in_(marks))
        .values(**values, updated_at=now)
    )


# --- refunds and disputes of bought credit ----------------------------------------------------


async def _charge_refunded(session: AsyncSession, obj: StripeObject) -> str:
    """Take back what was refunded since the last refund event: ``amount_refunded`` is a
    running total, and each step is posted under a key naming that total."""
    charge = _str(obj, "id")
    wallet = await _credited_wallet(session, _ref(obj, "payment_intent"))
    if wallet is None:
        return "no credited payment for this charge"
    # Serializes refund events of one wallet, so two steps never both count the same cents.
    # Every account the posting touches is locked now, in order (see ledger.lock_accounts).
    await ledger.lock_accounts(session, [accounts.available(wallet), accounts.STRIPE_CLEARING])
    prefix = f"stripe:{charge}:refunded:"
    keys = await session.scalars(
        select(LedgerTransactionModel.idempotency_key).where(
            LedgerTransactionModel.idempotency_key.startswith(prefix, autoescape=True)
        )
    )
    done = max((int(key[len(prefix) :]) for key in keys), default=0)
    total = _int(obj, "amount_refunded") * MICROS_PER_CENT
    if total <= done:
        return "refund already applied"
    await ledger.post(
        session,
        postings.card_money_returned(
            wallet=wallet,
            amount=total - done,
            key=f"{prefix}{total}",
            kind="card_refund",
            memo=f"Card payment refunded (charge {charge}).",
        ),
    )
    return f"took back {ledger.format_usd(total - done)} from {wallet}"


async def _dispute_created(session: AsyncSession, obj: StripeObject) -> str:
    dispute = _str(obj, "id")
    wallet = await _credited_wallet(session, _ref(obj, "payment_intent"))
    if wallet is None:
        return "no credited payment for this dispute"
    if str(obj.get("status", "")).startswith("warning_"):
        return "inquiry: no money withdrawn"  # an inquiry closes as warning_closed, not won
    amount = _int(obj, "amount") * MICROS_PER_CENT
    if amount <= 0:
        return "nothing disputed"
    posted = await ledger.post(
        session,
        postings.card_money_returned(
            wallet=wallet,
            amount=amount,
            key=f"stripe:{dispute}:disputed",
            kind="dispute",
            memo=f"Card payment disputed ({dispute}).",
        ),
    )
    return f"took back {ledger.format_usd(amount)} from {wallet}" if posted else "already applied"


async def _dispute_closed(session: AsyncSession, obj: StripeObject) -> str:
    """A won dispute gives back exactly what its opening took (read from the ledger)."""
    dispute, status = _str(obj, "id"), obj.get("status")
    if status != "won":
        return f"dispute closed: {status}"
    taken = await session.execute(
        select(LedgerEntryModel.account_code, LedgerEntryModel.amount_micros)
        .join(LedgerTransactionModel, LedgerTransactionModel.id == LedgerEntryModel.transaction_id)
        .where(LedgerTransactionModel.idempotency_key == f"stripe:{dispute}:disputed")
        .where(LedgerEntryModel.amount_micros < 0)
    )
    row = taken.first()
    if row is None:
        return "dispute won; nothing had been taken back"
    code, amount = row
    wallet = code.rsplit(":", 1)[0]
    posted = await ledger.post(
        session, postings.dispute_won(wallet=wallet, amount=-amount, dispute_id=dispute)
    )
    return f"gave back {ledger.format_usd(-amount)} to {wallet}" if posted else "already applied"


async def _credited_wallet(session: AsyncSession, payment_intent: str | None) -> str | None:
    """The wallet a payment credited: by its Checkout Session, or by the automatic top-up's
    ledger posting. None when that payment credited nothing (so nothing is taken back)."""
    if not payment_intent:
        return None
    wallet = await session.scalar(
        select(CheckoutSessionModel.wallet)
        .where(CheckoutSessionModel.payment_intent_id == payment_intent)
        .where(CheckoutSessionModel.status == "completed")
    )
    if wallet:
        return wallet
    details = await session.scalar(
        select(LedgerTransactionModel.details).where(
            LedgerTransactionModel.idempotency_key == f"stripe:{payment_intent}:topup"
        )
    )
    return _wallet(details.get("wallet")) if isinstance(details, dict) else None


# --- Connect: accounts and transfers ----------------------------------------------------------


async def _account_updated(session: AsyncSession, obj: StripeObject) -> str:
    changed = await session.execute(
        update(PayoutAccountModel)
        .where(PayoutAccountModel.stripe_account_id == _str(obj, "id"))
        .values(
            details_submitted=bool(obj.get("details_submitted")),
            payouts_enabled=bool(obj.get("payouts_enabled")),
            updated_at=utcnow(),
        )
    )
    if not changed.rowcount:  # type: ignore[attr-defined]
        return "unknown account"
    return f"payouts {'enabled' if obj.get('payouts_enabled') else 'disabled'}"


async def _transfer_reversed(session: AsyncSession, obj: StripeObject) -> str:
    """A payout's transfer (partly) reversed: the newly reversed amount is payable again.
    ``amount_reversed`` is a running total; the payout row remembers what was applied."""
    transfer = _str(obj, "id")
    payout = await _payout_for_transfer(session, transfer, _metadata(obj).get("payout_id"))
    if payout is None:
        return "unknown transfer"
    if payout.state == "failed":
        return "the payout had failed; nothing to restore"
    total = min(_int(obj, "amount_reversed") * MICROS_PER_CENT, payout.amount_micros)
    if total <= payout.reversed_micros:
        return "reversal already applied"
    delta = total - payout.reversed_micros
    await ledger.post(
        session,
        postings.payout_reversed(
            user_id=payout.user_id, amount=delta, transfer_id=transfer, reversed_total=total
        ),
    )
    payout.reversed_micros = total
    payout.stripe_transfer_id = payout.stripe_transfer_id or transfer
    payout.state = "reversed" if total >= payout.amount_micros else "paid"
    payout.updated_at = utcnow()
    return f"restored {ledger.format_usd(delta)} to host payable"


async def _payout_for_transfer(
    session: AsyncSession, transfer: str, payout_id: str | None
) -> PayoutModel | None:
    """By transfer id, or by the payout id in its metadata (a payout whose transfer answer
    never reached us is still pending without one)."""
    found = await session.scalar(
        select(PayoutModel).where(PayoutModel.stripe_transfer_id == transfer).with_for_update()
    )
    if found is not None or not payout_id:
        return found
    try:
        key = uuid.UUID(payout_id)
    except ValueError:
        return None
    payout = await session.get(PayoutModel, key, with_for_update=True)
    if payout is None or payout.stripe_transfer_id not in (None, transfer):
        return None  # that payout is known to have another transfer
    return payout


# --- reading Stripe objects ---------------------------------------------------------------------


def _str(obj: StripeObject, key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _int(obj: StripeObject, key: str) -> int:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _ref(obj: StripeObject, key: str) -> str | None:
    """An id field, which Stripe may have expanded into the object itself."""
    value = obj.get(key)
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _metadata(obj: StripeObject) -> dict[str, str]:
    value = obj.get("metadata")
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def _wallet(value: object) -> str | None:
    """A well-formed wallet (``user:<uuid>`` or ``org:<uuid>``), else None."""
    if not isinstance(value, str):
        return None
    try:
        kind, _owner, _ = accounts.describe(accounts.available(value))
    except ValueError:
        return None
    return value if kind == accounts.AccountKind.available else None


_HANDLERS: dict[str, Callable[[AsyncSession, StripeObject], Awaitable[str]]] = {
    "checkout.session.completed": _checkout_paid,
    "checkout.session.async_payment_succeeded": _checkout_paid,
    "checkout.session.async_payment_failed": _checkout_closed("failed"),
    "checkout.session.expired": _checkout_closed("expired"),
    "payment_intent.succeeded": _payment_intent_succeeded,
    "payment_intent.payment_failed": _payment_intent_failed,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute_created,
    "charge.dispute.closed": _dispute_closed,
    "account.updated": _account_updated,
    "transfer.reversed": _transfer_reversed,
}
