"""register -> login -> me -> create key -> use key, on both backends."""

from __future__ import annotations

import httpx

from tests.factories import PASSWORD, bearer, unique_email


async def test_register_login_me_key_flow(client: httpx.AsyncClient) -> None:
    email = unique_email("flow")
    registered = await client.post(
        "/api/v1/auth/register",
        json={"email": email, "password": PASSWORD, "roles": ["renter", "host"]},
    )
    assert registered.status_code == 201, registered.text
    assert registered.json()["roles"] == ["renter", "host"]
    assert "password" not in registered.text and "hash" not in registered.text

    tokens = (
        await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    ).json()
    me = await client.get("/api/v1/users/me", headers=bearer(tokens["access_token"]))
    assert me.status_code == 200 and me.json()["email"] == email

    created = await client.post(
        "/api/v1/keys", json={"name": "ci"}, headers=bearer(tokens["access_token"])
    )
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert key.startswith("pgk_")

    via_key = await client.get("/api/v1/users/me", headers=bearer(key))
    assert via_key.status_code == 200
    assert via_key.json()["id"] == registered.json()["id"]
