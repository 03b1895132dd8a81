"""Host presence: connected, heartbeating, disconnected, or silently gone.

A host is online while one of its agent sockets is open and heartbeating. Each connection has
an id; when an agent reconnects (maybe to another replica) the newest connection wins, and
updates from an older one are ignored. Every transition is a conditional UPDATE, so replicas
that race (a socket closing on one while the sweeper runs on another) never double-apply.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.protocol.messages import GpuSampleSpec, Hello
from peergpu.server.db import core
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import (
    HostGpuModel,
    HostModel,
    HostServedModelModel,
    HostSessionModel,
    HostStatus,
)


async def mark_connected(
    *,
    session: AsyncSession,
    host_id: uuid.UUID,
    connection_id: str,
    hello: Hello,
    protocol_version: int,
) -> None:
    """Record a new connection: host facts and GPUs from ``hello``, online, a new session."""
    now = utcnow()
    await _close_open_sessions(session, host_id, now)
    await session.execute(
        update(HostModel)
        .where(HostModel.id == host_id)
        .values(
            status=HostStatus.online.value,
            connection_id=connection_id,
            last_seen_at=now,
            hostname=hello.hostname,
            os=hello.os,
            agent_version=hello.agent_version,
            protocol_version=protocol_version,
            gpu_probe=hello.gpu_probe,
            runners=list(hello.runners),
        )
    )
    await _replace_gpus(session, host_id, hello)
    await _replace_served_models(session, host_id, hello, now)
    session.add(HostSessionModel(host_id=host_id, connection_id=connection_id, started_at=now))
    await session.commit()


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat: which connection of which host, and its GPU samples; ``running``, the
    jobs it says it runs, when they are to be reconciled with the jobs table (None: not this
    beat)."""

    host_id: uuid.UUID
    connection_id: str
    samples: Sequence[GpuSampleSpec]
    running: Sequence[uuid.UUID] | None = None


async def record_heartbeat(
    *,
    session: AsyncSession,
    host_id: uuid.UUID,
    connection_id: str,
    samples: list[GpuSampleSpec],
) -> bool:
    """Note that the host is alive and store its GPU samples; False if this connection has
    been superseded by a newer one (the caller should close it)."""
    current = await record_heartbeats(session, [Beat(host_id, connection_id, samples)])
    await session.commit()
    return bool(current)


async def record_heartbeats(
    session: AsyncSession, beats: Sequence[Beat]
) -> set[tuple[uuid.UUID, str]]:
    """Many hosts' heartbeats in the caller's transaction, in two statements: hosts still on
    the beating connection are marked seen (returned as ``(host id, connection id)``), then
    their GPU samples are stored (one executemany). Beats from superseded connections change
    nothing and are not returned."""
    if not beats:
        return set()
    now = utcnow()
    current = {
        (host_id, connection_id)
        for host_id, connection_id in await core.execute(
            session,
            update(HostModel)
            .where(
                tuple_(HostModel.id, HostModel.connection_id).in_(
                    list({(b.host_id, b.connection_id) for b in beats})
                )
            )
            .values(last_seen_at=now, status=HostStatus.online.value)
            .returning(HostModel.id, HostModel.connection_id)
            .execution_options(synchronize_session=False),
        )
        if connection_id is not None
    }
    samples = [
        {
            "b_host_id": beat.host_id,
            "b_index": sample.index,
            "utilization_percent": sample.utilization_percent,
            "memory_used_mib": sample.memory_used_mib,
            "temperature_c": sample.temperature_c,
            "power_watts": sample.power_watts,
            "sampled_at": now,
        }
        for beat in beats
        if (beat.host_id, beat.connection_id) in current
        for sample in beat.samples
    ]
    if samples:
        # Core executemany (the ORM would read a list of rows as an update by primary key).
        connection = await session.connection()
        await connection.execute(
            update(HostGpuModel).where(
                HostGpuModel.host_id == bindparam("b_host_id"),
                HostGpuModel.index == bindparam("b_index"),
            ),
            samples,
        )
    return current


