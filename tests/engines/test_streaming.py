"""Streaming chat completions over SSE, and what happens when the client goes away."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai import OpenAI

from peergpu.engines import SmolLM2Chat
from tests.engines.conftest import CHAT_MODEL

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a very long story about a dragon."}]


def endless(backend: SmolLM2Chat) -> dict[str, object]:
    """Ban the end tokens: the model cannot finish before max_tokens (minutes away)."""
    return {"max_tokens": 2048, "logit_bias": {str(t): -100 for t in backend.eos_token_ids}}


def test_stream_with_usage_matches_the_plain_answer(client: OpenAI) -> None:
    options = {"model": CHAT_MODEL, "messages": CAPITAL, "temperature": 0, "max_tokens": 16}
    plain = client.chat.completions.create(**options)
    chunks = list(
        client.chat.completions.create(
            **options, stream=True, stream_options={"include_usage": True}
        )
    )

    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == (
        plain.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert text == plain.choices[0].message.content
    assert "Paris" in text
    assert middle[-1].choices[0].finish_reason == "stop"
    assert len({chunk.id for chunk in chunks}) == 1


def test_sse_framing_ends_with_done(http: httpx.Client) -> None:
    body = {"model": CHAT_MODEL, "messages": CAPITAL, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()

    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all("usage" not in chunk for chunk in chunks)  # not asked for
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_refused_stream_is_a_plain_json_error(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CAPITAL, stream=True)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "hello " * 8200}],
            stream=True,
        )
    assert caught.value.code == "context_length_exceeded"


def test_the_model_stops_generating_when_the_stream_is_dropped(
    client: OpenAI, chat_backend: SmolLM2Chat
) -> None:
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=STORY,
        temperature=0,
        stream=True,
        **endless(chat_backend),
    )
    received = [chunk for chunk, _ in zip(stream, range(5), strict=False)]
    stream.close()

    assert chat_backend.wait_idle(timeout=60)
    generation = chat_backend.last_generation
    assert generation is not None and generation.finish_reason == "cancelled"
    assert len(received) == 5 and generation.completion_tokens < 100


def test_the_model_stops_when_a_plain_request_is_abandoned(
    engine_url: str, chat_backend: SmolLM2Chat
) -> None:
    body = {"model": CHAT_MODEL, "messages": STORY, "temperature": 0, **endless(chat_backend)}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{engine_url}/v1/chat/completions", json=body, timeout=1.5)

    assert chat_backend.wait_idle(timeout=60)
    generation = chat_backend.last_generation
    assert generation is not None and generation.finish_reason == "cancelled"
    assert generation.completion_tokens < 200


def test_a_request_abandoned_while_queued_never_starts(
    client: OpenAI, engine_url: str, chat_backend: SmolLM2Chat
) -> None:
    body = {"model": CHAT_MODEL, "messages": CAPITAL, "temperature": 0, "max_tokens": 8}
    busy = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=STORY,
        temperature=0,
        stream=True,
        **endless(chat_backend),
    )
    next(iter(busy))  # the worker is generating for it now
    with pytest.raises(httpx.ReadTimeout):  # queued behind it, then abandoned
        httpx.post(f"{engine_url}/v1/chat/completions", json=body, timeout=1.0)
    busy.close()

    assert chat_backend.wait_idle(timeout=60)
    queued = chat_backend.last_generation
    assert queued is not None and queued.finish_reason == "cancelled"
    assert queued.completion_tokens == 0
