from __future__ import annotations

import uuid

from fastapi import APIRouter, WebSocket, status

from peergpu.protocol.manifest import encode_public_key, key_id
from peergpu.server.agents import dispatch
from peergpu.server.api.deps import AuthRateLimit, ContextDep, Reader, SessionDep, Writer
from peergpu.server.api.responses import AUTHENTICATED, errors
from peergpu.server.schemas.hosts import (
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    EnrollRequest,
    EnrollResponse,
    GpuPublic,
    HostPublic,
    HostSettingsIn,
    HostsPublic,
    HostUpdate,
    from_micros,
    to_micros,
)
from peergpu.server.services import hosts
from peergpu.server.services.hosts import HostSettings, HostView

router = APIRouter(tags=["hosts"], responses=AUTHENTICATED)
agent_router = APIRouter(prefix="/agent", tags=["agent"])

WEBSOCKET_PATH = "/api/v1/agent/ws"


def _settings(body: HostSettingsIn, paused: bool | None = None) -> HostSettings:
    return HostSettings(
        name=body.name,
        region=body.region,
        tags=body.tags,
        price_per_gpu_hour_micros=to_micros(body.price_per_gpu_hour),
        paused=paused,
    )


def _host(view: HostView) -> HostPublic:
    host = view.host
    return HostPublic(
        id=host.id,
        name=host.name,
        region=host.region,
        tags=list(host.tags),
        price_per_gpu_hour=from_micros(host.price_per_gpu_hour_micros),
        availability="paused" if host.paused else host.status,
        status=host.status,
        paused=host.paused,
        verified=host.verified,
        hostname=host.hostname,
        os=host.os,
        agent_version=host.agent_version,
        gpu_probe=host.gpu_probe,
        runners=list(host.runners),
        last_seen_at=host.last_seen_at,
        created_at=host.created_at,
        uptime_30d=view.uptime_30d,
        gpus=[GpuPublic.model_validate(g) for g in view.gpus],
    )


@router.post("/hosts/enrollment-tokens", status_code=status.HTTP_201_CREATED, responses=errors(403))
async def create_enrollment_token(
    body: EnrollmentTokenCreate, principal: Writer, session: SessionDep, context: ContextDep
) -> EnrollmentTokenCreated:
    """A one-time token to enrol a machine as a host (needs the host role)."""
    row, token = await hosts.create_enrollment_token(
        session=session,
        principal=principal,
        settings=_settings(body),
        ttl_seconds=body.ttl_seconds or context.settings.enrollment_token_ttl_seconds,
    )
    server = context.settings.effective_public_url
    return EnrollmentTokenCreated(
        token=token,
        expires_at=row.expires_at,
        command=f"peergpu agent enroll --server {server} --token {token}",
    )


@router.get("/hosts")
async def list_hosts(principal: Reader, session: SessionDep) -> HostsPublic:
    """Your hosts, with GPUs, availability and 30-day uptime."""
    views = await hosts.list_hosts(session=session, principal=principal)
    return HostsPublic(data=[_host(v) for v in views], count=len(views))


@router.get("/hosts/{host_id}", responses=errors(404))
async def get_host(host_id: uuid.UUID, principal: Reader, session: SessionDep) -> HostPublic:
    return _host(await hosts.get_host(session=session, principal=principal, host_id=host_id))


@router.patch("/hosts/{host_id}", responses=errors(404))
async def update_host(
    host_id: uuid.UUID, body: HostUpdate, principal: Writer, session: SessionDep
) -> HostPublic:
    """Rename, move, retag, reprice, pause or resume a host."""
    view = await hosts.update_host(
        session=session, principal=principal, host_id=host_id, changes=_settings(body, body.paused)
    )
    return _host(view)


@router.delete("/hosts/{host_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(404))
async def remove_host(
    host_id: uuid.UUID, principal: Writer, session: SessionDep, context: ContextDep
) -> None:
    """Decommission a host: its credential stops working and its agent is disconnected."""
    await hosts.remove_host(session=session, principal=principal, host_id=host_id)
    await dispatch.disconnect_host(context=context, host_id=host_id)


@agent_router.post("/enroll", dependencies=[AuthRateLimit], responses=errors(401, 422, 429))
async def enroll(body: EnrollRequest, session: SessionDep, context: ContextDep) -> EnrollResponse:
    """Exchange a one-time enrolment token for a host credential (used by `peergpu agent
    enroll`)."""
    enrollment = await hosts.enroll(session=session, token=body.token, hostname=body.hostname)
    public_key = context.signing_key.public_key()
    return EnrollResponse(
        host_id=enrollment.host.id,
        credential=enrollment.credential,
        server_public_key=encode_public_key(public_key),
        key_id=key_id(public_key),
        heartbeat_interval=context.settings.agent_heartbeat_seconds,
        websocket_path=WEBSOCKET_PATH,
    )


@agent_router.websocket("/ws")
async def agent_socket(websocket: WebSocket) -> None:
    """The host agent's one outbound connection (see peergpu.protocol.messages)."""
    await websocket.app.state.hub.serve(websocket)
