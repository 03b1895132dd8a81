"""Authenticating a renter's WebSocket exactly as ``deps.get_principal`` authenticates a request.

Browsers cannot set headers on a WebSocket, so the credential (an access token or a ``pgk_``
API key) may come either as ``Authorization: Bearer <credential>`` or as the ``access_token``
query parameter; the header wins when both are present. Query strings end up in access logs:
prefer short-lived access tokens there over API keys.
"""

from __future__ import annotations

from fastapi import WebSocket
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.api.deps import get_principal, require_scope
from peergpu.server.context import ServerContext
from peergpu.server.security.principal import Principal
from peergpu.server.security.scopes import Scope

ACCESS_TOKEN_PARAMETER = "access_token"


async def websocket_principal(
    websocket: WebSocket,
    *,
    context: ServerContext,
    session: AsyncSession,
    scope: Scope = Scope.read,
) -> Principal:
    """The caller, holding ``scope``. Raises ``AuthenticationFailed`` (no or bad credential) or
    ``PermissionDenied`` (the credential lacks the scope), as the HTTP dependencies do."""
    credential = websocket_credential(websocket)
    credentials = (
        HTTPAuthorizationCredentials(scheme="Bearer", credentials=credential)
        if credential
        else None
    )
    principal = await get_principal(context, session, credentials)
    return await require_scope(scope)(principal)


def websocket_credential(websocket: WebSocket) -> str | None:
    scheme, _, value = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return websocket.query_params.get(ACCESS_TOKEN_PARAMETER) or None
