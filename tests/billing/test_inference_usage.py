"""Inference usage against the real database on both backends: the group-commit writer
(once per request, nothing lost on close or through an outage, back-pressure), per-token
pricing, the billing sweep (one transaction per wallet and host owner, the fee split, replays,
concurrent sweeps) and the gateway's credit pre-check with its cache."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, update

from peergpu.errors import PaymentRequired, ServiceUnavailable
from peergpu.server.context import ServerContext
from peergpu.server.db.billing_models import LedgerTransactionModel
from peergpu.server.db.session import create_sessionmaker
from peergpu.server.db.usage_models import InferenceUsageModel
from peergpu.server.services.billing import accounts, ledger, postings
from peergpu.server.services.billing.inference import (
    UsageRecord,
    UsageRecorder,
    bill_usage,
    ensure_can_spend,
    run_usage_billing,
    token_cost,
)
from tests.factories import grant_credit
from tests.unit.scheduling import make_host, make_renter

pytestmark = pytest.mark.timeout(60)

MODEL = "acme/chat-1"


def usage(
    user: uuid.UUID,
    host: uuid.UUID,
    *,
    prompt: int = 1000,
    completion: int = 500,
    input_price: int = 1_000_000,  # $1 per million tokens: 1 micro-dollar per token
    output_price: int = 2_000_000,
    model: str = MODEL,
    org: uuid.UUID | None = None,
    key: uuid.UUID | None = None,
    request_id: uuid.UUID | None = None,
    **fields: Any,
) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": request_id or uuid.uuid4(),
        "api_key_id": key,
        "user_id": user,
        "organization_id": org,
        "host_id": host,
        "model": model,
        "endpoint": "chat.completions",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "input_price_per_million_micros": input_price,
        "output_price_per_million_micros": output_price,
        "latency_ms": 120,
        "first_token_ms": 30,
        "outcome": "ok",
        **fields,
    }
    return UsageRecord(**values)


async def _host(context: ServerContext, owner: uuid.UUID | None = None) -> tuple[uuid.UUID, Any]:
    owner = owner or await make_renter(context, credit=0)
    return owner, await make_host(context, owner, price=1_000_000, gpus=[("L4", 24000)])


async def _rows(context: ServerContext) -> list[InferenceUsageModel]:
    async with context.sessionmaker() as session:
        found = await session.scalars(
            select(InferenceUsageModel).order_by(InferenceUsageModel.created_at)
        )
        return list(found)


async def _balances(context: ServerContext, *codes: str) -> dict[str, int]:
    async with context.sessionmaker() as session:
        return await ledger.balances(session, codes)


async def _inference_transactions(context: ServerContext) -> list[LedgerTransactionModel]:
    async with context.sessionmaker() as session:
        found = await session.scalars(
            select(LedgerTransactionModel).where(LedgerTransactionModel.kind == "inference")
        )
        return list(found)


# -- pricing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "completion", "input_price", "output_price", "cost"),
    [
        (0, 0, 5_000_000, 5_000_000, 0),
        (1, 0, 1, 0, 1),  # a millionth of a micro-dollar still costs one
        (500_000, 500_000, 1, 1, 1),  # one ceiling over the sum, not one per part (2)
        (1_000_000, 0, 150_000, 600_000, 150_000),
        (1234, 567, 150_000, 600_000, 526),  # 185.1 + 340.2 = 525.3 -> 526
        (10, 0, 0, 0, 0),  # a free host
    ],
)
def test_cost_is_one_ceiling_over_the_exact_sum(
    prompt: int, completion: int, input_price: int, output_price: int, cost: int
) -> None:
    assert (
        token_cost(
            prompt_tokens=prompt,
            completion_tokens=completion,
            input_price_per_million_micros=input_price,
            output_price_per_million_micros=output_price,
        )
        == cost
    )


def test_a_record_the_table_cannot_hold_is_refused_at_once() -> None:
    user, host = uuid.uuid4(), uuid.uuid4()
    for bad in (
        {"endpoint": "completions"},
        {"outcome": "maybe"},
        {"model": ""},
        {"prompt": -1},
        {"input_price": -5},
        {"latency_ms": 2**31},
    ):
        with pytest.raises(ValueError):
            usage(user, host, **bad)


# -- the writer ---------------------------------------------------------------------------------


async def test_a_request_recorded_twice_is_written_once_with_its_price(
    context: ServerContext,
) -> None:
    renter = await make_renter(context)
    owner, host = await _host(context)
    record = usage(renter, host, prompt=1234, completion=567, input_price=150_000)
    context.usage.record(record)
    context.usage.record(record)  # in the same write
    await context.usage.flush()
    await context.usage.record_async(record)  # and again later
    await context.usage.flush()
    [row] = await _rows(context)
    assert row.id == record.request_id
    assert row.wallet == accounts.user_wallet(renter)
    assert row.host_owner_id == owner
    assert row.cost_micros == 1234 * 150_000 // 1_000_000 + 567 * 2 + 1  # 185.1 -> one ceil
    assert (row.billed_at, row.billed_transaction_key) == (None, None)


async def test_close_writes_everything_still_buffered(context: ServerContext) -> None:
    renter = await make_renter(context)
    _, host = await _host(context)
    recorder = UsageRecorder(context.sessionmaker, interval=60)  # would wait a minute
    for _ in range(1200):  # more than one INSERT's worth
        recorder.record(usage(renter, host))
    await recorder.close()
    assert len(await _rows(context)) == 1200
    assert recorder.dropped == 0
    recorder.record(usage(renter, host))  # after close: dropped and logged, never raised
    assert recorder.dropped == 1


async def test_rows_wait_out_a_database_outage(context: ServerContext) -> None:
    """With the database unreachable the rows stay buffered and are written once it is
    back; nothing is lost, nothing is written twice."""
    renter = await make_renter(context)
    _, host = await _host(context)
    from peergpu.config import ServerSettings
    from peergpu.server.db.session import create_engine

    dead = create_engine(
        ServerSettings(database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none")  # type: ignore[call-arg]
    )
    recorder = UsageRecorder(create_sessionmaker(dead), interval=0.01)
    try:
        records = [usage(renter, host) for _ in range(5)]
        for record in records:
            recorder.record(record)
        with pytest.raises(OSError):  # connection refused
            await recorder.flush()
        assert recorder.buffered == 5
        recorder.sessionmaker = context.sessionmaker  # the database is back
        assert await recorder.wait_flushed(timeout=10)
        await recorder.close()
    finally:
        await dead.dispose()
    assert {row.id for row in await _rows(context)} == {r.request_id for r in records}
    assert recorder.dropped == 0


async def test_a_full_buffer_makes_record_async_wait_and_the_gateway_refuse(
    context: ServerContext,
) -> None:
    renter = await make_renter(context)
    _, host = await _host(context)
    recorder = UsageRecorder(context.sessionmaker, interval=60, max_buffered=2)
    default, context.usage = context.usage, recorder
    try:
        recorder.record(usage(renter, host))
        await recorder.record_async(usage(renter, host))
        assert recorder.overloaded
        with pytest.raises(ServiceUnavailable):
            await ensure_can_spend(context, user_id=renter, organization_id=None)
        waiting = asyncio.create_task(recorder.record_async(usage(renter, host)))
        await asyncio.sleep(0)
        assert not waiting.done()
        await recorder.flush()
        await asyncio.wait_for(waiting, timeout=5)
        await recorder.close()
    finally:
        context.usage = default
    assert len(await _rows(context)) == 3


async def test_a_request_on_an_unknown_host_is_dropped_and_the_rest_written(
    context: ServerContext, caplog: pytest.LogCaptureFixture
) -> None:
    renter = await make_renter(context)
    _, host = await _host(context)
    good = usage(renter, host)
    context.usage.record(usage(renter, uuid.uuid4()))
    context.usage.record(good)
    with caplog.at_level(logging.ERROR):
        await context.usage.flush()
    assert [row.id for row in await _rows(context)] == [good.request_id]
    assert context.usage.dropped == 1
    assert "its host no longer exists" in caplog.text


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_a_row_the_database_refuses_is_dropped_alone_unless_every_row_is(
    context: ServerContext, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad row (here: a token count past PostgreSQL's integer, which the record would have
    refused when built) is dropped and its batch written; a batch whose every row is refused
    is kept and retried (the fault is then not the rows')."""
    renter = await make_renter(context)
    _, host = await _host(context)
    poison = usage(renter, host)
    object.__setattr__(poison, "prompt_tokens", 2**40)
    good = [usage(renter, host) for _ in range(2)]
    recorder = UsageRecorder(context.sessionmaker, interval=60, close_timeout=0.5)
    for record in (good[0], poison, good[1]):
        recorder.record(record)
    with caplog.at_level(logging.ERROR):
        await recorder.flush()
    assert {row.id for row in await _rows(context)} == _ids(good)
    assert recorder.dropped == 1 and "refused by the database" in caplog.text

    recorder.record(poison)
    with pytest.raises(ServiceUnavailable):
        await recorder.flush()
    assert recorder.buffered == 1 and recorder.dropped == 1
    await recorder.close()  # gives up after close_timeout: dropped, logged
    assert recorder.dropped == 2


