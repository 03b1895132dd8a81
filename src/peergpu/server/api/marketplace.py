"""The marketplace: search hosts by GPU model, VRAM, count, price, region and tags."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from peergpu.server.api.deps import Reader, SessionDep
from peergpu.server.api.responses import AUTHENTICATED
from peergpu.server.schemas.jobs import MarketGpu, MarketHost, MarketHostsPublic
from peergpu.server.services import marketplace

router = APIRouter(tags=["marketplace"], responses=AUTHENTICATED)


@router.get("/marketplace/hosts")
async def search_hosts(
    _principal: Reader,
    session: SessionDep,
    gpu_model: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    min_vram_mib: Annotated[int, Query(ge=0, le=4 * 1024 * 1024)] = 0,
    min_gpus: Annotated[int, Query(ge=1, le=64)] = 1,
    max_price_per_gpu_hour_micros: Annotated[int | None, Query(ge=0, le=10**12)] = None,
    region: Annotated[str | None, Query(max_length=64)] = None,
    tag: Annotated[list[str] | None, Query(max_length=20)] = None,
    online: bool = True,
    free: Annotated[bool, Query(description="count only GPUs not running a job")] = False,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> MarketHostsPublic:
    """Hosts offering GPUs, cheapest first, then the most reliable."""
    listings, total = await marketplace.search(
        session=session,
        filters=marketplace.MarketFilters(
            gpu_model=gpu_model,
            min_vram_mib=min_vram_mib,
            min_gpus=min_gpus,
            max_price_per_gpu_hour_micros=max_price_per_gpu_hour_micros,
            region=region,
            tags=tag or [],
            online_only=online,
            free_only=free,
        ),
        limit=limit,
        offset=offset,
    )
    return MarketHostsPublic(
        data=[
            MarketHost(
                id=item.host.id,
                name=item.host.name,
                region=item.host.region,
                tags=list(item.host.tags),
                price_per_gpu_hour_micros=item.host.price_per_gpu_hour_micros or 0,
                status=item.host.status,
                uptime_30d=round(item.host.reliability, 4),
                runners=list(item.host.runners),
                gpus=[
                    MarketGpu(
                        index=g.index,
                        model=g.model,
                        memory_total_mib=g.memory_total_mib,
                        busy=g.job_id is not None,
                    )
                    for g in item.gpus
                ],
                free_gpus=sum(1 for g in item.gpus if g.job_id is None),
            )
            for item in listings
        ],
        count=total,
    )
