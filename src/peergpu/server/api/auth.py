from __future__ import annotations

from fastapi import APIRouter, status

from peergpu.server.api.deps import AuthRateLimit, ContextDep, SessionDep
from peergpu.server.api.responses import errors
from peergpu.server.schemas.auth import LoginRequest, RefreshRequest, TokenPair
from peergpu.server.schemas.users import UserPublic, UserRegister
from peergpu.server.services import accounts

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    dependencies=[AuthRateLimit],
    responses=errors(403, 409, 422, 429),
)
async def register(body: UserRegister, context: ContextDep, session: SessionDep) -> UserPublic:
    """Create an account (renter and/or host) with e-mail and password."""
    user = await accounts.register(
        session=session,
        passwords=context.passwords,
        email=body.email,
        password=body.password,
        roles=body.roles,
        display_name=body.display_name,
        signup_credit_micros=context.settings.signup_credit_micros,
    )
    return UserPublic.model_validate(user)


@router.post("/login", dependencies=[AuthRateLimit], responses=errors(401, 403, 422, 429))
async def login(body: LoginRequest, context: ContextDep, session: SessionDep) -> TokenPair:
    """Exchange e-mail and password for an access token and a refresh token."""
    user = await accounts.authenticate(
        session=session, passwords=context.passwords, email=body.email, password=body.password
    )
    return await accounts.start_session(
        session=session,
        tokens=context.access_tokens,
        user=user,
        refresh_ttl_seconds=context.settings.refresh_token_ttl_seconds,
    )


@router.post("/refresh", dependencies=[AuthRateLimit], responses=errors(401, 422, 429))
async def refresh(body: RefreshRequest, context: ContextDep, session: SessionDep) -> TokenPair:
    """Rotate a refresh token: the old one stops working, a new pair is returned.
    Reusing an old refresh token logs that whole session out."""
    return await accounts.rotate_refresh_token(
        session=session,
        tokens=context.access_tokens,
        refresh_token=body.refresh_token,
        refresh_ttl_seconds=context.settings.refresh_token_ttl_seconds,
    )


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, responses=errors(422))
async def logout(body: RefreshRequest, session: SessionDep) -> None:
    """Revoke the session the refresh token belongs to (idempotent)."""
    await accounts.logout(session=session, refresh_token=body.refresh_token)
