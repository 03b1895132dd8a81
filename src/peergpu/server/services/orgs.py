"""Organizations: creation, members and their roles, e-mail invites."""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import Conflict, NotFound, PermissionDenied
from peergpu.server.db.base import utcnow
from peergpu.server.db.models import (
    InviteModel,
    MembershipModel,
    OrganizationModel,
    OrgRole,
    UserModel,
)
from peergpu.server.security.principal import Principal
from peergpu.server.security.tokens import hash_token, new_opaque_token
from peergpu.server.services.accounts import normalize_email
from peergpu.server.services.email import Mailer
from peergpu.server.services.memberships import find_role, require_org_role


@dataclass(frozen=True, slots=True)
class OrgView:
    org: OrganizationModel
    role: OrgRole


@dataclass(frozen=True, slots=True)
class MemberView:
    membership: MembershipModel
    user: UserModel


async def create_org(
    *, session: AsyncSession, principal: Principal, name: str, slug: str | None
) -> OrgView:
    """Create an organization owned by the caller. A taken slug is a Conflict."""
    if principal.organization_id is not None:
        raise PermissionDenied("An organization key cannot create organizations.")
    org = OrganizationModel(name=name, slug=slug or _slugify(name), created_by_id=principal.user_id)
    session.add(org)
    try:
        await session.flush()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict(
            "That organization slug is taken.", code="slug_taken", details={"slug": org.slug}
        ) from exc
    session.add(
        MembershipModel(organization_id=org.id, user_id=principal.user_id, role=OrgRole.owner)
    )
    await session.commit()
    return OrgView(org=org, role=OrgRole.owner)


async def list_orgs(*, session: AsyncSession, principal: Principal) -> list[OrgView]:
    query = (
        select(OrganizationModel, MembershipModel.role)
        .join(MembershipModel, MembershipModel.organization_id == OrganizationModel.id)
        .where(MembershipModel.user_id == principal.user_id)
        .order_by(OrganizationModel.name, OrganizationModel.id)
    )
    if principal.organization_id is not None:
        query = query.where(OrganizationModel.id == principal.organization_id)
    rows = await session.execute(query)
    return [OrgView(org=org, role=OrgRole(role)) for org, role in rows]


async def get_org(
    *, session: AsyncSession, principal: Principal, organization_id: uuid.UUID
) -> OrgView:
    role = await require_org_role(
        session=session, principal=principal, organization_id=organization_id
    )
    org = await session.get(OrganizationModel, organization_id)
    assert org is not None  # a membership row cannot outlive its organization (FK cascade)
    return OrgView(org=org, role=role)


async def rename_org(
    *, session: AsyncSession, principal: Principal, organization_id: uuid.UUID, name: str
) -> OrgView:
    role = await require_org_role(
        session=session,
        principal=principal,
        organization_id=organization_id,
        at_least=OrgRole.admin,
    )
    org = await session.get(OrganizationModel, organization_id)
    assert org is not None
    org.name = name
    await session.commit()
    return OrgView(org=org, role=role)


async def list_members(
    *, session: AsyncSession, principal: Principal, organization_id: uuid.UUID
) -> list[MemberView]:
    await require_org_role(session=session, principal=principal, organization_id=organization_id)
    rows = await session.execute(
        select(MembershipModel, UserModel)
        .join(UserModel, UserModel.id == MembershipModel.user_id)
        .where(MembershipModel.organization_id == organization_id)
        .order_by(MembershipModel.created_at, UserModel.email)
    )
    return [MemberView(membership=m, user=u) for m, u in rows]


async def change_member_role(
    *,
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    user_id: uuid.UUID,
    role: OrgRole,
) -> MemberView:
    """Admins move people between member and admin; only owners grant or take away owner.
    The last owner cannot be demoted."""
    caller_role = await require_org_role(
        session=session,
        principal=principal,
        organization_id=organization_id,
        at_least=OrgRole.admin,
    )
    membership, user = await _member(session, organization_id, user_id)
    current = OrgRole(membership.role)
    if OrgRole.owner in (current, role) and caller_role is not OrgRole.owner:
        raise PermissionDenied("Only an owner can grant or remove the owner role.")
    if current is OrgRole.owner and role is not OrgRole.owner:
        await _ensure_another_owner(session, organization_id)
    membership.role = role
    await session.commit()
    return MemberView(membership=membership, user=user)


async def remove_member(
    *,
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    user_id: uuid.UUID,
) -> None:
    """Anyone may leave; admins remove members and admins; only owners remove owners.
    The last owner can neither leave nor be removed."""
    leaving = user_id == principal.user_id
    caller_role = await require_org_role(
        session=session,
        principal=principal,
        organization_id=organization_id,
        at_least=OrgRole.member if leaving else OrgRole.admin,
    )
    membership, _user = await _member(session, organization_id, user_id)
    if OrgRole(membership.role) is OrgRole.owner:
        if not leaving and caller_role is not OrgRole.owner:
            raise PermissionDenied("Only an owner can remove an owner.")
        await _ensure_another_owner(session, organization_id)
    await session.delete(membership)
    await session.commit()


