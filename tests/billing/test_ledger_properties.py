"""Property tests of the ledger and the postings, against the real database (both backends).

A Hypothesis state machine plays random sequences of every money movement (top-ups, grants,
holds with their job charge rows, settlements, admin refunds, payouts, failed and reversed
payouts, card refunds and disputes, batches, replays of earlier postings) and keeps an
in-memory model of what every balance should be. It predicts, before each posting, whether the
ledger must refuse it (an overdraft) and which accounts are short; after every step it checks:

- ``ledger.check`` is ok: every transaction balances, cached balances equal their entries, all
  balances sum to zero, each wallet's held balance equals its open job charges;
- the cached balances equal the model's;
- no renter's held account is ever negative, and a renter's available or a host's payable is
  negative only after a rule that may drive it negative (a dispute, a card refund, a refund
  after a payout) did;
- a replay returns None and changes nothing, a refused overdraft leaves nothing behind once
  rolled back, and each settlement's fee + host share == charge and charge + released == hold.

The state machine runs on one :class:`asyncio.Runner` (Hypothesis drives it synchronously);
the database is not emptied between examples, so each example uses fresh wallet and host ids
and snapshots the shared platform accounts when it starts.

``PEERGPU_LEDGER_EXAMPLES`` raises the number of examples (default 30) for a longer run;
``PEERGPU_LEDGER_SHRINK=1`` shrinks a failing sequence to a minimal one (slow).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from peergpu.config import ServerSettings
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import (
    JobChargeModel,
    LedgerAccountModel,
    LedgerTransactionModel,
)
from peergpu.server.db.session import create_engine, create_sessionmaker
from peergpu.server.services.billing import accounts, ledger, postings
from peergpu.server.services.billing.ledger import InsufficientFunds, LedgerReport, Posting

T = TypeVar("T")

USD = postings.MICROS_PER_USD
PLATFORM_ACCOUNTS = (accounts.PLATFORM_FEES, accounts.STRIPE_CLEARING, accounts.PROMOTIONS)

EXAMPLES = int(os.environ.get("PEERGPU_LEDGER_EXAMPLES", "30"))
MACHINE_SETTINGS = hypothesis_settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,  # the same sequences in CI every run; raise the examples to explore
    # Shrinking a failure replays hundreds of sequences against the database: minutes, more
    # than the test timeout. Set PEERGPU_LEDGER_SHRINK=1 (and --timeout=0) for a minimal one.
    phases=[Phase.explicit, Phase.generate]
    + ([Phase.shrink] if os.environ.get("PEERGPU_LEDGER_SHRINK") else []),
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
UNIT_SETTINGS = hypothesis_settings(max_examples=300, deadline=None, database=None)

amounts = st.one_of(st.integers(USD, 300 * USD), st.integers(0, 100), st.integers(0, 300 * USD))
fee_rates = st.one_of(st.sampled_from([0, 1, 1000, 9999, 10_000]), st.integers(0, 10_000))
fractions = st.integers(0, 1000)  # thousandths of something
edges = st.sampled_from([None, -1, 0, 1])  # None: a fraction of the balance; else balance+n
wallet_indexes = st.integers(0, 1)
host_indexes = st.integers(0, 1)
prices_per_hour = st.one_of(st.integers(USD // 10, 3 * USD), st.integers(0, 100))
max_durations = st.one_of(st.integers(600, 8 * 3600), st.integers(0, 120))


@dataclass
class Hold:
    wallet: str
    job_id: uuid.UUID
    attempt: int
    host_owner_id: uuid.UUID
    price: int
    gpus: int
    #: None for a hold not derived from a price (one placed at the edge of the balance)
    max_seconds: int | None
    amount: int


@dataclass
class Settled:
    hold: Hold
    charged: int
    fee: int
    transaction_id: uuid.UUID
    refunded: bool = False


@dataclass
class Payout:
    user_id: uuid.UUID
    amount: int
    payout_id: uuid.UUID
    failed: bool = False
    reversed_total: int = 0


@dataclass
class Dispute:
    wallet: str
    amount: int
    dispute_id: str
    won: bool = False


def _allow_negative(code: str) -> bool:
    return accounts.describe(code)[2]


def _net(batch: Sequence[Posting]) -> tuple[dict[str, int], set[str]]:
    """Each account's net movement in a batch, and the accounts some posting decreases without
    a rule that lets it go negative (a rule covers its own posting only: the machine never
    batches a posting that has one with others; a test below covers a mixed batch)."""
    deltas: dict[str, int] = defaultdict(int)
    strict: set[str] = set()
    for posting in batch:
        for code, amount in posting.entries:
            deltas[code] += amount
            if amount < 0 and code not in posting.may_go_negative:
                strict.add(code)
    return deltas, strict


class LedgerMachine(RuleBasedStateMachine):
    """One example: two wallets (a user's and an org's), two host owners, and the platform."""

    runner: asyncio.Runner
    db: async_sessionmaker[AsyncSession]

    def __init__(self) -> None:
        super().__init__()
        self.wallets = [accounts.user_wallet(uuid.uuid4()), accounts.org_wallet(uuid.uuid4())]
        self.hosts = [uuid.uuid4(), uuid.uuid4()]
        tracked = [
            *PLATFORM_ACCOUNTS,
            *(accounts.available(w) for w in self.wallets),
            *(accounts.held(w) for w in self.wallets),
            *(accounts.host_payable(h) for h in self.hosts),
        ]

        async def snapshot() -> dict[str, int]:
            async with self.db() as session:
                return await ledger.balances(session, tracked)

        #: what every tracked balance should be now
        self.expected: dict[str, int] = self._run(snapshot())
        self.keys: set[str] = set()
        self.posted: list[Posting] = []
        self.open: list[Hold] = []
        self.settled: list[Settled] = []
        self.payouts: list[Payout] = []
        self.disputes: list[Dispute] = []
        #: accounts that a rule allowed below zero (a dispute, a card refund, a refund after
        #: a payout): only these may be negative
        self.tainted: set[str] = set()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    # --- posting, with the model's prediction -------------------------------------------------

    def _post(
        self,
        batch: Sequence[Posting],
        *,
        before: Callable[[AsyncSession], Awaitable[None]] | None = None,
        after: Callable[[AsyncSession, list[uuid.UUID | None]], Awaitable[None]] | None = None,
        charge: tuple[uuid.UUID, int] | None = None,
    ) -> list[uuid.UUID | None] | None:
        """Post ``batch`` in one transaction (``before`` and ``after`` run in it, as a service's
        own writes would) and check the outcome against the model; the ids, or None when the
        ledger refused it (as the model must have predicted)."""
        fresh = [p for p in batch if p.key not in self.keys]
        deltas, strict = _net(fresh)
        short = {
            code
            for code, delta in deltas.items()
            if delta < 0
            and code in strict
            and not _allow_negative(code)
            and self.expected.get(code, 0) + delta < 0
        }
        ids = self._run(self._post_async(batch, short, before, after, charge))
        if ids is None:
            return None
        for posting, new_id in zip(batch, ids, strict=True):
            replay = posting.key in self.keys
            assert (new_id is None) == replay, f"{posting.key}: replay={replay} but id={new_id}"
        for code, delta in deltas.items():
            self.expected[code] = self.expected.get(code, 0) + delta
        for posting in fresh:
            self.keys.add(posting.key)
            self.posted.append(posting)
            self.tainted.update(c for c in posting.may_go_negative if self.expected[c] < 0)
        return ids

    async def _post_async(
        self,
        batch: Sequence[Posting],
        short: set[str],
        before: Callable[[AsyncSession], Awaitable[None]] | None,
        after: Callable[[AsyncSession, list[uuid.UUID | None]], Awaitable[None]] | None,
        charge: tuple[uuid.UUID, int] | None,
    ) -> list[uuid.UUID | None] | None:
        codes = sorted({code for p in batch for code, _ in p.entries})
        async with self.db() as session:
            existing = await _existing_accounts(session, codes)
            if before is not None:
                await before(session)
            try:
                ids = await ledger.post_many(session, batch)
            except InsufficientFunds as refused:
                await session.rollback()
                assert short, f"refused although the model expected it to pass: {refused}"
                reported = {row["account"] for row in refused.details["accounts"]}
                assert reported == short, f"short accounts {reported}, expected {short}"
                await self._nothing_left_behind(batch, existing, codes, charge)
                return None
            assert not short, f"the ledger let {sorted(short)} go below zero"
            if after is not None:
                await after(session, ids)
            await session.commit()
            return ids

    async def _nothing_left_behind(
        self,
        batch: Sequence[Posting],
        existing: set[str],
        codes: list[str],
        charge: tuple[uuid.UUID, int] | None,
    ) -> None:
        fresh_keys = [p.key for p in batch if p.key not in self.keys]
        async with self.db() as session:
            left = await session.scalar(
                select(func.count())
                .select_from(LedgerTransactionModel)
                .where(LedgerTransactionModel.idempotency_key.in_(fresh_keys))
            )
            assert left == 0, "a refused posting left a transaction behind"
            assert await _existing_accounts(session, codes) == existing
            if charge is not None:
                row = await session.get(JobChargeModel, charge)
                assert row is None, "a refused hold left its job charge behind"

    # --- the checks after every step ----------------------------------------------------------

    @invariant()
    def the_books_agree_with_the_model(self) -> None:
        async def read() -> tuple[LedgerReport, dict[str, int], dict[str, int]]:
            async with self.db() as session:
                report = await ledger.check(session)
                cached = await ledger.balances(session, self.expected)
                open_holds = await session.execute(
                    select(JobChargeModel.wallet, func.sum(JobChargeModel.hold_micros))
                    .where(
                        JobChargeModel.wallet.in_(self.wallets), JobChargeModel.settled_at.is_(None)
                    )
                    .group_by(JobChargeModel.wallet)
                )
                return report, cached, {wallet: int(total) for wallet, total in open_holds}

        report, cached, open_holds = self._run(read())
        for wallet in self.wallets:
            held = cached[accounts.held(wallet)]
            assert held == open_holds.get(wallet, 0), f"{wallet} holds {held}, its charges differ"
        assert report.ok, f"ledger check failed: {report}"
        assert cached == self.expected
        for wallet in self.wallets:
            assert self.expected[accounts.held(wallet)] == sum(
                h.amount for h in self.open if h.wallet == wallet
            )
        for code, balance in cached.items():
            kind = code.rsplit(":", 1)[1]
            if kind == accounts.AccountKind.held:
                assert balance >= 0, f"{code} is negative: {balance}"
            elif kind in (accounts.AccountKind.available, accounts.AccountKind.host_payable):
                assert balance >= 0 or code in self.tainted, f"{code} went negative: {balance}"
        for negative in report.negative_accounts:  # earlier examples' accounts were checked then
            if negative["account"] in self.expected:
                assert negative["account"] in self.tainted, f"negative without a rule: {negative}"

    # --- money in -----------------------------------------------------------------------------

    @rule(wallet=wallet_indexes, amount=amounts, bought=st.booleans())
    def money_in(self, wallet: int, amount: int, bought: bool) -> None:
        """A top-up through Stripe, or promotional credit granted."""
        owner = self.wallets[wallet]
        if bought:
            key = f"stripe:evt_{uuid.uuid4().hex}"
            self._post([postings.topup(wallet=owner, amount=amount, key=key, details={})])
        else:
            key = f"grant:{uuid.uuid4()}"
            self._post([postings.grant(wallet=owner, amount=amount, key=key)])

    # --- jobs ---------------------------------------------------------------------------------

    @rule(
        wallet=wallet_indexes,
        host=host_indexes,
        price=prices_per_hour,
        gpus=st.integers(1, 4),
        max_seconds=max_durations,
        attempt=st.integers(1, 3),
        edge=edges,
        granted=st.none() | amounts,
    )
    def hold(
        self,
        wallet: int,
        host: int,
        price: int,
        gpus: int,
        max_seconds: int,
        attempt: int,
        edge: int | None,
        granted: int | None,
    ) -> None:
        """A hold for price x max duration, or one at the edge of the available balance (minus
        one, exactly, plus one micro-dollar); optionally beside a grant in the same batch (a
        batch moves net amounts, so the hold may use that credit)."""
        owner = self.wallets[wallet]
        also = None
        if granted is not None:
            also = postings.grant(wallet=owner, amount=granted, key=f"grant:{uuid.uuid4()}")
        if edge is None:
            amount = postings.usage_cost(
                price_per_gpu_hour_micros=price, gpu_count=gpus, seconds=max_seconds
            )
        else:
            available = self.expected[accounts.available(owner)] + (granted or 0)
            amount, max_seconds = max(0, available + edge), -1
        job = Hold(
            wallet=owner,
            job_id=uuid.uuid4(),
            attempt=attempt,
            host_owner_id=self.hosts[host],
            price=price,
            gpus=gpus,
            max_seconds=None if max_seconds < 0 else max_seconds,
            amount=amount,
        )
        self._hold(job, also=also)

    @rule(wallet=wallet_indexes, by=st.one_of(st.integers(1, 10), st.integers(1, 50 * USD)))
    def overdraw(self, wallet: int, by: int) -> None:
        """A hold for more than the available credit is refused and leaves nothing behind."""
        owner = self.wallets[wallet]
        amount = max(0, self.expected[accounts.available(owner)]) + by
        job = Hold(owner, uuid.uuid4(), 1, self.hosts[0], USD, 1, None, amount)
        assert not self._hold(job)

    def _hold(self, job: Hold, *, also: Posting | None = None) -> bool:
        posting = postings.hold(
            wallet=job.wallet, job_id=job.job_id, attempt=job.attempt, amount=job.amount
        )

        async def add_charge(session: AsyncSession) -> None:
            session.add(
                JobChargeModel(
                    job_id=job.job_id,
                    attempt=job.attempt,
                    wallet=job.wallet,
                    host_id=uuid.uuid4(),
                    host_owner_id=job.host_owner_id,
                    price_per_gpu_hour_micros=job.price,
                    gpu_count=job.gpus,
                    hold_micros=job.amount,
                )
            )
            await session.flush()

        batch = [posting] if also is None else [also, posting]
        key = (job.job_id, job.attempt)
        if self._post(batch, before=add_charge, charge=key) is None:
            return False
        self.open.append(job)
        return True

    @precondition(lambda self: self.open)
    @rule(data=st.data(), used=fractions, host_fault=st.booleans(), fee_bps=fee_rates)
    def settle(self, data: st.DataObject, used: int, host_fault: bool, fee_bps: int) -> None:
        job = data.draw(st.sampled_from(self.open), label="hold")
        self._settle(job, used=used, host_fault=host_fault, fee_bps=fee_bps)

    @rule(
        wallet=wallet_indexes,
        host=host_indexes,
        price=prices_per_hour,
        gpus=st.integers(1, 4),
        max_seconds=max_durations,
        used=fractions,
        host_fault=st.integers(0, 4).map(lambda n: n == 0),
        fee_bps=fee_rates,
        after=st.sampled_from(["nothing", "refund", "payout", "payout then refund"]),
    )
    def a_job_runs(
        self,
        wallet: int,
        host: int,
        price: int,
        gpus: int,
        max_seconds: int,
        used: int,
        host_fault: bool,
        fee_bps: int,
        after: str,
    ) -> None:
        """A job's whole life: a top-up when the credit is short, the hold, the settlement,
        then maybe the host's payout and an admin's refund (which may leave the host owing)."""
        amount = postings.usage_cost(
            price_per_gpu_hour_micros=price, gpu_count=gpus, seconds=max_seconds
        )
        owner = self.wallets[wallet]
        short = amount - self.expected[accounts.available(owner)]
        if short > 0:
            key = f"stripe:evt_{uuid.uuid4().hex}"
            self._post([postings.topup(wallet=owner, amount=short, key=key, details={})])
        job = Hold(owner, uuid.uuid4(), 1, self.hosts[host], price, gpus, max_seconds, amount)
        assert self._hold(job), "a hold within the available credit is never refused"
        done = self._settle(job, used=used, host_fault=host_fault, fee_bps=fee_bps)
        if after.startswith("payout"):
            self.payout(host, share=1000, edge=None)
        if after.endswith("refund") and done.charged:
            self._refund(done)

    def _settle(self, job: Hold, *, used: int, host_fault: bool, fee_bps: int) -> Settled:
        if job.max_seconds is not None:
            seconds = job.max_seconds * used // 1000
            charged = postings.usage_cost(
                price_per_gpu_hour_micros=job.price, gpu_count=job.gpus, seconds=seconds
            )
            assert charged <= job.amount, "a shorter run cost more than the hold"
        else:
            seconds = used
            charged = job.amount * used // 1000
        if host_fault:
            seconds, charged = 0, 0
        fee, host_share = postings.split_fee(charged, fee_bps)
        released = job.amount - charged
        assert fee + host_share == charged and charged + released == job.amount
        assert 0 <= fee <= charged
        posting = postings.settle(
            wallet=job.wallet,
            job_id=job.job_id,
            attempt=job.attempt,
            hold_micros=job.amount,
            charged_micros=charged,
            fee_micros=fee,
            host_owner_id=job.host_owner_id,
            memo="settled",
            details={"seconds": seconds},
        )
        moved: dict[str, int] = defaultdict(int)
        for code, amount in posting.entries:
            moved[code] += amount
        assert moved[accounts.held(job.wallet)] == -job.amount
        assert moved[accounts.available(job.wallet)] == released
        assert moved[accounts.PLATFORM_FEES] == fee
        assert moved[accounts.host_payable(job.host_owner_id)] == host_share

        async def mark_settled(session: AsyncSession, ids: list[uuid.UUID | None]) -> None:
            await session.execute(
                update(JobChargeModel)
                .where(JobChargeModel.job_id == job.job_id, JobChargeModel.attempt == job.attempt)
                .values(
                    settled_at=utcnow(),
                    outcome="charged" if charged else "released",
                    billed_seconds=seconds,
                    charged_micros=charged,
                    fee_micros=fee,
                    settle_transaction_id=ids[0],
                )
            )

        ids = self._post([posting], after=mark_settled)
        assert ids is not None and ids[0] is not None, "a settlement can always be posted"
        self.open.remove(job)
        done = Settled(job, charged, fee, ids[0])
        self.settled.append(done)
        return done

    @precondition(lambda self: any(not s.refunded and s.charged for s in self.settled))
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        done = data.draw(
            st.sampled_from([s for s in self.settled if not s.refunded and s.charged]),
            label="settled",
        )
        self._refund(done)

    def _refund(self, done: Settled) -> None:
        posting = postings.refund_job(
            wallet=done.hold.wallet,
            job_id=done.hold.job_id,
            settle_transaction_id=done.transaction_id,
            charged_micros=done.charged,
            fee_micros=done.fee,
            host_owner_id=done.hold.host_owner_id,
            actor_id=uuid.uuid4(),
            memo="refunded by an admin",
        )

        async def mark_refunded(session: AsyncSession, _ids: list[uuid.UUID | None]) -> None:
            await session.execute(
                update(JobChargeModel)
                .where(
                    JobChargeModel.job_id == done.hold.job_id,
                    JobChargeModel.attempt == done.hold.attempt,
                )
                .values(outcome="refunded")
            )

        refunded = self._post([posting], after=mark_refunded)
        assert refunded is not None, "an admin's refund is never refused (the host may owe it)"
        done.refunded = True

    # --- payouts ------------------------------------------------------------------------------

    @rule(host=host_indexes, share=fractions, edge=edges)
    def payout(self, host: int, share: int, edge: int | None) -> None:
        """A share of host payable, or an amount at its edge (minus one, exactly, plus one)."""
        user_id = self.hosts[host]
        payable = self.expected[accounts.host_payable(user_id)]
        amount = max(0, payable) * share // 1000 if edge is None else max(0, payable + edge)
        payout_id = uuid.uuid4()
        posted = self._post([postings.payout(user_id=user_id, amount=amount, payout_id=payout_id)])
        if posted is not None:
            self.payouts.append(Payout(user_id, amount, payout_id))

    @precondition(
        lambda self: any(
            not p.failed and (not p.reversed_total or p.reversed_total < p.amount)
            for p in self.payouts
        )
    )
    @rule(data=st.data(), fail=st.booleans(), share=fractions)
    def payout_comes_back(self, data: st.DataObject, fail: bool, share: int) -> None:
        """The transfer failed (the whole amount), or was reversed on Stripe (in steps)."""
        payout = data.draw(
            st.sampled_from(
                [
                    p
                    for p in self.payouts
                    if not p.failed and (not p.reversed_total or p.reversed_total < p.amount)
                ]
            ),
            label="payout",
        )
        if not payout.reversed_total and (fail or not payout.amount):
            failed = postings.payout_failed(
                user_id=payout.user_id, amount=payout.amount, payout_id=payout.payout_id
            )
            assert self._post([failed]) is not None
            payout.failed = True
            return
        step = max(1, (payout.amount - payout.reversed_total) * share // 1000)
        reversed_ = postings.payout_reversed(
            user_id=payout.user_id,
            amount=step,
            transfer_id=f"tr_{payout.payout_id.hex}",
            reversed_total=payout.reversed_total + step,
        )
        assert self._post([reversed_]) is not None
        payout.reversed_total += step

    # --- card money going back ----------------------------------------------------------------

    @rule(wallet=wallet_indexes, amount=amounts, dispute=st.booleans())
    def card_money_returned(self, wallet: int, amount: int, dispute: bool) -> None:
        """A card refund or a dispute: bought credit goes back, even below zero."""
        kind = "dispute" if dispute else "card_refund"
        stripe_id = f"{'dp' if dispute else 're'}_{uuid.uuid4().hex}"
        posting = postings.card_money_returned(
            wallet=self.wallets[wallet],
            amount=amount,
            key=f"stripe:{stripe_id}",
            kind=kind,
            memo=kind,
        )
        assert self._post([posting]) is not None, "money returned to a card is never refused"
        if dispute:
            self.disputes.append(Dispute(self.wallets[wallet], amount, stripe_id))

    @precondition(lambda self: any(not d.won for d in self.disputes))
    @rule(data=st.data())
    def dispute_won(self, data: st.DataObject) -> None:
        dispute = data.draw(st.sampled_from([d for d in self.disputes if not d.won]))
        posting = postings.dispute_won(
            wallet=dispute.wallet, amount=dispute.amount, dispute_id=dispute.dispute_id
        )
        assert self._post([posting]) is not None
        dispute.won = True

    # --- replays ------------------------------------------------------------------------------

    @precondition(lambda self: self.posted)
    @rule(
        data=st.data(),
        how=st.sampled_from(["as is", "with other entries", "beside a new posting"]),
        amount=amounts,
    )
    def replay(self, data: st.DataObject, how: str, amount: int) -> None:
        """Posting a key again changes nothing, even with other entries (the key wins), and
        does not stop a new posting in the same batch."""
        earlier = data.draw(st.sampled_from(self.posted), label="earlier posting")
        if how == "with other entries":
            earlier = postings.grant(wallet=self.wallets[0], amount=amount + 1, key=earlier.key)
        if how != "beside a new posting":
            assert self._post([earlier]) == [None]
            return
        fresh = postings.grant(wallet=self.wallets[1], amount=amount, key=f"grant:{uuid.uuid4()}")
        ids = self._post([earlier, fresh])
        assert ids is not None and ids[0] is None and ids[1] is not None


async def _existing_accounts(session: AsyncSession, codes: Sequence[str]) -> set[str]:
    rows = await session.scalars(
        select(LedgerAccountModel.code).where(LedgerAccountModel.code.in_(codes))
    )
    return set(rows)


def test_random_sequences_of_money_movements_keep_the_books(settings: ServerSettings) -> None:
    with asyncio.Runner() as runner:
        engine = create_engine(settings)
        try:
            machine = type(
                "BoundLedgerMachine",
                (LedgerMachine,),
                {"runner": runner, "db": create_sessionmaker(engine)},
            )
            run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
        finally:
            runner.run(engine.dispose())


# --- concurrency, and a posting's exemption from overdraft ------------------------------------


async def test_an_exemption_covers_only_its_own_posting(session: AsyncSession) -> None:
    wallet = accounts.user_wallet(uuid.uuid4())
    dispute = postings.card_money_returned(
        wallet=wallet, amount=1, key=f"stripe:dp_{uuid.uuid4().hex}", kind="dispute", memo=""
    )
    hold = postings.hold(wallet=wallet, job_id=uuid.uuid4(), attempt=1, amount=100 * USD)
    try:
        with pytest.raises(InsufficientFunds):
            await ledger.post_many(session, [dispute, hold])
    finally:
        await session.rollback()


async def test_concurrent_postings_on_one_account_do_not_deadlock(
    settings: ServerSettings, context: ServerContext
) -> None:
    """PostgreSQL: the entries' foreign keys take KEY SHARE locks on their accounts; a FOR
    UPDATE taken after them (as the ledger once did) deadlocks two postings on one wallet."""
    if settings.is_sqlite:
        pytest.skip("SQLite has one writer at a time")
    wallet = accounts.user_wallet(uuid.uuid4())
    async with context.sessionmaker() as session:
        await ledger.post(session, postings.grant(wallet=wallet, amount=USD, key=f"g:{wallet}"))
        await session.commit()

    async def hold_and_release(errors: list[str]) -> None:
        job_id = uuid.uuid4()
        async with context.sessionmaker() as session:
            try:
                await ledger.post(
                    session, postings.hold(wallet=wallet, job_id=job_id, attempt=1, amount=1)
                )
                await ledger.post(
                    session,
                    postings.settle(
                        wallet=wallet,
                        job_id=job_id,
                        attempt=1,
                        hold_micros=1,
                        charged_micros=0,
                        fee_micros=0,
                        host_owner_id=uuid.uuid4(),
                        memo="",
                        details={},
                    ),
                )
                await session.commit()
            except DBAPIError as exc:
                await session.rollback()
                errors.append(str(exc.orig))

    errors: list[str] = []
    for _round in range(3):
        await asyncio.gather(*(hold_and_release(errors) for _ in range(8)))
    assert errors == []


# --- the arithmetic -------------------------------------------------------------------------

prices = st.integers(0, 10**9)
gpu_counts = st.integers(1, 64)
durations = st.integers(0, 10**7)


@UNIT_SETTINGS
@given(price=prices, gpus=gpu_counts, a=durations, b=durations)
def test_usage_cost_grows_with_time(price: int, gpus: int, a: int, b: int) -> None:
    short, long = sorted((a, b))
    cost = postings.usage_cost
    assert cost(price_per_gpu_hour_micros=price, gpu_count=gpus, seconds=short) <= cost(
        price_per_gpu_hour_micros=price, gpu_count=gpus, seconds=long
    )


@UNIT_SETTINGS
@given(price=prices, more=st.integers(0, 10**6), gpus=gpu_counts, seconds=durations)
def test_usage_cost_grows_with_price_and_gpus(
    price: int, more: int, gpus: int, seconds: int
) -> None:
    cost = postings.usage_cost
    base = cost(price_per_gpu_hour_micros=price, gpu_count=gpus, seconds=seconds)
    assert base <= cost(price_per_gpu_hour_micros=price + more, gpu_count=gpus, seconds=seconds)
    assert base <= cost(price_per_gpu_hour_micros=price, gpu_count=gpus + 1, seconds=seconds)


@UNIT_SETTINGS
@given(price=prices, gpus=gpu_counts, seconds=durations)
def test_usage_cost_rounds_up_to_the_micro_dollar(price: int, gpus: int, seconds: int) -> None:
    cost = postings.usage_cost(price_per_gpu_hour_micros=price, gpu_count=gpus, seconds=seconds)
    exact = Fraction(price * gpus * seconds, postings.SECONDS_PER_HOUR)
    assert cost - 1 < exact <= cost


@UNIT_SETTINGS
@given(price=prices, gpus=gpu_counts, hours=st.integers(0, 10_000))
def test_usage_cost_is_exact_for_whole_hours(price: int, gpus: int, hours: int) -> None:
    seconds = hours * postings.SECONDS_PER_HOUR
    cost = postings.usage_cost(price_per_gpu_hour_micros=price, gpu_count=gpus, seconds=seconds)
    assert cost == price * gpus * hours


@UNIT_SETTINGS
@given(charge=st.one_of(st.integers(0, 1000), st.integers(0, 10**15)), fee_bps=fee_rates)
def test_split_fee_adds_up_and_rounds_half_up(charge: int, fee_bps: int) -> None:
    fee, host = postings.split_fee(charge, fee_bps)
    assert fee + host == charge
    assert 0 <= fee <= charge and 0 <= host <= charge
    exact = Fraction(charge * fee_bps, 10_000)
    assert abs(fee - exact) <= Fraction(1, 2)
    if exact - int(exact) == Fraction(1, 2):
        assert fee == int(exact) + 1, "a half micro-dollar rounds up"


@pytest.mark.parametrize(("fee_bps", "fee"), [(0, 0), (1000, 100_000), (10_000, 1_000_000)])
def test_split_fee_known_values(fee_bps: int, fee: int) -> None:
    assert postings.split_fee(1_000_000, fee_bps) == (fee, 1_000_000 - fee)
    assert postings.split_fee(5, 1000) == (1, 4)  # 0.5 rounds up
    assert postings.split_fee(4, 1000) == (0, 4)  # 0.4 rounds down
