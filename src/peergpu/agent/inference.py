"""Serving inference: relay the gateway's requests to the engines this host runs.

The server sends ``infer_start`` over the agent's socket; the agent calls the model's local
OpenAI-compatible engine (vLLM, a llama.cpp server, Ollama, ``peergpu engine serve``) and
answers with ``infer_chunk`` frames and one ``infer_end``. Each request is its own task, so a
slow engine never holds up the socket. The agent is the authority on its own capacity: past a
model's ``max_concurrency`` it answers ``host_busy`` at once and the gateway tries another host.

``infer_cancel`` (the renter went away) cancels the task, which closes the connection to the
engine: engines stop generating when their client disconnects. A lost socket aborts every
stream (the gateway has already failed them). Streams ask the engine for usage
(``stream_options.include_usage``) whether or not the renter did, so every request is billed on
the engine's own token counts; the usage chunk is passed on only when the renter asked for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter
from typing import Any

import aiohttp

from peergpu.agent.link import Link
from peergpu.agent.settings import ServedModelConfig
from peergpu.protocol.messages import (
    InferCancel,
    InferChunk,
    InferEnd,
    InferStart,
    InferUsage,
    ServedModelSpec,
)

logger = logging.getLogger(__name__)
#: Longest line a streaming engine may send (one server-sent event).
_MAX_EVENT_BYTES = 4 * 1024 * 1024

_PATHS = {"chat.completions": "/chat/completions", "embeddings": "/embeddings"}
_SEND_END_TIMEOUT_SECONDS = 5.0


class _Failed(Exception):
    """The engine could not answer: becomes an ``infer_end`` with ``ok`` false."""

    def __init__(self, status: int, code: str, message: str, *, error_type: str = "server_error"):
        super().__init__(message)
        self.status, self.code, self.message, self.error_type = status, code, message, error_type
        self.param: str | None = None


class InferenceServer:
    def __init__(
        self,
        *,
        link: Link,
        models: list[ServedModelConfig],
    ) -> None:
        self._link = link
        self._models = {m.name: m for m in models}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._in_flight: Counter[str] = Counter()
        connections = max(1, sum(m.max_concurrency for m in models))
        self._connections = connections
        # aiohttp, not httpx: the engine call was most of the agent's CPU per request with
        # httpx (bench/gateway.py). Made on first use, inside the running loop.
        self._client: aiohttp.ClientSession | None = None

    @property
    def declared(self) -> list[ServedModelSpec]:
        """What the ``hello`` tells the server this host serves."""
        return [
            ServedModelSpec(
                name=m.name,
                kind=m.kind,
                max_concurrency=m.max_concurrency,
                input_price_per_million_micros=m.input_price_per_million_micros,
                output_price_per_million_micros=m.output_price_per_million_micros,
            )
            for m in self._models.values()
        ]

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def on_start(self, start: InferStart) -> None:
        model = self._models.get(start.model)
        if model is None:
            await self._end(start, _Failed(404, "model_not_found", "This host does not serve it."))
            return
        if start.stream_id in self._tasks:
            return  # a repeat of a stream already running
        if self._in_flight[model.name] >= model.max_concurrency:
            await self._end(start, _Failed(503, "host_busy", "The host is at its concurrency."))
            return
        self._in_flight[model.name] += 1
        task = asyncio.create_task(self._serve(start, model), name=f"infer-{start.stream_id}")
        self._tasks[start.stream_id] = task

        def _done(_: asyncio.Task[None], stream_id: str = start.stream_id) -> None:
            self._tasks.pop(stream_id, None)
            self._in_flight[model.name] -= 1

        task.add_done_callback(_done)

    def on_cancel(self, cancel: InferCancel) -> None:
        task = self._tasks.get(cancel.stream_id)
        if task is not None:
            task.cancel()

    def abort_all(self) -> None:
        """The socket dropped: the gateway has failed these streams; stop their engines."""
        for task in list(self._tasks.values()):
            task.cancel()

    async def close(self) -> None:
        self.abort_all()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._client is not None:
            await self._client.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._client is None or self._client.closed:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
                read_bufsize=_MAX_EVENT_BYTES,
                auto_decompress=True,
            )
        return self._client

    async def _serve(self, start: InferStart, model: ServedModelConfig) -> None:
        relay = _Relay(self._link, start, model)
        try:
            async with asyncio.timeout(max(0.0, start.deadline - time.time())):
                await relay.run(self._session())
        except asyncio.CancelledError:
            relay.failure = _Failed(499, "cancelled", "The request was cancelled.")
        except TimeoutError:
            relay.failure = _Failed(504, "timeout", "The engine did not finish in time.")
        except _Failed as failed:
            relay.failure = failed
        except (aiohttp.ClientError, ValueError) as exc:
            relay.failure = _Failed(
                502, "engine_unavailable", f"The host's engine is unreachable: {exc}"
            )
        except Exception:  # the request fails, the agent goes on
            logger.exception("inference stream %s failed", start.stream_id)
            relay.failure = _Failed(502, "engine_error", "The host's engine failed.")
        # The end frame goes out even when this task was cancelled (shielded from a second
        # cancel by its own timeout), so the gateway records what was used.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(_SEND_END_TIMEOUT_SECONDS):
                await self._end(start, relay.failure, relay.usage())

    async def _end(
        self, start: InferStart, failure: _Failed | None, usage: InferUsage | None = None
    ) -> None:
        end = InferEnd(
            stream_id=start.stream_id,
            reply_to=start.reply_to,
            ok=failure is None,
            status=200 if failure is None else failure.status,
            code=None if failure is None else failure.code,
            message="" if failure is None else failure.message[:4000],
            error_type="server_error" if failure is None else failure.error_type,
            param=None if failure is None else failure.param,
            usage=usage,
        )
        await self._link.send(end.model_dump_json())


class _Relay:
    """One request: call the engine, forward what it says, remember the usage.

    Streamed events are coalesced: the first goes out at once, and whatever the engine says
    while a frame is being sent goes in the next frame, so a fast engine costs one frame per
    batch rather than per token, and a slow one still gets each token out as it comes."""

    def __init__(self, link: Link, start: InferStart, model: ServedModelConfig) -> None:
        self.link, self.start, self.model = link, start, model
        self.failure: _Failed | None = None
        self.seq = 0
        self._pending: list[str] = []
        self._sender: asyncio.Task[None] | None = None
        self.reported: InferUsage | None = None
        self.pieces = 0  # streamed chunks with content: the usage of a stream cut short

    def usage(self) -> InferUsage | None:
        if self.reported is not None:
            return self.reported
        if self.pieces == 0:
            return None
        return InferUsage(
            prompt_tokens=_estimate_prompt_tokens(self.start.body),
            completion_tokens=self.pieces,
        )

    async def run(self, client: aiohttp.ClientSession) -> None:
        body = dict(self.start.body)
        body["model"] = self.model.engine_model or self.model.name
        streaming = self.start.endpoint == "chat.completions" and body.get("stream") is True
        wants_usage = False
        if streaming:
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            wants_usage = options.get("include_usage") is True
            body["stream_options"] = {**options, "include_usage": True}
        url = self.model.url.rstrip("/") + _PATHS[self.start.endpoint]
        headers = {"Content-Type": "application/json"}
        if self.model.api_key is not None:
            headers["Authorization"] = f"Bearer {self.model.api_key.get_secret_value()}"
        payload = json.dumps(body, separators=(",", ":")).encode()
        async with client.post(url, data=payload, headers=headers) as response:
            if response.status != 200:
                raise _engine_error(response.status, await response.read())
            if streaming:
                try:
                    await self._relay_stream(response, wants_usage)
                except BaseException:
                    if self._sender is not None:
                        self._sender.cancel()
                    raise
                await self._flush()
            else:
                await self._relay_whole(await response.read())

    async def _relay_whole(self, raw: bytes) -> None:
        try:
            answer = json.loads(raw)
        except ValueError as exc:
            raise _Failed(502, "engine_error", "The engine's answer is not JSON.") from exc
        if not isinstance(answer, dict):
            raise _Failed(502, "engine_error", "The engine's answer is not a JSON object.")
        answer["model"] = self.model.name
        self.reported = _usage(answer.get("usage"))
        await self._send([json.dumps(answer, separators=(",", ":"))])

    async def _relay_stream(self, response: aiohttp.ClientResponse, wants_usage: bool) -> None:
        async for raw_line in response.content:
            if not raw_line.startswith(b"data:"):
                continue
            payload = raw_line[5:].strip().decode()
            if payload == "[DONE]":
                return
            try:
                chunk = json.loads(payload)
            except ValueError as exc:
                raise _Failed(502, "engine_error", "The engine sent a malformed event.") from exc
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                raise _engine_error(502, payload.encode())
            usage = _usage(chunk.get("usage"))
            if usage is not None:
                self.reported = usage
            if not wants_usage:
                chunk.pop("usage", None)
                if chunk.get("choices") == []:
                    continue  # the usage-only chunk the renter did not ask for
            if _has_content(chunk):
                self.pieces += 1
            chunk["model"] = self.model.name
            self._pending.append(json.dumps(chunk, separators=(",", ":")))
            if self._sender is None or self._sender.done():
                if self._sender is not None:
                    self._sender.result()  # a failed send ends the stream
                self._sender = asyncio.create_task(self._send_pending())

    async def _send_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            await self._send(batch)

    async def _flush(self) -> None:
        """Wait for everything the engine said to go out."""
        if self._sender is not None:
            await self._sender
        await self._send_pending()

    async def _send(self, data: list[str]) -> None:
        frame = InferChunk(
            stream_id=self.start.stream_id, reply_to=self.start.reply_to, seq=self.seq, data=data
        )
        self.seq += 1
        if not await self.link.send(frame.model_dump_json()):
            # The socket is gone, and the gateway has failed the request: stop the engine.
            raise _Failed(503, "host_disconnected", "The host lost its connection.")


def _engine_error(status: int, raw: bytes) -> _Failed:
    """The engine's error, passed on: its 4xx are the renter's request's fault; anything else
    is the host's (502, and the gateway may retry elsewhere)."""
    message, error_type, param, code = "The engine refused the request.", "server_error", None, None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        error = json.loads(raw)["error"]
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            error_type = str(error.get("type") or error_type)
            param = error.get("param") if isinstance(error.get("param"), str) else None
            code = error.get("code") if isinstance(error.get("code"), str) else None
        elif isinstance(error, str):
            message = error
    if 400 <= status < 500 and status not in (408, 429):
        failed = _Failed(status, code or "invalid_request", message, error_type=error_type)
        failed.param = param
        return failed
    return _Failed(502, "engine_error", f"The host's engine failed ({status}): {message}")


def _usage(value: Any) -> InferUsage | None:
    if not isinstance(value, dict):
        return None
    try:
        return InferUsage(
            prompt_tokens=int(value.get("prompt_tokens") or 0),
            completion_tokens=int(value.get("completion_tokens") or 0),
        )
    except (TypeError, ValueError):
        return None


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and delta.get("content"):
            return True
    return False


def _estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A stream cut short has no engine count: about four characters a token."""
    return math.ceil(len(json.dumps(body.get("messages") or body.get("input") or "")) / 4)
