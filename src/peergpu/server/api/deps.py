"""Request dependencies as ``Annotated`` aliases: the session, the caller, scope checks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import AuthenticationFailed, PermissionDenied, RateLimited
from peergpu.server.context import ServerContext
from peergpu.server.security.principal import Principal
from peergpu.server.security.scopes import Scope
from peergpu.server.services import callers

_bearer = HTTPBearer(
    auto_error=False,
    description="An access token from /api/v1/auth/login, or an API key (pgk_...).",
)


def get_context(request: Request) -> ServerContext:
    context: ServerContext = request.app.state.context
    return context


ContextDep = Annotated[ServerContext, Depends(get_context)]


async def get_session(context: ContextDep) -> AsyncIterator[AsyncSession]:
    """One session per request. Services commit their own writes; anything left uncommitted
    (an error midway) is rolled back when the session closes."""
    async with context.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_principal(
    context: ContextDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    token = require_token(credentials.credentials if credentials else None)
    return await callers.look_up(context, session, token)


def require_token(token: str | None) -> str:
    """The bearer token, or AuthenticationFailed (401) when none was sent."""
    if not token:
        raise AuthenticationFailed(
            "Send 'Authorization: Bearer <access token or API key>'.", code="not_authenticated"
        )
    return token


def require_scope(scope: Scope) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        return require_scope_of(principal, scope)

    return check


def require_scope_of(principal: Principal, scope: Scope) -> Principal:
    """``principal`` if it holds ``scope``; PermissionDenied (403) otherwise."""
    if not principal.can(scope):
        raise PermissionDenied(
            f"This needs the '{scope.value}' scope.",
            code="insufficient_scope",
            details={"required": scope.value, "held": sorted(principal.scopes)},
        )
    return principal


async def _require_admin(
    principal: Annotated[Principal, Depends(require_scope(Scope.admin))],
) -> Principal:
    if not principal.user.is_admin:
        raise PermissionDenied("This needs a platform admin.", code="admin_required")
    return principal


Reader = Annotated[Principal, Depends(require_scope(Scope.read))]
Writer = Annotated[Principal, Depends(require_scope(Scope.write))]
Admin = Annotated[Principal, Depends(_require_admin)]


async def limit_auth_attempts(request: Request, context: ContextDep) -> None:
    """Rate limit for login/registration/refresh, per client address."""
    settings = context.settings
    client = request.client.host if request.client else "unknown"
    result = await context.rate_limiter.hit(
        f"auth:{client}",
        limit=settings.auth_rate_limit,
        window_seconds=settings.auth_rate_window_seconds,
    )
    if not result.allowed:
        raise RateLimited(
            "Too many attempts; wait before trying again.",
            retry_after=result.retry_after,
            details={"retry_after_seconds": round(result.retry_after, 1)},
        )


AuthRateLimit = Depends(limit_auth_attempts)