# -- the billing sweep ------------------------------------------------------------------------


async def test_the_sweep_posts_one_transaction_per_wallet_and_host_owner(
    context: ServerContext,
) -> None:
    alice = await make_renter(context, credit=10_000_000)
    bob = await make_renter(context, credit=10_000_000)
    owner1, host1 = await _host(context)
    owner2, host2 = await _host(context)
    # Alice on host 1: three requests of 335 micro-dollars (1,005 in all: a fee of 100.5
    # rounds half up to 101); on host 2: one of 2,000. Bob on host 1: two of 2,000, and one
    # free request on host 2 (no transaction for that pair).
    records = [
        *(usage(alice, host1, prompt=135, completion=100) for _ in range(3)),
        usage(alice, host2, model="acme/embed", prompt=2000, completion=0),
        *(usage(bob, host1) for _ in range(2)),
        usage(bob, host2, input_price=0, output_price=0),
    ]
    for record in records:
        context.usage.record(record)
    await context.usage.flush()
    assert await bill_usage(context) == 7
    assert await bill_usage(context) == 0

    alice_wallet, bob_wallet = accounts.user_wallet(alice), accounts.user_wallet(bob)
    assert await _balances(
        context,
        accounts.available(alice_wallet),
        accounts.available(bob_wallet),
        accounts.host_payable(owner1),
        accounts.host_payable(owner2),
        accounts.PLATFORM_FEES,
    ) == {
        accounts.available(alice_wallet): 10_000_000 - 1005 - 2000,
        accounts.available(bob_wallet): 10_000_000 - 4000,
        accounts.host_payable(owner1): (1005 - 101) + (4000 - 400),
        accounts.host_payable(owner2): 2000 - 200,
        accounts.PLATFORM_FEES: 101 + 400 + 200,
    }
    transactions = await _inference_transactions(context)
    assert len(transactions) == 3
    by_key = {tx.idempotency_key: tx for tx in transactions}
    rows = await _rows(context)
    assert all(row.billed_at is not None for row in rows)
    free = next(row for row in rows if row.cost_micros == 0)
    assert free.billed_transaction_key is None
    alice_on_1 = {row.billed_transaction_key for row in rows if row.id in _ids(records[:3])}
    [key] = alice_on_1
    assert by_key[key].details["requests"] == 3
    assert by_key[key].details["models"] == {MODEL: 3}
    assert by_key[key].memo == f"Inference: 3 requests (3 x {MODEL})."
    assert postings.split_fee(1005, context.settings.platform_fee_bps) == (101, 904)


