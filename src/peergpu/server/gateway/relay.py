"""One gateway request's trip to a host's engine and back.

The answer is held until the host's first frame: an error, a busy or silent host, or one that
went away before producing anything is answered as plain JSON, and such a request is retried
once on another host (busy hosts are skipped without spending that retry). After the first
chunk the answer streams; an error then arrives as an ``error`` event, as OpenAI sends it. A
renter who disconnects cancels the host's generation. Every request a host served is recorded
for usage billing with the engine's token counts, bounded by what the request allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from peergpu.protocol.messages import InferChunk, InferEnd, InferEndpoint, InferStart
from peergpu.server.agents.inference import InferenceStreams, InferFrame, OpenStream
from peergpu.server.context import ServerContext
from peergpu.server.gateway import catalog, limits
from peergpu.server.gateway.errors import OpenAIError
from peergpu.server.gateway.router import Candidate, NoHost, QueueTimeout, Router
from peergpu.server.security.principal import Principal
from peergpu.server.services.billing.inference import UsageRecord

logger = logging.getLogger(__name__)

#: Failures before the first chunk that another host may not have.
_RETRYABLE = frozenset(
    {
        "host_busy",
        "host_disconnected",
        "engine_unavailable",
        "engine_error",
        "timeout",
        "model_not_found",  # the host stopped serving it since the catalog was read
    }
)
_MAX_BUSY_SKIPS = 8
#: How long a cancelled stream's host has to report what it used.
_CANCEL_GRACE_SECONDS = 5.0
#: Template and special tokens a chat prompt may add to the request's own bytes.
_PROMPT_OVERHEAD_TOKENS = 512


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    principal: Principal
    endpoint: InferEndpoint
    kind: str
    model: str
    body: dict[str, Any]
    body_bytes: int
    stream: bool
    max_completion_tokens: int | None
    headers: dict[str, str]


class Relay:
    """The gateway's side of inference on this replica: routing and the open exchanges."""

    def __init__(self, context: ServerContext, streams: InferenceStreams) -> None:
        self.context = context
        self.streams = streams
        self.router = Router(context)
        #: Completion tokens counted after answers, charged with each caller's next admission.
        self.debts = limits.TokenDebts()
        self._flusher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def serve(self, request: InferenceRequest) -> Response:
        await self.streams.start()
        if self._flusher is None:
            self._flusher = asyncio.create_task(
                limits.run_debt_flusher(self.context, self.debts), name="gateway-token-debts"
            )
        exchange = _Exchange(self, request)
        try:
            first = await exchange.open()
            if request.stream:
                return _RelayedStream(exchange, first)
            return await exchange.whole(first)
        except BaseException:
            exchange.abandon()  # the renter went away (or the request failed): free the host
            raise

    def spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        try:
            await limits.flush_debts(self.context, self.debts)  # what the last answers used
        except Exception:  # noqa: BLE001 - shutting down: the limiter may be gone already
            logger.warning("gateway: could not charge the last tokens to the rate limits")


