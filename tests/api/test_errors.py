"""The error model: every failure is JSON in one shape; nothing produces a 500."""

from __future__ import annotations

import httpx

from tests.factories import assert_error, make_user


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/api/v1/nope"), 404, "not_found")
    assert_error(await client.put("/healthz"), 405, "method_not_allowed")


async def test_malformed_json_is_a_validation_error(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/v1/auth/login",
        content=b'{"email": ',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 422, "validation_error")


async def test_wrong_types_and_bad_path_ids(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    assert_error(
        await client.post("/api/v1/auth/login", json={"email": 5, "password": ["x"]}),
        422,
        "validation_error",
    )
    assert_error(await client.get("/api/v1/orgs/not-a-uuid", headers=user.headers), 422)
    assert_error(await client.post("/api/v1/keys", json=[], headers=user.headers), 422)
    assert_error(
        await client.post(
            "/api/v1/keys", json={"name": "x", "scopes": ["root"]}, headers=user.headers
        ),
        422,
    )


async def test_oversized_body_is_refused(client: httpx.AsyncClient) -> None:
    big = b'{"email": "' + b"a" * (2 << 20) + b'"}'
    response = await client.post(
        "/api/v1/auth/login", content=big, headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "payload_too_large")

    async def chunks():  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b"x" * 65536

    chunked = await client.post(
        "/api/v1/auth/login", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error(chunked, 413, "payload_too_large")


async def test_security_headers_present(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    checks = {"database": "ok", "bus": "ok", "storage": "ok"}
    assert ready.json() == {"status": "ready", "checks": checks}


async def test_openapi_has_stable_operation_ids(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operation_ids = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {"auth-login", "auth-register", "users-read_me", "keys-create_key"} <= operation_ids
    assert (await client.get("/docs")).status_code == 200
