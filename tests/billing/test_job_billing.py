"""The job money flow against the real database: holds at assignment, settlement by the
server's clock, who pays for what, cost caps, monthly caps, refunds, replays."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update

from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import BillingProfileModel, JobChargeModel
from peergpu.server.db.host_models import HostGpuModel
from peergpu.server.db.job_models import JobModel, JobState
from peergpu.server.services import scheduler
from peergpu.server.services.billing import accounts, admin, ledger, settlement
from tests.unit.scheduling import get_job, make_host, make_job, make_renter

pytestmark = pytest.mark.timeout(60)

PRICE = 3_600_000  # $3.60 per GPU-hour: exactly $0.001 per GPU-second


async def _balances(context: ServerContext, *codes: str) -> dict[str, int]:
    async with context.sessionmaker() as session:
        return await ledger.balances(session, codes)


async def _end(
    context: ServerContext,
    job_id: uuid.UUID,
    state: str,
    *,
    ran: float | None,
    failure_reason: str | None = None,
) -> None:
    """As if the host ran the job for ``ran`` seconds (None: never started) and ended it."""
    now = utcnow()
    values: dict[str, Any] = {"state": state, "finished_at": now, "failure_reason": failure_reason}
    if ran is not None:
        values["started_at"] = now - timedelta(seconds=ran)
    async with context.sessionmaker() as session:
        await session.execute(update(JobModel).where(JobModel.id == job_id).values(**values))
        await session.commit()


async def _charge(context: ServerContext, job_id: uuid.UUID) -> JobChargeModel:
    async with context.sessionmaker() as session:
        charge = await session.scalar(select(JobChargeModel).where(JobChargeModel.job_id == job_id))
        assert charge is not None
        return charge


async def test_a_job_is_held_at_assignment_and_settled_to_the_micro_dollar(
    context: ServerContext,
) -> None:
    renter = await make_renter(context, credit=50_000_000)
    host_owner = await make_renter(context, credit=0)
    await make_host(context, host_owner, price=PRICE, gpus=[("A100", 40960)] * 2)
    job = await make_job(context, renter, gpu_count=2, max_duration_seconds=600)
    wallet = accounts.user_wallet(renter)
    assert len((await scheduler.schedule_once(context)).assigned) == 1
    hold = 2 * 600 * 1_000  # 2 GPUs x 600 s x $0.001
    assert await _balances(context, accounts.available(wallet), accounts.held(wallet)) == {
        accounts.available(wallet): 50_000_000 - hold,
        accounts.held(wallet): hold,
    }
    await _end(context, job, "succeeded", ran=99.2)  # billed as 100 s
    assert (await settlement.settle_open(context)).settled == 1
    charged = 2 * 100 * 1_000
    payable = accounts.host_payable(host_owner)
    assert await _balances(
        context,
        accounts.available(wallet),
        accounts.held(wallet),
        payable,
        accounts.PLATFORM_FEES,
    ) == {
        accounts.available(wallet): 50_000_000 - charged,
        accounts.held(wallet): 0,
        payable: charged * 9 // 10,
        accounts.PLATFORM_FEES: charged // 10,
    }
    charge = await _charge(context, job)
    assert (charge.outcome, charge.billed_seconds, charge.charged_micros, charge.fee_micros) == (
        "charged",
        100,
        charged,
        charged // 10,
    )
    # The sweep runs again and again: nothing more happens.
    assert (await settlement.settle_open(context)).settled == 0


@pytest.mark.parametrize(
    ("state", "reason", "ran", "pays"),
    [
        ("failed", "nonzero_exit", 30.0, True),
        ("failed", "timeout", 30.0, True),
        ("cancelled", "cancelled", 30.0, True),
        ("cancelled", "cancelled", None, False),  # cancelled before it started
        ("failed", "agent_error", 30.0, False),
        ("failed", "host_lost", 30.0, False),
        ("failed", "bundle_download_failed", 30.0, False),
        ("failed", "something new", 30.0, False),
    ],
)
async def test_who_pays(
    context: ServerContext, state: str, reason: str, ran: float | None, pays: bool
) -> None:
    renter = await make_renter(context, credit=10_000_000)
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)])
    job = await make_job(context, renter)
    await scheduler.schedule_once(context)
    await _end(context, job, state, ran=ran, failure_reason=reason)
    await settlement.settle_open(context)
    charge = await _charge(context, job)
    assert charge.settled_at is not None
    assert charge.charged_micros == (30 * 1_000 if pays else 0), charge.reason
    wallet = accounts.user_wallet(renter)
    got = await _balances(context, accounts.available(wallet))
    assert got[accounts.available(wallet)] == 10_000_000 - charge.charged_micros


async def test_a_requeued_attempt_is_released_and_the_next_one_held_again(
    context: ServerContext,
) -> None:
    renter = await make_renter(context, credit=10_000_000)
    owner = await make_renter(context, credit=0)
    first = await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)])
    job = await make_job(context, renter, max_retries=2)
    await scheduler.schedule_once(context)
    async with context.sessionmaker() as session:  # the host vanished: back to the queue
        from peergpu.server.services import job_states

        row = await session.get(JobModel, job)
        assert row is not None
        await job_states.requeue_or_fail(
            session, row, expected=row_state(row), reason="host_lost", message="gone"
        )
        await session.commit()
    await settlement.settle_open(context)
    second = await make_host(context, owner, price=PRICE * 2, gpus=[("T4", 16000)])
    await scheduler.schedule_once(context)
    assert (await get_job(context, job)).host_id == second != first
    async with context.sessionmaker() as session:
        charges = list(
            await session.scalars(
                select(JobChargeModel)
                .where(JobChargeModel.job_id == job)
                .order_by(JobChargeModel.attempt)
            )
        )
    assert [(c.attempt, c.outcome, c.charged_micros) for c in charges] == [
        (1, "released", 0),
        (2, None, 0),
    ]
    assert charges[1].hold_micros == 60 * 2_000


def row_state(job: JobModel) -> Any:
    from peergpu.server.db.job_models import JobState

    return JobState(job.state)


async def test_without_credit_a_job_waits_and_says_why(context: ServerContext) -> None:
    renter = await make_renter(context, credit=10_000)  # one cent; the hold is 6 cents
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)])
    job = await make_job(context, renter)
    assert (await scheduler.schedule_once(context)).assigned == []
    waiting = await get_job(context, job)
    assert waiting.state == "queued"
    assert "needs a hold of $0.06" in waiting.message and "$0.01 is available" in waiting.message
    async with context.sessionmaker() as session:
        await admin.grant(
            session=session,
            wallet=accounts.user_wallet(renter),
            amount=1_000_000,
            memo="",
            actor_id=None,
        )
    assert (await scheduler.schedule_once(context)).assigned == []  # left out a few seconds
    scheduler._unfunded.clear()  # as if those seconds had passed
    assert len((await scheduler.schedule_once(context)).assigned) == 1
    assert (await get_job(context, job)).message == ""


async def test_credit_goes_to_the_oldest_jobs_first(context: ServerContext) -> None:
    renter = await make_renter(context, credit=130_000)  # two holds of 60,000 fit, not three
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)] * 3)
    jobs = [await make_job(context, renter) for _ in range(3)]
    result = await scheduler.schedule_once(context)
    assert {a.job_id for a in result.assigned} == set(jobs[:2])
    assert (await get_job(context, jobs[2])).state == "queued"


async def test_a_cost_cap_shortens_the_run_and_the_hold(context: ServerContext) -> None:
    renter = await make_renter(context)
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)])
    job = await make_job(context, renter, max_duration_seconds=3600, max_cost_micros=25_500)
    result = await scheduler.schedule_once(context)
    assert [a.max_duration_seconds for a in result.assigned] == [25]
    assert (await _charge(context, job)).hold_micros == 25_000


async def test_a_monthly_cap_holds_jobs_back(context: ServerContext) -> None:
    renter = await make_renter(context)
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)] * 2)
    async with context.sessionmaker() as session:
        session.add(
            BillingProfileModel(wallet=accounts.user_wallet(renter), monthly_cap_micros=100_000)
        )
        await session.commit()
    jobs = [await make_job(context, renter) for _ in range(2)]
    result = await scheduler.schedule_once(context)
    assert [a.job_id for a in result.assigned] == [jobs[0]]
    assert "monthly spending cap" in (await get_job(context, jobs[1])).message


async def test_an_admin_refund_reverses_the_charge_once(context: ServerContext) -> None:
    renter = await make_renter(context, credit=10_000_000)
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)])
    job = await make_job(context, renter)
    await scheduler.schedule_once(context)
    await _end(context, job, "succeeded", ran=40)
    await settlement.settle_open(context)
    async with context.sessionmaker() as session:
        txs, amount, wallet = await admin.refund_job(
            session=session, job_id=job, memo="sorry", actor_id=None
        )
    assert amount == 40_000 and len(txs) == 1
    payable = accounts.host_payable(owner)
    assert await _balances(
        context, accounts.available(wallet), payable, accounts.PLATFORM_FEES
    ) == {accounts.available(wallet): 10_000_000, payable: 0, accounts.PLATFORM_FEES: 0}
    from peergpu.errors import Conflict

    async with context.sessionmaker() as session:
        with pytest.raises(Conflict):
            await admin.refund_job(session=session, job_id=job, memo="", actor_id=None)


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_replicas_settling_at_once_neither_deadlock_nor_settle_twice(
    context: ServerContext,
) -> None:
    """Three settlement sweeps at once (three replicas) over charges that all touch the same
    platform and host accounts: every attempt settled once, no deadlock, balanced books."""
    renters = [await make_renter(context, credit=10_000_000) for _ in range(6)]
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)] * 36)
    jobs = [await make_job(context, renters[i % 6]) for i in range(36)]
    while len((await scheduler.schedule_once(context)).assigned) > 0:
        pass
    for job in jobs:
        await _end(context, job, "succeeded", ran=10)

    async def replica() -> int:
        settled = 0
        while (result := await settlement.settle_open(context, limit=4)).settled:
            settled += result.settled
        return settled

    counts = await asyncio.gather(replica(), replica(), replica())
    assert sum(counts) == 36
    payable = accounts.host_payable(owner)
    assert (await _balances(context, payable))[payable] == 36 * 10_000 * 9 // 10
    async with context.sessionmaker() as session:
        assert (await ledger.check(session)).ok


async def test_a_job_nobody_pays_for_leaves_the_gpu_to_the_next_one(
    context: ServerContext,
) -> None:
    broke = await make_renter(context, credit=1)  # passes the submit check, not the hold
    funded = await make_renter(context)
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)])
    stuck = await make_job(context, broke)  # older: first in the queue
    paid = await make_job(context, funded)
    result = await scheduler.schedule_once(context)
    assert [a.job_id for a in result.assigned] == [paid]
    assert "Waiting for credit" in (await get_job(context, stuck)).message


async def test_a_job_its_host_stopped_is_requeued_and_costs_nothing(
    context: ServerContext,
) -> None:
    from peergpu.protocol.messages import JobStatus
    from peergpu.server.services import job_reports

    renter = await make_renter(context, credit=10_000_000)
    owner = await make_renter(context, credit=0)
    host = await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)])
    job = await make_job(context, renter, max_retries=1)
    await scheduler.schedule_once(context)
    stop = [
        job_reports.Report(host, JobStatus(job_id=job, state="running")),
        job_reports.Report(
            host, JobStatus(job_id=job, state="cancelled", failure_reason="cancelled")
        ),
    ]
    async with context.sessionmaker() as session:  # the agent shut down mid-job
        applied = await job_reports.apply_reports(session, stop)
        await session.commit()
    assert (job, JobState.queued) in applied.changes and applied.requeued
    requeued = await get_job(context, job)
    assert (requeued.state, requeued.host_id, requeued.excluded_host_ids) == ("queued", None, [])
    await settlement.settle_open(context)
    charge = await _charge(context, job)
    assert (charge.outcome, charge.charged_micros) == ("released", 0)
    wallet = accounts.user_wallet(renter)
    got = await _balances(context, accounts.available(wallet))
    assert got[accounts.available(wallet)] == 10_000_000


async def test_a_charge_the_books_refuse_does_not_block_the_others(
    context: ServerContext,
) -> None:
    renter = await make_renter(context, credit=10_000_000)
    owner = await make_renter(context, credit=0)
    host = await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)] * 2)
    jobs = [await make_job(context, renter) for _ in range(2)]
    await scheduler.schedule_once(context)
    for job in jobs:
        await _end(context, job, "succeeded", ran=5)
    bogus = uuid.uuid4()  # an open charge whose hold was never booked: releasing it overdraws
    async with context.sessionmaker() as session:
        session.add(
            JobChargeModel(
                job_id=bogus,
                attempt=1,
                wallet=accounts.user_wallet(renter),
                host_id=host,
                host_owner_id=owner,
                price_per_gpu_hour_micros=PRICE,
                gpu_count=1,
                hold_micros=10**12,
                created_at=utcnow() - timedelta(hours=1),
            )
        )
        await session.commit()
    try:
        assert (await settlement.settle_open(context)).settled == 2
        assert (bogus, 1) in settlement._set_aside
        assert (await settlement.settle_open(context)).settled == 0
        for job in jobs:
            assert (await _charge(context, job)).outcome == "charged"
    finally:
        settlement._set_aside.discard((bogus, 1))
        async with context.sessionmaker() as session:
            await session.execute(delete(JobChargeModel).where(JobChargeModel.job_id == bogus))
            await session.commit()


async def test_a_pass_whose_credit_was_spent_meanwhile_rolls_back_whole(
    context: ServerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is read without locks; if another replica spent the credit before the holds
    are booked, the ledger refuses them and nothing of the pass remains."""
    renter = await make_renter(context, credit=60_000)  # one hold of 60,000
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)] * 2)
    jobs = [await make_job(context, renter) for _ in range(2)]
    real = ledger.balances

    async def stale(session: Any, codes: Any) -> dict[str, int]:  # as read before a spend
        return {code: value + 60_000 for code, value in (await real(session, codes)).items()}

    monkeypatch.setattr(ledger, "balances", stale)
    with pytest.raises(ledger.InsufficientFunds):
        await scheduler.schedule_once(context)
    monkeypatch.setattr(ledger, "balances", real)
    assert [(await get_job(context, j)).state for j in jobs] == ["queued", "queued"]
    async with context.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(JobChargeModel)) == 0
        claimed = (
            select(func.count()).select_from(HostGpuModel).where(HostGpuModel.job_id.is_not(None))
        )
        assert await session.scalar(claimed) == 0
    assert len((await scheduler.schedule_once(context)).assigned) == 1


