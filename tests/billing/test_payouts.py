"""Host payouts: Connect Express onboarding, Transfers booked once, failures and reversals."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from peergpu.server.services.billing import accounts, payouts
from tests.billing.conftest import Billing
from tests.factories import ApiUser, assert_error, make_user

ACCOUNT = "/api/v1/host/payout-account"
PAYOUTS = "/api/v1/host/payouts"


async def _host(billing: Billing) -> ApiUser:
    return await make_user(billing.client, roles=["renter", "host"])


async def _pay_out(billing: Billing, host: ApiUser, **body: int) -> dict[str, object]:
    response = await billing.client.post(PAYOUTS, json=body, headers=host.headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_onboarding_creates_one_express_account_and_fresh_links(billing: Billing) -> None:
    host = await _host(billing)
    first = await billing.client.post(ACCOUNT, headers=host.headers)
    assert first.status_code == 200, first.text
    account_id = first.json()["stripe_account_id"]
    assert account_id.startswith("acct_")
    assert first.json()["url"].startswith("https://connect.stripe.com/")
    [created] = billing.fake.calls("POST", "/v1/accounts")
    assert created.params == {
        "type": "express",
        "email": host.email,
        "capabilities": {"transfers": {"requested": "true"}},
        "metadata": {"user_id": host.id},
    }
    [link] = billing.fake.calls("POST", "/v1/account_links")
    assert link.params["account"] == account_id
    assert link.params["type"] == "account_onboarding"
    assert link.params["return_url"] == "http://testserver/host/payouts?onboarding=done"
    assert link.params["refresh_url"] == "http://testserver/host/payouts?onboarding=refresh"

    again = await billing.client.post(ACCOUNT, headers=host.headers)
    assert again.json()["stripe_account_id"] == account_id
    assert again.json()["url"] != first.json()["url"]
    assert len(billing.fake.calls("POST", "/v1/accounts")) == 1

    status = (await billing.client.get(ACCOUNT, headers=host.headers)).json()
    assert status["onboarded"] is False and status["payouts_enabled"] is False
    # Onboarding finished on Stripe's side: the status is refreshed from Stripe.
    billing.fake.update(account_id, details_submitted=True, payouts_enabled=True)
    status = (await billing.client.get(ACCOUNT, headers=host.headers)).json()
    assert status == {
        "onboarded": True,
        "stripe_account_id": account_id,
        "details_submitted": True,
        "payouts_enabled": True,
        "payable_micros": 0,
        "payable_usd": "$0.00",
        "payout_min_micros": 10_000_000,
        "payout_min_usd": "$10.00",
    }


async def test_payouts_need_the_host_role_and_onboarding(billing: Billing) -> None:
    renter = await make_user(billing.client)
    for response in (
        await billing.client.post(ACCOUNT, headers=renter.headers),
        await billing.client.get(ACCOUNT, headers=renter.headers),
        await billing.client.post(PAYOUTS, json={}, headers=renter.headers),
        await billing.client.get(PAYOUTS, headers=renter.headers),
    ):
        assert_error(response, 403, "host_role_required")
    host = await _host(billing)
    await billing.give_payable(host, 50_000_000)
    refused = await billing.client.post(PAYOUTS, json={}, headers=host.headers)
    error = assert_error(refused, 409, "payouts_not_enabled")
    assert "onboarding" in error["message"]
    assert await billing.payable(host) == 50_000_000


async def test_payout_amounts_are_checked_with_the_numbers(billing: Billing) -> None:
    host = await _host(billing)
    await billing.onboard(host)
    await billing.give_payable(host, 5_000_000)

    nothing_yet = await billing.client.post(PAYOUTS, json={}, headers=host.headers)
    error = assert_error(nothing_yet, 409, "payout_below_minimum")
    assert error["details"] == {
        "amount_micros": 5_000_000,
        "payable_micros": 5_000_000,
        "min_micros": 10_000_000,
    }
    assert "$10.00" in error["message"]
    await billing.give_payable(host, 20_000_000)
    too_much = await billing.client.post(
        PAYOUTS, json={"amount_micros": 30_000_000}, headers=host.headers
    )
    error = assert_error(too_much, 402, "insufficient_payable")
    assert error["details"]["payable_micros"] == 25_000_000
    odd = await billing.client.post(
        PAYOUTS, json={"amount_micros": 10_000_001}, headers=host.headers
    )
    assert_error(odd, 422, "invalid_amount")
    assert billing.fake.calls("POST", "/v1/transfers") == []
    assert await billing.payable(host) == 25_000_000


async def test_a_payout_books_payable_to_clearing_and_sends_one_transfer(billing: Billing) -> None:
    host = await _host(billing)
    account_id = await billing.onboard(host)
    await billing.give_payable(host, 30_005_000)  # $30.005: the half cent stays behind

    paid = await _pay_out(billing, host)
    assert paid["state"] == "paid" and paid["amount_micros"] == 30_000_000
    assert paid["amount_usd"] == "$30.00"
    [sent] = billing.fake.calls("POST", "/v1/transfers")
    assert sent.params == {
        "amount": "3000",
        "currency": "usd",
        "destination": account_id,
        "metadata": {"payout_id": paid["id"], "user_id": host.id},
    }
    assert sent.idempotency_key == f"payout:{paid['id']}"
    assert paid["stripe_transfer_id"] == billing.fake.get(str(paid["stripe_transfer_id"]))["id"]
    assert await billing.payable(host) == 5_000
    assert await billing.balance(accounts.STRIPE_CLEARING) == 30_000_000

    listed = (await billing.client.get(PAYOUTS, headers=host.headers)).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == paid["id"]
    other = await _host(billing)
    assert (await billing.client.get(PAYOUTS, headers=other.headers)).json()["count"] == 0


async def test_a_refused_transfer_makes_the_amount_payable_again(billing: Billing) -> None:
    host = await _host(billing)
    await billing.onboard(host)
    await billing.give_payable(host, 40_000_000)
    billing.fake.fail_next("/v1/transfers")

    refused = await billing.client.post(
        PAYOUTS, json={"amount_micros": 25_000_000}, headers=host.headers
    )
    error = assert_error(refused, 409, "payout_failed")
    assert error["message"] == "You have insufficient available funds in your Stripe account."
    assert await billing.payable(host) == 40_000_000
    assert await billing.balance(accounts.STRIPE_CLEARING) == 0
    [failed] = (await billing.client.get(PAYOUTS, headers=host.headers)).json()["data"]
    assert failed["id"] == error["details"]["payout_id"]
    assert (failed["state"], failed["stripe_transfer_id"]) == ("failed", None)
    # Nothing left to retry: the refusal was definitive.
    assert await payouts.retry_pending_payouts(context=billing.context, min_age=timedelta()) == 0
    assert len(billing.fake.calls("POST", "/v1/transfers")) == 1


async def test_a_payout_without_an_answer_stays_pending_and_the_retry_pays_it_once(
    billing: Billing,
) -> None:
    host = await _host(billing)
    await billing.onboard(host)
    await billing.give_payable(host, 20_000_000)
    # Stripe makes the transfer but the answer is lost, on the first try and on the SDK's two
    # retries: we cannot know it was made.
    billing.fake.drop_next("/v1/transfers", times=3, processed=True)

    pending = await _pay_out(billing, host)
    assert pending["state"] == "pending" and pending["stripe_transfer_id"] is None
    assert "retried automatically" in str(pending["message"])
    assert await billing.payable(host) == 0  # booked: it cannot be paid out twice

    retried = await payouts.retry_pending_payouts(context=billing.context, min_age=timedelta())
    assert retried == 1
    assert await payouts.retry_pending_payouts(context=billing.context, min_age=timedelta()) == 0
    sent = billing.fake.calls("POST", "/v1/transfers")
    assert len(sent) == 4
    assert {r.idempotency_key for r in sent} == {f"payout:{pending['id']}"}
    transfers = [o for o in billing.fake.objects.values() if o["object"] == "transfer"]
    assert len(transfers) == 1
    [paid] = (await billing.client.get(PAYOUTS, headers=host.headers)).json()["data"]
    assert (paid["state"], paid["stripe_transfer_id"]) == ("paid", transfers[0]["id"])
    assert await billing.balance(accounts.STRIPE_CLEARING) == 20_000_000


async def test_a_reversed_transfer_is_payable_again_once(billing: Billing) -> None:
    host = await _host(billing)
    await billing.onboard(host)
    await billing.give_payable(host, 30_000_000)
    paid = await _pay_out(billing, host)
    transfer_id = str(paid["stripe_transfer_id"])

    partly = billing.fake.reverse_transfer(transfer_id, 1_000)  # $10.00 of $30.00
    payload, signature = billing.fake.event("transfer.reversed", partly)
    ack = (await billing.deliver(payload, signature)).json()
    assert ack["outcome"] == "restored $10.00 to host payable"
    assert (await billing.deliver(payload, signature)).json()["duplicate"] is True
    same = await billing.send_event("transfer.reversed", partly)
    assert same["outcome"] == "reversal already applied"
    assert await billing.payable(host) == 10_000_000
    [row] = (await billing.client.get(PAYOUTS, headers=host.headers)).json()["data"]
    assert (row["state"], row["reversed_micros"]) == ("paid", 10_000_000)

    fully = billing.fake.reverse_transfer(transfer_id, 2_000)
    ack = await billing.send_event("transfer.reversed", fully)
    assert ack["outcome"] == "restored $20.00 to host payable"
    assert await billing.payable(host) == 30_000_000
    [row] = (await billing.client.get(PAYOUTS, headers=host.headers)).json()["data"]
    assert (row["state"], row["reversed_micros"]) == ("reversed", 30_000_000)
    assert await billing.balance(accounts.STRIPE_CLEARING) == 0
    unknown = await billing.send_event("transfer.reversed", {**fully, "id": "tr_not_ours"})
    assert unknown["outcome"] == "unknown transfer"


async def test_payouts_page_newest_first(billing: Billing) -> None:
    host = await _host(billing)
    await billing.onboard(host)
    await billing.give_payable(host, 60_000_000)
    made = [await _pay_out(billing, host, amount_micros=10_000_000) for _ in range(3)]
    page = await billing.client.get(f"{PAYOUTS}?limit=2&offset=1", headers=host.headers)
    body = page.json()
    assert body["count"] == 3
    assert [p["id"] for p in body["data"]] == [made[1]["id"], made[0]["id"]]


async def test_a_reversal_reaches_a_payout_whose_transfer_answer_was_lost(
    billing: Billing,
) -> None:
    host = await _host(billing)
    await billing.onboard(host)
    await billing.give_payable(host, 20_000_000)
    billing.fake.drop_next("/v1/transfers", times=3, processed=True)
    pending = await _pay_out(billing, host)
    [transfer] = [o for o in billing.fake.objects.values() if o["object"] == "transfer"]

    reversed_ = billing.fake.reverse_transfer(transfer["id"], 2_000)
    ack = await billing.send_event("transfer.reversed", reversed_)
    assert ack["outcome"] == "restored $20.00 to host payable"
    assert await billing.payable(host) == 20_000_000
    [row] = (await billing.client.get(PAYOUTS, headers=host.headers)).json()["data"]
    assert (row["id"], row["state"]) == (pending["id"], "reversed")
    assert row["stripe_transfer_id"] == transfer["id"]
    # It is no longer pending, so the retry loop leaves it alone.
    assert await payouts.retry_pending_payouts(context=billing.context, min_age=timedelta()) == 0
    assert len(billing.fake.calls("POST", "/v1/transfers")) == 3


async def test_concurrent_payouts_cannot_spend_the_same_earnings(billing: Billing) -> None:
    host = await _host(billing)
    await billing.onboard(host)
    await billing.give_payable(host, 30_000_000)
    body = {"amount_micros": 20_000_000}
    responses = await asyncio.gather(
        *(billing.client.post(PAYOUTS, json=body, headers=host.headers) for _ in range(3))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201, 402, 402], [r.text for r in responses]
    assert await billing.payable(host) == 10_000_000
    assert len(billing.fake.calls("POST", "/v1/transfers")) == 1


async def test_hosts_over_the_threshold_are_paid_out_automatically(billing: Billing) -> None:
    rich, poor, unboarded = await _host(billing), await _host(billing), await _host(billing)
    for host in (rich, poor):
        await billing.onboard(host)
    await billing.give_payable(rich, 30_004_321)
    await billing.give_payable(poor, 5_000_000)
    await billing.give_payable(unboarded, 90_000_000)
    context = billing.context
    off = await payouts.pay_out_above_threshold(context=context)
    assert off == 0  # the threshold is 0: automatic payouts are off
    context.settings.payout_auto_threshold_micros = 20_000_000
    try:
        assert await payouts.pay_out_above_threshold(context=context) == 1
        assert await payouts.pay_out_above_threshold(context=context) == 0  # nothing left
    finally:
        context.settings.payout_auto_threshold_micros = 0
    assert await billing.payable(rich) == 4_321  # whole cents only
    assert await billing.payable(poor) == 5_000_000
    assert await billing.payable(unboarded) == 90_000_000
    [transfer] = billing.fake.calls("POST", "/v1/transfers")
    assert transfer.params["amount"] == "3000"
    listed = (await billing.client.get(PAYOUTS, headers=rich.headers)).json()
    assert [(p["state"], p["amount_micros"]) for p in listed["data"]] == [("paid", 30_000_000)]


async def test_a_refused_automatic_payout_is_not_asked_again_every_few_seconds(
    billing: Billing,
) -> None:
    host = await _host(billing)
    await billing.onboard(host)
    await billing.give_payable(host, 30_000_000)
    context = billing.context
    context.settings.payout_auto_threshold_micros = 20_000_000
    try:
        billing.fake.fail_next("/v1/transfers", message="Your platform balance is too low.")
        assert await payouts.pay_out_above_threshold(context=context) == 1
        assert await billing.payable(host) == 30_000_000  # booked back
        assert await payouts.pay_out_above_threshold(context=context) == 0
    finally:
        context.settings.payout_auto_threshold_micros = 0
    assert len(billing.fake.calls("POST", "/v1/transfers")) == 1
