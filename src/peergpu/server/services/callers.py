"""Who calls the hot routes (job submission, the inference gateway), looked up in a session of
its own and remembered for a few seconds.

The rest of the API authenticates in the request's session, one query per request. The hot
routes keep a successful answer for :data:`CACHE_SECONDS` per credential (keyed by its
SHA-256, never the plaintext), so a busy key costs one lookup every few seconds instead of one
per request: on ``POST /api/v1/jobs`` that lookup was a fifth of the server's CPU per submit
(``bench/submit.py``). The price: a key revoked or expired, or a user disabled, on another
replica keeps working on these routes for up to :data:`CACHE_SECONDS`. On the replica that
revoked it (or removed the key's creator from its organization), the cache is emptied at
once (:func:`forget_all`).
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import AuthenticationFailed
from peergpu.server.db.models import UserModel
from peergpu.server.security.api_keys import looks_like_api_key
from peergpu.server.security.principal import Principal
from peergpu.server.services import api_keys

if TYPE_CHECKING:
    from peergpu.server.context import ServerContext

CACHE_SECONDS = 5.0
MAX_CACHED = 10_000


class PrincipalCache:
    """Successful authentications by credential digest, each for :data:`CACHE_SECONDS`."""

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

    def clear(self) -> None:
        self._entries.clear()


async def authenticate(context: ServerContext, token: str) -> Principal:
    """The caller behind ``token`` (an API key or an access token), from the cache when a
    lookup succeeded less than :data:`CACHE_SECONDS` ago."""
    cache = context.principals
    digest = hashlib.sha256(token.encode()).digest()
    cached = cache.get(digest)
    if cached is not None:
        return cached
    async with context.sessionmaker() as session:
        principal = await look_up(context, session, token)
    cache.put(digest, principal)
    return principal


async def look_up(context: ServerContext, session: AsyncSession, token: str) -> Principal:
    """The caller behind ``token`` (an API key or an access token), read in ``session``;
    AuthenticationFailed if it is unusable. Every route's authentication ends here."""
    if looks_like_api_key(token):
        return await api_keys.authenticate_key(session=session, plaintext=token)
    claims = context.access_tokens.verify(token)
    user = await session.get(UserModel, claims.user_id)
    if user is None or not user.is_active:
        raise AuthenticationFailed("The account no longer exists or is disabled.")
    return Principal.for_session(user)


def forget_all(context: ServerContext) -> None:
    """After a key is revoked, or a member removed from an organization, here: look every
    caller up again."""
    context.principals.clear()
