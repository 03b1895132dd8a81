"""A second user can neither read nor change the first user's keys, orgs or profile."""

from __future__ import annotations

import httpx

from tests.factories import assert_error, make_org, make_user


async def test_other_users_keys_are_invisible(client: httpx.AsyncClient) -> None:
    alice = await make_user(client)
    mallory = await make_user(client)
    key = (await client.post("/api/v1/keys", json={"name": "a"}, headers=alice.headers)).json()
    assert (await client.get("/api/v1/keys", headers=mallory.headers)).json()["count"] == 0
    assert_error(await client.delete(f"/api/v1/keys/{key['id']}", headers=mallory.headers), 404)
    # still works for Alice
    me = await client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {key['key']}"})
    assert me.json()["id"] == alice.id


async def test_other_users_orgs_are_invisible(client: httpx.AsyncClient) -> None:
    alice = await make_user(client)
    mallory = await make_user(client)
    org = await make_org(client, alice)
    base = f"/api/v1/orgs/{org['id']}"
    h = mallory.headers
    assert (await client.get("/api/v1/orgs", headers=h)).json()["count"] == 0
    assert_error(await client.get(base, headers=h), 404)
    assert_error(await client.patch(base, json={"name": "pwned"}, headers=h), 404)
    assert_error(await client.get(f"{base}/members", headers=h), 404)
    assert_error(await client.get(f"{base}/invites", headers=h), 404)
    assert_error(
        await client.post(f"{base}/invites", json={"email": mallory.email}, headers=h), 404
    )
    assert_error(
        await client.patch(f"{base}/members/{alice.id}", json={"role": "member"}, headers=h), 404
    )
    assert_error(await client.delete(f"{base}/members/{alice.id}", headers=h), 404)
    assert_error(
        await client.get("/api/v1/keys", params={"organization_id": org["id"]}, headers=h), 404
    )
    assert_error(
        await client.post(
            "/api/v1/keys", json={"name": "x", "organization_id": org["id"]}, headers=h
        ),
        404,
    )
    assert (await client.get(base, headers=alice.headers)).json()["name"] == org["name"]


async def test_profile_is_only_ones_own(client: httpx.AsyncClient) -> None:
    alice = await make_user(client)
    mallory = await make_user(client)
    await client.patch("/api/v1/users/me", json={"display_name": "M"}, headers=mallory.headers)
    assert (await client.get("/api/v1/users/me", headers=alice.headers)).json()[
        "display_name"
    ] != "M"
    assert_error(await client.get("/api/v1/admin/users", headers=mallory.headers), 403)


async def test_admin_lists_users(client: httpx.AsyncClient, context) -> None:
    from peergpu.server.db.models import UserRole
    from peergpu.server.services.accounts import create_user
    from tests.factories import PASSWORD

    async with context.sessionmaker() as session:
        await create_user(
            session=session,
            passwords=context.passwords,
            email="root@example.com",
            password=PASSWORD,
            roles=[UserRole.admin],
        )
    tokens = (
        await client.post(
            "/api/v1/auth/login", json={"email": "root@example.com", "password": PASSWORD}
        )
    ).json()
    listed = await client.get(
        "/api/v1/admin/users", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert listed.status_code == 200, listed.text
    assert listed.json()["count"] == 1
