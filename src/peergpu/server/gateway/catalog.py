"""Which models the gateway can serve: those declared by online, unpaused, enrolled hosts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db.host_models import HostModel, HostServedModelModel, taking_work


@dataclass(frozen=True)
class ServedModel:
    """A model name and what serving it looks like right now, across hosts."""

    name: str
    kind: str
    hosts: int
    declared_at: datetime
    input_price_per_million_micros: int
    output_price_per_million_micros: int


async def served_models(session: AsyncSession, name: str | None = None) -> list[ServedModel]:
    """Models with at least one online host, by name; their cheapest prices. A name some
    hosts declare as chat and others as embeddings is listed with the more common kind."""
    model = HostServedModelModel
    query = (
        select(
            model.name,
            model.kind,
            func.count(),
            func.min(model.declared_at),
            func.min(model.input_price_per_million_micros),
            func.min(model.output_price_per_million_micros),
        )
        .join(HostModel, HostModel.id == model.host_id)
        .where(*taking_work())
        .group_by(model.name, model.kind)
        .order_by(model.name, func.count().desc())
    )
    if name is not None:
        query = query.where(model.name == name)
    found: dict[str, ServedModel] = {}
    for served, kind, hosts, declared_at, price_in, price_out in await session.execute(query):
        if served not in found:
            found[served] = ServedModel(
                served, kind, int(hosts), declared_at, int(price_in), int(price_out)
            )
    return list(found.values())


async def ever_declared(session: AsyncSession, name: str) -> bool:
    """Some host (online or not) declares this model: it exists, it may just be offline."""
    found = await session.scalar(
        select(HostServedModelModel.name).where(HostServedModelModel.name == name).limit(1)
    )
    return found is not None
