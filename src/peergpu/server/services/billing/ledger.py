"""The double-entry ledger: post transactions, read balances, check the books.

Contract of :func:`post_many`:

- every posting's entries sum to zero (else ``ValueError``: a bug, not a user error);
- a posting whose idempotency key was posted before changes nothing and comes back as
  ``None`` (replays of webhooks, settlement sweeps and retries are safe);
- each account's cached ``balance_micros`` moves by the sum of its entries in the same
  transaction; an account that may not go negative and would is refused with
  :class:`InsufficientFunds` (the caller rolls back);
- on PostgreSQL the touched accounts are locked in code order (``FOR NO KEY UPDATE``) just
  before their balances move, so two concurrent batches never deadlock on each other's
  accounts;
- a posting's ``may_go_negative`` covers that posting only: an account another posting of the
  batch also takes from must stay above zero.

Accounts are created on first use from their code (see :mod:`.accounts`).
"""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, String, any_, bindparam, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import PaymentRequired
from peergpu.server.db import core
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import (
    JobChargeModel,
    LedgerAccountModel,
    LedgerEntryModel,
    LedgerTransactionModel,
)
from peergpu.server.db.bulk import insert_rows, table_of, unnest
from peergpu.server.services.billing.accounts import describe

#: Accounts per balance UPDATE (two bind parameters each).
_CHUNK = 2000


class InsufficientFunds(PaymentRequired):
    code = "insufficient_credit"


@dataclass(frozen=True)
class Posting:
    """One transaction to post: entries are ``(account code, micro-dollars)``."""

    key: str
    kind: str
    entries: tuple[tuple[str, int], ...]
    memo: str = ""
    job_id: uuid.UUID | None = None
    reverses_id: uuid.UUID | None = None
    actor_id: uuid.UUID | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: Accounts this posting may drive below zero (a dispute, a reversed payout).
    may_go_negative: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError(f"posting {self.key!r} has no entries")
        if sum(amount for _code, amount in self.entries) != 0:
            raise ValueError(f"posting {self.key!r} does not sum to zero: {self.entries}")
        if any(not isinstance(amount, int) for _code, amount in self.entries):
            raise ValueError(f"posting {self.key!r} has a non-integer amount")


def transfer(
    key: str, kind: str, *, source: str, target: str, amount: int, **kwargs: Any
) -> Posting:
    """The common two-entry posting: ``amount`` from ``source`` to ``target``."""
    return Posting(key=key, kind=kind, entries=((source, -amount), (target, amount)), **kwargs)


async def post(session: AsyncSession, posting: Posting) -> uuid.UUID | None:
    """Post one transaction; its id, or None when its key was posted before."""
    return (await post_many(session, [posting]))[0]


async def post_many(session: AsyncSession, postings: Sequence[Posting]) -> list[uuid.UUID | None]:
    """Post every posting not posted before, in the caller's transaction (see the module
    docstring); returns each one's new transaction id, or None for a replay."""
    if not postings:
        return []
    keys = [p.key for p in postings]
    if len(set(keys)) != len(keys):
        raise ValueError("two postings in one batch share an idempotency key")
    await ensure_accounts(session, {code for p in postings for code, _ in p.entries})
    now = utcnow()
    ids = {p.key: uuid.uuid4() for p in postings}
    inserted = await core.execute(
        session,
        _insert_transactions(_dialect(session)),
        [
            {
                "id": ids[p.key],
                "created_at": now,
                "idempotency_key": p.key,
                "kind": p.kind,
                "memo": p.memo[:2000],
                "job_id": p.job_id,
                "reverses_id": p.reverses_id,
                "actor_id": p.actor_id,
                "details": p.details,
            }
            for p in postings
        ],
    )
    new_ids = set(inserted.scalars())
    fresh = [p for p in postings if ids[p.key] in new_ids]
    if fresh:
        entries = [
            {  # the entry's id is made where it is inserted (see ``bulk.insert_rows``)
                "transaction_id": ids[p.key],
                "account_code": code,
                "amount_micros": amount,
                "at": now,
            }
            for p in fresh
            for code, amount in p.entries
            if amount != 0
        ]
        if entries:
            await insert_rows(session, LedgerEntryModel, entries)
        # Only now lock the accounts, in code order: one global order means two batches
        # touching the same accounts (platform:fees, a busy wallet) wait for each other
        # instead of deadlocking, and locking last keeps the hot accounts locked briefly.
        # (On PostgreSQL the move itself locks them in order first: one statement.)
        await _move_balances(session, fresh, now=now)
    return [ids[p.key] if ids[p.key] in new_ids else None for p in postings]


