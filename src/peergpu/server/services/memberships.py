"""Organization membership checks, in one place.

A caller who is not a member of an organization gets NotFound, never PermissionDenied, so
organization ids cannot be probed. Organization API keys act only inside their organization.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import NotFound, PermissionDenied
from peergpu.server.db.models import MembershipModel, OrgRole
from peergpu.server.security.principal import Principal

ROLE_RANK = {OrgRole.member: 0, OrgRole.admin: 1, OrgRole.owner: 2}


async def find_role(
    *, session: AsyncSession, organization_id: uuid.UUID, user_id: uuid.UUID
) -> OrgRole | None:
    role = await session.scalar(
        select(MembershipModel.role).where(
            MembershipModel.organization_id == organization_id,
            MembershipModel.user_id == user_id,
        )
    )
    return OrgRole(role) if role is not None else None


async def require_org_role(
    *,
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    at_least: OrgRole = OrgRole.member,
) -> OrgRole:
    """The caller's role in the organization, if it is at least ``at_least``."""
    not_found = NotFound("No such organization.", details={"id": str(organization_id)})
    if principal.organization_id not in (None, organization_id):
        raise not_found
    role = await find_role(
        session=session, organization_id=organization_id, user_id=principal.user_id
    )
    if role is None:
        raise not_found
    if ROLE_RANK[role] < ROLE_RANK[at_least]:
        raise PermissionDenied(
            f"This needs the {at_least.value} role in the organization.",
            details={"role": role.value, "required": at_least.value},
        )
    return role
