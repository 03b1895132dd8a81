"""The issue's "done when", end to end with real models: the official ``openai`` client calls
the gateway of a real server, which relays over a real agent process's WebSocket to the
built-in engine (MiniLM embeddings, SmolLM2 chat). A renter who goes away mid-stream stops the
model's generation on the host."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from peergpu.config import ServerSettings
from peergpu.engines import MiniLMEmbeddings, SmolLM2Chat
from tests.engines.serving import ThreadedApp
from tests.integration import harness
from tests.integration.harness import ThreadedServer, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def gateway(
    settings: ServerSettings, engine: ThreadedApp, tmp_path: Path
) -> Iterator[openai.OpenAI]:
    server = ThreadedServer(harness.e2e_settings(settings)).start()
    owner = harness.login(server, ["host"], "engine-host")
    models = [
        {
            "name": MiniLMEmbeddings.MODEL_ID,
            "kind": "embeddings",
            "url": f"{engine.url}/v1",
            "input_price_per_million_micros": 20_000,
        },
        {
            "name": SmolLM2Chat.MODEL_ID,
            "kind": "chat",
            "url": f"{engine.url}/v1",
            "input_price_per_million_micros": 100_000,
            "output_price_per_million_micros": 200_000,
        },
    ]
    agent = harness.enroll_agent(
        server, owner, tmp_path / "host", extra_env={"PEERGPU_AGENT_MODELS": json.dumps(models)}
    )
    renter = harness.login(server, ["renter"], "engine-renter")
    key = httpx.post(
        f"{server.url}/api/v1/keys", json={"name": "e2e"}, headers=renter, timeout=10
    ).json()["key"]
    try:
        yield openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", max_retries=0, timeout=60)
    finally:
        agent.stop()
        server.stop()


def test_real_models_through_the_gateway(gateway: openai.OpenAI, chat_backend: SmolLM2Chat) -> None:
    assert {m.id for m in gateway.models.list().data} == {
        MiniLMEmbeddings.MODEL_ID,
        SmolLM2Chat.MODEL_ID,
    }
    # Embeddings: the client's default base64, decoded by the client; real semantics.
    texts = ["A cat sleeps on the sofa.", "A kitten naps on the couch.", "Stock prices fell."]
    vectors = np.array(
        [
            d.embedding
            for d in gateway.embeddings.create(model=MiniLMEmbeddings.MODEL_ID, input=texts).data
        ]
    )
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3

    # Streaming chat, with usage, through the host.
    stream = gateway.chat.completions.create(
        model=SmolLM2Chat.MODEL_ID,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 24

    # The renter leaves after a few tokens: the model stops generating on the host.
    before, previous = chat_backend.tokens_generated, chat_backend.last_generation
    stream = gateway.chat.completions.create(
        model=SmolLM2Chat.MODEL_ID,
        messages=[{"role": "user", "content": "Count from one to two hundred in words."}],
        max_tokens=400,
        temperature=0,
        stream=True,
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    stream.close()
    wait_for(
        lambda: (
            chat_backend.last_generation is not previous
            and chat_backend.last_generation is not None
            and chat_backend.last_generation.finish_reason == "cancelled"
        ),
        timeout=15,
        what="the generation to be cancelled",
    )
    chat_backend.wait_idle(10)
    assert chat_backend.tokens_generated - before < 100, "the host kept generating"
