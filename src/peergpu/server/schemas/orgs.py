from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from peergpu.server.db.models import OrgRole

OrgName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Slug = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
]


class OrgCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: OrgName
    slug: Slug | None = Field(default=None, description="URL name; derived from name if omitted")


class OrgUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: OrgName | None = None


class OrgPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    slug: str
    created_at: datetime
    role: OrgRole = Field(description="the caller's role in this organization")


class OrgsPublic(BaseModel):
    data: list[OrgPublic]
    count: int


class MemberPublic(BaseModel):
    user_id: uuid.UUID
    email: str
    display_name: str
    role: OrgRole
    joined_at: datetime


class MembersPublic(BaseModel):
    data: list[MemberPublic]
    count: int


class MemberUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: OrgRole


class InviteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    role: OrgRole = OrgRole.member


class InvitePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    organization_id: uuid.UUID
    email: str
    role: OrgRole
    created_at: datetime
    expires_at: datetime
    accepted_at: datetime | None
    revoked_at: datetime | None


class InviteCreated(InvitePublic):
    accept_url: str = Field(description="the link e-mailed to the invitee; shown once")


class InvitesPublic(BaseModel):
    data: list[InvitePublic]
    count: int


class InviteAccept(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=512)
