"""Stripe webhooks: signed, applied once per event, and once per Stripe object."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from sqlalchemy import select

from peergpu.server.db.billing_models import (
    CheckoutSessionModel,
    PayoutAccountModel,
    StripeEventModel,
)
from peergpu.server.services.billing import accounts, ledger
from tests.billing.conftest import Billing, wallet_of
from tests.factories import ApiUser, assert_error, make_user


async def test_a_completed_checkout_credits_the_wallet_exactly_once(billing: Billing) -> None:
    user = await make_user(billing.client)
    created = await billing.checkout(user, 25_000_000)
    paid = billing.fake.pay_checkout(created["id"])
    payload, signature = billing.fake.event("checkout.session.completed", paid)

    first = await billing.deliver(payload, signature)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "received": True,
        "duplicate": False,
        "outcome": f"credited $25.00 to {wallet_of(user)}",
    }
    replay = await billing.deliver(payload, signature)
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    # Another event about the same session (Stripe sends both for delayed methods).
    later = await billing.send_event("checkout.session.async_payment_succeeded", paid)
    assert (later["duplicate"], later["outcome"]) == (False, "already credited")
    again = await billing.send_event("checkout.session.completed", paid)
    assert again["outcome"] == "already credited"

    assert await billing.available(user) == 25_000_000
    async with billing.context.sessionmaker() as session:
        record = await session.get(CheckoutSessionModel, created["id"])
        events = (await session.scalars(select(StripeEventModel))).all()
    assert record is not None and record.status == "completed"
    assert record.payment_intent_id == paid["payment_intent"]
    assert record.completed_at is not None
    assert len(events) == 3
    assert await billing.balance(accounts.STRIPE_CLEARING) == -25_000_000


async def test_unsigned_forged_and_stale_events_are_refused(billing: Billing) -> None:
    user = await make_user(billing.client)
    created = await billing.checkout(user, 10_000_000)
    paid = billing.fake.pay_checkout(created["id"])
    payload, good = billing.fake.event("checkout.session.completed", paid)
    tolerance = billing.context.settings.stripe_webhook_tolerance_seconds
    tampered = payload.replace(b'"amount_total": 1000', b'"amount_total": 99900')
    assert tampered != payload

    refusals = [
        await billing.deliver(payload, None),
        await billing.deliver(payload, "garbage"),
        await billing.deliver(payload, billing.fake.sign(payload, secret="whsec_someone_else")),
        await billing.deliver(tampered, good),
        await billing.deliver(
            payload, billing.fake.sign(payload, timestamp=int(time.time()) - tolerance - 5)
        ),
    ]
    for response in refusals:
        error = assert_error(response, 400, "invalid_signature")
        assert error["message"].startswith("The Stripe-Signature does not verify")
    not_json = b"not json at all"
    assert_error(await billing.deliver(not_json, billing.fake.sign(not_json)), 400, "invalid_event")
    assert await billing.available(user) == 0

    accepted = await billing.deliver(payload, good)  # the genuine delivery still works
    assert accepted.status_code == 200 and not accepted.json()["duplicate"]
    assert await billing.available(user) == 10_000_000


async def test_an_amount_that_does_not_match_credits_nothing(billing: Billing) -> None:
    user = await make_user(billing.client)
    created = await billing.checkout(user, 10_000_000)
    paid = billing.fake.pay_checkout(created["id"], amount_total=100)  # $1.00, not $10.00

    ack = await billing.send_event("checkout.session.completed", paid)
    assert ack["outcome"].startswith("amount mismatch")
    assert await billing.available(user) == 0
    async with billing.context.sessionmaker() as session:
        record = await session.get(CheckoutSessionModel, created["id"])
    assert record is not None and record.status == "mismatch"
    # A refund of that payment takes nothing back either: it credited nothing.
    refund = billing.fake.refund(billing.fake.charge_of(paid["payment_intent"]), 100)
    ack = await billing.send_event("charge.refunded", refund)
    assert ack["outcome"] == "no credited payment for this charge"
    assert await billing.available(user) == 0


async def test_a_delayed_payment_is_credited_when_it_succeeds(billing: Billing) -> None:
    user = await make_user(billing.client)
    created = await billing.checkout(user, 10_000_000)
    paid = billing.fake.pay_checkout(created["id"])
    ack = await billing.send_event(
        "checkout.session.completed", {**paid, "payment_status": "unpaid"}
    )
    assert ack["outcome"] == "awaiting payment (unpaid)"
    assert await billing.available(user) == 0
    ack = await billing.send_event("checkout.session.async_payment_succeeded", paid)
    assert ack["outcome"].startswith("credited")
    assert await billing.available(user) == 10_000_000


async def test_refunds_take_credit_back_once_per_step(billing: Billing) -> None:
    user = await make_user(billing.client)
    paid = await billing.buy_credit(user, 50_000_000)
    charge = billing.fake.charge_of(paid["payment_intent"])

    first = billing.fake.refund(charge, 2_000)  # $20.00
    payload, signature = billing.fake.event("charge.refunded", first)
    ack = (await billing.deliver(payload, signature)).json()
    assert ack["outcome"] == f"took back $20.00 from {wallet_of(user)}"
    assert (await billing.deliver(payload, signature)).json()["duplicate"] is True
    same_state = await billing.send_event("charge.refunded", first)
    assert same_state["outcome"] == "refund already applied"
    assert await billing.available(user) == 30_000_000

    second = billing.fake.refund(charge, 1_000)  # $10.00 more: $30.00 refunded in all
    assert (await billing.send_event("charge.refunded", second))["outcome"].startswith(
        "took back $10.00"
    )
    # The first step arriving late changes nothing (the running total is what counts).
    late = await billing.send_event("charge.refunded", first)
    assert late["outcome"] == "refund already applied"
    assert await billing.available(user) == 20_000_000


async def test_a_dispute_takes_credit_back_even_below_zero_and_a_win_returns_it(
    billing: Billing,
) -> None:
    user = await make_user(billing.client)
    paid = await billing.buy_credit(user, 25_000_000)
    await _spend(billing, user, 20_000_000)
    charge = billing.fake.charge_of(paid["payment_intent"])

    dispute = billing.fake.dispute(charge)
    opened = await billing.send_event("charge.dispute.created", dispute)
    assert opened["outcome"] == f"took back $25.00 from {wallet_of(user)}"
    assert (await billing.send_event("charge.dispute.created", dispute))["outcome"] == (
        "already applied"
    )
    assert await billing.available(user) == -20_000_000  # the renter owes it now

    under_review = billing.fake.close_dispute(dispute["id"], "under_review")
    assert (await billing.send_event("charge.dispute.updated", under_review))["outcome"] == (
        "ignored"
    )
    won = billing.fake.close_dispute(dispute["id"], "won")
    payload, signature = billing.fake.event("charge.dispute.closed", won)
    ack = (await billing.deliver(payload, signature)).json()
    assert ack["outcome"] == f"gave back $25.00 to {wallet_of(user)}"
    assert (await billing.deliver(payload, signature)).json()["duplicate"] is True
    assert (await billing.send_event("charge.dispute.closed", won))["outcome"] == (
        "already applied"
    )
    assert await billing.available(user) == 5_000_000


async def test_a_lost_dispute_keeps_the_credit_taken_back(billing: Billing) -> None:
    user = await make_user(billing.client)
    paid = await billing.buy_credit(user, 10_000_000)
    dispute = billing.fake.dispute(billing.fake.charge_of(paid["payment_intent"]))
    await billing.send_event("charge.dispute.created", dispute)
    lost = billing.fake.close_dispute(dispute["id"], "lost")
    ack = await billing.send_event("charge.dispute.closed", lost)
    assert ack["outcome"] == "dispute closed: lost"
    assert await billing.available(user) == 0


async def test_account_updated_flips_payouts_enabled(billing: Billing) -> None:
    host = await make_user(billing.client, roles=["renter", "host"])
    opened = await billing.client.post("/api/v1/host/payout-account", headers=host.headers)
    account_id = opened.json()["stripe_account_id"]
    status = await billing.client.get("/api/v1/host/payout-account", headers=host.headers)
    assert status.json()["payouts_enabled"] is False

    account = billing.fake.update(account_id, details_submitted=True, payouts_enabled=True)
    ack = await billing.send_event("account.updated", account, account=account_id)
    assert ack["outcome"] == "payouts enabled"
    async with billing.context.sessionmaker() as session:
        stored = await session.get(PayoutAccountModel, uuid.UUID(host.id))
    assert stored is not None and stored.payouts_enabled and stored.details_submitted

    disabled = billing.fake.update(account_id, payouts_enabled=False)
    ack = await billing.send_event("account.updated", disabled, account=account_id)
    assert ack["outcome"] == "payouts disabled"
    stranger = await billing.send_event("account.updated", {**disabled, "id": "acct_other"})
    assert stranger["outcome"] == "unknown account"


async def test_events_we_do_not_use_are_acknowledged(billing: Billing) -> None:
    ack = await billing.send_event("customer.created", {"id": "cus_x", "object": "customer"})
    assert ack == {"received": True, "duplicate": False, "outcome": "ignored"}
    unknown = await billing.send_event(
        "checkout.session.completed",
        {"id": "cs_not_ours", "object": "checkout.session", "payment_status": "paid"},
    )
    assert unknown["outcome"] == "unknown checkout session"
    not_event = json.dumps({"id": "evt_1", "type": "x"}).encode()
    response = await billing.deliver(not_event, billing.fake.sign(not_event))
    assert_error(response, 400, "invalid_event")


async def _spend(billing: Billing, user: ApiUser, amount: int) -> None:
    """Credit used up (as settled jobs would), so a dispute can overdraw the wallet."""
    async with billing.context.sessionmaker() as session:
        await ledger.post(
            session,
            ledger.transfer(
                f"test-spend:{uuid.uuid4()}",
                "settle",
                source=accounts.available(wallet_of(user)),
                target=accounts.PLATFORM_FEES,
                amount=amount,
            ),
        )
        await session.commit()


async def test_concurrent_deliveries_of_one_event_credit_once(billing: Billing) -> None:
    user = await make_user(billing.client)
    created = await billing.checkout(user, 15_000_000)
    payload, signature = billing.fake.event(
        "checkout.session.completed", billing.fake.pay_checkout(created["id"])
    )
    responses = await asyncio.gather(*(billing.deliver(payload, signature) for _ in range(4)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert sorted(r.json()["duplicate"] for r in responses) == [False, True, True, True]
    assert await billing.available(user) == 15_000_000
