from __future__ import annotations

import logging

import httpx
import pytest

from tests.factories import assert_error, make_org, make_user


async def _invite(
    client: httpx.AsyncClient, org_id: str, inviter, email: str, role: str = "member"
) -> str:
    response = await client.post(
        f"/api/v1/orgs/{org_id}/invites",
        json={"email": email, "role": role},
        headers=inviter.headers,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["accept_url"].split("token=")[1])


async def test_create_and_list_orgs(client: httpx.AsyncClient) -> None:
    owner = await make_user(client)
    org = await make_org(client, owner, name="Deep Lab")
    assert org["role"] == "owner"
    assert org["slug"].startswith("deep-lab-")
    listed = (await client.get("/api/v1/orgs", headers=owner.headers)).json()
    assert [o["id"] for o in listed["data"]] == [org["id"]]
    clash = await client.post(
        "/api/v1/orgs", json={"name": "X", "slug": org["slug"]}, headers=owner.headers
    )
    assert_error(clash, 409, "slug_taken")
    bad_slug = await client.post(
        "/api/v1/orgs", json={"name": "X", "slug": "Bad Slug!"}, headers=owner.headers
    )
    assert_error(bad_slug, 422)


async def test_invite_flow_logs_the_email(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    owner = await make_user(client)
    org = await make_org(client, owner)
    invitee = await make_user(client)
    with caplog.at_level(logging.WARNING, logger="peergpu.server.services.email"):
        token = await _invite(client, org["id"], owner, invitee.email.upper())
    assert token in caplog.text and invitee.email in caplog.text

    stranger = await make_user(client)
    wrong = await client.post(
        "/api/v1/invites/accept", json={"token": token}, headers=stranger.headers
    )
    assert_error(wrong, 403, "invite_wrong_recipient")

    accepted = await client.post(
        "/api/v1/invites/accept", json={"token": token}, headers=invitee.headers
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["role"] == "member"
    reused = await client.post(
        "/api/v1/invites/accept", json={"token": token}, headers=invitee.headers
    )
    assert_error(reused, 404, "invite_invalid")

    members = (
        await client.get(f"/api/v1/orgs/{org['id']}/members", headers=invitee.headers)
    ).json()
    assert {m["email"]: m["role"] for m in members["data"]} == {
        owner.email: "owner",
        invitee.email: "member",
    }
    again = await client.post(
        f"/api/v1/orgs/{org['id']}/invites", json={"email": invitee.email}, headers=owner.headers
    )
    assert_error(again, 409, "already_member")


async def test_roles_inside_an_org(client: httpx.AsyncClient) -> None:
    owner = await make_user(client)
    org = await make_org(client, owner)
    admin = await make_user(client)
    member = await make_user(client)
    for user, role in ((admin, "admin"), (member, "member")):
        token = await _invite(client, org["id"], owner, user.email, role)
        await client.post("/api/v1/invites/accept", json={"token": token}, headers=user.headers)
    base = f"/api/v1/orgs/{org['id']}"

    # members cannot invite, rename or manage people
    assert_error(
        await client.post(
            f"{base}/invites", json={"email": "a@example.com"}, headers=member.headers
        ),
        403,
    )
    assert_error(await client.patch(base, json={"name": "Mine"}, headers=member.headers), 403)
    assert_error(
        await client.patch(
            f"{base}/members/{admin.id}", json={"role": "member"}, headers=member.headers
        ),
        403,
    )
    # admins manage members but not owners
    renamed = await client.patch(base, json={"name": "Renamed"}, headers=admin.headers)
    assert renamed.status_code == 200 and renamed.json()["name"] == "Renamed"
    assert_error(
        await client.patch(
            f"{base}/members/{member.id}", json={"role": "owner"}, headers=admin.headers
        ),
        403,
    )
    assert_error(await client.delete(f"{base}/members/{owner.id}", headers=admin.headers), 403)
    assert_error(
        await client.post(
            f"{base}/invites",
            json={"email": "o@example.com", "role": "owner"},
            headers=admin.headers,
        ),
        403,
    )
    promoted = await client.patch(
        f"{base}/members/{member.id}", json={"role": "admin"}, headers=admin.headers
    )
    assert promoted.status_code == 200 and promoted.json()["role"] == "admin"

    # the last owner can neither leave nor be demoted
    assert_error(
        await client.delete(f"{base}/members/{owner.id}", headers=owner.headers), 409, "last_owner"
    )
    assert_error(
        await client.patch(
            f"{base}/members/{owner.id}", json={"role": "member"}, headers=owner.headers
        ),
        409,
        "last_owner",
    )
    # a member can leave
    assert (
        await client.delete(f"{base}/members/{member.id}", headers=member.headers)
    ).status_code == 204
    assert_error(await client.get(base, headers=member.headers), 404)


async def test_revoked_invite_cannot_be_accepted(client: httpx.AsyncClient) -> None:
    owner = await make_user(client)
    org = await make_org(client, owner)
    invitee = await make_user(client)
    token = await _invite(client, org["id"], owner, invitee.email)
    invites = (await client.get(f"/api/v1/orgs/{org['id']}/invites", headers=owner.headers)).json()
    invite_id = invites["data"][0]["id"]
    revoked = await client.delete(
        f"/api/v1/orgs/{org['id']}/invites/{invite_id}", headers=owner.headers
    )
    assert revoked.status_code == 204
    accept = await client.post(
        "/api/v1/invites/accept", json={"token": token}, headers=invitee.headers
    )
    assert_error(accept, 404, "invite_invalid")


async def test_org_key_dies_when_its_creator_leaves(client: httpx.AsyncClient) -> None:
    owner = await make_user(client)
    org = await make_org(client, owner)
    admin = await make_user(client)
    token = await _invite(client, org["id"], owner, admin.email, "admin")
    await client.post("/api/v1/invites/accept", json={"token": token}, headers=admin.headers)
    key = (
        await client.post(
            "/api/v1/keys", json={"name": "k", "organization_id": org["id"]}, headers=admin.headers
        )
    ).json()["key"]
    assert (
        await client.get("/api/v1/orgs", headers={"Authorization": f"Bearer {key}"})
    ).status_code == 200
    # Submitting through it once puts the caller in the hot routes' cache (services.callers):
    # authenticated, then refused for the organization's empty wallet.
    submitted = await client.post(
        "/api/v1/jobs", json={"command": ["true"]}, headers={"Authorization": f"Bearer {key}"}
    )
    assert_error(submitted, 402, "insufficient_credit")
    await client.delete(f"/api/v1/orgs/{org['id']}/members/{admin.id}", headers=owner.headers)
    assert_error(
        await client.post(
            "/api/v1/jobs", json={"command": ["true"]}, headers={"Authorization": f"Bearer {key}"}
        ),
        401,
        "api_key_orphaned",
    )
    assert_error(
        await client.get("/api/v1/orgs", headers={"Authorization": f"Bearer {key}"}),
        401,
        "api_key_orphaned",
    )
