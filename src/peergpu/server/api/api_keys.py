from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from peergpu.server.api.deps import ContextDep, Reader, SessionDep, Writer
from peergpu.server.api.responses import AUTHENTICATED, errors
from peergpu.server.schemas.api_keys import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    ApiKeysPublic,
)
from peergpu.server.services import api_keys, callers

router = APIRouter(prefix="/keys", tags=["keys"], responses=AUTHENTICATED)


@router.post("", status_code=status.HTTP_201_CREATED, responses=errors(404))
async def create_key(body: ApiKeyCreate, principal: Writer, session: SessionDep) -> ApiKeyCreated:
    """Create an API key. The secret is in this response only: store it now."""
    key, plaintext = await api_keys.create_key(session=session, principal=principal, data=body)
    return ApiKeyCreated.model_validate(
        {**ApiKeyPublic.model_validate(key).model_dump(), "key": plaintext}
    )


@router.get("", responses=errors(404))
async def list_keys(
    principal: Reader, session: SessionDep, organization_id: uuid.UUID | None = None
) -> ApiKeysPublic:
    """Your personal keys, or an organization's keys (`organization_id`, org admins)."""
    keys = await api_keys.list_keys(
        session=session, principal=principal, organization_id=organization_id
    )
    return ApiKeysPublic(data=[ApiKeyPublic.model_validate(k) for k in keys], count=len(keys))


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404))
async def revoke_key(
    key_id: uuid.UUID, principal: Writer, session: SessionDep, context: ContextDep
) -> None:
    """Revoke a key at once (idempotent). The hot routes (job submission, the inference
    gateway) remember callers for a few seconds: on this replica they forget them now, on
    others within ``services.callers.CACHE_SECONDS``."""
    await api_keys.revoke_key(session=session, principal=principal, key_id=key_id)
    callers.forget_all(context)
