"""Chat completions and embeddings relayed to hosts: a real server, real agent processes, the
official ``openai`` client over real sockets, and a scripted engine at the host's edge (it
stands in for vLLM; the built-in engine's real models are in tests/gateway/test_engines_e2e.py).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from peergpu.config import ServerSettings
from tests.gateway.scripted_engine import DIMENSIONS, ScriptedEngine, embed
from tests.integration import harness
from tests.integration.harness import AgentProcess, ThreadedServer, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def engine() -> Iterator[ScriptedEngine]:
    with ScriptedEngine() as running:
        yield running


@pytest.fixture
def server(settings: ServerSettings) -> Iterator[ThreadedServer]:
    configured = harness.e2e_settings(
        settings,
        gateway_first_token_timeout_seconds=5.0,
        gateway_queue_timeout_seconds=5.0,
        host_lost_grace_seconds=1.0,
    )
    running = ThreadedServer(configured).start()
    yield running
    running.stop()


def _models(engine: ScriptedEngine, **overrides: Any) -> list[dict[str, Any]]:
    base = {"url": engine.url, "max_concurrency": 4}
    models = [
        {
            **base,
            "name": "echo-chat",
            "kind": "chat",
            "engine_model": "echo",
            "input_price_per_million_micros": 1_000_000,
            "output_price_per_million_micros": 2_000_000,
        },
        {**base, "name": "slow-chat", "kind": "chat", "engine_model": "slow"},
        {**base, "name": "bad-chat", "kind": "chat", "engine_model": "bad"},
        {**base, "name": "hash-embed", "kind": "embeddings", "engine_model": "hash"},
    ]
    return [{**m, **overrides.get(m["name"], {})} for m in models]


def _host(
    server: ThreadedServer, owner: dict[str, str], state_dir: Path, models: list[dict[str, Any]]
) -> AgentProcess:
    return harness.enroll_agent(
        server, owner, state_dir, extra_env={"PEERGPU_AGENT_MODELS": json.dumps(models)}
    )


def _key(server: ThreadedServer, headers: dict[str, str]) -> str:
    created = httpx.post(
        f"{server.url}/api/v1/keys",
        json={"name": "gw", "scopes": ["inference"]},
        headers=headers,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["key"])


def _client(server: ThreadedServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", max_retries=0, timeout=30)


@pytest.fixture
def hosted(
    server: ThreadedServer, engine: ScriptedEngine, tmp_path: Path
) -> Iterator[tuple[openai.OpenAI, AgentProcess]]:
    owner = harness.login(server, ["host"], "gw-host")
    agent = _host(server, owner, tmp_path / "host", _models(engine))
    renter = harness.login(server, ["renter"], "gw-renter")
    try:
        yield _client(server, _key(server, renter)), agent
    finally:
        agent.stop()


def test_chat_completion_through_a_host(hosted: tuple[openai.OpenAI, AgentProcess]) -> None:
    client, _agent = hosted
    answer = client.chat.completions.create(
        model="echo-chat", messages=[{"role": "user", "content": "hello from the renter"}]
    )
    assert answer.choices[0].message.content == "hello from the renter"
    assert answer.model == "echo-chat"  # the public name, not the engine's
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 4)
    assert [m.id for m in client.models.list().data] == [
        "bad-chat",
        "echo-chat",
        "hash-embed",
        "slow-chat",
    ]


def test_streaming_chat_with_and_without_usage(
    hosted: tuple[openai.OpenAI, AgentProcess],
) -> None:
    client, _agent = hosted
    messages = [{"role": "user", "content": "one two three"}]
    chunks = list(
        client.chat.completions.create(
            model="echo-chat",
            messages=messages,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(
        client.chat.completions.create(
            model="echo-chat",
            messages=messages,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert all(c.choices for c in plain), "no usage chunk unless asked for"
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "one two three"


def test_embeddings_float_and_base64(hosted: tuple[openai.OpenAI, AgentProcess]) -> None:
    client, _agent = hosted
    # The official client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model="hash-embed", input=["alpha", "beta"])
    assert [d.index for d in default.data] == [0, 1]
    assert default.data[0].embedding == pytest.approx(embed("alpha"))
    explicit = client.embeddings.create(model="hash-embed", input="gamma", encoding_format="float")
    assert explicit.data[0].embedding == pytest.approx(embed("gamma"))
    assert len(explicit.data[0].embedding) == DIMENSIONS


def test_errors_a_renter_can_act_on(
    hosted: tuple[openai.OpenAI, AgentProcess], server: ThreadedServer
) -> None:
    client, agent = hosted
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.embeddings.create(model="echo-chat", input="x")
    assert wrong_kind.value.code == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as refused:  # the engine's own 400, passed on
        client.chat.completions.create(
            model="bad-chat", messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model="echo-chat", messages=[])
    assert invalid.value.param == "messages"
    with pytest.raises(openai.AuthenticationError):
        _client(server, "pgk_not_a_key").chat.completions.create(
            model="echo-chat", messages=[{"role": "user", "content": "x"}]
        )

    agent.stop()  # the model still exists, but nobody serves it now
    wait_for(lambda: not _served(server), what="the host to go offline")
    with pytest.raises(openai.InternalServerError) as offline:
        client.chat.completions.create(
            model="echo-chat", messages=[{"role": "user", "content": "x"}]
        )
    assert offline.value.status_code == 503 and offline.value.code == "model_unavailable"


def _served(server: ThreadedServer) -> bool:
    return bool(server.app.state.hub.connected_hosts)


def test_a_renter_without_credit_gets_insufficient_quota(
    server: ThreadedServer, engine: ScriptedEngine, tmp_path: Path
) -> None:
    owner = harness.login(server, ["host"], "gw-host")
    agent = _host(server, owner, tmp_path / "host", _models(engine))
    try:
        broke = harness.login(server, ["renter"], "gw-broke")
        from peergpu.server.services.billing import accounts  # noqa: PLC0415

        me = httpx.get(f"{server.url}/api/v1/users/me", headers=broke, timeout=10).json()
        wallet = accounts.user_wallet(uuid.UUID(me["id"]))
        balance = httpx.get(f"{server.url}/api/v1/billing/balance", headers=broke).json()
        if balance["available_micros"] > 0:  # spend the signup credit away
            server.call(lambda ctx: _drain(ctx, wallet, balance["available_micros"]))
        client = _client(server, _key(server, broke))
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(
                model="echo-chat", messages=[{"role": "user", "content": "x"}]
            )
        assert refused.value.code == "insufficient_quota"
        assert refused.value.response.headers["x-should-retry"] == "false"
    finally:
        agent.stop()


async def _drain(context: Any, wallet: str, amount: int) -> None:
    from peergpu.server.services.billing import accounts, ledger  # noqa: PLC0415

    async with context.sessionmaker() as session, session.begin():
        await ledger.post(
            session,
            ledger.Posting(
                key=f"test-drain:{wallet}",
                kind="adjustment",
                entries=((accounts.available(wallet), -amount), (accounts.PROMOTIONS, amount)),
            ),
        )


def test_a_renter_who_leaves_mid_stream_stops_the_host(
    hosted: tuple[openai.OpenAI, AgentProcess], engine: ScriptedEngine, server: ThreadedServer
) -> None:
    client, _agent = hosted
    words = " ".join(f"w{i}" for i in range(200))  # 200 words, 50 ms each: 10 s if not stopped
    stream = client.chat.completions.create(
        model="slow-chat", messages=[{"role": "user", "content": words}], stream=True
    )
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received >= 5:
            break
    stream.close()  # the renter goes away
    cancelled = wait_for(lambda: engine.log.cancelled, timeout=5, what="the engine to stop")
    assert cancelled[0] < 60, "the host kept generating after the renter left"
    # Its slot is free again: the next request is served at once.
    answer = client.chat.completions.create(
        model="slow-chat", messages=[{"role": "user", "content": "quick"}]
    )
    assert answer.choices[0].message.content == "quick"
    wait_for(lambda: server.app.state.hub.streams.open_streams == 0, what="streams closed")


def test_a_failing_host_is_retried_on_another(
    server: ThreadedServer, engine: ScriptedEngine, tmp_path: Path
) -> None:
    owner = harness.login(server, ["host"], "gw-host")
    # The cheaper host's engine fails; the dearer one works. Cheapest first, then the retry.
    broken = _host(
        server,
        owner,
        tmp_path / "broken",
        [
            {"name": "echo-chat", "kind": "chat", "url": engine.url, "engine_model": "fail"},
        ],
    )
    working = _host(
        server,
        owner,
        tmp_path / "working",
        [
            {
                "name": "echo-chat",
                "kind": "chat",
                "url": engine.url,
                "engine_model": "echo",
                "input_price_per_million_micros": 5,
            },
        ],
    )
    try:
        client = _client(server, _key(server, harness.login(server, ["renter"], "gw-r")))
        answer = client.chat.completions.create(
            model="echo-chat", messages=[{"role": "user", "content": "still answered"}]
        )
        assert answer.choices[0].message.content == "still answered"
        assert [r["model"] for r in engine.log.requests] == ["fail", "echo"]
    finally:
        broken.stop()
        working.stop()


def test_concurrency_cap_queues_requests_instead_of_overloading_a_host(
    server: ThreadedServer, engine: ScriptedEngine, tmp_path: Path
) -> None:
    owner = harness.login(server, ["host"], "gw-host")
    agent = _host(
        server,
        owner,
        tmp_path / "host",
        [
            {
                "name": "slow-chat",
                "kind": "chat",
                "url": engine.url,
                "engine_model": "slow",
                "max_concurrency": 1,
            },
        ],
    )
    try:
        client = _client(server, _key(server, harness.login(server, ["renter"], "gw-r")))
        results: list[str] = []

        def ask(text: str) -> None:
            answer = client.chat.completions.create(
                model="slow-chat", messages=[{"role": "user", "content": text}]
            )
            results.append(answer.choices[0].message.content or "")

        threads = [threading.Thread(target=ask, args=(f"a{i} b{i} c{i}",)) for i in range(3)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(results) == ["a0 b0 c0", "a1 b1 c1", "a2 b2 c2"]
        # One at a time: three answers of three words at 50 ms a word.
        assert time.monotonic() - started >= 0.4
    finally:
        agent.stop()


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
def test_a_request_on_one_replica_reaches_a_host_connected_to_another(
    settings: ServerSettings, engine: ScriptedEngine, tmp_path: Path
) -> None:
    first = ThreadedServer(harness.e2e_settings(settings)).start()
    second = ThreadedServer(harness.e2e_settings(settings)).start()
    try:
        owner = harness.login(first, ["host"], "gw-host")
        agent = _host(first, owner, tmp_path / "host", _models(engine))
        try:
            client = _client(second, _key(second, harness.login(second, ["renter"], "gw-r")))
            assert not second.app.state.hub.connected_hosts
            answer = client.chat.completions.create(
                model="echo-chat", messages=[{"role": "user", "content": "across replicas"}]
            )
            assert answer.choices[0].message.content == "across replicas"
            streamed = client.chat.completions.create(
                model="echo-chat",
                messages=[{"role": "user", "content": "a b c d"}],
                stream=True,
            )
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == "a b c d"
        finally:
            agent.stop()
    finally:
        second.stop()
        first.stop()


def test_rate_limits_count_completions_and_answer_429_with_headers(
    settings: ServerSettings, engine: ScriptedEngine, tmp_path: Path
) -> None:
    limited = harness.e2e_settings(
        settings, gateway_requests_per_minute=4, gateway_tokens_per_minute=100
    )
    server = ThreadedServer(limited).start()
    try:
        owner = harness.login(server, ["host"], "gw-host")
        agent = _host(server, owner, tmp_path / "host", _models(engine))
        try:
            client = _client(server, _key(server, harness.login(server, ["renter"], "gw-r")))
            words = [{"role": "user", "content": " ".join(["a"] * 30)}]  # ~25 + 30 tokens
            first = client.chat.completions.with_raw_response.create(
                model="echo-chat", messages=words
            )
            assert first.headers["x-ratelimit-limit-requests"] == "4"
            assert first.headers["x-ratelimit-remaining-requests"] == "3"
            assert first.headers["x-ratelimit-limit-tokens"] == "100"
            client.chat.completions.create(model="echo-chat", messages=words)
            # Two prompts (charged up front) and two 30-word answers (charged once counted)
            # are over 100 tokens: the third is refused for tokens.
            with pytest.raises(openai.RateLimitError) as tokens:
                client.chat.completions.create(model="echo-chat", messages=words)
            assert tokens.value.code == "rate_limit_exceeded"
            assert tokens.value.type == "tokens"
            assert int(tokens.value.response.headers["retry-after"]) >= 1
            assert int(tokens.value.response.headers["x-ratelimit-remaining-tokens"]) < 25
            client.models.list()  # the fourth request
            with pytest.raises(openai.RateLimitError) as requests:
                client.chat.completions.create(model="echo-chat", messages=words)
            assert requests.value.type == "requests"
            assert requests.value.response.headers["x-ratelimit-remaining-requests"] == "0"
        finally:
            agent.stop()
    finally:
        server.stop()


def test_each_request_is_recorded_and_billed_per_token(
    server: ThreadedServer, engine: ScriptedEngine, tmp_path: Path
) -> None:
    owner = harness.login(server, ["host"], "gw-host")
    agent = _host(server, owner, tmp_path / "host", _models(engine))
    try:
        renter = harness.login(server, ["renter"], "gw-r")
        api = httpx.Client(base_url=f"{server.url}/api/v1", headers=renter, timeout=10)
        before = api.get("/billing/balance").json()["available_micros"]
        client = _client(server, _key(server, renter))
        client.chat.completions.create(  # 4 prompt and 4 completion tokens
            model="echo-chat", messages=[{"role": "user", "content": "hello from the renter"}]
        )

        def billed() -> dict[str, Any] | None:
            rows = api.get("/usage").json()["data"]
            return rows[0] if rows and rows[0]["billed_at"] else None

        row = wait_for(billed, what="the request to be billed")
        # $1 per million input tokens, $2 per million output: 4 x 1 + 4 x 2 micro-dollars.
        assert (row["prompt_tokens"], row["completion_tokens"], row["cost_micros"]) == (4, 4, 12)
        assert row["model"] == "echo-chat" and row["outcome"] == "ok"
        assert row["host_id"] == str(agent.host_id) and row["first_token_ms"] is not None
        assert api.get("/billing/balance").json()["available_micros"] == before - 12
        earned = httpx.get(f"{server.url}/api/v1/host/earnings", headers=owner, timeout=10).json()
        assert earned["payable_micros"] == 11  # 12 less the platform's 10%, rounded half up
        summary = api.get("/usage/summary", params={"group_by": "key"}).json()
        assert summary["total"]["requests"] == 1 and summary["groups"][0]["name"] == "gw"
        api.close()
    finally:
        agent.stop()
