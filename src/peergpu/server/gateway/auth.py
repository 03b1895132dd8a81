"""Who calls the gateway, answered without holding a database connection for the request.

The rest of the API authenticates in a request-scoped session that lives until the response
is sent. An inference request lives for seconds or minutes and, with many in flight, would
hold every pooled connection. Here the lookup opens and closes its own session, and a
successful answer is kept for a few seconds per credential (by its SHA-256, never the
plaintext), so a busy key costs one lookup every few seconds instead of one per request. The
price: a revoked or expired key, or a disabled user, keeps working on the gateway for up to
:data:`CACHE_SECONDS`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from peergpu.errors import AuthenticationFailed, PermissionDenied
from peergpu.server.api.deps import ContextDep
from peergpu.server.context import ServerContext
from peergpu.server.db.models import UserModel
from peergpu.server.security.api_keys import looks_like_api_key
from peergpu.server.security.principal import Principal
from peergpu.server.security.scopes import Scope
from peergpu.server.services import api_keys

CACHE_SECONDS = 5.0
MAX_CACHED = 10_000

_bearer = HTTPBearer(auto_error=False, description="An API key (pgk_...) or an access token.")


class PrincipalCache:
    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    def get(self, digest: bytes) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._entries[digest]
            return None
        return entry[1]

    def put(self, digest: bytes, principal: Principal) -> None:
        if len(self._entries) >= MAX_CACHED:
            self._entries.clear()  # rare; the next requests look their keys up again
        self._entries[digest] = (time.monotonic() + CACHE_SECONDS, principal)


async def authenticate(context: ServerContext, cache: PrincipalCache, token: str) -> Principal:
    digest = hashlib.sha256(token.encode()).digest()
    cached = cache.get(digest)
    if cached is not None:
        return cached
    async with context.sessionmaker() as session:
        if looks_like_api_key(token):
            principal = await api_keys.authenticate_key(session=session, plaintext=token)
        else:
            claims = context.access_tokens.verify(token)
            user = await session.get(UserModel, claims.user_id)
            if user is None or not user.is_active:
                raise AuthenticationFailed("The account no longer exists or is disabled.")
            principal = Principal.for_session(user)
    cache.put(digest, principal)
    return principal


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
    cache: PrincipalCache = request.app.state.relay.principals
    principal = await authenticate(context, cache, token)
    if not principal.can(Scope.inference):
        raise PermissionDenied(
            "This key does not have the 'inference' scope.", code="insufficient_scope"
        )
    return principal


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, as ``HTTPBearer`` reads it."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


GatewayCaller = Annotated[Principal, Depends(gateway_caller)]
