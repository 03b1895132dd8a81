"""The renter's view of hosts: who offers which GPUs, at what price, how reliably."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db.host_models import HostGpuModel, HostModel, HostStatus


@dataclass(frozen=True)
class MarketFilters:
    gpu_model: str | None = None
    min_vram_mib: int = 0
    min_gpus: int = 1
    max_price_per_gpu_hour_micros: int | None = None
    region: str | None = None
    tags: list[str] = field(default_factory=list)
    online_only: bool = True
    free_only: bool = False


@dataclass(frozen=True)
class MarketListing:
    host: HostModel
    gpus: list[HostGpuModel]
    matching_gpus: int


async def search(
    *, session: AsyncSession, filters: MarketFilters, limit: int = 50, offset: int = 0
) -> tuple[list[MarketListing], int]:
    """Priced, unpaused hosts with at least ``min_gpus`` GPUs that match, cheapest first, then
    the most reliable."""
    gpu_match = [HostGpuModel.memory_total_mib >= filters.min_vram_mib]
    if filters.gpu_model:
        escaped = filters.gpu_model.lower().replace("\\", "\\\\")
        escaped = escaped.replace("%", "\\%").replace("_", "\\_")
        gpu_match.append(func.lower(HostGpuModel.model).like(f"%{escaped}%", escape="\\"))
    if filters.free_only:
        gpu_match.append(HostGpuModel.job_id.is_(None))
    matching = (
        select(HostGpuModel.host_id, func.count().label("n"))
        .where(*gpu_match)
        .group_by(HostGpuModel.host_id)
        .subquery()
    )
    query = (
        select(HostModel, matching.c.n)
        .join(matching, matching.c.host_id == HostModel.id)
        .where(
            matching.c.n >= filters.min_gpus,
            HostModel.revoked_at.is_(None),
            HostModel.paused.is_(False),
            HostModel.price_per_gpu_hour_micros.is_not(None),
        )
    )
    if filters.online_only:
        query = query.where(HostModel.status == HostStatus.online.value)
    if filters.max_price_per_gpu_hour_micros is not None:
        query = query.where(
            HostModel.price_per_gpu_hour_micros <= filters.max_price_per_gpu_hour_micros
        )
    if filters.region:
        query = query.where(HostModel.region == filters.region)
    rows = list(
        await session.execute(
            query.order_by(
                HostModel.price_per_gpu_hour_micros,
                HostModel.reliability.desc(),
                HostModel.id,
            )
        )
    )
    # Tags are a JSON list: filtered here, portable across SQLite and PostgreSQL.
    wanted = set(filters.tags)
    rows = [row for row in rows if wanted <= set(row[0].tags or ())]
    total = len(rows)
    page = rows[offset : offset + limit]
    host_ids: list[uuid.UUID] = [row[0].id for row in page]
    gpus: dict[uuid.UUID, list[HostGpuModel]] = {host_id: [] for host_id in host_ids}
    if host_ids:
        for gpu in await session.scalars(
            select(HostGpuModel)
            .where(HostGpuModel.host_id.in_(host_ids))
            .order_by(HostGpuModel.host_id, HostGpuModel.index)
        ):
            gpus[gpu.host_id].append(gpu)
    listings = [
        MarketListing(host=host, gpus=gpus[host.id], matching_gpus=int(n)) for host, n in page
    ]
    return listings, total
