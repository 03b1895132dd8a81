"""What a job would cost before it is submitted, and the credit check at submit.

The estimate prices the job at the cheapest online host that could run it (any host, busy or
not, that has enough GPUs of the right model and memory, the runner, the tags, within the
job's price limit) and says how many such hosts exist and how many are free now. The hold is
what the scheduler will set aside: price x GPUs x maximum duration, cut to the job's cost cap.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db.host_models import HostGpuModel, HostModel, taking_jobs
from peergpu.server.services.billing import accounts, holds, ledger


@dataclass(frozen=True)
class Need:
    """The parts of a job spec that decide where it can run and what it costs."""

    wallet: str
    gpu_count: int
    min_vram_mib: int
    gpu_models: list[str]
    tags: list[str]
    runner: str
    max_price_per_gpu_hour_micros: int | None
    max_duration_seconds: int
    max_cost_micros: int | None


@dataclass(frozen=True)
class Estimate:
    wallet: str
    eligible_hosts: int
    free_hosts: int
    price_per_gpu_hour_micros: int | None
    cost_per_hour_micros: int | None
    run_seconds: int
    hold_micros: int | None
    available_micros: int
    monthly_cap_left_micros: int | None
    enough_credit: bool
    message: str


async def estimate(*, session: AsyncSession, need: Need) -> Estimate:
    cheapest, eligible, free = await _cheapest_host(session, need)
    available = (await ledger.balances(session, [accounts.available(need.wallet)]))[
        accounts.available(need.wallet)
    ]
    room = await holds.cap_room(session, [need.wallet])
    cap_left = room.get(need.wallet)
    if cheapest is None:
        return Estimate(
            wallet=need.wallet,
            eligible_hosts=0,
            free_hosts=0,
            price_per_gpu_hour_micros=None,
            cost_per_hour_micros=None,
            run_seconds=need.max_duration_seconds,
            hold_micros=None,
            available_micros=available,
            monthly_cap_left_micros=cap_left,
            enough_credit=available > 0,
            message="No online host can run this job now; it would wait in the queue.",
        )
    plan = holds.plan(
        holds.HoldRequest(
            job_id=uuid.UUID(int=0),
            attempt=1,
            wallet=need.wallet,
            host_id=uuid.UUID(int=0),
            host_owner_id=uuid.UUID(int=0),
            price_per_gpu_hour_micros=cheapest,
            gpu_count=need.gpu_count,
            max_duration_seconds=need.max_duration_seconds,
            max_cost_micros=need.max_cost_micros,
        )
    )
    hold = plan.amount if plan else None
    run_seconds = plan.run_seconds if plan else 0
    enough = hold is not None and hold <= available and (cap_left is None or hold <= cap_left)
    per_hour = cheapest * need.gpu_count
    if hold is None:
        message = "The cost cap buys no time on the cheapest eligible host."
    elif enough:
        message = (
            f"At most {ledger.format_usd(hold)} for {run_seconds} s at "
            f"{ledger.format_usd(per_hour)}/hour; you pay only the seconds used."
        )
    elif hold > available:
        message = (
            f"This job needs a hold of {ledger.format_usd(hold)}; "
            f"{ledger.format_usd(max(available, 0))} is available. Top up first."
        )
    else:
        message = "The monthly spending cap does not leave room for this job's hold."
    return Estimate(
        wallet=need.wallet,
        eligible_hosts=eligible,
        free_hosts=free,
        price_per_gpu_hour_micros=cheapest,
        cost_per_hour_micros=per_hour,
        run_seconds=run_seconds,
        hold_micros=hold,
        available_micros=available,
        monthly_cap_left_micros=cap_left,
        enough_credit=enough,
        message=message,
    )


async def require_some_credit(*, session: AsyncSession, wallet: str) -> None:
    """Submit refuses a wallet with no credit at all, available or held for running jobs (held
    credit comes back as they end); the scheduler checks the real hold."""
    codes = [accounts.available(wallet), accounts.held(wallet)]
    found = await ledger.balances(session, codes)
    available = found[codes[0]]
    if available + found[codes[1]] <= 0:
        raise ledger.InsufficientFunds(
            f"No credit left ({ledger.format_usd(available)} available). Top up with "
            "`peergpu billing topup` or ask an admin for credit.",
            details={"available_micros": available},
        )


async def _cheapest_host(session: AsyncSession, need: Need) -> tuple[int | None, int, int]:
    """(cheapest eligible price, eligible hosts, of which free now)."""
    query = (
        select(
            HostModel.id,
            HostModel.price_per_gpu_hour_micros,
            HostModel.tags,
            HostModel.runners,
            HostGpuModel.model,
            HostGpuModel.memory_total_mib,
            HostGpuModel.job_id,
        )
        .join(HostGpuModel, HostGpuModel.host_id == HostModel.id)
        .where(*taking_jobs())
    )
    if need.max_price_per_gpu_hour_micros is not None:
        query = query.where(
            HostModel.price_per_gpu_hour_micros <= need.max_price_per_gpu_hour_micros
        )
    wanted = [m.lower() for m in need.gpu_models]
    fitting: dict[uuid.UUID, list[bool]] = defaultdict(list)
    price: dict[uuid.UUID, int] = {}
    for host_id, host_price, tags, runners, model, memory, job_id in await session.execute(query):
        if need.runner not in (runners or ()) or not set(need.tags) <= set(tags or ()):
            continue
        if memory < need.min_vram_mib or (wanted and not any(w in model.lower() for w in wanted)):
            continue
        fitting[host_id].append(job_id is None)
        price[host_id] = int(host_price or 0)
    eligible = [h for h, gpus in fitting.items() if len(gpus) >= need.gpu_count]
    free = [h for h in eligible if sum(fitting[h]) >= need.gpu_count]
    if not eligible:
        return None, 0, 0
    return min(price[h] for h in eligible), len(eligible), len(free)
