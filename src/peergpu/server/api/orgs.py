from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from peergpu.server.api.deps import ContextDep, Reader, SessionDep, Writer
from peergpu.server.api.responses import AUTHENTICATED, errors
from peergpu.server.db.models import OrgRole
from peergpu.server.schemas.orgs import (
    InviteAccept,
    InviteCreate,
    InviteCreated,
    InvitePublic,
    InvitesPublic,
    MemberPublic,
    MembersPublic,
    MemberUpdate,
    OrgCreate,
    OrgPublic,
    OrgsPublic,
    OrgUpdate,
)
from peergpu.server.services import callers, orgs
from peergpu.server.services.orgs import MemberView, OrgView

router = APIRouter(tags=["orgs"], responses=AUTHENTICATED)


def _org(view: OrgView) -> OrgPublic:
    return OrgPublic(
        id=view.org.id,
        name=view.org.name,
        slug=view.org.slug,
        created_at=view.org.created_at,
        role=view.role,
    )


def _member(view: MemberView) -> MemberPublic:
    return MemberPublic(
        user_id=view.user.id,
        email=view.user.email,
        display_name=view.user.display_name,
        role=OrgRole(view.membership.role),
        joined_at=view.membership.created_at,
    )


@router.post("/orgs", status_code=status.HTTP_201_CREATED, responses=errors(409))
async def create_org(body: OrgCreate, principal: Writer, session: SessionDep) -> OrgPublic:
    """Create an organization; you become its owner."""
    return _org(
        await orgs.create_org(session=session, principal=principal, name=body.name, slug=body.slug)
    )


@router.get("/orgs")
async def list_orgs(principal: Reader, session: SessionDep) -> OrgsPublic:
    """Organizations you belong to, with your role in each."""
    views = await orgs.list_orgs(session=session, principal=principal)
    return OrgsPublic(data=[_org(v) for v in views], count=len(views))


@router.get("/orgs/{org_id}", responses=errors(404))
async def get_org(org_id: uuid.UUID, principal: Reader, session: SessionDep) -> OrgPublic:
    return _org(await orgs.get_org(session=session, principal=principal, organization_id=org_id))


@router.patch("/orgs/{org_id}", responses=errors(404))
async def update_org(
    org_id: uuid.UUID, body: OrgUpdate, principal: Writer, session: SessionDep
) -> OrgPublic:
    """Rename an organization (owners and admins)."""
    if body.name is None:
        return await get_org(org_id, principal, session)
    return _org(
        await orgs.rename_org(
            session=session, principal=principal, organization_id=org_id, name=body.name
        )
    )


@router.get("/orgs/{org_id}/members", responses=errors(404))
async def list_members(org_id: uuid.UUID, principal: Reader, session: SessionDep) -> MembersPublic:
    views = await orgs.list_members(session=session, principal=principal, organization_id=org_id)
    return MembersPublic(data=[_member(v) for v in views], count=len(views))


@router.patch("/orgs/{org_id}/members/{user_id}", responses=errors(404, 409))
async def update_member(
    org_id: uuid.UUID,
    user_id: uuid.UUID,
    body: MemberUpdate,
    principal: Writer,
    session: SessionDep,
) -> MemberPublic:
    """Change a member's role. Only owners grant or remove the owner role."""
    view = await orgs.change_member_role(
        session=session,
        principal=principal,
        organization_id=org_id,
        user_id=user_id,
        role=body.role,
    )
    return _member(view)


@router.delete(
    "/orgs/{org_id}/members/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404, 409),
)
async def remove_member(
    org_id: uuid.UUID,
    user_id: uuid.UUID,
    principal: Writer,
    session: SessionDep,
    context: ContextDep,
) -> None:
    """Remove a member, or leave (your own user id). The last owner cannot go. The member's
    keys for the organization stop working (on other replicas' hot routes within
    ``services.callers.CACHE_SECONDS``)."""
    await orgs.remove_member(
        session=session, principal=principal, organization_id=org_id, user_id=user_id
    )
    callers.forget_all(context)


@router.post(
    "/orgs/{org_id}/invites", status_code=status.HTTP_201_CREATED, responses=errors(404, 409)
)
async def create_invite(
    org_id: uuid.UUID,
    body: InviteCreate,
    principal: Writer,
    session: SessionDep,
    context: ContextDep,
) -> InviteCreated:
    """Invite someone by e-mail. The link is e-mailed (or logged until SMTP is set up)."""
    invite, accept_url = await orgs.create_invite(
        session=session,
        principal=principal,
        mailer=context.mailer,
        organization_id=org_id,
        email=body.email,
        role=body.role,
        public_url=context.settings.effective_public_url,
        ttl_seconds=context.settings.invite_ttl_seconds,
    )
    return InviteCreated.model_validate(
        {**InvitePublic.model_validate(invite).model_dump(), "accept_url": accept_url}
    )


@router.get("/orgs/{org_id}/invites", responses=errors(404))
async def list_invites(org_id: uuid.UUID, principal: Reader, session: SessionDep) -> InvitesPublic:
    invites = await orgs.list_invites(session=session, principal=principal, organization_id=org_id)
    return InvitesPublic(data=[InvitePublic.model_validate(i) for i in invites], count=len(invites))


@router.delete(
    "/orgs/{org_id}/invites/{invite_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404),
)
async def revoke_invite(
    org_id: uuid.UUID, invite_id: uuid.UUID, principal: Writer, session: SessionDep
) -> None:
    await orgs.revoke_invite(
        session=session, principal=principal, organization_id=org_id, invite_id=invite_id
    )


@router.post("/invites/accept", responses=errors(404, 409))
async def accept_invite(body: InviteAccept, principal: Writer, session: SessionDep) -> OrgPublic:
    """Join an organization with the token from an invite e-mail."""
    return _org(await orgs.accept_invite(session=session, principal=principal, token=body.token))
