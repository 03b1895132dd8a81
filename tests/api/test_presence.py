"""Presence and uptime, at the service level (no sockets needed)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.protocol.messages import GpuSampleSpec, GpuSpec, Hello
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostModel, HostSessionModel
from peergpu.server.db.models import UserRole
from peergpu.server.security.principal import Principal
from peergpu.server.services import accounts, hosts, presence
from tests.factories import PASSWORD

HELLO = Hello(
    protocol_versions=[1],
    agent_version="test",
    gpus=[GpuSpec(index=0, uuid="GPU-x", model="NVIDIA L4", memory_total_mib=23034)],
)


async def _host(context: ServerContext, session: AsyncSession) -> HostModel:
    user = await accounts.create_user(
        session=session,
        passwords=context.passwords,
        email="h@example.com",
        password=PASSWORD,
        roles=[UserRole.host],
    )
    _row, token = await hosts.create_enrollment_token(
        session=session,
        principal=Principal.for_session(user),
        settings=hosts.HostSettings(),
        ttl_seconds=60,
    )
    return (await hosts.enroll(session=session, token=token, hostname="h")).host


async def _status(session: AsyncSession, host_id: uuid.UUID) -> str:
    host = await session.get(HostModel, host_id, populate_existing=True)
    assert host is not None
    return host.status


async def test_newest_connection_wins(context: ServerContext, session: AsyncSession) -> None:
    host = await _host(context, session)
    host_id = host.id
    await presence.mark_connected(
        session=session, host_id=host_id, connection_id="old", hello=HELLO, protocol_version=1
    )
    await presence.mark_connected(
        session=session, host_id=host_id, connection_id="new", hello=HELLO, protocol_version=1
    )
    sample = [GpuSampleSpec(index=0, utilization_percent=50, memory_used_mib=100)]
    assert not await presence.record_heartbeat(
        session=session, host_id=host_id, connection_id="old", samples=sample
    )
    assert await presence.record_heartbeat(
        session=session, host_id=host_id, connection_id="new", samples=sample
    )
    # the old socket closing does not take the host offline
    assert not await presence.mark_disconnected(
        session=session, host_id=host_id, connection_id="old"
    )
    assert await _status(session, host_id) == "online"
    assert await presence.mark_disconnected(session=session, host_id=host_id, connection_id="new")
    assert await _status(session, host_id) == "offline"


async def test_sweeper_marks_silent_hosts_offline(
    context: ServerContext, session: AsyncSession
) -> None:
    host = await _host(context, session)
    host_id = host.id
    await presence.mark_connected(
        session=session, host_id=host_id, connection_id="c", hello=HELLO, protocol_version=1
    )
    assert (
        await presence.sweep_silent_hosts(session=session, silent_for=timedelta(seconds=45)) == []
    )
    last_seen = utcnow() - timedelta(minutes=5)
    await session.execute(
        update(HostModel).where(HostModel.id == host_id).values(last_seen_at=last_seen)
    )
    await session.commit()
    gone = await presence.sweep_silent_hosts(session=session, silent_for=timedelta(seconds=45))
    assert gone == [host_id]
    assert await _status(session, host_id) == "offline"
    # a heartbeat from the swept connection no longer counts
    assert not await presence.record_heartbeat(
        session=session, host_id=host_id, connection_id="c", samples=[]
    )


async def test_uptime_is_the_share_of_30_days_online(
    context: ServerContext, session: AsyncSession
) -> None:
    host = await _host(context, session)
    host_id = host.id
    now = utcnow()
    session.add_all(
        [
            # 3 days, entirely inside the window
            HostSessionModel(
                host_id=host_id,
                connection_id="a",
                started_at=now - timedelta(days=10),
                ended_at=now - timedelta(days=7),
            ),
            # started before the window: only the last 1.5 days of it count
            HostSessionModel(
                host_id=host_id,
                connection_id="b",
                started_at=now - timedelta(days=40),
                ended_at=now - timedelta(days=28, hours=12),
            ),
            # still open: 1.5 days so far
            HostSessionModel(
                host_id=host_id, connection_id="c", started_at=now - timedelta(days=1.5)
            ),
        ]
    )
    await session.commit()
    value = await hosts.uptime(session=session, host_id=host_id, now=now)
    assert abs(value - 6 / 30) < 1e-4
