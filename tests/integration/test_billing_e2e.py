"""Money end to end: a real server (scheduler and settlement loops), a real agent process, the
real Stripe SDK against the local fake Stripe, webhooks signed as Stripe signs them.

A renter with no credit is refused; buys $20 through Checkout (the webhook credits it once);
runs a job that is settled to the micro-dollar (charge = seconds x price, 10% to the platform,
90% to the host); the host onboards and is paid out by a Transfer; a job whose host dies costs
the renter nothing; an admin refunds the first job; a reversed transfer is payable again; and
every webhook, replayed twice more, changes nothing."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import update

from peergpu.config import ServerSettings
from peergpu.server.context import ServerContext
from peergpu.server.db.models import UserModel
from peergpu.server.services.billing import accounts, ledger
from tests.billing.stripe_fake import API_KEY, WEBHOOK_SECRET, FakeStripe
from tests.integration import harness
from tests.integration.harness import ThreadedServer, wait_for

pytestmark = pytest.mark.timeout(240)

PRICE_PER_GPU_HOUR = "360"  # $360/GPU-hour = $0.10 a second: every second is 10 cents
PER_SECOND = 100_000
FINAL = {"succeeded", "failed", "cancelled", "expired"}


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def server(settings: ServerSettings, fake_stripe: FakeStripe) -> Iterator[ThreadedServer]:
    configured = harness.e2e_settings(
        settings,
        scheduler_sweep_seconds=0.5,
        billing_settle_seconds=0.5,
        host_lost_grace_seconds=1.0,
        manifest_ack_timeout_seconds=10.0,
        signup_credit_micros=0,
        payout_min_micros=10_000,
        stripe_secret_key=SecretStr(API_KEY),
        stripe_webhook_secret=SecretStr(WEBHOOK_SECRET),
        stripe_api_base=fake_stripe.base_url,
        stripe_connect_base=fake_stripe.base_url,
    )
    running = ThreadedServer(configured).start()
    yield running
    running.stop()


class Webhooks:
    """Delivers signed events to the server and remembers them, to replay them all later."""

    def __init__(self, server: ThreadedServer, fake: FakeStripe) -> None:
        self.server = server
        self.fake = fake
        self.delivered: list[tuple[bytes, str]] = []

    def send(self, type: str, obj: dict[str, Any]) -> dict[str, Any]:
        payload, signature = self.fake.event(type, obj)
        self.delivered.append((payload, signature))
        first = self._post(payload, signature)
        assert first.status_code == 200, first.text
        assert first.json()["duplicate"] is False, first.json()
        again = self._post(payload, signature)  # Stripe delivers at least once
        assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
        return dict(first.json())

    def replay_all(self) -> None:
        for payload, _old in self.delivered:
            response = self._post(payload, self.fake.sign(payload))  # re-signed: not stale
            assert response.status_code == 200 and response.json()["duplicate"] is True

    def _post(self, payload: bytes, signature: str) -> httpx.Response:
        return httpx.post(
            f"{self.server.url}/api/v1/billing/stripe/webhook",
            content=payload,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
            timeout=10,
        )


def _balance(server: ThreadedServer, code: str) -> int:
    async def read(context: ServerContext) -> int:
        async with context.sessionmaker() as session:
            return (await ledger.balances(session, [code]))[code]

    return server.call(read)


def _make_admin(server: ThreadedServer) -> dict[str, str]:
    headers = harness.login(server, ["renter"], stem="admin")
    me = httpx.get(f"{server.url}/api/v1/users/me", headers=headers, timeout=10).json()

    async def promote(context: ServerContext) -> None:
        async with context.sessionmaker() as session:
            await session.execute(
                update(UserModel).where(UserModel.id == uuid.UUID(me["id"])).values(is_admin=True)
            )
            await session.commit()

    server.call(promote)
    return headers  # the role is read from the database on every request


def _seconds(job: dict[str, Any]) -> int:
    started = datetime.fromisoformat(job["started_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    return math.ceil((finished - started).total_seconds())


def test_top_up_run_settle_pay_out_refund_and_replay(
    server: ThreadedServer, fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    hooks = Webhooks(server, fake_stripe)
    renter = httpx.Client(
        base_url=server.url, headers=harness.login(server, ["renter"]), timeout=10
    )
    me = renter.get("/api/v1/users/me").json()
    wallet = accounts.user_wallet(uuid.UUID(me["id"]))
    available = accounts.available(wallet)
    job_body = {
        "command": ["python3", "-c", "import time; time.sleep(1.5); print('done')"],
        "max_duration_seconds": 120,
    }

    # No credit: refused at the door.
    refused = renter.post("/api/v1/jobs", json=job_body)
    assert refused.status_code == 402, refused.text

    # $20 through Checkout; the webhook credits it exactly once.
    checkout = renter.post("/api/v1/billing/checkout", json={"amount_micros": 20_000_000})
    assert checkout.status_code == 201, checkout.text
    paid = fake_stripe.pay_checkout(checkout.json()["id"])
    hooks.send("checkout.session.completed", paid)
    assert _balance(server, available) == 20_000_000

    # A host at $0.10 a second runs a job; it is settled to the micro-dollar.
    host_owner = harness.login(server, ["host"])
    host_me = httpx.get(f"{server.url}/api/v1/users/me", headers=host_owner, timeout=10).json()
    payable = accounts.host_payable(uuid.UUID(host_me["id"]))
    agent = harness.enroll_agent(
        server,
        host_owner,
        tmp_path / "host",
        simulate="RTX4090",
        name="billing-host",
        price_per_gpu_hour=PRICE_PER_GPU_HOUR,
    )
    try:
        job = renter.post("/api/v1/jobs", json=job_body).json()
        done = _wait_job(renter, job["id"], agent.log)
        assert done["state"] == "succeeded", (done, agent.log())
        receipt = _wait_settled(renter, job["id"], agent.log)
        seconds = _seconds(done)
        charged = seconds * PER_SECOND
        assert receipt["total_micros"] == charged
        assert receipt["charges"][0]["billed_seconds"] == seconds
        assert _balance(server, available) == 20_000_000 - charged
        assert _balance(server, payable) == charged * 9 // 10
        assert _balance(server, accounts.PLATFORM_FEES) == charged // 10

        # The host onboards to Stripe Connect and is paid out.
        onboarding = httpx.post(
            f"{server.url}/api/v1/host/payout-account", headers=host_owner, timeout=10
        )
        assert onboarding.status_code in (200, 201), onboarding.text
        account_id = onboarding.json()["stripe_account_id"]
        enabled = fake_stripe.update(
            account_id, details_submitted=True, payouts_enabled=True, charges_enabled=True
        )
        hooks.send("account.updated", enabled)
        payout = httpx.post(
            f"{server.url}/api/v1/host/payouts", json={}, headers=host_owner, timeout=10
        )
        assert payout.status_code == 201, payout.text
        assert payout.json()["state"] == "paid"
        assert payout.json()["amount_micros"] == charged * 9 // 10
        transfer_id = payout.json()["stripe_transfer_id"]
        transfer = fake_stripe.get(transfer_id)
        assert transfer["destination"] == account_id
        assert transfer["amount"] == charged * 9 // 10 // 10_000  # cents
        assert _balance(server, payable) == 0

        # A job whose host dies: the renter pays nothing for it.
        before = _balance(server, available)
        doomed = renter.post(
            "/api/v1/jobs",
            json={
                "command": ["python3", "-c", "import time\nwhile True: time.sleep(0.1)"],
                "max_duration_seconds": 60,
                "max_retries": 0,
            },
        ).json()
        wait_for(
            lambda: renter.get(f"/api/v1/jobs/{doomed['id']}").json()["state"] == "running",
            what="the second job running",
            context=agent.log,
        )
        agent.kill()
        lost = _wait_job(renter, doomed["id"], agent.log, timeout=60)
        assert (lost["state"], lost["failure_reason"]) == ("failed", "host_lost"), lost
        free = _wait_settled(renter, doomed["id"], agent.log)
        assert free["total_micros"] == 0 and free["held_micros"] == 0
        assert _balance(server, available) == before
    finally:
        agent.stop()

    # An admin refunds the first job: the charge comes back, split reversed.
    admin = _make_admin(server)
    refund = httpx.post(
        f"{server.url}/api/v1/admin/billing/refunds",
        json={"job_id": job["id"], "memo": "goodwill"},
        headers=admin,
        timeout=10,
    )
    assert refund.status_code == 201, refund.text
    assert _balance(server, available) == 20_000_000
    assert _balance(server, payable) == -(charged * 9 // 10)  # paid out already: owed back
    assert _balance(server, accounts.PLATFORM_FEES) == 0
    again = httpx.post(
        f"{server.url}/api/v1/admin/billing/refunds",
        json={"job_id": job["id"]},
        headers=admin,
        timeout=10,
    )
    assert again.status_code == 409

    # Stripe reverses the transfer: that amount is payable to the host again, once.
    reversed_transfer = fake_stripe.reverse_transfer(transfer_id, transfer["amount"])
    hooks.send("transfer.reversed", reversed_transfer)
    assert _balance(server, payable) == 0

    # Every webhook, delivered again: nothing changes.
    snapshot = {
        code: _balance(server, code)
        for code in (available, payable, accounts.PLATFORM_FEES, accounts.STRIPE_CLEARING)
    }
    hooks.replay_all()
    hooks.replay_all()
    assert {code: _balance(server, code) for code in snapshot} == snapshot
    check = httpx.get(
        f"{server.url}/api/v1/admin/billing/ledger-check", headers=admin, timeout=10
    ).json()
    assert check["ok"] is True, check


def _wait_job(
    renter: httpx.Client, job_id: str, context: Any, timeout: float = 60
) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (job := renter.get(f"/api/v1/jobs/{job_id}").json())["state"] in FINAL and job,
            timeout=timeout,
            what=f"job {job_id} to end",
            context=context,
        )
    )


def _wait_settled(renter: httpx.Client, job_id: str, context: Any) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (
                (r := renter.get(f"/api/v1/jobs/{job_id}/receipt").json())["settled"]
                and r["charges"]
                and r
            ),
            timeout=30,
            what=f"job {job_id} settled",
            context=context,
        )
    )
