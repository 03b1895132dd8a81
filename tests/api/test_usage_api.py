"""The usage API: a wallet's inference requests (newest first, filtered, paged), totals by
key, model and day, organization keys seeing only their organization, bad parameters as
4xx, and inference earnings in the host's earnings."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from peergpu.config import ServerSettings
from peergpu.server.app import create_app
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.services.billing import accounts
from peergpu.server.services.billing.inference import UsageRecord, bill_usage
from tests.factories import ApiUser, assert_error, bearer, make_org, make_user
from tests.unit.scheduling import make_host

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def app(settings: ServerSettings) -> AsyncIterator[FastAPI]:
    """No background loops: the tests bill by hand (the usage writer still runs)."""
    application = create_app(settings.model_copy(update={"scheduler_enabled": False}))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def context(app: FastAPI) -> ServerContext:
    found: ServerContext = app.state.context
    return found


async def _key(client: httpx.AsyncClient, user: ApiUser, name: str, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/v1/keys", json={"name": name, **body}, headers=user.headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def _record(context: ServerContext, *records: UsageRecord) -> None:
    for record in records:
        context.usage.record(record)
    await context.usage.flush()


def _usage(
    user: ApiUser,
    host: uuid.UUID,
    *,
    key: dict[str, Any] | None = None,
    org: dict[str, Any] | None = None,
    model: str = "acme/chat",
    prompt: int = 1000,
    completion: int = 100,
    at: datetime | None = None,
) -> UsageRecord:
    return UsageRecord(
        request_id=uuid.uuid4(),
        api_key_id=uuid.UUID(key["id"]) if key else None,
        user_id=uuid.UUID(user.id),
        organization_id=uuid.UUID(org["id"]) if org else None,
        host_id=host,
        model=model,
        endpoint="embeddings" if "embed" in model else "chat.completions",
        prompt_tokens=prompt,
        completion_tokens=completion,
        input_price_per_million_micros=1_000_000,
        output_price_per_million_micros=2_000_000,
        latency_ms=80,
        first_token_ms=None,
        outcome="ok",
        created_at=at or utcnow(),
    )


async def _host(client: httpx.AsyncClient, context: ServerContext) -> tuple[ApiUser, uuid.UUID]:
    owner = await make_user(client, roles=["host"])
    host = await make_host(context, uuid.UUID(owner.id), price=1_000_000, gpus=[("L4", 24000)])
    return owner, host


async def test_a_wallet_lists_its_requests_newest_first_with_filters_and_pages(
    client: httpx.AsyncClient, context: ServerContext
) -> None:
    renter = await make_user(client)
    _, host = await _host(client, context)
    ci = await _key(client, renter, "ci")
    now = utcnow()
    await _record(
        context,
        _usage(renter, host, key=ci, at=now - timedelta(hours=3)),
        _usage(renter, host, key=ci, model="acme/embed", completion=0, at=now - timedelta(hours=2)),
        _usage(renter, host, at=now - timedelta(hours=1)),
    )
    listed = await client.get("/api/v1/usage", headers=renter.headers)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["count"] == 3
    first = body["data"][0]
    assert (first["model"], first["api_key_id"], first["billed_at"]) == ("acme/chat", None, None)
    assert (first["prompt_tokens"], first["completion_tokens"]) == (1000, 100)
    assert (first["cost_micros"], first["cost_usd"]) == (1200, "$0.0012")
    times = [row["created_at"] for row in body["data"]]
    assert times == sorted(times, reverse=True)

    async def count(**params: Any) -> int:
        response = await client.get("/api/v1/usage", params=params, headers=renter.headers)
        assert response.status_code == 200, response.text
        return int(response.json()["count"])

    assert await count(api_key_id=ci["id"]) == 2
    assert await count(model="acme/embed") == 1
    assert await count(since=(now - timedelta(minutes=150)).isoformat()) == 2
    assert await count(until=(now - timedelta(minutes=150)).replace(tzinfo=None).isoformat()) == 1
    paged = await client.get(
        "/api/v1/usage", params={"limit": 1, "offset": 1}, headers=renter.headers
    )
    assert [r["model"] for r in paged.json()["data"]] == ["acme/embed"]
    assert paged.json()["count"] == 3

    assert await bill_usage(context) == 3
    billed = (await client.get("/api/v1/usage", headers=renter.headers)).json()
    assert all(row["billed_at"] for row in billed["data"])
    transactions = await client.get(
        "/api/v1/billing/transactions", params={"kind": "inference"}, headers=renter.headers
    )
    [charge] = transactions.json()["data"]
    assert charge["available_change_micros"] == -(1200 + 1000 + 1200)
    assert "3 requests" in charge["memo"]


async def test_the_summary_groups_by_key_model_and_day(
    client: httpx.AsyncClient, context: ServerContext
) -> None:
    renter = await make_user(client)
    _, host = await _host(client, context)
    ci = await _key(client, renter, "ci")
    yesterday = utcnow() - timedelta(days=1)
    await _record(
        context,
        _usage(renter, host, key=ci),
        _usage(renter, host, key=ci, model="acme/embed", completion=0),
        _usage(renter, host, at=yesterday),
        _usage(renter, host, at=utcnow() - timedelta(days=40)),  # outside the default window
    )

    async def summary(group_by: str, **params: Any) -> dict[str, Any]:
        response = await client.get(
            "/api/v1/usage/summary",
            params={"group_by": group_by, **params},
            headers=renter.headers,
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    by_key = await summary("key")
    assert by_key["total"] == {
        "requests": 3,
        "prompt_tokens": 3000,
        "completion_tokens": 200,
        "cost_micros": 3400,
        "cost_usd": "$0.0034",
    }
    assert [(g["key"], g["name"], g["requests"]) for g in by_key["groups"]] == [
        (ci["id"], "ci", 2),
        (None, None, 1),
    ]
    by_model = await summary("model")
    assert [(g["key"], g["requests"], g["cost_micros"]) for g in by_model["groups"]] == [
        ("acme/chat", 2, 2400),
        ("acme/embed", 1, 1000),
    ]
    by_day = await summary("day")
    assert [(g["key"], g["requests"]) for g in by_day["groups"]] == [
        (utcnow().date().isoformat(), 2),
        (yesterday.date().isoformat(), 1),
    ]
    everything = await summary("model", since=(utcnow() - timedelta(days=60)).isoformat())
    assert everything["total"]["requests"] == 4
    only_ci = await summary("model", api_key_id=ci["id"])
    assert only_ci["total"]["requests"] == 2


async def test_an_org_key_sees_only_its_organization(
    client: httpx.AsyncClient, context: ServerContext
) -> None:
    alice = await make_user(client)
    mallory = await make_user(client)
    _, host = await _host(client, context)
    org = await make_org(client, alice)
    org_key = await _key(client, alice, "org", organization_id=org["id"])
    personal = await _key(client, alice, "mine")
    await _record(
        context,
        _usage(alice, host, key=org_key, org=org),
        _usage(alice, host, key=personal),
        _usage(alice, host, key=personal),
        _usage(mallory, host),
    )
    as_org_key = await client.get("/api/v1/usage", headers=bearer(org_key["key"]))
    assert as_org_key.status_code == 200, as_org_key.text
    assert [row["api_key_id"] for row in as_org_key.json()["data"]] == [org_key["id"]]
    summary = await client.get("/api/v1/usage/summary", headers=bearer(org_key["key"]))
    assert summary.json()["wallet"] == accounts.org_wallet(uuid.UUID(org["id"]))
    assert summary.json()["total"]["requests"] == 1
    mine = await client.get("/api/v1/usage", headers=alice.headers)
    assert mine.json()["count"] == 2
    as_member = await client.get(
        "/api/v1/usage", params={"org_id": org["id"]}, headers=alice.headers
    )
    assert as_member.json()["count"] == 1
    assert (await client.get("/api/v1/usage", headers=mallory.headers)).json()["count"] == 1
    for path in ("/api/v1/usage", "/api/v1/usage/summary"):
        assert_error(
            await client.get(path, params={"org_id": org["id"]}, headers=mallory.headers), 404
        )
    # An organization key cannot read its owner's personal wallet either.
    other_org = await make_org(client, alice, name="Other")
    assert_error(
        await client.get(
            "/api/v1/usage", params={"org_id": other_org["id"]}, headers=bearer(org_key["key"])
        ),
        404,
    )


@pytest.mark.parametrize(
    "params",
    [
        {"group_by": "week"},
        {"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"},
        {"since": "not a time"},
        {"since": "9999-12-31T23:59:59-23:00"},  # leaves the calendar in UTC
        {"api_key_id": "not-a-uuid"},
        {"model": "m" * 129},
        {"model": ""},
    ],
)
async def test_bad_parameters_are_422(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    renter = await make_user(client)
    for path in ("/api/v1/usage", "/api/v1/usage/summary"):
        if "group_by" in params and path == "/api/v1/usage":
            continue
        assert_error(await client.get(path, params=params, headers=renter.headers), 422)
    for bad_page in ({"limit": 0}, {"limit": 501}, {"offset": -1}):
        assert_error(
            await client.get("/api/v1/usage", params=bad_page, headers=renter.headers), 422
        )
    assert_error(await client.get("/api/v1/usage"), 401)


async def test_inference_earnings_show_in_the_host_earnings(
    client: httpx.AsyncClient, context: ServerContext
) -> None:
    renter = await make_user(client)
    owner, host = await _host(client, context)
    await _record(context, *(_usage(renter, host) for _ in range(5)))  # 6,000 in all
    assert await bill_usage(context) == 5
    earnings = await client.get("/api/v1/host/earnings", headers=owner.headers)
    assert earnings.status_code == 200, earnings.text
    body = earnings.json()
    assert body["payable_micros"] == 5400
    [today] = body["days"]
    assert (today["day"], today["jobs"], today["earned_micros"]) == (
        datetime.now(UTC).date().isoformat(),
        0,
        5400,
    )
