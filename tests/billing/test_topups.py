"""Card top-ups through Stripe Checkout, and automatic top-ups of a saved card."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update

from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import BillingProfileModel, CheckoutSessionModel
from peergpu.server.services.billing import topups
from tests.billing.conftest import Billing, wallet_of
from tests.factories import assert_error, make_org, make_user

CHECKOUT = "/api/v1/billing/checkout"


async def test_checkout_creates_a_session_for_the_wallet_and_records_it(billing: Billing) -> None:
    user = await make_user(billing.client)
    created = await billing.checkout(user, 25_000_000)

    assert created["id"].startswith("cs_") and created["url"].startswith("https://")
    assert created["wallet"] == wallet_of(user)
    assert (created["amount_micros"], created["amount_usd"]) == (25_000_000, "$25.00")
    [customer] = billing.fake.calls("POST", "/v1/customers")
    assert customer.params == {"email": user.email, "metadata": {"wallet": wallet_of(user)}}
    [sent] = billing.fake.calls("POST", "/v1/checkout/sessions")
    customer_id = billing.fake.objects[created["id"]]["customer"]
    assert customer_id.startswith("cus_")
    assert sent.params["mode"] == "payment"
    assert sent.params["customer"] == customer_id
    assert sent.params["client_reference_id"] == wallet_of(user)
    assert sent.params["line_items"] == [
        {
            "quantity": "1",
            "price_data": {
                "currency": "usd",
                "unit_amount": "2500",
                "product_data": {"name": "PeerGPU credit"},
            },
        }
    ]
    assert sent.params["metadata"] == {"wallet": wallet_of(user), "user_id": user.id}
    assert sent.params["payment_intent_data"] == {
        "metadata": {"wallet": wallet_of(user)},
        "setup_future_usage": "off_session",
    }
    assert sent.params["success_url"].startswith("http://testserver/billing?checkout=success")
    assert sent.idempotency_key and sent.idempotency_key.startswith("checkout:")
    async with billing.context.sessionmaker() as session:
        record = await session.get(CheckoutSessionModel, created["id"])
    assert record is not None
    assert (record.wallet, record.amount_micros, record.status) == (
        wallet_of(user),
        25_000_000,
        "open",
    )
    assert await billing.available(user) == 0  # nothing is credited before Stripe says so

    again = await billing.checkout(user, 10_000_000)
    assert again["id"] != created["id"]
    assert len(billing.fake.calls("POST", "/v1/customers")) == 1  # the customer is reused
    assert billing.fake.objects[again["id"]]["customer"] == customer_id


async def test_an_idempotency_key_returns_the_same_checkout(billing: Billing) -> None:
    user = await make_user(billing.client)
    headers = {**user.headers, "Idempotency-Key": "buy-once"}
    first = await billing.client.post(CHECKOUT, json={"amount_micros": 5_000_000}, headers=headers)
    second = await billing.client.post(CHECKOUT, json={"amount_micros": 5_000_000}, headers=headers)
    assert first.status_code == second.status_code == 201, second.text
    assert first.json()["id"] == second.json()["id"]
    other = await billing.client.post(CHECKOUT, json={"amount_micros": 6_000_000}, headers=headers)
    assert_error(other, 409, "idempotency_key_reused")


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        (4_990_000, "invalid_amount"),  # under the $5 minimum
        (10_000_010_000, "invalid_amount"),  # over the $10,000 maximum
        (5_000_001, "invalid_amount"),  # not whole cents
        (0, "validation_error"),
        (-5_000_000, "validation_error"),
    ],
)
async def test_bad_amounts_are_refused(billing: Billing, amount: int, code: str) -> None:
    user = await make_user(billing.client)
    response = await billing.client.post(
        CHECKOUT, json={"amount_micros": amount}, headers=user.headers
    )
    assert_error(response, 422, code)
    assert billing.fake.requests == []


async def test_an_org_wallet_needs_an_org_admin(billing: Billing) -> None:
    owner, member, stranger = [await make_user(billing.client) for _ in range(3)]
    org = await make_org(billing.client, owner)
    invite = await billing.client.post(
        f"/api/v1/orgs/{org['id']}/invites", json={"email": member.email}, headers=owner.headers
    )
    token = invite.json()["accept_url"].split("token=")[1]
    joined = await billing.client.post(
        "/api/v1/invites/accept", json={"token": token}, headers=member.headers
    )
    assert joined.status_code == 200, joined.text
    body = {"amount_micros": 5_000_000, "org_id": org["id"]}

    assert_error(await billing.client.post(CHECKOUT, json=body, headers=member.headers), 403)
    assert_error(await billing.client.post(CHECKOUT, json=body, headers=stranger.headers), 404)
    created = await billing.checkout(owner, 5_000_000, org_id=org["id"])
    assert created["wallet"] == f"org:{org['id']}"
    [sent] = billing.fake.calls("POST", "/v1/checkout/sessions")
    assert sent.params["client_reference_id"] == f"org:{org['id']}"


async def test_without_stripe_keys_card_payments_are_unavailable(client: httpx.AsyncClient) -> None:
    user = await make_user(client, roles=["renter", "host"])
    response = await client.post(CHECKOUT, json={"amount_micros": 5_000_000}, headers=user.headers)
    error = assert_error(response, 503, "payments_not_configured")
    assert "ask an administrator" in error["message"]
    onboarding = await client.post("/api/v1/host/payout-account", headers=user.headers)
    assert_error(onboarding, 503, "payments_not_configured")
    webhook = await client.post(
        "/api/v1/billing/stripe/webhook", content=b"{}", headers={"Stripe-Signature": "t=1,v1=x"}
    )
    assert_error(webhook, 400, "invalid_signature")


async def test_stripe_trouble_is_a_clear_error(billing: Billing) -> None:
    user = await make_user(billing.client)
    body = {"amount_micros": 5_000_000}
    billing.fake.drop_next("/v1/checkout/sessions", times=3)  # the SDK tries three times
    unreachable = await billing.client.post(CHECKOUT, json=body, headers=user.headers)
    assert_error(unreachable, 503, "stripe_unavailable")
    billing.fake.fail_next(
        "/v1/checkout/sessions", code="amount_too_large", message="Amount must be no more."
    )
    refused = await billing.client.post(CHECKOUT, json=body, headers=user.headers)
    error = assert_error(refused, 409, "stripe_refused")
    assert error["message"] == "Amount must be no more."
    assert error["details"]["stripe_code"] == "amount_too_large"


async def _save_card_and_enable_auto_topup(billing: Billing) -> tuple[str, str]:
    """A user who paid $10 by card (saved for later) and wants $50 more under $20."""
    user = await make_user(billing.client)
    paid = await billing.buy_credit(user, 10_000_000)
    intent = billing.fake.get(paid["payment_intent"])
    ack = await billing.send_event("payment_intent.succeeded", intent)
    assert ack["outcome"] == "card saved"
    wallet = wallet_of(user)
    async with billing.context.sessionmaker() as session:
        profile = await session.get(BillingProfileModel, wallet)
        assert profile is not None and profile.payment_method_id == intent["payment_method"]
        # Set as PUT /api/v1/billing/settings would (that router is tested with its own code).
        profile.auto_topup_below_micros = 20_000_000
        profile.auto_topup_amount_micros = 50_000_000
        await session.commit()
    return wallet, str(intent["payment_method"])


async def test_auto_topup_fires_once_below_the_threshold(billing: Billing) -> None:
    wallet, card = await _save_card_and_enable_auto_topup(billing)

    started = await topups.auto_topup_if_low(context=billing.context, wallets=[wallet, wallet])
    assert len(started) == 1 and started[0].startswith("pi_")
    assert await topups.auto_topup_if_low(context=billing.context, wallets=[wallet]) == []
    [sent] = billing.fake.calls("POST", "/v1/payment_intents")
    assert sent.params["amount"] == "5000" and sent.params["currency"] == "usd"
    assert sent.params["payment_method"] == card
    assert sent.params["off_session"] == "true" and sent.params["confirm"] == "true"
    assert sent.params["metadata"]["purpose"] == "auto_topup"
    assert sent.params["metadata"]["wallet"] == wallet
    assert sent.idempotency_key == sent.params["metadata"]["attempt"]

    intent = billing.fake.get(started[0])
    payload, signature = billing.fake.event("payment_intent.succeeded", intent)
    assert (await billing.deliver(payload, signature)).json()["outcome"] == ("auto top-up credited")
    replay = (await billing.deliver(payload, signature)).json()
    assert replay["duplicate"] is True
    again = await billing.send_event("payment_intent.succeeded", intent)
    assert again["outcome"] == "auto top-up already credited"
    assert await billing.balance(f"{wallet}:available") == 60_000_000
    # Above the threshold now: nothing more is charged.
    assert await topups.auto_topup_if_low(context=billing.context, wallets=[wallet]) == []
    assert len(billing.fake.calls("POST", "/v1/payment_intents")) == 1


async def test_a_declined_card_is_not_charged_again_until_a_new_card_is_saved(
    billing: Billing,
) -> None:
    wallet, _card = await _save_card_and_enable_auto_topup(billing)
    billing.fake.fail_next(
        "/v1/payment_intents",
        status=402,
        type="card_error",
        code="card_declined",
        decline_code="insufficient_funds",
        message="Your card has insufficient funds.",
    )
    assert await topups.auto_topup_if_low(context=billing.context, wallets=[wallet]) == []
    async with billing.context.sessionmaker() as session:
        profile = await session.get(BillingProfileModel, wallet)
        assert profile is not None and profile.auto_topup_pending_id
        assert profile.auto_topup_pending_id.startswith(topups.DECLINED_PREFIX)
    assert await billing.balance(f"{wallet}:available") == 10_000_000
    # Every later settlement would ask again: the declined card is left alone.
    assert await topups.auto_topup_if_low(context=billing.context, wallets=[wallet]) == []
    assert len(billing.fake.calls("POST", "/v1/payment_intents")) == 1
    # A card saved again (Stripe reports a payment set up for later use) lifts the pause.
    [first_payment] = [o for o in billing.fake.objects.values() if o["object"] == "payment_intent"]
    ack = await billing.send_event("payment_intent.succeeded", first_payment)
    assert ack["outcome"] == "card saved"
    assert len(await topups.auto_topup_if_low(context=billing.context, wallets=[wallet])) == 1


async def test_an_auto_topup_with_no_answer_is_resent_with_the_same_key(billing: Billing) -> None:
    wallet, _card = await _save_card_and_enable_auto_topup(billing)
    billing.fake.drop_next("/v1/payment_intents", times=3)
    assert await topups.auto_topup_if_low(context=billing.context, wallets=[wallet]) == []
    keys = {r.idempotency_key for r in billing.fake.calls("POST", "/v1/payment_intents")}
    assert len(keys) == 1
    # Too soon to ask again; a minute later the same request goes out once more.
    assert await topups.auto_topup_if_low(context=billing.context, wallets=[wallet]) == []
    async with billing.context.sessionmaker() as session:
        await session.execute(
            update(BillingProfileModel)
            .where(BillingProfileModel.wallet == wallet)
            .values(auto_topup_pending_at=utcnow() - topups.RESEND_AFTER - timedelta(seconds=1))
        )
        await session.commit()
    [intent_id] = await topups.auto_topup_if_low(context=billing.context, wallets=[wallet])
    sent = billing.fake.calls("POST", "/v1/payment_intents")
    assert len(sent) == 4 and {r.idempotency_key for r in sent} == keys
    ack = await billing.send_event("payment_intent.succeeded", billing.fake.get(intent_id))
    assert ack["outcome"] == "auto top-up credited"
    assert await billing.balance(f"{wallet}:available") == 60_000_000


async def test_an_org_api_key_tops_up_only_its_org(billing: Billing) -> None:
    owner = await make_user(billing.client)
    org = await make_org(billing.client, owner)
    key = await billing.client.post(
        "/api/v1/keys",
        json={"name": "ci", "scopes": ["write"], "organization_id": org["id"]},
        headers=owner.headers,
    )
    assert key.status_code == 201, key.text
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    personal = await billing.client.post(
        CHECKOUT, json={"amount_micros": 5_000_000}, headers=headers
    )
    assert_error(personal, 403, "organization_key")
    other_org = str(uuid.uuid4())
    elsewhere = await billing.client.post(
        CHECKOUT, json={"amount_micros": 5_000_000, "org_id": other_org}, headers=headers
    )
    assert_error(elsewhere, 404)


async def test_the_upkeep_loop_finds_wallets_under_their_threshold(billing: Billing) -> None:
    from peergpu.server.services.billing import upkeep

    wallet, _card = await _save_card_and_enable_auto_topup(billing)  # $10 under a $20 line
    await upkeep.upkeep_once(billing.context)
    [sent] = billing.fake.calls("POST", "/v1/payment_intents")
    assert sent.params["metadata"]["wallet"] == wallet
    await upkeep.upkeep_once(billing.context)  # under way: not a second charge
    assert len(billing.fake.calls("POST", "/v1/payment_intents")) == 1


async def test_a_failed_payment_webhook_pauses_and_a_day_later_upkeep_tries_again(
    billing: Billing,
) -> None:
    from peergpu.server.services.billing import upkeep

    wallet, _card = await _save_card_and_enable_auto_topup(billing)
    [intent_id] = await topups.auto_topup_if_low(context=billing.context, wallets=[wallet])
    failed = billing.fake.update(intent_id, status="requires_payment_method")
    await billing.send_event("payment_intent.payment_failed", failed)
    async with billing.context.sessionmaker() as session:
        profile = await session.get(BillingProfileModel, wallet)
        assert profile is not None and profile.auto_topup_pending_id
        assert profile.auto_topup_pending_id.startswith(topups.DECLINED_PREFIX)
    await upkeep.upkeep_once(billing.context)
    assert len(billing.fake.calls("POST", "/v1/payment_intents")) == 1  # paused
    async with billing.context.sessionmaker() as session:
        await session.execute(
            update(BillingProfileModel)
            .where(BillingProfileModel.wallet == wallet)
            .values(auto_topup_pending_at=utcnow() - topups.GIVE_UP_AFTER - timedelta(minutes=1))
        )
        await session.commit()
    await upkeep.upkeep_once(billing.context)
    assert len(billing.fake.calls("POST", "/v1/payment_intents")) == 2
