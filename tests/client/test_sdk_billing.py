"""The SDK's billing methods against a real server (uvicorn in a thread) on both backends:
balances, estimates, the cost cap, receipts, transactions, earnings, settings, the admins'
grants, refunds and ledger check, and the Stripe-backed top-ups and payouts (with Stripe not
configured, and with the loopback fake)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from peergpu.client import PeerGPU, PeerGPUError
from peergpu.client.billing import UNSET
from peergpu.config import ServerSettings
from tests.billing.stripe_fake import FakeStripe
from tests.client.billing_support import (
    PRICE,
    SIGNUP,
    add_host,
    enable_payouts,
    give_payable,
    make_admin,
    run_and_settle,
    schedule,
    spend_everything,
    stripe_server,
)
from tests.client.conftest import Account, needs_jobs_api, register
from tests.integration.harness import ThreadedServer

pytestmark = [needs_jobs_api, pytest.mark.timeout(90)]


@pytest.fixture
def gpu(server: ThreadedServer, account: Account) -> Iterator[PeerGPU]:
    with PeerGPU(server.url) as client:
        client.login(account.email, account.password)
        yield client


def connect(server: ThreadedServer, account: Account) -> PeerGPU:
    client = PeerGPU(server.url)
    client.login(account.email, account.password)
    return client


def test_a_job_from_estimate_to_receipt(server: ThreadedServer, gpu: PeerGPU) -> None:
    owner = register(server, roles=["host"])
    host_id = add_host(server, owner)
    balance = gpu.balance()
    assert balance.available_micros == SIGNUP and balance.held_micros == 0
    assert balance.available_usd == "$1,000.00" and balance.wallet.startswith("user:")

    estimate = gpu.estimate_job(["true"], gpu_count=1, max_duration_seconds=1800)
    assert estimate.price_per_gpu_hour_micros == PRICE and estimate.cost_per_hour_micros == PRICE
    assert (estimate.eligible_hosts, estimate.free_hosts) == (1, 1)
    assert estimate.hold_micros == 1_800_000 and estimate.hold_usd == "$1.80"
    assert estimate.run_seconds == 1800 and estimate.enough_credit is True
    capped = gpu.estimate_job(["true"], max_cost_micros=20_000)
    assert (capped.run_seconds, capped.hold_micros) == (20, 20_000)
    assert gpu.list_jobs().total == 0  # estimates queue nothing

    job = gpu.submit_job(["true"], max_duration_seconds=100, max_cost_micros=500_000)
    assert job.max_cost_micros == 500_000
    schedule(server, job.id)
    held = gpu.receipt(job.id)
    assert held.held_micros == 100_000 and held.settled is False
    assert gpu.balance().held_micros == 100_000

    run_and_settle(server, job.id, seconds=42)
    receipt = gpu.receipt(job.id)
    assert receipt.settled is True and receipt.state == "succeeded"
    assert (receipt.total_micros, receipt.total_usd) == (42_000, "$0.042")
    [charge] = receipt.charges
    assert charge.host_id == str(host_id) and charge.billed_seconds == 42
    assert charge.charged_micros == 42_000 and charge.settled_at is not None

    lines = gpu.transactions(job_id=job.id)
    assert lines.total == 2
    assert [(t.kind, t.available_change_micros, t.held_change_micros) for t in lines.items] == [
        ("settle", 100_000 - 42_000, -100_000),
        ("hold", -100_000, 100_000),
    ]
    assert [t.kind for t in gpu.transactions(kind="grant").items] == ["grant"]
    assert gpu.transactions(limit=1, offset=1).items[0].kind == "hold"
    oldest = gpu.transactions(kind="grant").items[0].at
    assert oldest is not None and gpu.transactions(since=oldest).total == 3

    with connect(server, owner) as host_owner:
        earned = host_owner.earnings(days=7)
        assert earned.payable_micros == 37_800 and earned.paid_out_micros == 0
        [day] = earned.days
        assert (day.jobs, day.gpu_seconds, day.earned_micros) == (1, 42, 37_800)
        with pytest.raises(PeerGPUError) as hidden:
            host_owner.receipt(job.id)
    assert hidden.value.status == 404


def test_settings_keep_what_is_left_out_and_clear_none(gpu: PeerGPU) -> None:
    capped = gpu.update_billing_settings(monthly_cap_micros=50_000_000)
    assert capped.monthly_cap_micros == 50_000_000 and capped.monthly_cap_left_micros == 50_000_000
    topped = gpu.update_billing_settings(
        auto_topup_below_micros=10_000_000, auto_topup_amount_micros=25_000_000
    )
    assert topped.monthly_cap_micros == 50_000_000  # left out: kept
    assert (topped.auto_topup_below_micros, topped.auto_topup_amount_micros) == (
        10_000_000,
        25_000_000,
    )
    uncapped = gpu.update_billing_settings(monthly_cap_micros=None)
    assert uncapped.monthly_cap_micros is None and uncapped.auto_topup_amount_micros == 25_000_000
    off = gpu.update_billing_settings(auto_topup_below_micros=None, auto_topup_amount_micros=None)
    assert off.auto_topup_below_micros is None and off.auto_topup_amount_micros is None
    assert gpu.update_billing_settings(monthly_cap_micros=UNSET) == gpu.balance()
    with pytest.raises(PeerGPUError) as half:
        gpu.update_billing_settings(auto_topup_below_micros=1_000_000)
    assert half.value.status == 422


def test_no_credit_is_a_402_and_an_estimate_says_so(
    server: ThreadedServer, account: Account, gpu: PeerGPU
) -> None:
    add_host(server, register(server, roles=["host"]))
    spend_everything(server, account)
    estimate = gpu.estimate_job(["true"], max_duration_seconds=60)
    assert estimate.enough_credit is False and estimate.available_micros == 0
    assert "Top up" in estimate.message
    with pytest.raises(PeerGPUError) as refused:
        gpu.submit_job(["true"])
    assert (refused.value.status, refused.value.code) == (402, "insufficient_credit")
    assert "peergpu billing topup" in refused.value.message


def test_payments_need_stripe(gpu: PeerGPU) -> None:
    for call in (
        lambda: gpu.checkout(25_000_000),
        gpu.start_payout_onboarding,
        lambda: gpu.request_payout(10_000_000),
    ):
        with pytest.raises(PeerGPUError) as raised:
            call()
        assert (raised.value.status, raised.value.code) == (503, "payments_not_configured")
    account = gpu.payout_account()
    assert account.onboarded is False and account.stripe_account_id is None
    assert account.payable_micros == 0 and account.payout_min_micros > 0
    assert gpu.payouts().items == [] and gpu.payouts().total == 0


def test_admin_grants_refunds_and_the_ledger_check(
    server: ThreadedServer, account: Account, gpu: PeerGPU
) -> None:
    admin_account = register(server, roles=["renter"])
    with pytest.raises(PeerGPUError) as refused:
        gpu.admin_grant(1_000_000, email=admin_account.email)
    assert refused.value.status == 403
    make_admin(server, admin_account)
    with connect(server, admin_account) as admin:
        first = admin.admin_grant(
            5_000_000, email=account.email, memo="welcome", idempotency_key="g1"
        )
        again = admin.admin_grant(5_000_000, email=account.email, idempotency_key="g1")
        assert len(first.transaction_ids) == 1 and first.amount_usd == "$5.00"
        assert again.transaction_ids == [] and again.wallet == first.wallet
        assert gpu.balance().available_micros == SIGNUP + 5_000_000  # booked once
        by_id = admin.admin_grant(1_000_000, user_id=account.id)
        assert by_id.wallet == first.wallet

        add_host(server, register(server, roles=["host"]))
        job = gpu.submit_job(["true"], max_duration_seconds=100)
        run_and_settle(server, job.id, seconds=10)
        refunded = admin.admin_refund(job.id, memo="host was slow")
        assert refunded.amount_micros == 10_000 and len(refunded.transaction_ids) == 1
        with pytest.raises(PeerGPUError) as twice:
            admin.admin_refund(job.id)
        assert twice.value.status == 409
        check = admin.ledger_check()
        assert check.ok is True and check.total_micros == 0 and check.transactions > 0
    receipt = gpu.receipt(job.id)
    assert receipt.refunded_micros == 10_000 and receipt.total_micros == 0


@pytest.fixture
def stripe(settings: ServerSettings) -> Iterator[tuple[ThreadedServer, FakeStripe]]:
    with stripe_server(settings) as running:
        yield running


def test_checkout_onboarding_and_payouts_with_stripe(
    stripe: tuple[ThreadedServer, FakeStripe],
) -> None:
    server, fake = stripe
    owner = register(server)
    with connect(server, owner) as gpu:
        checkout = gpu.checkout(25_000_000, idempotency_key="buy-1")
        assert checkout.url.startswith("https://checkout.stripe.com/")
        assert (checkout.amount_micros, checkout.amount_usd) == (25_000_000, "$25.00")
        assert gpu.checkout(25_000_000, idempotency_key="buy-1").id == checkout.id
        assert gpu.checkout(25_000_000).id != checkout.id

        link = gpu.start_payout_onboarding()
        assert link.url.startswith("https://connect.stripe.com/")
        assert gpu.start_payout_onboarding().stripe_account_id == link.stripe_account_id
        enable_payouts(server, fake, link.stripe_account_id)
        give_payable(server, owner, 30_000_000)
        account = gpu.payout_account()
        assert account.payouts_enabled and account.payable_micros == 30_000_000

        with pytest.raises(PeerGPUError) as too_much:
            gpu.request_payout(31_000_000)
        assert (too_much.value.status, too_much.value.code) == (402, "insufficient_payable")
        paid = gpu.request_payout(20_000_000)
        assert (paid.state, paid.amount_micros) == ("paid", 20_000_000)
        assert paid.stripe_transfer_id and paid.stripe_transfer_id.startswith("tr_")
        rest = gpu.request_payout()
        assert (rest.state, rest.amount_micros) == ("paid", 10_000_000)
        page = gpu.payouts()
        assert page.total == 2 and [p.id for p in page.items] == [rest.id, paid.id]
        assert gpu.earnings().paid_out_micros == 30_000_000
