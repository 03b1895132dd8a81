from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from tests.factories import assert_error, bearer, make_org, make_user


async def test_key_is_shown_once_and_stored_hashed(client: httpx.AsyncClient, session) -> None:
    from sqlalchemy import select

    from peergpu.server.db.models import ApiKeyModel

    user = await make_user(client)
    created = (
        await client.post("/api/v1/keys", json={"name": "laptop"}, headers=user.headers)
    ).json()
    listed = (await client.get("/api/v1/keys", headers=user.headers)).json()
    assert listed["count"] == 1
    assert "key" not in listed["data"][0]
    assert listed["data"][0]["prefix"] == created["prefix"]
    assert created["key"].startswith(f"pgk_{created['prefix']}_")
    stored = (await session.scalars(select(ApiKeyModel))).one()
    assert created["key"] not in (stored.secret_hash, stored.prefix)
    assert len(stored.secret_hash) == 64


async def test_a_revoked_key_stops_submitting_jobs_at_once(client: httpx.AsyncClient) -> None:
    # POST /jobs remembers the callers it checked for a few seconds (services.callers); a
    # revocation on this replica must not wait for that.
    user = await make_user(client)
    key = (await client.post("/api/v1/keys", json={"name": "k"}, headers=user.headers)).json()
    job = {"command": ["true"]}
    first = await client.post("/api/v1/jobs", json=job, headers=bearer(key["key"]))
    assert first.status_code == 201, first.text
    again = await client.post("/api/v1/jobs", json=job, headers=bearer(key["key"]))
    assert again.status_code == 201, again.text  # from the cache
    assert (
        await client.delete(f"/api/v1/keys/{key['id']}", headers=user.headers)
    ).status_code == 204
    assert_error(
        await client.post("/api/v1/jobs", json=job, headers=bearer(key["key"])),
        401,
        "api_key_revoked",
    )
    assert_error(
        await client.post("/api/v1/jobs", json=job, headers=bearer(key["key"][:-2] + "xx")),
        401,
        "invalid_api_key",
    )
    read_only = (
        await client.post(
            "/api/v1/keys", json={"name": "r", "scopes": ["read"]}, headers=user.headers
        )
    ).json()
    assert_error(
        await client.post("/api/v1/jobs", json=job, headers=bearer(read_only["key"])),
        403,
        "insufficient_scope",
    )


async def test_revoked_and_expired_keys_stop_working(client: httpx.AsyncClient, session) -> None:
    from sqlalchemy import update

    from peergpu.server.db.models import ApiKeyModel

    user = await make_user(client)
    key = (await client.post("/api/v1/keys", json={"name": "k"}, headers=user.headers)).json()
    assert (await client.get("/api/v1/users/me", headers=bearer(key["key"]))).status_code == 200
    assert (
        await client.delete(f"/api/v1/keys/{key['id']}", headers=user.headers)
    ).status_code == 204
    assert (
        await client.delete(f"/api/v1/keys/{key['id']}", headers=user.headers)
    ).status_code == 204
    assert_error(
        await client.get("/api/v1/users/me", headers=bearer(key["key"])), 401, "api_key_revoked"
    )

    soon = datetime.now(UTC) + timedelta(hours=1)
    expiring = (
        await client.post(
            "/api/v1/keys", json={"name": "e", "expires_at": soon.isoformat()}, headers=user.headers
        )
    ).json()
    assert (
        await client.get("/api/v1/users/me", headers=bearer(expiring["key"]))
    ).status_code == 200
    await session.execute(
        update(ApiKeyModel)
        .where(ApiKeyModel.prefix == expiring["prefix"])
        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    )
    await session.commit()
    assert_error(
        await client.get("/api/v1/users/me", headers=bearer(expiring["key"])),
        401,
        "api_key_expired",
    )