async def test_a_refund_the_platform_pays_leaves_the_host_its_earnings(
    context: ServerContext,
) -> None:
    from peergpu.errors import Conflict

    renter = await make_renter(context, credit=10_000_000)
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)])
    job = await make_job(context, renter)
    await scheduler.schedule_once(context)
    await _end(context, job, "succeeded", ran=40)
    await settlement.settle_open(context)
    async with context.sessionmaker() as session:
        _txs, amount, wallet = await admin.refund_job(
            session=session, job_id=job, memo="our mistake", actor_id=None, platform_pays=True
        )
    assert amount == 40_000
    payable = accounts.host_payable(owner)
    assert await _balances(
        context, accounts.available(wallet), payable, accounts.PLATFORM_REFUNDS
    ) == {
        accounts.available(wallet): 10_000_000,
        payable: 36_000,
        accounts.PLATFORM_REFUNDS: -40_000,
    }
    async with context.sessionmaker() as session:
        with pytest.raises(Conflict):  # refunded once, whichever way
            await admin.refund_job(session=session, job_id=job, memo="", actor_id=None)


async def test_a_renter_without_credit_cannot_starve_the_queue(context: ServerContext) -> None:
    """Many high-priority jobs nobody pays for fill a whole batch once; the next passes leave
    that renter's queue out for a few seconds, so the others' jobs run."""
    broke = await make_renter(context, credit=1)
    funded = await make_renter(context)
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=PRICE, gpus=[("T4", 16000)] * 2)
    for _ in range(3):
        await make_job(context, broke, priority=10)
    paid = await make_job(context, funded)
    context.settings.scheduler_batch_size = 2  # the broke renter's jobs fill a batch
    try:
        assert (await scheduler.schedule_once(context)).assigned == []
        assert [a.job_id for a in (await scheduler.schedule_once(context)).assigned] == [paid]
    finally:
        context.settings.scheduler_batch_size = 200