async def test_a_replayed_batch_posts_nothing(context: ServerContext) -> None:
    renter = await make_renter(context, credit=10_000_000)
    owner, host = await _host(context)
    for _ in range(4):
        context.usage.record(usage(renter, host))
    await context.usage.flush()
    assert await bill_usage(context) == 4
    payable = accounts.host_payable(owner)
    before = await _balances(context, payable)
    [first_key] = {row.billed_transaction_key for row in await _rows(context)}
    async with context.sessionmaker() as session:  # as if the rows had not been stamped
        await session.execute(update(InferenceUsageModel).values(billed_at=None))
        await session.commit()
    assert await bill_usage(context) == 4
    assert await _balances(context, payable) == before
    assert len(await _inference_transactions(context)) == 1
    assert {row.billed_transaction_key for row in await _rows(context)} == {first_key}


async def test_an_org_key_is_paid_from_the_org_and_may_overdraw_it(
    context: ServerContext,
) -> None:
    member = await make_renter(context, credit=50_000_000)
    org = uuid.uuid4()
    org_wallet = accounts.org_wallet(org)
    await grant_credit(context, org_wallet, 1000)
    _, host = await _host(context)
    context.usage.record(usage(member, host, org=org))  # 2,000 micro-dollars
    await context.usage.flush()
    assert await bill_usage(context) == 1
    balances = await _balances(
        context,
        accounts.available(org_wallet),
        accounts.available(accounts.user_wallet(member)),
    )
    assert balances == {
        accounts.available(org_wallet): -1000,  # the request had happened: it is paid
        accounts.available(accounts.user_wallet(member)): 50_000_000,
    }
    with pytest.raises(PaymentRequired):
        await ensure_can_spend(context, user_id=member, organization_id=org)