class _Exchange:
    def __init__(self, relay: Relay, request: InferenceRequest) -> None:
        self.relay, self.request = relay, request
        self.context = relay.context
        settings = relay.context.settings
        self.started = time.monotonic()
        self.deadline = self.started + settings.gateway_request_timeout_seconds
        #: The same deadline on the event loop's clock (asyncio.timeout_at).
        self.loop_deadline = asyncio.get_running_loop().time() + (self.deadline - self.started)
        self.first_chunk_at: float | None = None
        self.candidate: Candidate | None = None
        self.stream: OpenStream | None = None
        self.relayed_bytes = 0
        self.finished = False
        self.released = False

    # ------------------------------------------------------------ routing

    async def open(self) -> InferFrame:
        """Route the request and wait for the host's first frame (see the module docstring);
        raises :class:`OpenAIError` when no host can answer."""
        request, settings = self.request, self.context.settings
        exclude: set[Any] = set()
        retries, busy_skips = 1, _MAX_BUSY_SKIPS
        failure: InferEnd | None = None
        while True:
            try:
                candidate = await self.relay.router.acquire(
                    request.model,
                    kind=request.kind,
                    exclude=exclude,
                    priority=request.principal.priority,
                    queue_timeout=settings.gateway_queue_timeout_seconds,
                )
            except NoHost as no_host:
                if failure is not None and no_host.served:
                    raise _error_of(failure, request.headers) from None
                raise await self._nobody_serves(no_host.kind) from None
            except QueueTimeout:
                raise OpenAIError(
                    503,
                    f"Every host serving '{request.model}' is at capacity; retry shortly.",
                    type="server_error",
                    code="model_overloaded",
                    headers={**request.headers, "Retry-After": "1"},
                ) from None
            first = await self._start(candidate)
            if isinstance(first, InferChunk) or first.ok:
                return first
            self._release()
            if first.code not in _RETRYABLE:
                raise _error_of(first, request.headers)
            failure = first
            exclude.add(candidate.host_id)
            if first.code == "host_busy" and busy_skips > 0:
                busy_skips -= 1
            elif retries > 0:
                retries -= 1
                self.relay.router.forget(request.model)
                logger.info(
                    "gateway: host %s failed %s (%s); retrying elsewhere",
                    candidate.host_id,
                    request.model,
                    first.code,
                )
            else:
                raise _error_of(failure, request.headers)

    async def _start(self, candidate: Candidate) -> InferFrame:
        settings = self.context.settings
        self.candidate, self.released = candidate, False
        stream = self.stream = self.relay.streams.open(candidate.host_id)
        start = InferStart(
            stream_id=stream.stream_id,
            reply_to=self.relay.streams.replica_id,
            endpoint=self.request.endpoint,
            model=self.request.model,
            body=self.request.body,
            deadline=time.time() + (self.deadline - time.monotonic()),
        )
        if not await self.relay.streams.send(candidate.host_id, start.model_dump_json()):
            return _end(stream, 502, "host_disconnected", "The host is not connected.")
        wait = min(settings.gateway_first_token_timeout_seconds, self.deadline - time.monotonic())
        try:
            frame = await asyncio.wait_for(stream.queue.get(), max(wait, 0.0))
        except TimeoutError:
            await self.relay.streams.cancel(stream)
            return _end(stream, 504, "timeout", "The host did not answer in time.")
        if isinstance(frame, InferChunk):
            self.first_chunk_at = time.monotonic()
            self.relayed_bytes += sum(len(d) for d in frame.data)
        return frame

    async def _nobody_serves(self, other_kind: str | None) -> OpenAIError:
        request = self.request
        if other_kind is not None:
            return OpenAIError(
                400,
                f"'{request.model}' is a {other_kind} model; it cannot serve "
                f"/v1/{request.endpoint.replace('.', '/')}.",
                param="model",
                code="model_not_supported",
                headers=request.headers,
            )
        async with self.context.sessionmaker() as session:
            known = await catalog.ever_declared(session, request.model)
        if known:
            return OpenAIError(
                503,
                f"No host serves '{request.model}' right now; retry later.",
                type="server_error",
                code="model_unavailable",
                headers={**request.headers, "Retry-After": "5"},
            )
        return OpenAIError(
            404,
            f"The model '{request.model}' does not exist or no host serves it.",
            param="model",
            code="model_not_found",
            headers=request.headers,
        )

    # ------------------------------------------------------------ answers

    async def whole(self, first: InferFrame) -> Response:
        parts: list[str] = []
        frame = first
        while True:
            if isinstance(frame, InferChunk):
                parts.extend(frame.data)
            else:
                self._finish(frame)
                if not frame.ok:
                    raise _error_of(frame, self.request.headers)
                return Response(
                    "".join(parts), media_type="application/json", headers=self.request.headers
                )
            frame = await self._next()

    async def events(self, first: InferFrame) -> AsyncIterator[bytes]:
        frame = first
        try:
            while True:
                if isinstance(frame, InferChunk):
                    yield b"".join(b"data: " + item.encode() + b"\n\n" for item in frame.data)
                else:
                    self._finish(frame)
                    if frame.ok:
                        yield b"data: [DONE]\n\n"
                    else:
                        yield b"data: " + _error_event(frame) + b"\n\n"
                    return
                frame = await self._next()
        finally:
            self.abandon()

    async def _next(self) -> InferFrame:
        stream = self.stream
        assert stream is not None
        try:
            async with asyncio.timeout_at(self.loop_deadline):
                frame = await stream.queue.get()
        except TimeoutError:
            await self.relay.streams.cancel(stream)
            return _end(stream, 504, "timeout", "The request took longer than the gateway allows.")
        if isinstance(frame, InferChunk):
            if self.first_chunk_at is None:
                self.first_chunk_at = time.monotonic()
            self.relayed_bytes += sum(len(d) for d in frame.data)
        return frame

    def abandon(self) -> None:
        """The renter went away mid-answer: stop the host and bill what it made (a no-op
        once the exchange finished or holds no host)."""
        if self.finished or self.released or self.stream is None:
            return
        self.finished = True  # from here on, only _abandon finishes it
        self.relay.spawn(self._abandon())

    async def _abandon(self) -> None:
        stream = self.stream
        assert stream is not None
        end: InferEnd | None = None
        try:
            await self.relay.streams.cancel(stream)
            async with asyncio.timeout(_CANCEL_GRACE_SECONDS):
                while end is None:
                    frame = await stream.queue.get()
                    if isinstance(frame, InferEnd):
                        end = frame
                    else:
                        self.relayed_bytes += sum(len(d) for d in frame.data)
        except Exception:  # the host will not say; bill nothing rather than guess
            logger.debug("gateway: no end for abandoned stream %s", stream.stream_id)
        self.finished = False
        self._finish(end or _end(stream, 499, "cancelled", ""), outcome="cancelled")

    # ------------------------------------------------------------ bookkeeping

    def _release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.candidate is not None:
            self.relay.router.release(self.candidate)
        if self.stream is not None:
            self.relay.streams.discard(self.stream)

    def _finish(self, end: InferEnd, outcome: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self._release()
        candidate, request = self.candidate, self.request
        assert candidate is not None and self.stream is not None
        usage = end.usage
        prompt = completion = 0
        if usage is not None:
            # The host's counts, bounded by what this request could have used.
            prompt = min(usage.prompt_tokens, request.body_bytes + _PROMPT_OVERHEAD_TOKENS)
            completion = min(usage.completion_tokens, self.relayed_bytes)
            if request.max_completion_tokens is not None:
                completion = min(completion, request.max_completion_tokens)
        now = time.monotonic()
        record = UsageRecord(
            request_id=uuid.UUID(self.stream.stream_id),
            api_key_id=request.principal.api_key_id,
            user_id=request.principal.user_id,
            organization_id=request.principal.organization_id,
            host_id=candidate.host_id,
            model=request.model,
            endpoint=request.endpoint,
            prompt_tokens=prompt,
            completion_tokens=completion,
            input_price_per_million_micros=candidate.input_price_per_million_micros,
            output_price_per_million_micros=candidate.output_price_per_million_micros,
            latency_ms=round((now - self.started) * 1000),
            first_token_ms=(
                None
                if self.first_chunk_at is None
                else round((self.first_chunk_at - self.started) * 1000)
            ),
            outcome=outcome or ("ok" if end.ok else "error"),
        )
        self.context.usage.record(record)
        if request.max_completion_tokens is None:
            limits.owe_tokens(self.relay.debts, request.principal, completion)


class _RelayedStream(StreamingResponse):
    """A streamed answer that frees its host even if it never got to stream (the renter left
    between the first chunk and the response starting)."""

    def __init__(self, exchange: _Exchange, first: InferFrame) -> None:
        headers = {**exchange.request.headers, "Cache-Control": "no-cache"}
        super().__init__(exchange.events(first), media_type="text/event-stream", headers=headers)
        self._exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._exchange.abandon()


def _end(stream: OpenStream, status: int, code: str, message: str) -> InferEnd:
    return InferEnd(
        stream_id=stream.stream_id, reply_to="", ok=False, status=status, code=code, message=message
    )


def _error_of(end: InferEnd, headers: dict[str, str]) -> OpenAIError:
    status = end.status if 400 <= end.status <= 599 else 502
    extra = {"Retry-After": "1"} if status in (502, 503, 504) else {}
    return OpenAIError(
        status,
        end.message or "The host could not answer.",
        type=end.error_type,
        code=end.code,
        param=end.param,
        headers={**headers, **extra},
    )


def _error_event(end: InferEnd) -> bytes:
    error = {"message": end.message, "type": end.error_type, "param": end.param, "code": end.code}
    return json.dumps({"error": error}).encode()


def estimate_tokens(body_bytes: int) -> int:
    """A prompt's tokens before anyone counted them: about four bytes a token."""
    return math.ceil(body_bytes / 4)
