"""The engine's HTTP app: OpenAI's ``/v1`` for loaded backends, plus ``/health``.

Routes parse, pick the backend and hand over; the rules live in ``chat_api`` and
``embeddings_api``. The app neither loads nor closes backends: whoever created them does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from peergpu.engines.base import Backend, ChatBackend, ChatEvent, EmbeddingsBackend
from peergpu.engines.chat_api import chat_params, complete, sse_events
from peergpu.engines.disconnect import ClientGone, unless_disconnected
from peergpu.engines.embeddings_api import embedding_inputs, embedding_list
from peergpu.engines.errors import InvalidRequest, ModelNotFound, install_error_handlers
from peergpu.engines.schemas import (
    ChatCompletion,
    ChatCompletionCreate,
    EmbeddingCreate,
    EmbeddingList,
    Health,
    ModelInfo,
    ModelList,
    ModelPublic,
)

#: nginx-style "client closed request": nobody reads it, the client is gone
CLIENT_CLOSED = 499


def create_engine_app(backends: Iterable[Backend]) -> FastAPI:
    """An OpenAI-compatible app serving already loaded backends, one per model id."""
    by_id: dict[str, Backend] = {}
    for backend in backends:
        if backend.model_id in by_id:
            raise ValueError(f"two backends serve {backend.model_id}")
        by_id[backend.model_id] = backend
    created = int(time.time())
    app = FastAPI(title="PeerGPU built-in engine", version="1", docs_url="/docs")
    app.state.backends = by_id
    install_error_handlers(app)

    def model_public(backend: Backend) -> ModelPublic:
        return ModelPublic(
            id=backend.model_id, created=created, peergpu=ModelInfo(kind=backend.kind)
        )

    @app.get("/health")
    async def health() -> Health:
        return Health(models=list(by_id))

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_public(backend) for backend in by_id.values()])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelPublic:
        if model_id not in by_id:
            raise ModelNotFound(model_id)
        return model_public(by_id[model_id])

    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingCreate) -> EmbeddingList:
        backend = _embeddings_backend(by_id, body.model)
        result = await backend.embed(embedding_inputs(body, backend))
        return embedding_list(result, model=backend.model_id, encoding_format=body.encoding_format)

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def create_chat_completion(body: ChatCompletionCreate, request: Request) -> Response:
        backend = _chat_backend(by_id, body.model)
        events = backend.stream(chat_params(body, backend))
        try:
            if not body.stream:
                answer = await unless_disconnected(
                    complete(events, model=backend.model_id), request.receive
                )
                return JSONResponse(answer.model_dump(mode="json"))
            # Hold the answer until the model starts: a refused request stays a JSON error.
            first = await unless_disconnected(_first(events), request.receive)
        except ClientGone:
            await events.aclose()
            return Response(status_code=CLIENT_CLOSED)
        except BaseException:
            await events.aclose()
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(
            sse_events(first, events, model=backend.model_id, include_usage=include_usage)
        )

    return app


def _chat_backend(by_id: dict[str, Backend], model: str) -> ChatBackend:
    backend = _known(by_id, model)
    if not isinstance(backend, ChatBackend):
        raise _wrong_kind(backend, "/v1/embeddings")
    return backend


def _embeddings_backend(by_id: dict[str, Backend], model: str) -> EmbeddingsBackend:
    backend = _known(by_id, model)
    if not isinstance(backend, EmbeddingsBackend):
        raise _wrong_kind(backend, "/v1/chat/completions")
    return backend


def _known(by_id: dict[str, Backend], model: str) -> Backend:
    backend = by_id.get(model)
    if backend is None:
        raise ModelNotFound(model)
    return backend


def _wrong_kind(backend: Backend, route: str) -> InvalidRequest:
    article = "a chat" if backend.kind == "chat" else "an embeddings"
    return InvalidRequest(
        f"'{backend.model_id}' is {article} model; use {route}.",
        param="model",
        code="model_not_supported",
    )


async def _first(events: AsyncIterator[ChatEvent]) -> ChatEvent:
    return await anext(events)


class _EventStream(StreamingResponse):
    """SSE that always closes its generator, so a vanished client cancels the generation.

    Starlette stops iterating when the client disconnects but leaves closing the generator to
    the garbage collector; closing it here runs its ``finally`` at once.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
