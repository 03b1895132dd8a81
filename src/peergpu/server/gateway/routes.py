"""The gateway's endpoints under ``/v1``: thin, as the rest of the API."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from peergpu.errors import PaymentRequired
from peergpu.protocol.messages import MODEL_NAME_PATTERN, InferEndpoint
from peergpu.server.api.bare import bearer_token, documented, json_body
from peergpu.server.api.deps import ContextDep, SessionDep
from peergpu.server.context import ServerContext
from peergpu.server.gateway import catalog, limits, relay
from peergpu.server.gateway.auth import GatewayCaller, caller_of
from peergpu.server.gateway.errors import OpenAIError
from peergpu.server.gateway.schemas import (
    ChatCompletionRequest,
    EmbeddingRequest,
    ModelList,
    ModelObject,
    PeerGPUModelInfo,
)
from peergpu.server.security.principal import Principal
from peergpu.server.services.billing import inference

router = APIRouter()
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_Body = TypeVar("_Body", bound=BaseModel)


#: A key with the ``inference`` scope (403 ``insufficient_permissions`` otherwise), looked up
#: without holding a database connection for the request (see :mod:`.auth`).
Caller = GatewayCaller


@router.get("/models")
async def list_models(
    request: Request,
    principal: Caller,
    session: SessionDep,
    context: ContextDep,
    response: Response,
) -> ModelList:
    """Models some online host serves now."""
    response.headers.update(await limits.admit(context, principal, debts=_debts(request)))
    return ModelList(data=[_model(m) for m in await catalog.served_models(session)])


@router.get("/models/{model_id:path}")
async def retrieve_model(
    model_id: str,
    request: Request,
    principal: Caller,
    session: SessionDep,
    context: ContextDep,
    response: Response,
) -> ModelObject:
    headers = await limits.admit(context, principal, debts=_debts(request))
    response.headers.update(headers)
    found = (
        await catalog.served_models(session, name=model_id)
        if _MODEL_NAME.fullmatch(model_id)
        else []  # no host can declare such a name: do not even ask the database
    )
    if not found:
        raise OpenAIError(
            404,
            f"The model '{model_id}' does not exist or no host serves it now.",
            code="model_not_found",
            param="model",
            headers=headers,
        )
    return _model(found[0])


def _debts(request: Request) -> limits.TokenDebts:
    gateway_relay: relay.Relay = request.app.state.relay
    return gateway_relay.debts


def _model(served: catalog.ServedModel) -> ModelObject:
    return ModelObject(
        id=served.name,
        created=int(served.declared_at.timestamp()),
        peergpu=PeerGPUModelInfo(
            kind=served.kind,
            hosts=served.hosts,
            input_price_per_million_micros=served.input_price_per_million_micros,
            output_price_per_million_micros=served.output_price_per_million_micros,
        ),
    )


# The two inference routes are the hottest path of the server. They take the bare request and
# do what FastAPI's dependency resolution and body parsing would (authenticate, parse the body
# once, validate it with the same models, answer the same 400s), at a fraction of the cost:
# about a fifth of the server's CPU per request went to that machinery (bench/gateway.py).
# Their OpenAPI entries are still generated from the models (``api.bare.documented``).


@router.post(
    "/chat/completions",
    response_model=None,
    openapi_extra=documented(ChatCompletionRequest, security="HTTPBearer"),
)
async def chat_completions(request: Request) -> Response:
    """A chat completion from a host serving the model; ``stream: true`` answers as
    server-sent events ending with ``data: [DONE]``."""
    context, principal, (raw, size, body) = await _accept(request, ChatCompletionRequest)
    return await _relay(
        request,
        principal,
        context,
        raw=raw,
        body_bytes=size,
        endpoint="chat.completions",
        kind="chat",
        model=body.model,
        stream=body.stream is True,
        completion_limit=body.completion_limit,
    )


@router.post(
    "/embeddings",
    response_model=None,
    openapi_extra=documented(EmbeddingRequest, security="HTTPBearer"),
)
async def embeddings(request: Request) -> Response:
    """Embeddings of one text or many, from a host serving the model."""
    context, principal, (raw, size, body) = await _accept(request, EmbeddingRequest)
    return await _relay(
        request,
        principal,
        context,
        raw=raw,
        body_bytes=size,
        endpoint="embeddings",
        kind="embeddings",
        model=body.model,
        stream=False,
        completion_limit=None,
    )


async def _accept(
    request: Request, schema: type[_Body]
) -> tuple[ServerContext, Principal, tuple[dict[str, Any], int, _Body]]:
    """The caller (401/403 first, as the dependency would), then the body: parsed once,
    validated by ``schema`` (400 in OpenAI's shape, through the validation handler). The body
    comes back as sent (for the engine), its size in bytes, and validated."""
    context: ServerContext = request.app.state.context
    principal = await caller_of(request, context, bearer_token(request))
    return context, principal, await json_body(request, schema)


async def _relay(
    request: Request,
    principal: Principal,
    context: ServerContext,
    *,
    raw: dict[str, Any],
    body_bytes: int,
    endpoint: InferEndpoint,
    kind: str,
    model: str,
    stream: bool,
    completion_limit: int | None,
) -> Response:
    gateway_relay: relay.Relay = request.app.state.relay
    headers = await limits.admit(
        context,
        principal,
        tokens=relay.estimate_tokens(body_bytes) + (completion_limit or 0),
        debts=gateway_relay.debts,
    )
    if not _MODEL_NAME.fullmatch(model):
        raise OpenAIError(
            404,
            f"The model '{model}' does not exist or no host serves it.",
            param="model",
            code="model_not_found",
            headers=headers,
        )
    try:
        await inference.ensure_can_spend(
            context, user_id=principal.user_id, organization_id=principal.organization_id
        )
    except PaymentRequired as exc:
        raise OpenAIError(
            429,
            f"{exc.message} Add credit to use the inference API.",
            type="insufficient_quota",
            code="insufficient_quota",
            headers={**headers, "x-should-retry": "false"},
        ) from exc
    return await gateway_relay.serve(
        relay.InferenceRequest(
            principal=principal,
            endpoint=endpoint,
            kind=kind,
            model=model,
            body=raw,
            body_bytes=body_bytes,
            stream=stream,
            max_completion_tokens=completion_limit,
            headers=headers,
        )
    )