async def create_invite(
    *,
    session: AsyncSession,
    principal: Principal,
    mailer: Mailer,
    organization_id: uuid.UUID,
    email: str,
    role: OrgRole,
    public_url: str,
    ttl_seconds: int,
) -> tuple[InviteModel, str]:
    """Invite an e-mail address; the link is e-mailed after the commit and returned once."""
    caller_role = await require_org_role(
        session=session,
        principal=principal,
        organization_id=organization_id,
        at_least=OrgRole.admin,
    )
    if role is OrgRole.owner and caller_role is not OrgRole.owner:
        raise PermissionDenied("Only an owner can invite another owner.")
    email = normalize_email(email)
    already = await session.scalar(
        select(MembershipModel.user_id)
        .join(UserModel, UserModel.id == MembershipModel.user_id)
        .where(MembershipModel.organization_id == organization_id, UserModel.email == email)
    )
    if already is not None:
        raise Conflict("That person is already a member.", code="already_member")
    token = new_opaque_token()
    invite = InviteModel(
        organization_id=organization_id,
        email=email,
        role=role,
        token_hash=hash_token(token),
        invited_by_id=principal.user_id,
        expires_at=utcnow() + timedelta(seconds=ttl_seconds),
    )
    session.add(invite)
    org = await session.get(OrganizationModel, organization_id)
    await session.commit()
    accept_url = f"{public_url}/invites/accept?token={token}"
    await mailer.send(
        to=email,
        subject=f"You are invited to {org.name if org else 'an organization'} on PeerGPU",
        body=(
            f"{principal.user.email} invited you to join "
            f"{org.name if org else 'an organization'} as {role.value}.\n\n"
            f"Accept: {accept_url}\n(or: POST /api/v1/invites/accept with this token: {token})\n"
            f"The link expires at {invite.expires_at:%Y-%m-%d %H:%M} UTC.\n"
        ),
    )
    return invite, accept_url


async def list_invites(
    *, session: AsyncSession, principal: Principal, organization_id: uuid.UUID
) -> list[InviteModel]:
    await require_org_role(
        session=session,
        principal=principal,
        organization_id=organization_id,
        at_least=OrgRole.admin,
    )
    rows = await session.scalars(
        select(InviteModel)
        .where(InviteModel.organization_id == organization_id)
        .order_by(InviteModel.created_at.desc())
    )
    return list(rows)


async def revoke_invite(
    *,
    session: AsyncSession,
    principal: Principal,
    organization_id: uuid.UUID,
    invite_id: uuid.UUID,
) -> None:
    await require_org_role(
        session=session,
        principal=principal,
        organization_id=organization_id,
        at_least=OrgRole.admin,
    )
    invite = await session.get(InviteModel, invite_id)
    if invite is None or invite.organization_id != organization_id:
        raise NotFound("No such invite.", details={"id": str(invite_id)})
    if invite.revoked_at is None and invite.accepted_at is None:
        invite.revoked_at = utcnow()
        await session.commit()


async def accept_invite(*, session: AsyncSession, principal: Principal, token: str) -> OrgView:
    """Join the organization an invite is for. The invite must be addressed to the caller's
    e-mail, unexpired, unrevoked and unused; accepting works once."""
    invite = await session.scalar(
        select(InviteModel).where(InviteModel.token_hash == hash_token(token))
    )
    if (
        invite is None
        or invite.revoked_at is not None
        or invite.accepted_at is not None
        or invite.expires_at <= utcnow()
    ):
        raise NotFound("This invite is invalid, used or expired.", code="invite_invalid")
    if invite.email != principal.user.email:
        raise PermissionDenied(
            "This invite was sent to another e-mail address.", code="invite_wrong_recipient"
        )
    if principal.organization_id is not None:
        raise PermissionDenied("An organization key cannot accept invites.")
    if (
        await find_role(
            session=session, organization_id=invite.organization_id, user_id=principal.user_id
        )
        is not None
    ):
        raise Conflict("You are already a member.", code="already_member")
    claimed = await session.execute(
        update(InviteModel)
        .where(
            InviteModel.id == invite.id,
            InviteModel.accepted_at.is_(None),
            InviteModel.revoked_at.is_(None),
        )
        .values(accepted_at=utcnow(), accepted_by_id=principal.user_id)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise NotFound("This invite is invalid, used or expired.", code="invite_invalid")
    session.add(
        MembershipModel(
            organization_id=invite.organization_id, user_id=principal.user_id, role=invite.role
        )
    )
    org = await session.get(OrganizationModel, invite.organization_id)
    assert org is not None
    try:
        await session.commit()
    except IntegrityError as exc:  # joined through another invite at the same moment
        await session.rollback()
        raise Conflict("You are already a member.", code="already_member") from exc
    return OrgView(org=org, role=OrgRole(invite.role))


async def _member(
    session: AsyncSession, organization_id: uuid.UUID, user_id: uuid.UUID
) -> tuple[MembershipModel, UserModel]:
    row = (
        await session.execute(
            select(MembershipModel, UserModel)
            .join(UserModel, UserModel.id == MembershipModel.user_id)
            .where(
                MembershipModel.organization_id == organization_id,
                MembershipModel.user_id == user_id,
            )
        )
    ).first()
    if row is None:
        raise NotFound("No such member.", details={"user_id": str(user_id)})
    membership, user = row
    return membership, user


async def _ensure_another_owner(session: AsyncSession, organization_id: uuid.UUID) -> None:
    owners = await session.scalar(
        select(func.count()).where(
            MembershipModel.organization_id == organization_id,
            MembershipModel.role == OrgRole.owner.value,
        )
    )
    if (owners or 0) <= 1:
        raise Conflict(
            "An organization needs at least one owner; make someone else owner first.",
            code="last_owner",
        )


def _slugify(name: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "org"
    return f"{base}-{secrets.token_hex(3)}"
