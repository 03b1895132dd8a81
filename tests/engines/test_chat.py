"""/v1/chat/completions with SmolLM2-135M-Instruct, not streaming, through the openai client."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from openai import OpenAI

from tests.engines.conftest import CHAT_MODEL, EMBEDDINGS_MODEL

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def ask(client: OpenAI, **overrides: object) -> openai.types.chat.ChatCompletion:
    options: dict[str, object] = {
        "model": CHAT_MODEL,
        "messages": CAPITAL,
        "temperature": 0,
        "max_tokens": 16,
    }
    return client.chat.completions.create(**{**options, **overrides})


def test_answers_a_factual_question_with_real_token_counts(client: OpenAI) -> None:
    answer = ask(client)

    choice = answer.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert answer.object == "chat.completion"
    assert answer.model == CHAT_MODEL
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 10  # the chat template adds a system prompt
    assert 0 < answer.usage.completion_tokens <= 16
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_max_tokens_ends_with_length(client: OpenAI) -> None:
    answer = ask(client, max_tokens=3)

    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 3


def test_max_completion_tokens_is_honoured_too(client: OpenAI) -> None:
    answer = ask(client, max_completion_tokens=2)

    assert answer.usage is not None and answer.usage.completion_tokens == 2


def test_a_stop_sequence_ends_the_answer_before_it(client: OpenAI) -> None:
    answer = ask(client, stop=["Paris", "paris"])

    assert answer.choices[0].finish_reason == "stop"
    content = answer.choices[0].message.content or ""
    assert "Paris" not in content
    assert content.startswith("The capital of France is")


def test_sampling_with_a_seed_is_reproducible(client: OpenAI) -> None:
    story = [{"role": "user", "content": "Write one sentence about a cat."}]
    first = ask(client, messages=story, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    again = ask(client, messages=story, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)

    assert first.choices[0].message.content == again.choices[0].message.content


def test_system_messages_and_text_parts_are_understood(client: OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are a geography teacher. Answer in one sentence."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ]
    answer = ask(client, messages=messages, max_tokens=24)

    assert "Paris" in (answer.choices[0].message.content or "")


def test_concurrent_requests_wait_their_turn(client: OpenAI) -> None:
    answers: list[str] = []

    def run() -> None:
        answers.append(ask(client).choices[0].message.content or "")

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(answers) == 2 and all("Paris" in answer for answer in answers)
    assert answers[0] == answers[1]  # greedy decoding: queued, not interleaved


@pytest.mark.parametrize(
    ("overrides", "param", "code"),
    [
        ({"n": 2}, "n", "invalid_value"),
        ({"max_tokens": 5000}, "max_tokens", "invalid_value"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"logit_bias": {"not-a-token": 5}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"999999": 5}}, "logit_bias", "invalid_value"),
        ({"logprobs": True}, "logprobs", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]},
            "messages.0.role",
            "invalid_value",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                    }
                ]
            },
            "messages.0.content",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "user", "content": "hello " * 8200}]},
            "messages",
            "context_length_exceeded",
        ),
        ({"model": EMBEDDINGS_MODEL}, "model", "model_not_supported"),
    ],
)
def test_bad_requests_are_400_in_openai_shape(
    http: httpx.Client, overrides: dict[str, object], param: str, code: str
) -> None:
    body = {"model": CHAT_MODEL, "messages": CAPITAL, "max_tokens": 4, **overrides}
    response = http.post("/v1/chat/completions", json=body)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_malformed_json_is_400_in_openai_shape(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_404_model_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, model="gpt-4o")
    assert caught.value.code == "model_not_found"


def test_models_health_and_unknown_urls(client: OpenAI, http: httpx.Client) -> None:
    assert sorted(model.id for model in client.models.list()) == sorted(
        [CHAT_MODEL, EMBEDDINGS_MODEL]
    )
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL
    kinds = {
        model["id"]: model["peergpu"]["kind"] for model in http.get("/v1/models").json()["data"]
    }
    assert kinds == {CHAT_MODEL: "chat", EMBEDDINGS_MODEL: "embeddings"}
    assert http.get("/health").json() == {"status": "ok", "models": [EMBEDDINGS_MODEL, CHAT_MODEL]}
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_url"
