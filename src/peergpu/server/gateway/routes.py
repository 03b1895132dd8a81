"""The gateway's endpoints under ``/v1``: thin, as the rest of the API."""

from __future__ import annotations

import json
import re

from fastapi import APIRouter, Request, Response

from peergpu.errors import PaymentRequired
from peergpu.protocol.messages import MODEL_NAME_PATTERN, InferEndpoint
from peergpu.server.api.deps import ContextDep, SessionDep
from peergpu.server.context import ServerContext
from peergpu.server.gateway import catalog, limits, relay
from peergpu.server.gateway.auth import GatewayCaller
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


#: A key with the ``inference`` scope (403 ``insufficient_permissions`` otherwise), looked up
#: without holding a database connection for the request (see :mod:`.auth`).
Caller = GatewayCaller


@router.get("/models")
async def list_models(
    principal: Caller, session: SessionDep, context: ContextDep, response: Response
) -> ModelList:
    """Models some online host serves now."""
    response.headers.update(await limits.admit(context, principal))
    return ModelList(data=[_model(m) for m in await catalog.served_models(session)])


@router.get("/models/{model_id:path}")
async def retrieve_model(
    model_id: str, principal: Caller, session: SessionDep, context: ContextDep, response: Response
) -> ModelObject:
    headers = await limits.admit(context, principal)
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


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, principal: Caller, context: ContextDep
) -> Response:
    """A chat completion from a host serving the model; ``stream: true`` answers as
    server-sent events ending with ``data: [DONE]``."""
    return await _relay(
        request,
        principal,
        context,
        endpoint="chat.completions",
        kind="chat",
        model=body.model,
        stream=body.stream is True,
        completion_limit=body.completion_limit,
    )


@router.post("/embeddings", response_model=None)
async def embeddings(
    body: EmbeddingRequest, request: Request, principal: Caller, context: ContextDep
) -> Response:
    """Embeddings of one text or many, from a host serving the model."""
    return await _relay(
        request,
        principal,
        context,
        endpoint="embeddings",
        kind="embeddings",
        model=body.model,
        stream=False,
        completion_limit=None,
    )


async def _relay(
    request: Request,
    principal: Principal,
    context: ServerContext,
    *,
    endpoint: InferEndpoint,
    kind: str,
    model: str,
    stream: bool,
    completion_limit: int | None,
) -> Response:
    raw = await request.body()
    headers = await limits.admit(
        context, principal, tokens=relay.estimate_tokens(len(raw)) + (completion_limit or 0)
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
    gateway_relay: relay.Relay = request.app.state.relay
    return await gateway_relay.serve(
        relay.InferenceRequest(
            principal=principal,
            endpoint=endpoint,
            kind=kind,
            model=model,
            body=json.loads(raw),
            body_bytes=len(raw),
            stream=stream,
            max_completion_tokens=completion_limit,
            headers=headers,
        )
    )
