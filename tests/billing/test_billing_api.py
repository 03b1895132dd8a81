"""The billing API: balances, transactions, estimates, the credit check at submit, receipts,
earnings, wallet settings and the admin's grants, refunds and ledger check."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.job_models import JobModel
from peergpu.server.db.models import UserModel
from peergpu.server.services import scheduler
from peergpu.server.services.billing import accounts, ledger, settlement
from tests.factories import PASSWORD, ApiUser, assert_error, make_org, make_user
from tests.unit.scheduling import make_host

pytestmark = pytest.mark.timeout(60)
SIGNUP = 1_000_000_000  # what tests/conftest.py gives every new account
PRICE = 3_600_000


async def _admin(client: httpx.AsyncClient, context: ServerContext) -> ApiUser:
    user = await make_user(client)
    async with context.sessionmaker() as session:
        await session.execute(
            update(UserModel).where(UserModel.id == uuid.UUID(user.id)).values(is_admin=True)
        )
        await session.commit()
    tokens = (
        await client.post("/api/v1/auth/login", json={"email": user.email, "password": PASSWORD})
    ).json()
    user.access_token = tokens["access_token"]
    return user


async def _spend_everything(context: ServerContext, user: ApiUser) -> None:
    wallet = accounts.user_wallet(uuid.UUID(user.id))
    async with context.sessionmaker() as session:
        await ledger.post(
            session,
            ledger.transfer(
                f"t:drain:{user.id}",
                "grant",
                source=accounts.available(wallet),
                target=accounts.PROMOTIONS,
                amount=SIGNUP,
            ),
        )
        await session.commit()


async def _receipt_when(
    client: httpx.AsyncClient,
    user: ApiUser,
    job_id: str,
    context: ServerContext,
    ready: Callable[[dict[str, Any]], Any],
) -> dict[str, Any]:
    """The job's receipt once ``ready`` holds. The app's own scheduler and settlement loops
    run beside the test and may hold the rows for a moment (PostgreSQL's SKIP LOCKED), so the
    test runs passes itself until the receipt shows the result."""
    for _ in range(100):
        await scheduler.schedule_once(context)
        await settlement.settle_open(context)
        response = await client.get(f"/api/v1/jobs/{job_id}/receipt", headers=user.headers)
        receipt = dict(response.json())
        if ready(receipt):
            return receipt
        await asyncio.sleep(0.05)
    raise AssertionError(f"the receipt never got there: {receipt}")


async def test_balance_and_transactions_start_with_the_sign_up_credit(
    client: httpx.AsyncClient,
) -> None:
    renter = await make_user(client)
    balance = (await client.get("/api/v1/billing/balance", headers=renter.headers)).json()
    assert balance["available_micros"] == SIGNUP and balance["held_micros"] == 0
    assert balance["available_usd"] == "$1,000.00"
    listed = (await client.get("/api/v1/billing/transactions", headers=renter.headers)).json()
    assert listed["count"] == 1
    assert listed["data"][0]["kind"] == "grant"
    assert listed["data"][0]["available_change_micros"] == SIGNUP
    none = await client.get("/api/v1/billing/transactions?kind=topup", headers=renter.headers)
    assert none.json() == {"data": [], "count": 0}
    naive = await client.get(  # no offset: read as UTC, not a 500
        "/api/v1/billing/transactions?since=2024-01-01T00:00:00", headers=renter.headers
    )
    assert naive.status_code == 200 and naive.json()["count"] == 1


async def test_submit_without_credit_is_402(client: httpx.AsyncClient, app: Any) -> None:
    renter = await make_user(client)
    await _spend_everything(app.state.context, renter)
    response = await client.post("/api/v1/jobs", json={"command": ["true"]}, headers=renter.headers)
    error = assert_error(response, 402, "insufficient_credit")
    assert "peergpu billing topup" in error["message"]


async def test_an_estimate_prices_the_cheapest_eligible_host(
    client: httpx.AsyncClient, app: Any
) -> None:
    context: ServerContext = app.state.context
    renter = await make_user(client)
    owner = await make_user(client, roles=["host"])
    await make_host(context, uuid.UUID(owner.id), price=PRICE, gpus=[("A100", 40960)] * 2)
    await make_host(context, uuid.UUID(owner.id), price=PRICE // 2, gpus=[("T4", 16000)])
    body = {"command": ["true"], "gpu_count": 2, "max_duration_seconds": 1800}
    found = (await client.post("/api/v1/jobs/estimate", json=body, headers=renter.headers)).json()
    assert found["price_per_gpu_hour_micros"] == PRICE
    assert found["eligible_hosts"] == 1 and found["free_hosts"] == 1
    assert found["hold_micros"] == 2 * 1800 * 1_000 and found["hold_usd"] == "$3.60"
    assert found["enough_credit"] is True
    one = {"command": ["true"], "max_cost_micros": 10_000}
    cheap = (await client.post("/api/v1/jobs/estimate", json=one, headers=renter.headers)).json()
    assert cheap["price_per_gpu_hour_micros"] == PRICE // 2
    assert cheap["run_seconds"] == 20 and cheap["hold_micros"] == 10_000
    nobody = {"command": ["true"], "gpu_models": ["H200"]}
    empty = (await client.post("/api/v1/jobs/estimate", json=nobody, headers=renter.headers)).json()
    assert empty["eligible_hosts"] == 0 and empty["hold_micros"] is None
    bad = await client.post("/api/v1/jobs/estimate", json={"command": []}, headers=renter.headers)
    assert_error(bad, 422)


async def test_receipt_transactions_and_earnings_after_a_job(
    client: httpx.AsyncClient, app: Any
) -> None:
    context: ServerContext = app.state.context
    renter = await make_user(client)
    owner = await make_user(client, roles=["host"])
    await make_host(context, uuid.UUID(owner.id), price=PRICE, gpus=[("A100", 40960)])
    submitted = await client.post(
        "/api/v1/jobs",
        json={"command": ["true"], "max_duration_seconds": 100},
        headers=renter.headers,
    )
    job_id = submitted.json()["id"]
    held = await _receipt_when(client, renter, job_id, context, lambda r: r["charges"])
    assert held["held_micros"] == 100_000 and held["settled"] is False
    now = utcnow()
    async with context.sessionmaker() as session:
        await session.execute(
            update(JobModel)
            .where(JobModel.id == uuid.UUID(job_id))
            .values(state="succeeded", started_at=now - timedelta(seconds=42), finished_at=now)
        )
        await session.commit()
    receipt = await _receipt_when(client, renter, job_id, context, lambda r: r["settled"])
    assert receipt["settled"] is True and receipt["held_micros"] == 0
    assert receipt["total_micros"] == 42_000 and receipt["total_usd"] == "$0.042"
    assert receipt["charges"][0]["billed_seconds"] == 42
    lines = (
        await client.get(f"/api/v1/billing/transactions?job_id={job_id}", headers=renter.headers)
    ).json()
    assert [(t["kind"], t["available_change_micros"]) for t in lines["data"]] == [
        ("settle", 100_000 - 42_000),
        ("hold", -100_000),
    ]
    earned = (await client.get("/api/v1/host/earnings", headers=owner.headers)).json()
    assert earned["payable_micros"] == 42_000 - 4_200
    assert earned["days"][0]["earned_micros"] == 37_800 and earned["days"][0]["jobs"] == 1
    assert earned["days"][0]["gpu_seconds"] == 42
    stranger = await make_user(client)
    hidden = await client.get(f"/api/v1/jobs/{job_id}/receipt", headers=stranger.headers)
    assert_error(hidden, 404)


async def test_settings_and_org_wallets(client: httpx.AsyncClient) -> None:
    owner = await make_user(client)
    capped = await client.put(
        "/api/v1/billing/settings", json={"monthly_cap_micros": 5_000_000}, headers=owner.headers
    )
    assert capped.status_code == 200, capped.text
    assert capped.json()["monthly_cap_micros"] == 5_000_000
    assert capped.json()["monthly_cap_left_micros"] == 5_000_000
    half = await client.put(
        "/api/v1/billing/settings", json={"auto_topup_below_micros": 1}, headers=owner.headers
    )
    assert_error(half, 422)
    cleared = await client.put(
        "/api/v1/billing/settings", json={"monthly_cap_micros": None}, headers=owner.headers
    )
    assert cleared.json()["monthly_cap_micros"] is None
    org = await make_org(client, owner)
    member = await make_user(client)
    invited = await client.post(
        f"/api/v1/orgs/{org['id']}/invites",
        json={"email": member.email, "role": "member"},
        headers=owner.headers,
    )
    token = invited.json()["accept_url"].split("token=")[1]
    accepted = await client.post(
        "/api/v1/invites/accept", json={"token": token}, headers=member.headers
    )
    assert accepted.status_code == 200, accepted.text
    seen = await client.get(f"/api/v1/billing/balance?org_id={org['id']}", headers=member.headers)
    assert seen.status_code == 200 and seen.json()["available_micros"] == 0
    denied = await client.put(
        "/api/v1/billing/settings",
        json={"org_id": org["id"], "monthly_cap_micros": 1},
        headers=member.headers,
    )
    assert_error(denied, 403)
    outsider = await make_user(client)
    hidden = await client.get(
        f"/api/v1/billing/balance?org_id={org['id']}", headers=outsider.headers
    )
    assert_error(hidden, 404)


async def test_admin_grants_refunds_and_checks_the_ledger(
    client: httpx.AsyncClient, app: Any
) -> None:
    context: ServerContext = app.state.context
    admin = await _admin(client, context)
    renter = await make_user(client)
    body = {"email": renter.email, "amount_micros": 5_000_000, "memo": "welcome"}
    refused = await client.post("/api/v1/admin/billing/grants", json=body, headers=renter.headers)
    assert_error(refused, 403)
    key = {"Idempotency-Key": "grant-1"}
    for _ in range(2):  # a retried grant is booked once
        granted = await client.post(
            "/api/v1/admin/billing/grants", json=body, headers={**admin.headers, **key}
        )
        assert granted.status_code == 201, granted.text
    balance = (await client.get("/api/v1/billing/balance", headers=renter.headers)).json()
    assert balance["available_micros"] == SIGNUP + 5_000_000
    long_key = {"Idempotency-Key": "k" * 200}
    granted = await client.post(
        "/api/v1/admin/billing/grants", json=body, headers={**admin.headers, **long_key}
    )
    assert granted.status_code == 201, granted.text
    missing = await client.post(
        "/api/v1/admin/billing/grants",
        json={"email": "nobody@example.com", "amount_micros": 1},
        headers=admin.headers,
    )
    assert_error(missing, 404)
    nothing = await client.post(
        "/api/v1/admin/billing/refunds", json={"job_id": str(uuid.uuid4())}, headers=admin.headers
    )
    assert_error(nothing, 404)
    check = (await client.get("/api/v1/admin/billing/ledger-check", headers=admin.headers)).json()
    assert check["ok"] is True and check["total_micros"] == 0
