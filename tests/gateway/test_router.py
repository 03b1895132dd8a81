"""The gateway's host choice: fewest in flight, then cheapest; concurrency caps; the queue
when every host is busy, in priority order."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from peergpu.server.context import ServerContext
from peergpu.server.db.host_models import HostServedModelModel
from peergpu.server.gateway.router import NoHost, QueueTimeout, Router
from tests.unit.scheduling import make_host, make_renter

pytestmark = pytest.mark.timeout(30)


async def _serving(
    context: ServerContext,
    *,
    price: int,
    concurrency: int = 4,
    kind: str = "chat",
    online: bool = True,
) -> uuid.UUID:
    owner = await make_renter(context)
    host_id = await make_host(context, owner, price=1, gpus=[("H100", 80_000)], online=online)
    async with context.sessionmaker() as session:
        session.add(
            HostServedModelModel(
                host_id=host_id,
                name="m",
                kind=kind,
                max_concurrency=concurrency,
                input_price_per_million_micros=price,
                output_price_per_million_micros=price,
            )
        )
        await session.commit()
    return host_id


async def test_fewest_in_flight_then_cheapest(context: ServerContext) -> None:
    cheap = await _serving(context, price=10)
    dear = await _serving(context, price=20)
    await _serving(context, price=1, online=False)  # offline hosts are never picked
    router = Router(context)
    first = await router.acquire("m", kind="chat", exclude=set(), queue_timeout=0)
    second = await router.acquire("m", kind="chat", exclude=set(), queue_timeout=0)
    third = await router.acquire("m", kind="chat", exclude=set(), queue_timeout=0)
    assert [first.host_id, second.host_id, third.host_id] == [cheap, dear, cheap]
    router.release(first)
    router.release(third)
    again = await router.acquire("m", kind="chat", exclude={cheap}, queue_timeout=0)
    assert again.host_id == dear


async def test_no_host_says_why(context: ServerContext) -> None:
    await _serving(context, price=1, kind="embeddings")
    router = Router(context)
    with pytest.raises(NoHost) as wrong_kind:
        await router.acquire("m", kind="chat", exclude=set(), queue_timeout=0)
    assert wrong_kind.value.served and wrong_kind.value.kind == "embeddings"
    with pytest.raises(NoHost) as nobody:
        await router.acquire("other", kind="chat", exclude=set(), queue_timeout=0)
    assert not nobody.value.served


async def test_busy_hosts_queue_requests_by_priority(context: ServerContext) -> None:
    await _serving(context, price=1, concurrency=1)
    router = Router(context)
    holder = await router.acquire("m", kind="chat", exclude=set(), queue_timeout=0)
    with pytest.raises(QueueTimeout):
        await router.acquire("m", kind="chat", exclude=set(), queue_timeout=0.05)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        slot = await router.acquire(
            "m", kind="chat", exclude=set(), priority=priority, queue_timeout=5
        )
        order.append(name)
        await asyncio.sleep(0.01)
        router.release(slot)

    waiters = []
    for name, priority in (("normal", 0), ("batch", -5), ("urgent", 5)):
        waiters.append(asyncio.create_task(wait(name, priority)))
        await asyncio.sleep(0.01)  # arrival order: normal, batch, urgent
    router.release(holder)
    await asyncio.gather(*waiters)
    assert order == ["urgent", "normal", "batch"]