async def mark_disconnected(
    *, session: AsyncSession, host_id: uuid.UUID, connection_id: str
) -> bool:
    """The socket closed. Offline only if this was still the host's current connection."""
    now = utcnow()
    result = await session.execute(
        update(HostModel)
        .where(HostModel.id == host_id, HostModel.connection_id == connection_id)
        .values(status=HostStatus.offline.value, connection_id=None)
    )
    await session.execute(
        update(HostSessionModel)
        .where(
            HostSessionModel.host_id == host_id,
            HostSessionModel.connection_id == connection_id,
            HostSessionModel.ended_at.is_(None),
        )
        .values(ended_at=now)
    )
    await session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def sweep_silent_hosts(
    *, session: AsyncSession, silent_for: timedelta, now: datetime | None = None
) -> list[uuid.UUID]:
    """Mark offline every online host not heard from for ``silent_for`` (missed heartbeats,
    or a replica that died holding its socket). Their sessions end at their last heartbeat."""
    now = now or utcnow()
    cutoff = now - silent_for
    stale = list(
        await session.execute(
            select(HostModel.id, HostModel.connection_id, HostModel.last_seen_at).where(
                HostModel.status == HostStatus.online.value, HostModel.last_seen_at < cutoff
            )
        )
    )
    gone: list[uuid.UUID] = []
    for host_id, connection_id, last_seen in stale:
        result = await session.execute(
            update(HostModel)
            .where(
                HostModel.id == host_id,
                HostModel.status == HostStatus.online.value,
                HostModel.last_seen_at < cutoff,
            )
            .values(status=HostStatus.offline.value, connection_id=None)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            gone.append(host_id)
            await session.execute(
                update(HostSessionModel)
                .where(
                    HostSessionModel.host_id == host_id,
                    HostSessionModel.connection_id == (connection_id or ""),
                    HostSessionModel.ended_at.is_(None),
                )
                .values(ended_at=last_seen or now)
            )
    await session.commit()
    return gone


async def _close_open_sessions(session: AsyncSession, host_id: uuid.UUID, now: datetime) -> None:
    await session.execute(
        update(HostSessionModel)
        .where(HostSessionModel.host_id == host_id, HostSessionModel.ended_at.is_(None))
        .values(ended_at=now)
    )


async def _replace_gpus(session: AsyncSession, host_id: uuid.UUID, hello: Hello) -> None:
    """Make the host's GPU rows match ``hello``, by index. Rows are updated in place, not
    recreated, so a GPU keeps its claim (``job_id``) across a reconnect."""
    existing = {
        gpu.index: gpu
        for gpu in await session.scalars(
            select(HostGpuModel).where(HostGpuModel.host_id == host_id)
        )
    }
    reported = {gpu.index for gpu in hello.gpus}
    gone = [index for index in existing if index not in reported]
    if gone:
        await session.execute(
            delete(HostGpuModel).where(
                HostGpuModel.host_id == host_id, HostGpuModel.index.in_(gone)
            )
        )
    for gpu in hello.gpus:
        facts = {
            "uuid": gpu.uuid,
            "model": gpu.model,
            "memory_total_mib": gpu.memory_total_mib,
            "driver_version": gpu.driver_version,
            "cuda_version": gpu.cuda_version,
            "compute_capability": gpu.compute_capability,
        }
        row = existing.get(gpu.index)
        if row is None:
            session.add(HostGpuModel(host_id=host_id, index=gpu.index, **facts))
        else:
            for name, value in facts.items():
                setattr(row, name, value)


async def _replace_served_models(
    session: AsyncSession, host_id: uuid.UUID, hello: Hello, now: datetime
) -> None:
    """The host serves exactly the models its latest ``hello`` declared."""
    await session.execute(
        delete(HostServedModelModel).where(HostServedModelModel.host_id == host_id)
    )
    if hello.models:
        await session.execute(
            insert(HostServedModelModel),
            [
                {
                    "host_id": host_id,
                    "name": model.name,
                    "kind": model.kind,
                    "max_concurrency": model.max_concurrency,
                    "input_price_per_million_micros": model.input_price_per_million_micros,
                    "output_price_per_million_micros": model.output_price_per_million_micros,
                    "declared_at": now,
                }
                for model in {m.name: m for m in hello.models}.values()  # last one wins
            ],
        )
