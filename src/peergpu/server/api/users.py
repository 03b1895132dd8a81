from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from peergpu.server.api.deps import Admin, ContextDep, Reader, SessionDep, Writer
from peergpu.server.api.responses import AUTHENTICATED
from peergpu.server.schemas.users import UserPublic, UsersPublic, UserUpdate
from peergpu.server.services import accounts

router = APIRouter(tags=["users"], responses=AUTHENTICATED)


@router.get("/users/me")
async def read_me(principal: Reader) -> UserPublic:
    """The calling user."""
    return UserPublic.model_validate(principal.user)


@router.patch("/users/me")
async def update_me(
    body: UserUpdate, principal: Writer, context: ContextDep, session: SessionDep
) -> UserPublic:
    """Change your display name, roles (renter/host) or password (needs current_password)."""
    # principal.user was loaded in this request's session (dependencies are cached per request)
    updated = await accounts.update_profile(
        session=session, passwords=context.passwords, user=principal.user, changes=body
    )
    return UserPublic.model_validate(updated)


@router.get("/admin/users", tags=["admin"])
async def list_users(
    _admin: Admin,
    session: SessionDep,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> UsersPublic:
    """Every user (platform admins only)."""
    users, total = await accounts.list_users(session=session, offset=offset, limit=limit)
    return UsersPublic(data=[UserPublic.model_validate(u) for u in users], count=total)
