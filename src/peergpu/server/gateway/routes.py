"""The gateway's endpoints under ``/v1``: thin, as the rest of the API."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Response

from peergpu.protocol.messages import MODEL_NAME_PATTERN
from peergpu.server.api.deps import ContextDep, SessionDep, require_scope
from peergpu.server.gateway import catalog, limits
from peergpu.server.gateway.errors import OpenAIError
from peergpu.server.gateway.schemas import ModelList, ModelObject, PeerGPUModelInfo
from peergpu.server.security.principal import Principal
from peergpu.server.security.scopes import Scope

router = APIRouter()
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


#: A key with the ``inference`` scope (403 ``insufficient_permissions`` otherwise).
Caller = Annotated[Principal, Depends(require_scope(Scope.inference))]


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