async def ensure_accounts(session: AsyncSession, codes: Iterable[str]) -> None:
    """Create the accounts that do not exist yet (kind and owner come from the code)."""
    rows = []
    now = utcnow()
    for code in sorted(set(codes)):
        kind, owner, allow_negative = describe(code)
        rows.append(
            {
                "code": code,
                "kind": kind,
                "owner": owner,
                "allow_negative": allow_negative,
                "balance_micros": 0,
                "created_at": now,
                "updated_at": now,
            }
        )
    if rows:
        await core.execute(session, _insert_accounts(_dialect(session)), rows)


async def balances(session: AsyncSession, codes: Iterable[str]) -> dict[str, int]:
    """Cached balances; an account never used reads as 0."""
    wanted = sorted(set(codes))
    rows = await core.execute(session, _balances_query(), {"codes": wanted})
    found = {code: int(balance) for code, balance in rows}
    return {code: int(found.get(code, 0)) for code in wanted}


@functools.lru_cache(maxsize=1)
def _balances_query() -> Any:
    return select(LedgerAccountModel.code, LedgerAccountModel.balance_micros).where(
        LedgerAccountModel.code.in_(bindparam("codes", expanding=True))
    )


@functools.lru_cache(maxsize=2)
def _insert_accounts(dialect: str) -> Any:
    """``INSERT INTO ledger_accounts ... ON CONFLICT (code) DO NOTHING``, built once."""
    return _insert_ignoring(dialect, LedgerAccountModel, "code")


@functools.lru_cache(maxsize=2)
def _insert_transactions(dialect: str) -> Any:
    """``INSERT INTO ledger_transactions ... ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id``, built once."""
    return _insert_ignoring(dialect, LedgerTransactionModel, "idempotency_key").returning(
        LedgerTransactionModel.id
    )


async def lock_accounts(session: AsyncSession, codes: Iterable[str]) -> dict[str, int]:
    """Balances of ``codes``, locked until the transaction ends (PostgreSQL; SQLite has one
    writer anyway). Locks are taken in code order. A caller that posts afterwards must lock
    here every account its postings will touch: locking some now and others later can
    deadlock with a posting that takes them all in order."""
    wanted = sorted(set(codes))
    await ensure_accounts(session, wanted)
    rows = await session.execute(
        select(LedgerAccountModel.code, LedgerAccountModel.balance_micros)
        .where(LedgerAccountModel.code.in_(wanted))
        .order_by(LedgerAccountModel.code)
        .with_for_update(key_share=True)
    )
    return {code: int(balance) for code, balance in rows}


