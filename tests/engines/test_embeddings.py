"""/v1/embeddings with all-MiniLM-L6-v2, through the official openai client."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest
from openai import OpenAI

from tests.engines.conftest import CHAT_MODEL, EMBEDDINGS_MODEL

DIMENSIONS = 384
SENTENCES = [
    "A man is eating a piece of bread.",
    "Someone is having a sandwich for lunch.",
    "The stock market fell sharply this morning.",
]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_vectors_are_unit_length_and_similar_sentences_are_closer(client: OpenAI) -> None:
    answer = client.embeddings.create(
        model=EMBEDDINGS_MODEL, input=SENTENCES, encoding_format="float"
    )

    vectors = [item.embedding for item in sorted(answer.data, key=lambda item: item.index)]
    assert [len(vector) for vector in vectors] == [DIMENSIONS] * 3
    assert all(math.isclose(math.sqrt(dot(v, v)), 1.0, abs_tol=1e-3) for v in vectors)
    eating, lunch, market = vectors
    assert dot(eating, lunch) > dot(eating, market) + 0.2
    assert dot(eating, lunch) > dot(lunch, market) + 0.2
    assert answer.model == EMBEDDINGS_MODEL
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(SENTENCES) * 5


def test_base64_is_little_endian_float32_of_the_same_vector(
    client: OpenAI, http: httpx.Client
) -> None:
    as_floats = client.embeddings.create(
        model=EMBEDDINGS_MODEL, input=SENTENCES[0], encoding_format="float"
    )
    raw = http.post(
        "/v1/embeddings",
        json={"model": EMBEDDINGS_MODEL, "input": SENTENCES[0], "encoding_format": "base64"},
    ).json()

    decoded = struct.unpack(f"<{DIMENSIONS}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert decoded == pytest.approx(as_floats.data[0].embedding, abs=1e-6)
    # The openai client asks for base64 unless told otherwise, and decodes it.
    default = client.embeddings.create(model=EMBEDDINGS_MODEL, input=SENTENCES[0])
    assert default.data[0].embedding == pytest.approx(as_floats.data[0].embedding, abs=1e-6)


def test_dimensions_equal_to_the_model_are_accepted(client: OpenAI) -> None:
    answer = client.embeddings.create(
        model=EMBEDDINGS_MODEL, input="hello", dimensions=DIMENSIONS, encoding_format="float"
    )
    assert len(answer.data[0].embedding) == DIMENSIONS


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": "hello", "dimensions": 128}, "dimensions", "invalid_value"),
        ({"input": [[101, 7592, 102]]}, "input", "invalid_value"),
        ({"input": [101, 7592, 102]}, "input", "invalid_value"),
        ({"input": []}, "input", "invalid_value"),
        ({"input": ""}, "input", "invalid_value"),
        ({"input": "hello", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ({"input": "word " * 300}, "input", "context_length_exceeded"),
        ({"input": "hello", "model": CHAT_MODEL}, "model", "model_not_supported"),
    ],
)
def test_bad_requests_are_400_in_openai_shape(
    http: httpx.Client, body: dict[str, object], param: str, code: str
) -> None:
    response = http.post("/v1/embeddings", json={"model": EMBEDDINGS_MODEL, **body})

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


def test_an_unknown_model_is_404_model_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert caught.value.code == "model_not_found"