async def test_concurrent_sweeps_bill_every_row_once(context: ServerContext) -> None:
    """Three sweeps at once (three replicas), in small batches over rows that all touch the
    same platform and host accounts: every row billed once, the books balanced. On
    PostgreSQL the sweeps skip each other's locked rows; on SQLite they take turns."""
    renters = [await make_renter(context, credit=10_000_000) for _ in range(3)]
    owners = [await _host(context) for _ in range(2)]
    for i in range(120):
        context.usage.record(usage(renters[i % 3], owners[i % 2][1]))
    await context.usage.flush()

    async def replica() -> int:
        billed = 0
        while (done := await bill_usage(context, limit=7)) or await _unbilled(context):
            billed += done
            await asyncio.sleep(0)
        return billed

    counts = await asyncio.gather(replica(), replica(), replica())
    assert sum(counts) == 120
    for owner, _ in owners:
        payable = accounts.host_payable(owner)
        assert (await _balances(context, payable))[payable] == 60 * 2000 * 9 // 10
    assert (await _balances(context, accounts.PLATFORM_FEES))[accounts.PLATFORM_FEES] == 24_000
    async with context.sessionmaker() as session:
        assert (await ledger.check(session)).ok


async def test_the_billing_loop_bills_after_a_write(context: ServerContext) -> None:
    renter = await make_renter(context, credit=10_000_000)
    _, host = await _host(context)
    loop = asyncio.create_task(run_usage_billing(context))
    try:
        context.usage.record(usage(renter, host))
        deadline = asyncio.get_running_loop().time() + 10
        # One read for both conditions: two (unbilled, then written) can straddle the write
        # and see "none unbilled" before it and "written" after it, before the billing.
        while not (rows := await _rows(context)) or any(r.billed_at is None for r in rows):
            assert asyncio.get_running_loop().time() < deadline, "not billed"
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    wallet = accounts.user_wallet(renter)
    assert (await _balances(context, accounts.available(wallet)))[
        accounts.available(wallet)
    ] == 10_000_000 - 2000


# -- the pre-check ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_pre_check_refuses_an_empty_wallet_and_caches_only_credit(
    context: ServerContext,
) -> None:
    clock = FakeClock()
    context.usage.credit_cache.clock = clock
    renter = await make_renter(context, credit=0)
    wallet = accounts.user_wallet(renter)
    with pytest.raises(PaymentRequired) as refused:
        await ensure_can_spend(context, user_id=renter, organization_id=None)
    assert refused.value.code == "insufficient_credit"
    await grant_credit(context, wallet, 5_000)  # a refusal is not cached: credit counts now
    await ensure_can_spend(context, user_id=renter, organization_id=None)
    await _spend(context, wallet, 5_000)
    await ensure_can_spend(context, user_id=renter, organization_id=None)  # cached: no query
    clock.now += 2.5
    with pytest.raises(PaymentRequired):
        await ensure_can_spend(context, user_id=renter, organization_id=None)


async def test_billing_a_wallet_drops_its_cached_answer(context: ServerContext) -> None:
    context.usage.credit_cache.clock = FakeClock()  # the cache would never expire alone
    renter = await make_renter(context, credit=1_500)
    _, host = await _host(context)
    await ensure_can_spend(context, user_id=renter, organization_id=None)
    context.usage.record(usage(renter, host))  # 2,000: more than the wallet holds
    await context.usage.flush()
    await ensure_can_spend(context, user_id=renter, organization_id=None)  # still cached
    assert await bill_usage(context) == 1
    with pytest.raises(PaymentRequired):
        await ensure_can_spend(context, user_id=renter, organization_id=None)


# -- helpers ------------------------------------------------------------------------------------


def _ids(records: list[UsageRecord]) -> set[uuid.UUID]:
    return {record.request_id for record in records}


async def _unbilled(context: ServerContext) -> int:
    async with context.sessionmaker() as session:
        found = await session.scalar(
            select(func.count())
            .select_from(InferenceUsageModel)
            .where(InferenceUsageModel.billed_at.is_(None))
        )
        return int(found or 0)


async def _spend(context: ServerContext, wallet: str, amount: int) -> None:
    """Empty the wallet behind the cache's back (credit given back to promotions)."""
    async with context.sessionmaker() as session:
        await ledger.post(
            session,
            ledger.transfer(
                f"test-spend:{uuid.uuid4()}",
                "grant",
                source=accounts.available(wallet),
                target=accounts.PROMOTIONS,
                amount=amount,
            ),
        )
        await session.commit()
