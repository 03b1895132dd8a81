from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from peergpu.server.db.models import UserRole

Password = Annotated[str, Field(min_length=10, max_length=256)]
DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, max_length=100)]


class UserRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    password: Password
    display_name: DisplayName = ""
    roles: list[UserRole] = Field(
        default_factory=lambda: [UserRole.renter],
        description="renter and/or host; admin cannot be chosen at registration",
    )


class UserUpdate(BaseModel):
    """Fields a user may change on their own account. A new password needs the current one."""

    model_config = ConfigDict(extra="forbid")

    display_name: DisplayName | None = None
    roles: list[UserRole] | None = Field(default=None, description="renter and/or host")
    password: Password | None = None
    current_password: str | None = None


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    display_name: str
    roles: list[UserRole]
    is_active: bool
    created_at: datetime


class UsersPublic(BaseModel):
    data: list[UserPublic]
    count: int
