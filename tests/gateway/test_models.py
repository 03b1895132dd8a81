"""The gateway's model list and its edges (auth, scope, rate limits, errors), driven by the
official ``openai`` client, unchanged, over an in-process transport."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from peergpu.config import ServerSettings
from peergpu.protocol.messages import Hello, ServedModelSpec
from peergpu.server.app import create_app
from peergpu.server.context import ServerContext
from peergpu.server.db.host_models import HostServedModelModel
from peergpu.server.services import presence
from tests.factories import make_user
from tests.unit.scheduling import make_host

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def gateway_app(settings: ServerSettings) -> AsyncIterator[FastAPI]:
    # No background loops: these tests need none, and a loop's query still in flight when a
    # short test ends would outlive its event loop.
    configured = settings.model_copy(
        update={"gateway_requests_per_minute": 5, "scheduler_enabled": False}
    )
    application = create_app(configured)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(gateway_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=gateway_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def _key(http: httpx.AsyncClient, scopes: list[str]) -> str:
    user = await make_user(http)
    created = await http.post(
        "/api/v1/keys", json={"name": "gw", "scopes": scopes}, headers=user.headers
    )
    assert created.status_code == 201, created.text
    return str(created.json()["key"])


def _openai(http: httpx.AsyncClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key, base_url="http://testserver/v1", http_client=http, max_retries=0
    )


async def _serve(
    context: ServerContext, *models: tuple[str, str, int], online: bool = True
) -> uuid.UUID:
    owner = uuid.UUID(await _owner(context))
    host = await make_host(context, owner, price=1_000_000, gpus=[("T4", 16000)], online=online)
    async with context.sessionmaker() as session:
        for name, kind, price in models:
            session.add(
                HostServedModelModel(
                    host_id=host,
                    name=name,
                    kind=kind,
                    input_price_per_million_micros=price,
                    output_price_per_million_micros=2 * price,
                )
            )
        await session.commit()
    return host


async def _owner(context: ServerContext) -> str:
    from tests.unit.scheduling import make_renter

    return str(await make_renter(context, credit=0))


async def test_models_lists_what_online_hosts_serve(
    http: httpx.AsyncClient, gateway_app: FastAPI
) -> None:
    context: ServerContext = gateway_app.state.context
    await _serve(context, ("HuggingFaceTB/SmolLM2-135M-Instruct", "chat", 200_000))
    await _serve(
        context,
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "chat", 100_000),
        ("all-MiniLM-L6-v2", "embeddings", 20_000),
    )
    await _serve(context, ("offline-model", "chat", 1), online=False)
    client = _openai(http, await _key(http, ["inference"]))
    listed = await client.models.list()
    by_id = {m.id: m for m in listed.data}
    assert sorted(by_id) == ["HuggingFaceTB/SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]
    chat: Any = by_id["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert chat.object == "model" and chat.owned_by == "peergpu" and chat.created > 0
    assert chat.peergpu == {
        "kind": "chat",
        "hosts": 2,
        "input_price_per_million_micros": 100_000,
        "output_price_per_million_micros": 200_000,
    }
    one = await client.models.retrieve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert one.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("offline-model")
    assert missing.value.code == "model_not_found"
    assert missing.value.body == {
        "message": "The model 'offline-model' does not exist or no host serves it now.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


async def test_a_bad_key_is_401_and_a_key_without_the_scope_403(
    http: httpx.AsyncClient,
) -> None:
    with pytest.raises(openai.AuthenticationError) as bad:
        await _openai(http, "pgk_nope_nope").models.list()
    assert bad.value.status_code == 401 and bad.value.code == "invalid_api_key"
    assert bad.value.response.headers["www-authenticate"] == "Bearer"
    read_only = _openai(http, await _key(http, ["read"]))
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await read_only.models.list()
    assert denied.value.code == "insufficient_permissions"


async def test_rate_limits_send_openai_headers_and_429(http: httpx.AsyncClient) -> None:
    key = await _key(http, ["inference"])
    client = _openai(http, key)
    for left in (4, 3, 2, 1, 0):
        raw = await client.models.with_raw_response.list()
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(left)
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    with pytest.raises(openai.RateLimitError) as limited:
        await client.models.list()
    headers = limited.value.response.headers
    assert limited.value.code == "rate_limit_exceeded"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(headers["retry-after"]) <= 60
    other = _openai(http, await _key(http, ["inference"]))  # limits are per key
    assert (await other.models.list()).data == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_inference_routes_check_the_caller_then_the_body_in_openai_shape(
    http: httpx.AsyncClient, path: str
) -> None:
    """These routes authenticate and parse their bodies themselves (the hot path): the
    same answers as FastAPI's dependency and validation would give, in OpenAI's shape."""
    nobody = await http.post(path, content=b"{not json")
    assert nobody.status_code == 401
    assert nobody.json()["error"]["code"] == "invalid_api_key"
    assert nobody.headers["www-authenticate"] == "Bearer"
    basic = await http.post(path, json={}, headers={"Authorization": "Basic abc"})
    assert basic.status_code == 401
    read_only = {"Authorization": f"Bearer {await _key(http, ['read'])}"}
    denied = await http.post(path, json={}, headers=read_only)
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "insufficient_permissions"

    caller = {"Authorization": f"Bearer {await _key(http, ['inference'])}"}
    for content in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"model": ""}'):
        bad = await http.post(path, content=content, headers=caller)
        assert bad.status_code == 400, (content, bad.text)
        error = bad.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    missing = await http.post(path, json={"model": "m"}, headers=caller)
    expected = "messages" if "chat" in path else "input"
    assert missing.status_code == 400 and missing.json()["error"]["param"] == expected
    nested = {"model": "m", "messages": [{"role": ""}], "input": []}
    deep = (await http.post(path, json=nested, headers=caller)).json()["error"]
    assert deep["param"] == ("messages.0.role" if "chat" in path else "input")
    # Valid, but nobody serves it: past the parsing, into the relay.
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
    unknown = await http.post(path, json=body, headers=caller)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert unknown.headers["x-ratelimit-limit-requests"] == "5"


def test_the_inference_routes_document_their_bodies() -> None:
    document = create_app(ServerSettings()).routes  # the /v1 app is mounted first
    gateway = next(route for route in document if getattr(route, "path", "") == "/v1")
    paths = gateway.app.openapi()["paths"]  # type: ignore[attr-defined]
    for path, required in (("/chat/completions", "messages"), ("/embeddings", "input")):
        operation = paths[path]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert required in schema["required"] and "$ref" not in str(schema)
        assert operation["security"] == [{"HTTPBearer": []}]


async def test_unknown_paths_answer_in_openai_shape(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/nope", headers={"Authorization": "Bearer x"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "Unknown request URL.",
            "type": "invalid_request_error",
            "param": None,
            "code": "unknown_url",
        }
    }


async def test_hello_declares_the_models_a_host_serves(context: ServerContext) -> None:
    owner = uuid.UUID(await _owner(context))
    host = await make_host(context, owner, price=1, gpus=[("T4", 16000)])

    async def connect(*models: ServedModelSpec) -> list[tuple[str, str, int]]:
        hello = Hello(protocol_versions=[1], agent_version="t", models=list(models))
        async with context.sessionmaker() as session:
            await presence.mark_connected(
                session=session,
                host_id=host,
                connection_id=uuid.uuid4().hex,
                hello=hello,
                protocol_version=1,
            )
        async with context.sessionmaker() as session:
            rows = await session.execute(
                HostServedModelModel.__table__.select().where(HostServedModelModel.host_id == host)
            )
            return sorted((r.name, r.kind, r.max_concurrency) for r in rows)

    first = await connect(
        ServedModelSpec(name="a", kind="chat", max_concurrency=2),
        ServedModelSpec(name="b", kind="embeddings"),
    )
    assert first == [("a", "chat", 2), ("b", "embeddings", 4)]
    assert await connect(ServedModelSpec(name="b", kind="embeddings")) == [("b", "embeddings", 4)]
    assert await connect() == []


async def test_a_body_too_large_is_refused_in_openai_shape(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/models", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_model_id_no_host_could_declare_is_404_not_a_database_error(
    http: httpx.AsyncClient,
) -> None:
    key = await _key(http, ["inference"])
    response = await http.get("/v1/models/bad%00id", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 404, response.text  # no host can serve such a name
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