async def _move_balances(session: AsyncSession, postings: Sequence[Posting], *, now: Any) -> None:
    deltas: dict[str, int] = defaultdict(int)
    exempt: set[str] = set()
    strict: set[str] = set()  # taken from by a posting with no rule for it
    for posting in postings:
        for code, amount in posting.entries:
            deltas[code] += amount
            if amount < 0:
                (exempt if code in posting.may_go_negative else strict).add(code)
    exempt -= strict
    touched = sorted(code for code, delta in deltas.items() if delta)
    if not touched:
        return
    short: list[dict[str, Any]] = []
    if _dialect(session) == "postgresql":
        # One statement, always the same: the deltas travel as two arrays. A CASE of one
        # branch per account was compiled anew for every batch of holds and settlements.
        moved = await core.execute(
            session,
            _move_by_arrays(),
            {"deltas_code": touched, "deltas_delta": [deltas[c] for c in touched], "now": now},
        )
        chunks = [moved]
    else:
        chunks = []
        for start in range(0, len(touched), _CHUNK):
            chunk = touched[start : start + _CHUNK]
            chunks.append(
                await session.execute(
                    update(LedgerAccountModel)
                    .where(LedgerAccountModel.code.in_(chunk))
                    .values(
                        balance_micros=LedgerAccountModel.balance_micros
                        + case(
                            *((LedgerAccountModel.code == code, deltas[code]) for code in chunk),
                            else_=0,
                        ),
                        updated_at=now,
                    )
                    .returning(*_MOVED)
                    .execution_options(synchronize_session=False)
                )
            )
    for moved in chunks:
        for code, balance, allow_negative in moved:
            if balance < 0 and not allow_negative and code not in exempt and deltas[code] < 0:
                short.append({"account": code, "balance_micros": int(balance) - deltas[code]})
    if short:
        first = short[0]
        raise InsufficientFunds(
            f"Not enough credit in {first['account']}: it holds "
            f"{format_usd(first['balance_micros'])}.",
            details={"accounts": short},
        )


_MOVED = (
    LedgerAccountModel.code,
    LedgerAccountModel.balance_micros,
    LedgerAccountModel.allow_negative,
)


@functools.lru_cache(maxsize=1)
def _move_by_arrays() -> Any:
    """PostgreSQL: ``UPDATE ledger_accounts SET balance_micros = balance_micros + delta FROM
    unnest(:deltas_code, :deltas_delta) AS deltas(code, delta)``, returning the new
    balances. The accounts are locked first, in code order (``locked``: ``SELECT ... ORDER BY
    code FOR NO KEY UPDATE``), so two batches touching the same accounts wait for each other
    instead of deadlocking; the UPDATE alone would lock them in whatever order its join
    produced."""
    deltas = unnest("deltas", [("code", String()), ("delta", BigInteger())])
    codes = bindparam("deltas_code", type_=postgresql.ARRAY(String()))  # the same array
    locked = (
        select(LedgerAccountModel.code)
        .where(LedgerAccountModel.code == any_(codes))
        .order_by(LedgerAccountModel.code)
        .with_for_update(key_share=True)
        .cte("locked")
    )
    return (
        update(LedgerAccountModel)
        .where(
            LedgerAccountModel.code == deltas.c.code,
            LedgerAccountModel.code.in_(select(locked.c.code)),
        )
        .values(
            balance_micros=LedgerAccountModel.balance_micros + deltas.c.delta,
            updated_at=bindparam("now", type_=LedgerAccountModel.updated_at.type),
        )
        .returning(*_MOVED)
        .execution_options(synchronize_session=False)
    )


def insert_ignoring_duplicates(session: AsyncSession, model: Any, column: str) -> Any:
    """``INSERT ... ON CONFLICT (column) DO NOTHING`` for the session's database."""
    return _insert_ignoring(_dialect(session), model, column)


def _insert_ignoring(dialect_name: str, model: Any, column: str) -> Any:
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    return dialect.insert(table_of(model)).on_conflict_do_nothing(index_elements=[column])


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


def format_usd(micros: int) -> str:
    """``$1.234567`` trimmed to cents when the rest is zero: ``$12.50``."""
    sign = "-" if micros < 0 else ""
    whole, rest = divmod(abs(micros), 1_000_000)
    text = f"{rest:06d}".rstrip("0")
    return f"{sign}${whole:,}.{text.ljust(2, '0')}"


