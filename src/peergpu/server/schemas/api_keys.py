from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from peergpu.server.security.scopes import DEFAULT_KEY_SCOPES, Scope

KeyName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: KeyName
    organization_id: uuid.UUID | None = Field(
        default=None, description="make an organization key (you must be an org owner or admin)"
    )
    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_KEY_SCOPES), min_length=1)
    expires_at: datetime | None = Field(default=None, description="UTC; must lie in the future")
    priority: int = Field(
        default=0,
        ge=-10,
        le=10,
        description="inference gateway: when every host is busy, higher priorities are served "
        "first (below 0 for batch work; above 0 needs an admin)",
    )


class ApiKeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    prefix: str
    organization_id: uuid.UUID | None
    user_id: uuid.UUID
    scopes: list[Scope]
    priority: int = 0
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="the secret key; shown only in this response")


class ApiKeysPublic(BaseModel):
    data: list[ApiKeyPublic]
    count: int
