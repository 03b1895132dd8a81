"""Accounts: registration, login, token rotation, logout and profile changes."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import AuthenticationFailed, Conflict, InvalidInput, PermissionDenied
from peergpu.server.db.base import utcnow
from peergpu.server.db.models import RefreshTokenModel, UserModel, UserRole
from peergpu.server.schemas.auth import TokenPair
from peergpu.server.schemas.users import UserUpdate
from peergpu.server.security.passwords import PasswordHashing
from peergpu.server.security.tokens import AccessTokens, hash_token, new_opaque_token
from peergpu.server.services.billing import accounts as billing_accounts
from peergpu.server.services.billing import ledger, postings

SELF_SERVICE_ROLES = frozenset({UserRole.renter, UserRole.host})


def normalize_email(email: str) -> str:
    return email.strip().lower()


async def create_user(
    *,
    session: AsyncSession,
    passwords: PasswordHashing,
    email: str,
    password: str,
    roles: list[UserRole],
    display_name: str = "",
    signup_credit_micros: int = 0,
) -> UserModel:
    """Create a user with the given roles (and, if given, promotional sign-up credit booked in
    the same transaction); raises Conflict when the e-mail is taken."""
    if not roles:
        raise InvalidInput("Choose at least one role.", details={"field": "roles"})
    user = UserModel(
        email=normalize_email(email),
        display_name=display_name,
        password_hash=passwords.hash(password),
        is_renter=UserRole.renter in roles,
        is_host=UserRole.host in roles,
        is_admin=UserRole.admin in roles,
    )
    session.add(user)
    try:
        await session.flush()
        if signup_credit_micros > 0:
            await ledger.post(
                session,
                postings.grant(
                    wallet=billing_accounts.user_wallet(user.id),
                    amount=signup_credit_micros,
                    key=f"signup:{user.id}",
                    memo="Sign-up credit.",
                ),
            )
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise Conflict("An account with this e-mail already exists.", code="email_taken") from exc
    return user


async def register(
    *,
    session: AsyncSession,
    passwords: PasswordHashing,
    email: str,
    password: str,
    roles: list[UserRole],
    display_name: str = "",
    signup_credit_micros: int = 0,
) -> UserModel:
    """Self-service sign-up: renter and/or host; the admin role is only granted by an admin."""
    if not set(roles) <= SELF_SERVICE_ROLES:
        raise PermissionDenied(
            "The admin role cannot be chosen at registration.",
            details={"field": "roles", "allowed": sorted(SELF_SERVICE_ROLES)},
        )
    return await create_user(
        session=session,
        passwords=passwords,
        email=email,
        password=password,
        roles=roles,
        display_name=display_name,
        signup_credit_micros=signup_credit_micros,
    )


async def authenticate(
    *, session: AsyncSession, passwords: PasswordHashing, email: str, password: str
) -> UserModel:
    """The user these credentials belong to; one message for every failure (no account probing)."""
    user = await session.scalar(select(UserModel).where(UserModel.email == normalize_email(email)))
    if not passwords.verify(user.password_hash if user else None, password) or user is None:
        raise AuthenticationFailed("Wrong e-mail or password.", code="invalid_credentials")
    if not user.is_active:
        raise PermissionDenied("This account is disabled.", code="account_disabled")
    return user


async def start_session(
    *,
    session: AsyncSession,
    tokens: AccessTokens,
    user: UserModel,
    refresh_ttl_seconds: int,
    family_id: uuid.UUID | None = None,
) -> TokenPair:
    """Issue an access token and a new refresh token (a new family unless one is given)."""
    refresh_token = new_opaque_token()
    session.add(
        RefreshTokenModel(
            user_id=user.id,
            family_id=family_id or uuid.uuid4(),
            token_hash=hash_token(refresh_token),
            expires_at=utcnow() + timedelta(seconds=refresh_ttl_seconds),
        )
    )
    await session.commit()
    return TokenPair(
        access_token=tokens.issue(user.id),
        refresh_token=refresh_token,
        expires_in=tokens.ttl_seconds,
    )


async def rotate_refresh_token(
    *,
    session: AsyncSession,
    tokens: AccessTokens,
    refresh_token: str,
    refresh_ttl_seconds: int,
) -> TokenPair:
    """Exchange a refresh token for a new pair; each refresh token works once.

    Presenting a token that was already used means it leaked (or two clients raced): the whole
    family is revoked and the caller must log in again. The "used" mark is one conditional
    UPDATE, so of two concurrent refreshes exactly one wins.
    """
    invalid = AuthenticationFailed(
        "The refresh token is invalid or expired; log in again.", code="invalid_refresh_token"
    )
    row = await session.scalar(
        select(RefreshTokenModel).where(RefreshTokenModel.token_hash == hash_token(refresh_token))
    )
    now = utcnow()
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        raise invalid
    claimed = await session.execute(
        update(RefreshTokenModel)
        .where(RefreshTokenModel.id == row.id, RefreshTokenModel.used_at.is_(None))
        .values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        await _revoke_family(session=session, family_id=row.family_id)
        await session.commit()
        raise invalid
    user = await session.get(UserModel, row.user_id)
    if user is None or not user.is_active:
        await session.commit()
        raise invalid
    return await start_session(
        session=session,
        tokens=tokens,
        user=user,
        refresh_ttl_seconds=refresh_ttl_seconds,
        family_id=row.family_id,
    )


async def logout(*, session: AsyncSession, refresh_token: str) -> None:
    """Revoke the login the refresh token belongs to. Unknown tokens are ignored (idempotent)."""
    row = await session.scalar(
        select(RefreshTokenModel).where(RefreshTokenModel.token_hash == hash_token(refresh_token))
    )
    if row is None:
        return
    await _revoke_family(session=session, family_id=row.family_id)
    await session.commit()


async def update_profile(
    *, session: AsyncSession, passwords: PasswordHashing, user: UserModel, changes: UserUpdate
) -> UserModel:
    """Apply a user's own changes. A password change needs the current password and ends
    every other login of this user (their refresh tokens are revoked)."""
    if changes.display_name is not None:
        user.display_name = changes.display_name
    if changes.roles is not None:
        _apply_self_service_roles(user, changes.roles)
    if changes.password is not None:
        if not changes.current_password or not passwords.verify(
            user.password_hash, changes.current_password
        ):
            raise PermissionDenied(
                "The current password is wrong.",
                code="wrong_password",
                details={"field": "current_password"},
            )
        user.password_hash = passwords.hash(changes.password)
        await session.execute(
            update(RefreshTokenModel)
            .where(RefreshTokenModel.user_id == user.id, RefreshTokenModel.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
    user.updated_at = utcnow()
    await session.commit()
    return user


async def list_users(
    *, session: AsyncSession, offset: int, limit: int
) -> tuple[list[UserModel], int]:
    total = await session.scalar(select(func.count()).select_from(UserModel))
    rows = await session.scalars(
        select(UserModel).order_by(UserModel.created_at, UserModel.id).offset(offset).limit(limit)
    )
    return list(rows), total or 0


def _apply_self_service_roles(user: UserModel, roles: list[UserRole]) -> None:
    wanted = set(roles)
    if not wanted:
        raise InvalidInput("Keep at least one role.", details={"field": "roles"})
    if UserRole.admin in wanted and not user.is_admin:
        raise PermissionDenied(
            "Only an admin can grant the admin role.", details={"field": "roles"}
        )
    user.is_renter = UserRole.renter in wanted
    user.is_host = UserRole.host in wanted
    # The admin flag is never removed through self-service: dropping it from the list keeps it.


async def _revoke_family(*, session: AsyncSession, family_id: uuid.UUID) -> None:
    await session.execute(
        update(RefreshTokenModel)
        .where(RefreshTokenModel.family_id == family_id, RefreshTokenModel.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
