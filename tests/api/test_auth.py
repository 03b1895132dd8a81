from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.factories import PASSWORD, assert_error, bearer, make_user, unique_email


async def test_register_validates_fields(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/auth/register", json={"email": "not-an-email", "password": "short"}
    )
    error = assert_error(response, 422, "validation_error")
    locs = {field["loc"] for field in error["details"]["fields"]}
    assert locs == {"body.email", "body.password"}


async def test_register_rejects_unknown_fields_and_admin_role(client: httpx.AsyncClient) -> None:
    extra = await client.post(
        "/api/v1/auth/register",
        json={"email": unique_email(), "password": PASSWORD, "is_admin": True},
    )
    assert_error(extra, 422, "validation_error")
    admin = await client.post(
        "/api/v1/auth/register",
        json={"email": unique_email(), "password": PASSWORD, "roles": ["admin"]},
    )
    assert_error(admin, 403, "permission_denied")


async def test_duplicate_email_is_a_conflict_case_insensitively(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    again = await client.post(
        "/api/v1/auth/register", json={"email": user.email.upper(), "password": PASSWORD}
    )
    assert_error(again, 409, "email_taken")


async def test_login_failures_do_not_reveal_which_part_was_wrong(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    wrong_password = await client.post(
        "/api/v1/auth/login", json={"email": user.email, "password": "wrong password!"}
    )
    unknown_user = await client.post(
        "/api/v1/auth/login", json={"email": "nobody@example.com", "password": PASSWORD}
    )
    first = assert_error(wrong_password, 401, "invalid_credentials")
    second = assert_error(unknown_user, 401, "invalid_credentials")
    assert first["message"] == second["message"]
    assert wrong_password.headers["www-authenticate"] == "Bearer"


async def test_protected_endpoints_need_credentials(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/v1/users/me"), 401, "not_authenticated")
    assert_error(
        await client.get("/api/v1/users/me", headers=bearer("garbage")), 401, "invalid_token"
    )
    assert_error(
        await client.get("/api/v1/users/me", headers=bearer("pgk_0123456789ab_nope")),
        401,
        "invalid_api_key",
    )


async def test_refresh_rotates_and_reuse_revokes_the_family(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    rotated = await client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert rotated.status_code == 200, rotated.text
    new_pair = rotated.json()
    assert new_pair["refresh_token"] != user.refresh_token
    me = await client.get("/api/v1/users/me", headers=bearer(new_pair["access_token"]))
    assert me.status_code == 200

    # The old token was used once already: presenting it again is treated as theft...
    reuse = await client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert_error(reuse, 401, "invalid_refresh_token")
    # ...and the rotated token of the same login stops working too.
    after = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": new_pair["refresh_token"]}
    )
    assert_error(after, 401, "invalid_refresh_token")


async def test_concurrent_refreshes_let_exactly_one_win(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    body = {"refresh_token": user.refresh_token}
    results = await asyncio.gather(
        *(client.post("/api/v1/auth/refresh", json=body) for _ in range(4))
    )
    assert sorted(r.status_code for r in results).count(200) <= 1
    assert all(r.status_code in (200, 401) for r in results)


async def test_logout_revokes_the_refresh_token(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    out = await client.post("/api/v1/auth/logout", json={"refresh_token": user.refresh_token})
    assert out.status_code == 204
    again = await client.post("/api/v1/auth/logout", json={"refresh_token": user.refresh_token})
    assert again.status_code == 204  # idempotent
    refresh = await client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert_error(refresh, 401, "invalid_refresh_token")


async def test_update_me_and_password_change(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    renamed = await client.patch(
        "/api/v1/users/me",
        json={"display_name": "  Ada  ", "roles": ["renter", "host"]},
        headers=user.headers,
    )
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["display_name"] == "Ada"
    assert renamed.json()["roles"] == ["renter", "host"]

    no_current = await client.patch(
        "/api/v1/users/me", json={"password": "a new password!"}, headers=user.headers
    )
    assert_error(no_current, 403, "wrong_password")
    escalate = await client.patch(
        "/api/v1/users/me", json={"roles": ["admin"]}, headers=user.headers
    )
    assert_error(escalate, 403)
    no_roles = await client.patch("/api/v1/users/me", json={"roles": []}, headers=user.headers)
    assert_error(no_roles, 422)

    changed = await client.patch(
        "/api/v1/users/me",
        json={"password": "a new password!", "current_password": PASSWORD},
        headers=user.headers,
    )
    assert changed.status_code == 200
    old_login = await client.post(
        "/api/v1/auth/login", json={"email": user.email, "password": PASSWORD}
    )
    assert_error(old_login, 401)
    new_login = await client.post(
        "/api/v1/auth/login", json={"email": user.email, "password": "a new password!"}
    )
    assert new_login.status_code == 200
    # Changing the password ended the other sessions.
    stale = await client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert_error(stale, 401)


@pytest.mark.parametrize("limit", [3])
async def test_login_is_rate_limited_per_client(
    client: httpx.AsyncClient, app: object, limit: int
) -> None:
    from fastapi import FastAPI

    assert isinstance(app, FastAPI)
    app.state.context.settings.auth_rate_limit = limit
    body = {"email": "nobody@example.com", "password": PASSWORD}
    statuses = [
        (await client.post("/api/v1/auth/login", json=body)).status_code for _ in range(limit)
    ]
    assert statuses == [401] * limit
    limited = await client.post("/api/v1/auth/login", json=body)
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    register = await client.post(
        "/api/v1/auth/register", json={"email": unique_email(), "password": PASSWORD}
    )
    assert_error(register, 429, "rate_limited")
