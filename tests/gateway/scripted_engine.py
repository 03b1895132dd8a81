"""A scripted OpenAI-compatible engine for the gateway's tests and benchmark.

It stands in for vLLM or Ollama at the edge of the host (the real built-in engine has its own
tests): its answers are deterministic, not a model's. A chat answer repeats the last user
message word by word (``stream`` or not, with OpenAI's usage counting one token per word);
embeddings are fixed vectors derived from each text's hash. The engine model name picks a
behaviour: ``echo``, ``slow`` (one word every 50 ms, to be cancelled), ``fail`` (500), ``bad``
(400 in OpenAI's shape). It records what it saw, so tests can check that the host stopped
generating when the renter went away.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.integration.harness import free_port

DIMENSIONS = 8


@dataclass
class EngineLog:
    requests: list[dict[str, Any]] = field(default_factory=list)
    #: Streams that ended because the client went away, and the words they had produced.
    cancelled: list[int] = field(default_factory=list)
    completed: int = 0


def create_scripted_engine(log: EngineLog) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        log.requests.append(body)
        behaviour = body.get("model", "echo")
        if behaviour == "fail":
            return JSONResponse({"error": {"message": "engine crashed"}}, status_code=500)
        if behaviour == "bad":
            error = {
                "message": "temperature too high",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_value",
            }
            return JSONResponse({"error": error}, status_code=400)
        text = str(body["messages"][-1]["content"])
        words = text.split() * int(body.get("repeat", 1))
        limit = body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and len(words) > limit:
            words, finish = words[:limit], "length"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        created = int(time.time())
        if not body.get("stream"):
            if behaviour == "slow":
                await asyncio.sleep(0.05 * len(words))
            log.completed += 1
            return JSONResponse(
                {
                    "id": "chatcmpl-scripted",
                    "object": "chat.completion",
                    "created": created,
                    "model": behaviour,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": finish,
                            "message": {"role": "assistant", "content": " ".join(words)},
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        delay = 0.05 if behaviour == "slow" else 0.0

        def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
            event: dict[str, Any] = {
                "id": "chatcmpl-scripted",
                "object": "chat.completion.chunk",
                "created": created,
                "model": behaviour,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }
            if include_usage:
                event["usage"] = None
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            produced = 0
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                for index, word in enumerate(words):
                    if delay:
                        await asyncio.sleep(delay)
                    produced += 1
                    yield chunk({"content": word if index == 0 else " " + word}, None)
                yield chunk({}, finish)
                if include_usage:
                    final = {
                        "id": "chatcmpl-scripted",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": behaviour,
                        "choices": [],
                        "usage": usage,
                    }
                    yield b"data: " + json.dumps(final).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                log.completed += 1
            except (asyncio.CancelledError, GeneratorExit):
                log.cancelled.append(produced)
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await request.json()
        log.requests.append(body)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for index, text in enumerate(texts):
            vector = embed(str(text))
            value: Any = vector
            if body.get("encoding_format") == "base64":
                value = base64.b64encode(struct.pack(f"<{DIMENSIONS}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        tokens = sum(len(str(t).split()) for t in texts)
        log.completed += 1
        return JSONResponse(
            {
                "object": "list",
                "model": body.get("model"),
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return app


def embed(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255 for b in digest[:DIMENSIONS]]


class ScriptedEngine:
    """The engine on a loopback port, in a thread of its own."""

    def __init__(self) -> None:
        self.log = EngineLog()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(
            create_scripted_engine(self.log),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ScriptedEngine:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the scripted engine did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
