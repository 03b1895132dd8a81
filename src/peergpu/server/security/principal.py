"""Who is calling: a user, through a session token or an API key."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from peergpu.server.db.models import UserModel
from peergpu.server.security.scopes import ALL_SCOPES, Scope, grants


@dataclass(frozen=True, slots=True)
class Principal:
    user: UserModel
    scopes: frozenset[Scope]
    api_key_id: uuid.UUID | None = None
    #: Set for organization keys: the caller acts only inside this organization.
    organization_id: uuid.UUID | None = None
    #: The key's priority in the inference gateway's queue (0 for sessions).
    priority: int = 0

    @classmethod
    def for_session(cls, user: UserModel) -> Principal:
        scopes = ALL_SCOPES if user.is_admin else ALL_SCOPES - {Scope.admin}
        return cls(user=user, scopes=frozenset(scopes))

    @property
    def user_id(self) -> uuid.UUID:
        return self.user.id

    def can(self, scope: Scope) -> bool:
        return grants(self.scopes, scope)
