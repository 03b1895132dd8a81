"""API keys: personal or per organization, shown once, stored as a hash, revocable."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import AuthenticationFailed, InvalidInput, NotFound, PermissionDenied
from peergpu.server.db.base import utcnow
from peergpu.server.db.models import ApiKeyModel, OrgRole, UserModel
from peergpu.server.schemas.api_keys import ApiKeyCreate
from peergpu.server.security import api_keys as key_format
from peergpu.server.security.principal import Principal
from peergpu.server.security.scopes import Scope
from peergpu.server.services.memberships import find_role, require_org_role

#: last_used_at is written at most this often per key, so using a key is not a write per request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
MAX_ACTIVE_KEYS_PER_OWNER = 100


async def create_key(
    *, session: AsyncSession, principal: Principal, data: ApiKeyCreate
) -> tuple[ApiKeyModel, str]:
    """Create a key and return it with its plaintext, which is never stored or shown again.

    A key can never hold more than its creator: an API-key caller may only create keys with a
    subset of its own scopes, and the ``admin`` scope needs an admin user.
    """
    scopes = set(data.scopes)
    if Scope.admin in scopes and not principal.user.is_admin:
        raise PermissionDenied("Only admins can create keys with the admin scope.")
    if data.priority > 0 and not principal.user.is_admin:
        raise PermissionDenied(
            "Only admins can give a key a priority above 0; use a negative one for batch work."
        )
    if principal.api_key_id is not None and not scopes <= principal.scopes:
        raise PermissionDenied(
            "A key cannot create a key with more scopes than it has.",
            details={"allowed": sorted(principal.scopes)},
        )
    if data.expires_at is not None and (
        data.expires_at.tzinfo is None or data.expires_at <= utcnow()
    ):
        raise InvalidInput(
            "expires_at must be a future UTC timestamp with a timezone.",
            details={"field": "expires_at"},
        )
    if data.organization_id is not None:
        await require_org_role(
            session=session,
            principal=principal,
            organization_id=data.organization_id,
            at_least=OrgRole.admin,
        )
    elif principal.organization_id is not None:
        raise PermissionDenied("An organization key cannot create personal keys.")
    await _check_key_quota(session=session, principal=principal, org_id=data.organization_id)

    generated = key_format.generate_api_key()
    key = ApiKeyModel(
        name=data.name,
        prefix=generated.prefix,
        secret_hash=generated.secret_hash,
        user_id=principal.user_id,
        organization_id=data.organization_id,
        scopes=sorted(scopes),
        expires_at=data.expires_at,
        priority=data.priority,
    )
    session.add(key)
    await session.commit()
    return key, generated.plaintext


async def list_keys(
    *, session: AsyncSession, principal: Principal, organization_id: uuid.UUID | None
) -> list[ApiKeyModel]:
    """Personal keys of the caller, or (for org owners/admins) every key of one organization."""
    query = select(ApiKeyModel).order_by(ApiKeyModel.created_at.desc(), ApiKeyModel.id)
    if organization_id is None:
        query = query.where(
            ApiKeyModel.user_id == principal.user_id, ApiKeyModel.organization_id.is_(None)
        )
    else:
        await require_org_role(
            session=session,
            principal=principal,
            organization_id=organization_id,
            at_least=OrgRole.admin,
        )
        query = query.where(ApiKeyModel.organization_id == organization_id)
    return list(await session.scalars(query))


async def revoke_key(*, session: AsyncSession, principal: Principal, key_id: uuid.UUID) -> None:
    """Revoke a key the caller controls. Revoking twice is a no-op; others' keys are NotFound."""
    key = await session.get(ApiKeyModel, key_id)
    if key is None or not await _controls(session=session, principal=principal, key=key):
        raise NotFound("No such API key.", details={"id": str(key_id)})
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.commit()


async def authenticate_key(*, session: AsyncSession, plaintext: str) -> Principal:
    """The principal a presented key stands for; AuthenticationFailed if it is unusable."""
    invalid = AuthenticationFailed("The API key is invalid.", code="invalid_api_key")
    prefix = key_format.parse_prefix(plaintext)
    if prefix is None:
        raise invalid
    # The key and its user in one round trip (every API request comes through here).
    found = (
        await session.execute(
            select(ApiKeyModel, UserModel)
            .join(UserModel, UserModel.id == ApiKeyModel.user_id)
            .where(ApiKeyModel.prefix == prefix)
        )
    ).first()
    if found is None:
        raise invalid
    key, user = found
    if not key_format.matches(plaintext, key.secret_hash):
        raise invalid
    now = utcnow()
    if key.revoked_at is not None:
        raise AuthenticationFailed("The API key has been revoked.", code="api_key_revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthenticationFailed("The API key has expired.", code="api_key_expired")
    if not user.is_active:
        raise invalid
    if key.organization_id is not None and (
        await find_role(session=session, organization_id=key.organization_id, user_id=user.id)
        is None
    ):
        # The creator left the organization: the key dies with the membership.
        raise AuthenticationFailed(
            "The API key's creator is no longer a member of its organization.",
            code="api_key_orphaned",
        )
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        await session.execute(
            update(ApiKeyModel).where(ApiKeyModel.id == key.id).values(last_used_at=now)
        )
        await session.commit()
    return Principal(
        user=user,
        scopes=frozenset(Scope(s) for s in key.scopes if s in Scope.__members__),
        api_key_id=key.id,
        organization_id=key.organization_id,
        priority=key.priority,
    )


async def _controls(*, session: AsyncSession, principal: Principal, key: ApiKeyModel) -> bool:
    if key.organization_id is None:
        return key.user_id == principal.user_id and principal.organization_id is None
    if principal.organization_id not in (None, key.organization_id):
        return False
    role = await find_role(
        session=session, organization_id=key.organization_id, user_id=principal.user_id
    )
    return role in (OrgRole.owner, OrgRole.admin) or (
        role is not None and key.user_id == principal.user_id
    )


async def _check_key_quota(
    *, session: AsyncSession, principal: Principal, org_id: uuid.UUID | None
) -> None:
    query = select(ApiKeyModel.id).where(ApiKeyModel.revoked_at.is_(None))
    if org_id is None:
        query = query.where(
            ApiKeyModel.user_id == principal.user_id, ApiKeyModel.organization_id.is_(None)
        )
    else:
        query = query.where(ApiKeyModel.organization_id == org_id)
    active = len(list(await session.scalars(query.limit(MAX_ACTIVE_KEYS_PER_OWNER))))
    if active >= MAX_ACTIVE_KEYS_PER_OWNER:
        raise InvalidInput(
            f"At most {MAX_ACTIVE_KEYS_PER_OWNER} active keys; revoke one first.",
            code="too_many_keys",
        )
