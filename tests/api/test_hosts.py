"""Host registry: enrolment tokens, enrolment, the owner's endpoints, isolation."""

from __future__ import annotations

import httpx

from tests.factories import ApiUser, assert_error, make_user


async def _enroll(
    client: httpx.AsyncClient, owner: ApiUser, **settings: object
) -> dict[str, object]:
    created = await client.post(
        "/api/v1/hosts/enrollment-tokens", json=settings, headers=owner.headers
    )
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    assert created.json()["command"].endswith(f"--token {token}")
    enrolled = await client.post("/api/v1/agent/enroll", json={"token": token, "hostname": "box"})
    assert enrolled.status_code == 200, enrolled.text
    return dict(enrolled.json())


async def test_enrollment_needs_the_host_role(client: httpx.AsyncClient) -> None:
    renter = await make_user(client)
    response = await client.post("/api/v1/hosts/enrollment-tokens", json={}, headers=renter.headers)
    assert_error(response, 403, "host_role_required")


async def test_enroll_and_manage_a_host(client: httpx.AsyncClient) -> None:
    owner = await make_user(client, roles=["host"])
    enrolled = await _enroll(
        client, owner, name="rig", region="eu-west", tags=["nvlink"], price_per_gpu_hour="2.5"
    )
    assert str(enrolled["credential"]).startswith("pgh_")
    assert enrolled["websocket_path"] == "/api/v1/agent/ws"
    assert len(str(enrolled["server_public_key"])) == 44  # base64 of 32 bytes

    [host] = (await client.get("/api/v1/hosts", headers=owner.headers)).json()["data"]
    assert (host["name"], host["region"], host["tags"]) == ("rig", "eu-west", ["nvlink"])
    assert host["price_per_gpu_hour"] == "2.5"
    assert host["availability"] == "offline" and host["uptime_30d"] == 0
    assert host["hostname"] == "box"

    updated = await client.patch(
        f"/api/v1/hosts/{host['id']}",
        json={"price_per_gpu_hour": "1.99", "paused": True, "tags": ["a100", "spot"]},
        headers=owner.headers,
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["price_per_gpu_hour"] == "1.99"
    assert updated.json()["availability"] == "paused"
    bad_price = await client.patch(
        f"/api/v1/hosts/{host['id']}", json={"price_per_gpu_hour": "-1"}, headers=owner.headers
    )
    assert_error(bad_price, 422, "validation_error")
    bad_tag = await client.patch(
        f"/api/v1/hosts/{host['id']}", json={"tags": ["Not A Tag!"]}, headers=owner.headers
    )
    assert_error(bad_tag, 422)

    removed = await client.delete(f"/api/v1/hosts/{host['id']}", headers=owner.headers)
    assert removed.status_code == 204
    assert (await client.get("/api/v1/hosts", headers=owner.headers)).json()["count"] == 0


async def test_enrollment_token_is_one_time(client: httpx.AsyncClient) -> None:
    owner = await make_user(client, roles=["host"])
    token = (
        await client.post("/api/v1/hosts/enrollment-tokens", json={}, headers=owner.headers)
    ).json()["token"]
    first = await client.post("/api/v1/agent/enroll", json={"token": token})
    assert first.status_code == 200
    again = await client.post("/api/v1/agent/enroll", json={"token": token})
    assert_error(again, 401, "invalid_enrollment_token")
    assert_error(
        await client.post("/api/v1/agent/enroll", json={"token": "made-up"}),
        401,
        "invalid_enrollment_token",
    )


async def test_hosts_are_invisible_to_other_users(client: httpx.AsyncClient) -> None:
    owner = await make_user(client, roles=["host"])
    await _enroll(client, owner)
    [host] = (await client.get("/api/v1/hosts", headers=owner.headers)).json()["data"]
    other = await make_user(client, roles=["host"])
    assert (await client.get("/api/v1/hosts", headers=other.headers)).json()["count"] == 0
    url = f"/api/v1/hosts/{host['id']}"
    assert_error(await client.get(url, headers=other.headers), 404)
    assert_error(await client.patch(url, json={"paused": True}, headers=other.headers), 404)
    assert_error(await client.delete(url, headers=other.headers), 404)
    assert (await client.get(url, headers=owner.headers)).json()["paused"] is False


async def test_host_credentials_are_not_api_keys(client: httpx.AsyncClient) -> None:
    owner = await make_user(client, roles=["host"])
    enrolled = await _enroll(client, owner)
    me = await client.get(
        "/api/v1/users/me", headers={"Authorization": f"Bearer {enrolled['credential']}"}
    )
    assert_error(me, 401)