async def test_expiry_must_be_in_the_future(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert_error(
        await client.post(
            "/api/v1/keys", json={"name": "p", "expires_at": past}, headers=user.headers
        ),
        422,
        "invalid_input",
    )


async def test_tampered_key_is_refused(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    key = (await client.post("/api/v1/keys", json={"name": "k"}, headers=user.headers)).json()[
        "key"
    ]
    tampered = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
    assert_error(
        await client.get("/api/v1/users/me", headers=bearer(tampered)), 401, "invalid_api_key"
    )


async def test_scopes_are_enforced(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    read_only = (
        await client.post(
            "/api/v1/keys", json={"name": "ro", "scopes": ["read"]}, headers=user.headers
        )
    ).json()["key"]
    inference = (
        await client.post(
            "/api/v1/keys", json={"name": "inf", "scopes": ["inference"]}, headers=user.headers
        )
    ).json()["key"]
    assert (await client.get("/api/v1/users/me", headers=bearer(read_only))).status_code == 200
    assert_error(
        await client.patch(
            "/api/v1/users/me", json={"display_name": "x"}, headers=bearer(read_only)
        ),
        403,
        "insufficient_scope",
    )
    assert_error(
        await client.get("/api/v1/users/me", headers=bearer(inference)), 403, "insufficient_scope"
    )
    # A key cannot mint a key with more power than it has.
    writer = (
        await client.post(
            "/api/v1/keys", json={"name": "w", "scopes": ["read", "write"]}, headers=user.headers
        )
    ).json()["key"]
    assert_error(
        await client.post(
            "/api/v1/keys", json={"name": "x", "scopes": ["inference"]}, headers=bearer(writer)
        ),
        403,
    )
    assert (
        await client.post(
            "/api/v1/keys", json={"name": "y", "scopes": ["read"]}, headers=bearer(writer)
        )
    ).status_code == 201
    assert_error(
        await client.post(
            "/api/v1/keys", json={"name": "adm", "scopes": ["admin"]}, headers=user.headers
        ),
        403,
    )


async def test_org_keys(client: httpx.AsyncClient) -> None:
    owner = await make_user(client)
    org = await make_org(client, owner)
    created = await client.post(
        "/api/v1/keys", json={"name": "ci", "organization_id": org["id"]}, headers=owner.headers
    )
    assert created.status_code == 201, created.text
    org_key = created.json()
    assert org_key["organization_id"] == org["id"]
    personal = (await client.get("/api/v1/keys", headers=owner.headers)).json()
    assert personal["count"] == 0  # org keys are listed under the org
    org_keys = (
        await client.get(
            "/api/v1/keys", params={"organization_id": org["id"]}, headers=owner.headers
        )
    ).json()
    assert [k["id"] for k in org_keys["data"]] == [org_key["id"]]

    # The org key sees only its org, and cannot create personal keys or orgs.
    headers = bearer(org_key["key"])
    orgs = (await client.get("/api/v1/orgs", headers=headers)).json()
    assert [o["id"] for o in orgs["data"]] == [org["id"]]
    assert_error(await client.post("/api/v1/keys", json={"name": "p"}, headers=headers), 403)
    assert_error(await client.post("/api/v1/orgs", json={"name": "Other"}, headers=headers), 403)

    # A plain member cannot create org keys.
    member = await make_user(client)
    invite = (
        await client.post(
            f"/api/v1/orgs/{org['id']}/invites", json={"email": member.email}, headers=owner.headers
        )
    ).json()
    token = invite["accept_url"].split("token=")[1]
    await client.post("/api/v1/invites/accept", json={"token": token}, headers=member.headers)
    assert_error(
        await client.post(
            "/api/v1/keys", json={"name": "m", "organization_id": org["id"]}, headers=member.headers
        ),
        403,
    )


async def test_key_priority_above_zero_needs_an_admin(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    batch = await client.post(
        "/api/v1/keys", json={"name": "batch", "priority": -5}, headers=user.headers
    )
    assert batch.status_code == 201, batch.text
    assert batch.json()["priority"] == -5
    urgent = await client.post(
        "/api/v1/keys", json={"name": "urgent", "priority": 5}, headers=user.headers
    )
    assert_error(urgent, 403)
    too_high = await client.post(
        "/api/v1/keys", json={"name": "x", "priority": 11}, headers=user.headers
    )
    assert_error(too_high, 422)
