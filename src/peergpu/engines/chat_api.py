"""``/v1/chat/completions`` on OpenAI's terms: request checks, the answer, and the SSE stream."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from peergpu.engines.base import (
    ChatBackend,
    ChatEvent,
    ChatParams,
    ChatTurn,
    Finished,
    Role,
    Started,
    TextDelta,
)
from peergpu.engines.errors import EngineError, InvalidRequest
from peergpu.engines.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionCreate,
    ChatMessageIn,
    ChatMessageOut,
    Usage,
)

MAX_STOP_SEQUENCES = 4
#: OpenAI's roles this engine understands; newer clients say "developer" for "system"
_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


def chat_params(body: ChatCompletionCreate, backend: ChatBackend) -> ChatParams:
    """The generation a request asks for; InvalidRequest for what this engine cannot honour."""
    if body.n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported.", param="n")
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported by this engine.", param="logprobs")
    if body.tools:
        raise InvalidRequest("Tool calling is not supported by this engine.", param="tools")
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise InvalidRequest(
            "Only the 'text' response format is supported.", param="response_format"
        )
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > backend.max_completion_tokens:
        raise InvalidRequest(
            f"max_tokens is too large: {max_tokens}. This model supports at most "
            f"{backend.max_completion_tokens} completion tokens.",
            param="max_tokens",
        )
    return ChatParams(
        messages=[_turn(index, message) for index, message in enumerate(body.messages)],
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=_stops(body.stop),
        seed=body.seed,
        logit_bias=_logit_bias(body.logit_bias or {}),
    )


async def complete(events: AsyncIterator[ChatEvent], *, model: str) -> ChatCompletion:
    """Collect a whole generation into one ``chat.completion``."""
    parts: list[str] = []
    async for event in events:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return ChatCompletion(
                id=_completion_id(),
                created=int(time.time()),
                model=model,
                choices=[
                    ChatChoice(
                        message=ChatMessageOut(content="".join(parts)),
                        finish_reason=event.finish_reason,
                    )
                ],
                usage=_usage(event),
            )
    raise EngineError("The generation ended without finishing.")


async def sse_events(
    first: ChatEvent, events: AsyncGenerator[ChatEvent, None], *, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events, then ``[DONE]``; closing it cancels the generation.

    The first chunk carries the role; with ``include_usage`` every chunk has ``"usage": null``
    and a last one has no choices and the usage, as OpenAI sends them.
    """
    chunk = _Chunks(model, include_usage)
    try:
        yield chunk.delta({"role": "assistant", "content": ""})
        async for event in _chain(first, events):
            if isinstance(event, TextDelta):
                yield chunk.delta({"content": event.text})
            elif isinstance(event, Finished):
                yield chunk.delta({}, finish_reason=event.finish_reason)
                if include_usage:
                    yield chunk.usage(event)
        yield "data: [DONE]\n\n"
    except EngineError as exc:  # after the 200: the error travels as an event, as OpenAI's do
        yield _event(exc.body())
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


class _Chunks:
    def __init__(self, model: str, include_usage: bool) -> None:
        self._base: dict[str, Any] = {
            "id": _completion_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage

    def delta(self, delta: dict[str, Any], *, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._base, "choices": [choice]}
        if self._include_usage:
            body["usage"] = None
        return _event(body)

    def usage(self, finished: Finished) -> str:
        return _event({**self._base, "choices": [], "usage": _usage(finished).model_dump()})


async def _chain(first: ChatEvent, events: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
    if not isinstance(first, Started):
        yield first
    async for event in events:
        yield event


def _turn(index: int, message: ChatMessageIn) -> ChatTurn:
    role = _ROLES.get(message.role)
    if role is None:
        raise InvalidRequest(
            f"Unsupported role '{message.role}' (this engine has no tool calling).",
            param=f"messages.{index}.role",
        )
    content = message.content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if part.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(text, str) for text in texts):
            raise InvalidRequest(
                "Only text content parts are supported by this model.",
                param=f"messages.{index}.content",
            )
        content = "\n".join(str(text) for text in texts)
    if content is None:
        raise InvalidRequest("Each message needs content.", param=f"messages.{index}.content")
    return ChatTurn(role=role, content=content)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.", param="stop"
        )
    return tuple(item for item in stops if item)


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or not -100 <= value <= 100:
            raise InvalidRequest(
                "logit_bias maps token ids to a bias between -100 and 100.", param="logit_bias"
            )
        parsed[int(key)] = value
    return parsed


def _usage(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