@dataclass
class LedgerReport:
    """What ``peergpu admin ledger-check`` prints; ``ok`` unless a problem was found."""

    transactions: int = 0
    accounts: int = 0
    unbalanced_transactions: list[str] = field(default_factory=list)
    stale_balances: list[dict[str, Any]] = field(default_factory=list)
    total_micros: int = 0
    holds_mismatched: list[dict[str, Any]] = field(default_factory=list)
    negative_accounts: list[dict[str, Any]] = field(default_factory=list)
    #: Accounts that entries name but that do not exist (entries carry no foreign key).
    unknown_accounts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.unknown_accounts
            or self.unbalanced_transactions
            or self.stale_balances
            or self.total_micros
            or self.holds_mismatched
        )


async def check(session: AsyncSession, *, repair: bool = False) -> LedgerReport:
    """Re-derive the books from the entries: every transaction sums to zero, every cached
    balance equals its entries' sum (``repair`` rewrites those that do not), all balances sum
    to zero, and each wallet's held balance equals its open holds. Negative balances are
    listed for information: rules (disputes, reversed payouts) allow some."""
    report = LedgerReport()
    if _dialect(session) == "postgresql" and not session.in_transaction():
        # One snapshot for every read below, so a posting committed meanwhile cannot show as
        # a mismatch (and a repair cannot overwrite a balance that moved).
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    report.transactions = int(
        await session.scalar(select(func.count()).select_from(LedgerTransactionModel)) or 0
    )
    unbalanced = await session.execute(
        select(LedgerEntryModel.transaction_id)
        .group_by(LedgerEntryModel.transaction_id)
        .having(func.sum(LedgerEntryModel.amount_micros) != 0)
    )
    report.unbalanced_transactions = [str(tx) for tx in unbalanced.scalars()]
    unknown = await session.scalars(
        select(LedgerEntryModel.account_code)
        .distinct()
        .where(~LedgerEntryModel.account_code.in_(select(LedgerAccountModel.code)))
    )
    report.unknown_accounts = sorted(unknown)
    sums = (
        select(
            LedgerEntryModel.account_code.label("code"),
            func.sum(LedgerEntryModel.amount_micros).label("total"),
        )
        .group_by(LedgerEntryModel.account_code)
        .subquery()
    )
    rows = await session.execute(
        select(
            LedgerAccountModel.code,
            LedgerAccountModel.balance_micros,
            LedgerAccountModel.allow_negative,
            func.coalesce(sums.c.total, 0),
        ).outerjoin(sums, sums.c.code == LedgerAccountModel.code)
    )
    derived_by_code: dict[str, int] = {}
    for code, cached, allow_negative, derived in rows:
        report.accounts += 1
        derived = int(derived)
        derived_by_code[code] = derived
        report.total_micros += derived
        if int(cached) != derived:
            report.stale_balances.append(
                {"account": code, "cached_micros": int(cached), "derived_micros": derived}
            )
        if derived < 0 and not allow_negative:
            report.negative_accounts.append({"account": code, "balance_micros": derived})
    open_holds = await session.execute(
        select(JobChargeModel.wallet, func.sum(JobChargeModel.hold_micros))
        .where(JobChargeModel.settled_at.is_(None))
        .group_by(JobChargeModel.wallet)
    )
    holds = {wallet: int(total) for wallet, total in open_holds}
    held_accounts = {code for code in derived_by_code if code.endswith(":held")}
    for wallet in sorted(set(holds) | {code.rsplit(":", 1)[0] for code in held_accounts}):
        expected = holds.get(wallet, 0)
        actual = derived_by_code.get(f"{wallet}:held", 0)
        if expected != actual:
            report.holds_mismatched.append(
                {"wallet": wallet, "open_holds_micros": expected, "held_micros": actual}
            )
    if repair and report.stale_balances:
        for stale in report.stale_balances:
            await session.execute(
                update(LedgerAccountModel)
                .where(LedgerAccountModel.code == stale["account"])
                .values(balance_micros=stale["derived_micros"], updated_at=utcnow())
            )
    return report
