"""Hosts: enrolment tokens, enrolment, the owner's view and settings, uptime."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import AuthenticationFailed, NotFound, PermissionDenied
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import (
    EnrollmentTokenModel,
    HostGpuModel,
    HostModel,
    HostSessionModel,
)
from peergpu.server.security import api_keys as key_format
from peergpu.server.security.principal import Principal
from peergpu.server.security.tokens import hash_token, new_opaque_token

UPTIME_WINDOW = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class HostSettings:
    name: str | None = None
    region: str | None = None
    tags: list[str] | None = None
    price_per_gpu_hour_micros: int | None = None
    paused: bool | None = None


@dataclass(frozen=True, slots=True)
class HostView:
    host: HostModel
    gpus: list[HostGpuModel]
    uptime_30d: float


@dataclass(frozen=True, slots=True)
class Enrollment:
    host: HostModel
    credential: str


async def create_enrollment_token(
    *, session: AsyncSession, principal: Principal, settings: HostSettings, ttl_seconds: int
) -> tuple[EnrollmentTokenModel, str]:
    """A one-time token for ``peergpu agent enroll``; only users with the host role get one."""
    _require_host_role(principal)
    token = new_opaque_token()
    row = EnrollmentTokenModel(
        owner_id=principal.user_id,
        token_hash=hash_token(token),
        name=settings.name or "",
        region=settings.region or "",
        tags=settings.tags or [],
        price_per_gpu_hour_micros=settings.price_per_gpu_hour_micros,
        expires_at=utcnow() + timedelta(seconds=ttl_seconds),
    )
    session.add(row)
    await session.commit()
    return row, token


async def enroll(*, session: AsyncSession, token: str, hostname: str) -> Enrollment:
    """Exchange an enrolment token for a new host and its credential (shown once).

    The token is consumed by one conditional UPDATE, so it works exactly once even when two
    agents present it at the same moment; an expired or used token is refused.
    """
    invalid = AuthenticationFailed(
        "The enrolment token is invalid, expired or already used; create a new one.",
        code="invalid_enrollment_token",
    )
    row = await session.scalar(
        select(EnrollmentTokenModel).where(EnrollmentTokenModel.token_hash == hash_token(token))
    )
    now = utcnow()
    if row is None or row.used_at is not None or row.expires_at <= now:
        raise invalid
    claimed = await session.execute(
        update(EnrollmentTokenModel)
        .where(EnrollmentTokenModel.id == row.id, EnrollmentTokenModel.used_at.is_(None))
        .values(used_at=now)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise invalid
    credential = key_format.generate_api_key(key_format.HOST_CREDENTIAL_MARKER)
    host = HostModel(
        owner_id=row.owner_id,
        name=row.name or hostname or "host",
        region=row.region,
        tags=list(row.tags),
        price_per_gpu_hour_micros=row.price_per_gpu_hour_micros,
        credential_prefix=credential.prefix,
        credential_hash=credential.secret_hash,
        hostname=hostname,
    )
    session.add(host)
    await session.flush()
    row.host_id = host.id
    await session.commit()
    return Enrollment(host=host, credential=credential.plaintext)


async def authenticate_host(*, session: AsyncSession, credential: str) -> HostModel:
    invalid = AuthenticationFailed(
        "The host credential is invalid.", code="invalid_host_credential"
    )
    prefix = key_format.parse_prefix(credential, key_format.HOST_CREDENTIAL_MARKER)
    if prefix is None:
        raise invalid
    host = await session.scalar(select(HostModel).where(HostModel.credential_prefix == prefix))
    if host is None or not key_format.matches(credential, host.credential_hash):
        raise invalid
    if host.revoked_at is not None:
        raise AuthenticationFailed(
            "This host was removed by its owner; enrol it again.", code="host_revoked"
        )
    return host


async def list_hosts(*, session: AsyncSession, principal: Principal) -> list[HostView]:
    hosts = list(
        await session.scalars(
            select(HostModel)
            .where(HostModel.owner_id == principal.user_id, HostModel.revoked_at.is_(None))
            .order_by(HostModel.created_at, HostModel.id)
        )
    )
    return [await _view(session, host) for host in hosts]


async def get_host(*, session: AsyncSession, principal: Principal, host_id: uuid.UUID) -> HostView:
    return await _view(session, await _owned_host(session, principal, host_id))


async def update_host(
    *, session: AsyncSession, principal: Principal, host_id: uuid.UUID, changes: HostSettings
) -> HostView:
    """Change a host's name, region, tags, price or pause it (paused hosts stay connected but
    get no new jobs)."""
    host = await _owned_host(session, principal, host_id)
    if changes.name is not None:
        host.name = changes.name
    if changes.region is not None:
        host.region = changes.region
    if changes.tags is not None:
        host.tags = changes.tags
    if changes.price_per_gpu_hour_micros is not None:
        host.price_per_gpu_hour_micros = changes.price_per_gpu_hour_micros
    if changes.paused is not None:
        host.paused = changes.paused
    await session.commit()
    return await _view(session, host)


async def remove_host(*, session: AsyncSession, principal: Principal, host_id: uuid.UUID) -> None:
    """Decommission a host: its credential stops working at once (its socket is closed by
    the caller after this commits)."""
    host = await _owned_host(session, principal, host_id)
    host.revoked_at = utcnow()
    await session.commit()


async def uptime(
    *, session: AsyncSession, host_id: uuid.UUID, now: datetime | None = None
) -> float:
    """Share of the last 30 days the host was online (0..1), from its session intervals."""
    return (await uptimes(session=session, host_ids=[host_id], now=now))[host_id]


async def uptimes(
    *, session: AsyncSession, host_ids: list[uuid.UUID] | None = None, now: datetime | None = None
) -> dict[uuid.UUID, float]:
    """``uptime`` of several hosts (every host with a session in the window when ``host_ids``
    is None) in one query; hosts without sessions in the window are at 0."""
    now = now or utcnow()
    window_start = now - UPTIME_WINDOW
    query = select(
        HostSessionModel.host_id, HostSessionModel.started_at, HostSessionModel.ended_at
    ).where(or_(HostSessionModel.ended_at.is_(None), HostSessionModel.ended_at > window_start))
    if host_ids is not None:
        query = query.where(HostSessionModel.host_id.in_(host_ids))
    online = {host_id: timedelta() for host_id in host_ids or ()}
    for host_id, started, ended in await session.execute(query):
        start = max(started, window_start)
        end = min(ended or now, now)
        if end > start:
            online[host_id] = online.get(host_id, timedelta()) + (end - start)
    return {host_id: min(1.0, total / UPTIME_WINDOW) for host_id, total in online.items()}


async def count_gpus(*, session: AsyncSession, host_id: uuid.UUID) -> int:
    return (
        await session.scalar(
            select(func.count()).select_from(HostGpuModel).where(HostGpuModel.host_id == host_id)
        )
    ) or 0


async def _view(session: AsyncSession, host: HostModel) -> HostView:
    gpus = list(
        await session.scalars(
            select(HostGpuModel).where(HostGpuModel.host_id == host.id).order_by(HostGpuModel.index)
        )
    )
    return HostView(host=host, gpus=gpus, uptime_30d=await uptime(session=session, host_id=host.id))


async def _owned_host(session: AsyncSession, principal: Principal, host_id: uuid.UUID) -> HostModel:
    host = await session.get(HostModel, host_id)
    if host is None or host.owner_id != principal.user_id or host.revoked_at is not None:
        raise NotFound("No such host.", details={"id": str(host_id)})
    return host


def _require_host_role(principal: Principal) -> None:
    if not principal.user.is_host:
        raise PermissionDenied(
            "Only users with the host role can enrol hosts; add it with PATCH /api/v1/users/me.",
            code="host_role_required",
        )
