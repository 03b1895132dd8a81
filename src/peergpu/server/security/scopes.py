"""API key scopes.

``read`` allows GET requests on the REST API, ``write`` allows changes (and implies ``read``),
``inference`` allows the OpenAI-compatible gateway, ``admin`` allows admin endpoints (for admin
users only). Session tokens (JWTs from login) carry every scope their user's roles allow.
"""

from __future__ import annotations

from enum import StrEnum


class Scope(StrEnum):
    read = "read"
    write = "write"
    inference = "inference"
    admin = "admin"


DEFAULT_KEY_SCOPES: tuple[Scope, ...] = (Scope.read, Scope.write, Scope.inference)
ALL_SCOPES: frozenset[Scope] = frozenset(Scope)


def grants(held: frozenset[Scope], needed: Scope) -> bool:
    if needed in held:
        return True
    return needed is Scope.read and Scope.write in held
