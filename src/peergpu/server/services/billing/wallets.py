"""Whose wallet a caller may see or manage: their own, or an organization's they belong to.

Any member of an organization sees its balance and transactions; changing its settings or
buying credit for it needs the admin (or owner) role. An organization API key acts only for
its organization.
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db.models import OrgRole
from peergpu.server.security.principal import Principal
from peergpu.server.services import memberships
from peergpu.server.services.billing import accounts


async def resolve(
    *,
    session: AsyncSession,
    principal: Principal,
    org_id: uuid.UUID | None,
    manage: bool = False,
) -> str:
    """The wallet the caller names (``org_id`` or, by default, their own / their key's org)."""
    org_id = org_id or principal.organization_id
    if org_id is None:
        return accounts.user_wallet(principal.user_id)
    await memberships.require_org_role(
        session=session,
        principal=principal,
        organization_id=org_id,
        at_least=OrgRole.admin if manage else OrgRole.member,
    )
    return accounts.org_wallet(org_id)
