"""Who calls the gateway, answered without holding a database connection for the request.

The rest of the API authenticates in a request-scoped session that lives until the response
is sent. An inference request lives for seconds or minutes and, with many in flight, would
hold every pooled connection. Here the lookup opens and closes its own session, and a
successful answer is kept for a few seconds per credential (``services.callers``, shared with
job submission). The price: a revoked or expired key, or a disabled user, keeps working on
the gateway for up to :data:`~peergpu.server.services.callers.CACHE_SECONDS`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from peergpu.errors import AuthenticationFailed, PermissionDenied
from peergpu.server.api.deps import ContextDep
from peergpu.server.context import ServerContext
from peergpu.server.security.principal import Principal
from peergpu.server.security.scopes import Scope
from peergpu.server.services import callers

_bearer = HTTPBearer(auto_error=False, description="An API key (pgk_...) or an access token.")


async def gateway_caller(
    request: Request,
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, who must hold the ``inference`` scope (401 / 403 otherwise)."""
    return await caller_of(request, context, credentials.credentials if credentials else None)


async def caller_of(request: Request, context: ServerContext, token: str | None) -> Principal:
    """:func:`gateway_caller` for the hot routes, which read the bearer token themselves
    (:func:`bearer_token`) rather than through FastAPI's dependency resolution."""
    if not token:
        raise AuthenticationFailed(
            "Send 'Authorization: Bearer <API key>'.", code="not_authenticated"
        )
    principal = await callers.authenticate(context, token)
    if not principal.can(Scope.inference):
        raise PermissionDenied(
            "This key does not have the 'inference' scope.", code="insufficient_scope"
        )
    return principal


GatewayCaller = Annotated[Principal, Depends(gateway_caller)]
