"""``peergpu admin ledger-check`` and ``peergpu admin grant``, run in-process against the real
database of the ``settings`` fixture (both backends), as an operator would on the server."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import Result
from sqlalchemy import delete, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from peergpu.cli.admin import MAX_GRANT_MICROS
from peergpu.cli.output import EXIT_API, EXIT_NOT_FOUND, EXIT_USAGE, parse_amount_micros
from peergpu.config import ServerSettings
from peergpu.server.context import ServerContext
from peergpu.server.db.billing_models import (
    JobChargeModel,
    LedgerAccountModel,
    LedgerEntryModel,
    LedgerTransactionModel,
)
from peergpu.server.db.session import create_engine, create_sessionmaker
from peergpu.server.services.billing import accounts, ledger, postings
from tests.client.conftest import Cli
from tests.factories import unique_email

T = TypeVar("T")
USD = postings.MICROS_PER_USD


@pytest.fixture
def env(settings: ServerSettings) -> dict[str, str]:
    """The environment the CLI reads its settings from: the test's database."""
    return {
        "PEERGPU_DATA_DIR": str(settings.data_dir),
        "PEERGPU_DATABASE_URL": settings.database_url,
        "PEERGPU_REDIS_URL": "",
        "PEERGPU_SECRET_KEY": settings.secret_key.get_secret_value(),
        "PEERGPU_ARGON2_TIME_COST": "1",
        "PEERGPU_ARGON2_MEMORY_COST_KIB": "64",
    }


def on_db(settings: ServerSettings, action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run ``action`` in a session on the test's database (and commit)."""

    async def run() -> T:
        engine = create_engine(settings)
        try:
            async with create_sessionmaker(engine)() as session:
                result = await action(session)
                await session.commit()
                return result
        finally:
            await engine.dispose()

    return asyncio.run(run())


def make_user(cli: Cli, env: dict[str, str]) -> tuple[str, str]:
    """A user created the operator's way; their e-mail and wallet."""
    email = unique_email("admin-cli")
    created = cli(
        "admin", "create-user", "--email", email, "--password", "a long password", env=env
    )
    assert created.exit_code == 0, created.output
    user_id = created.output.strip().rsplit("id=", 1)[1]
    return email, accounts.user_wallet(uuid.UUID(user_id))


def available(settings: ServerSettings, wallet: str) -> int:
    code = accounts.available(wallet)

    async def read(session: AsyncSession) -> int:
        return (await ledger.balances(session, [code]))[code]

    return on_db(settings, read)


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def test_a_clean_ledger_passes(cli: Cli, env: dict[str, str], settings: ServerSettings) -> None:
    empty = cli("admin", "ledger-check", env=env)
    assert empty.exit_code == 0, empty.output
    assert "0 transactions" in empty.stdout and "ok" in empty.stdout
    email, _wallet = make_user(cli, env)
    assert cli("admin", "grant", "--email", email, "--amount", "5", env=env).exit_code == 0
    checked = cli("admin", "ledger-check", "--json", env=env)
    assert checked.exit_code == 0, checked.output
    report = as_json(checked)
    assert report["ok"] is True
    assert report["transactions"] == 1 and report["accounts"] == 2
    assert report["total_micros"] == 0
    assert report["stale_balances"] == report["unbalanced_transactions"] == []
    assert report["holds_mismatched"] == report["negative_accounts"] == []
    repaired = cli("admin", "ledger-check", "--repair", "--json", env=env)
    assert repaired.exit_code == 0 and as_json(repaired)["repaired"] == []


def test_a_stale_balance_is_reported_then_repaired(
    cli: Cli, env: dict[str, str], settings: ServerSettings
) -> None:
    email, wallet = make_user(cli, env)
    assert cli("admin", "grant", "--email", email, "--amount", "10", env=env).exit_code == 0
    code = accounts.available(wallet)

    async def corrupt(session: AsyncSession) -> None:
        await session.execute(
            update(LedgerAccountModel)
            .where(LedgerAccountModel.code == code)
            .values(balance_micros=LedgerAccountModel.balance_micros + 3)
        )

    on_db(settings, corrupt)
    found = cli("admin", "ledger-check", env=env)
    assert found.exit_code == 1, found.output
    assert f"stale balance {code}: cached $10.000003, its entries sum to $10.00" in found.stdout
    assert "--repair rewrites stale cached balances" in found.stdout
    report = as_json(cli("admin", "ledger-check", "--json", env=env))
    assert report["ok"] is False
    assert report["stale_balances"] == [
        {"account": code, "cached_micros": 10 * USD + 3, "derived_micros": 10 * USD}
    ]

    repaired = cli("admin", "ledger-check", "--repair", env=env)
    assert repaired.exit_code == 0, repaired.output
    assert "repaired 1 cached balance(s)" in repaired.stdout
    assert f"{code}: $10.000003 -> $10.00" in repaired.stdout
    assert "consistent now" in repaired.stdout
    assert available(settings, wallet) == 10 * USD
    again = cli("admin", "ledger-check", "--json", env=env)
    assert again.exit_code == 0 and as_json(again)["ok"] is True


def test_problems_that_repair_cannot_fix_keep_a_non_zero_exit(
    cli: Cli, env: dict[str, str], settings: ServerSettings
) -> None:
    """An entry that unbalances its transaction, and a job charge with no hold behind it:
    reported, left alone by --repair (which only rewrites cached balances), exit 1."""
    email, wallet = make_user(cli, env)
    granted = cli("admin", "grant", "--email", email, "--amount", "2", "--json", env=env)
    transaction_id = uuid.UUID(as_json(granted)["transaction_id"])
    code = accounts.available(wallet)
    stray_entry, job_id = uuid.uuid4(), uuid.uuid4()

    async def break_books(session: AsyncSession) -> None:
        session.add(
            LedgerEntryModel(
                id=stray_entry, transaction_id=transaction_id, account_code=code, amount_micros=5
            )
        )
        session.add(
            JobChargeModel(
                job_id=job_id,
                attempt=1,
                wallet=wallet,
                host_id=uuid.uuid4(),
                host_owner_id=uuid.uuid4(),
                price_per_gpu_hour_micros=USD,
                gpu_count=1,
                hold_micros=7,
            )
        )

    async def mend_books(session: AsyncSession) -> None:
        await session.execute(delete(LedgerEntryModel).where(LedgerEntryModel.id == stray_entry))
        await session.execute(delete(JobChargeModel).where(JobChargeModel.job_id == job_id))
        await ledger.check(session, repair=True)

    on_db(settings, break_books)
    try:
        found = cli("admin", "ledger-check", env=env)
        assert found.exit_code == 1, found.output
        assert "balances sum to $0.000005" in found.stdout
        assert f"unbalanced transaction {transaction_id}" in found.stdout
        assert f"stale balance {code}: cached $2.00, its entries sum to $2.000005" in found.stdout
        assert f"held credit mismatch {wallet}: held $0.00, open holds $0.000007" in found.stdout

        repaired = cli("admin", "ledger-check", "--repair", "--json", env=env)
        assert repaired.exit_code == 1, repaired.output
        report = as_json(repaired)
        assert report["repaired"] == [
            {"account": code, "cached_micros": 2 * USD, "derived_micros": 2 * USD + 5}
        ]
        assert report["ok"] is False and report["stale_balances"] == []
        assert report["unbalanced_transactions"] == [str(transaction_id)]
        assert report["total_micros"] == 5
        assert report["holds_mismatched"] == [
            {"wallet": wallet, "open_holds_micros": 7, "held_micros": 0}
        ]
        human = cli("admin", "ledger-check", "--repair", env=env)
        assert human.exit_code == 1 and "nothing that --repair fixes" in human.stdout
    finally:
        on_db(settings, mend_books)


def test_a_repair_never_overwrites_a_balance_that_moved_meanwhile(
    cli: Cli, env: dict[str, str], settings: ServerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live server posts to a stale account while ``--repair`` runs. PostgreSQL: the check
    reads one snapshot, so writing the balance it derived fails (and says to run it again)
    instead of losing the posting. SQLite: the repair holds the write lock from the start, so
    the posting waits (here: gives up at once)."""
    email, wallet = make_user(cli, env)
    assert cli("admin", "grant", "--email", email, "--amount", "10", env=env).exit_code == 0
    code = accounts.available(wallet)

    async def corrupt(session: AsyncSession) -> None:
        await session.execute(
            update(LedgerAccountModel)
            .where(LedgerAccountModel.code == code)
            .values(balance_micros=1)
        )

    on_db(settings, corrupt)
    original = ledger.check
    outcome: list[str] = []

    async def post_meanwhile() -> None:
        url = settings.effective_database_url
        options: dict[str, Any] = {"connect_args": {"timeout": 0.2}} if settings.is_sqlite else {}
        engine = create_async_engine(url, **options)
        try:
            async with AsyncSession(engine) as other:
                grant = postings.grant(wallet=wallet, amount=USD, key="grant:meanwhile")
                await ledger.post(other, grant)
                await other.commit()
                outcome.append("posted")
        except OperationalError as exc:
            outcome.append(f"waited: {exc.orig}")
        finally:
            await engine.dispose()

    async def racing_check(session: AsyncSession, *, repair: bool = False) -> ledger.LedgerReport:
        if repair and not outcome:
            await original(session)  # the snapshot is taken (and the stale balance found)
            await post_meanwhile()
        return await original(session, repair=repair)

    with monkeypatch.context() as patch:
        patch.setattr(ledger, "check", racing_check)
        raced = cli("admin", "ledger-check", "--repair", env=env)
    if settings.is_sqlite:
        assert outcome == ["waited: database is locked"]
        assert raced.exit_code == 0, raced.output
        assert available(settings, wallet) == 10 * USD
    else:
        assert outcome == ["posted"]
        assert raced.exit_code == 1, raced.output
        assert "the books changed (or the database was busy)" in raced.stderr
        assert cli("admin", "ledger-check", env=env).exit_code == 1  # still stale, not lost
        assert cli("admin", "ledger-check", "--repair", env=env).exit_code == 0
        assert available(settings, wallet) == 11 * USD


def test_negative_balances_are_listed_for_information(
    cli: Cli, env: dict[str, str], settings: ServerSettings
) -> None:
    _email, wallet = make_user(cli, env)
    dispute = postings.card_money_returned(
        wallet=wallet, amount=3 * USD, key="stripe:dp_test", kind="dispute", memo="disputed"
    )

    async def post(session: AsyncSession) -> None:
        await ledger.post(session, dispute)

    on_db(settings, post)
    checked = cli("admin", "ledger-check", env=env)
    assert checked.exit_code == 0, checked.output
    assert "1 negative account(s), for information:" in checked.stdout
    assert f"{accounts.available(wallet)}: -$3.00" in checked.stdout
    report = as_json(cli("admin", "ledger-check", "--json", env=env))
    assert report["ok"] is True
    assert report["negative_accounts"] == [
        {"account": accounts.available(wallet), "balance_micros": -3 * USD}
    ]


def test_grant_credits_exactly_the_amount_once_per_call(
    cli: Cli, env: dict[str, str], settings: ServerSettings
) -> None:
    email, wallet = make_user(cli, env)
    first = cli(
        "admin", "grant", "--email", email.upper(), "--amount", "12.50", "--memo", "beta", env=env
    )
    assert first.exit_code == 0, first.output
    assert f"granted $12.50 to {email}" in first.stdout
    assert "available credit now $12.50" in first.stdout
    assert available(settings, wallet) == 12_500_000

    second = cli("admin", "grant", "--email", email, "--amount", "$0.000001", "--json", env=env)
    assert second.exit_code == 0, second.output
    granted = as_json(second)
    assert granted["amount_micros"] == 1 and granted["available_micros"] == 12_500_001
    assert granted["wallet"] == wallet and granted["email"] == email
    assert available(settings, wallet) == 12_500_001

    async def grants(session: AsyncSession) -> list[tuple[str, str, str, str]]:
        rows = await session.execute(
            select(
                LedgerTransactionModel.kind,
                LedgerTransactionModel.memo,
                LedgerTransactionModel.idempotency_key,
                LedgerTransactionModel.id,
            ).order_by(LedgerTransactionModel.created_at)
        )
        return [(kind, memo, key, str(id_)) for kind, memo, key, id_ in rows]

    posted = on_db(settings, grants)
    assert [(kind, memo) for kind, memo, _key, _id in posted] == [
        ("grant", "beta"),
        ("grant", "Promotional credit granted by an operator."),
    ]
    assert posted[1][3] == granted["transaction_id"]
    keys = [key for _kind, _memo, key, _id in posted]
    assert all(key.startswith("grant:") for key in keys) and len(set(keys)) == 2
    promotions = on_db(settings, lambda s: ledger.balances(s, [accounts.PROMOTIONS]))
    assert promotions == {accounts.PROMOTIONS: -12_500_001}
    assert cli("admin", "ledger-check", env=env).exit_code == 0


def test_grant_to_an_unknown_user_is_not_found(
    cli: Cli, env: dict[str, str], settings: ServerSettings
) -> None:
    result = cli("admin", "grant", "--email", "nobody@example.com", "--amount", "5", env=env)
    assert result.exit_code == EXIT_NOT_FOUND
    assert "no user with the e-mail nobody@example.com" in result.stderr
    assert result.stdout == ""

    async def count(session: AsyncSession) -> int:
        return len((await session.scalars(select(LedgerTransactionModel.id))).all())

    assert on_db(settings, count) == 0


@pytest.mark.parametrize(
    ("amount", "reason"),
    [
        ("-5", "cannot be negative"),
        ("$-5", "cannot be negative"),
        ("0", "more than zero"),
        ("0.000000", "more than zero"),
        ("0.0000001", "at most 6 decimals"),
        ("12.3456789", "at most 6 decimals"),
        ("abc", "expected dollars"),
        ("1e3", "expected dollars"),
        ("nan", "expected dollars"),
        ("", "expected dollars"),
        ("$", "expected dollars"),
        ("1,00", "expected dollars"),
        ("1000000.000001", "at most $1,000,000.00 in one grant"),
    ],
)
def test_bad_amounts_are_refused_before_the_database_is_touched(
    cli: Cli, tmp_path: Path, amount: str, reason: str
) -> None:
    env = {"PEERGPU_DATA_DIR": str(tmp_path / "data"), "PEERGPU_DATABASE_URL": ""}
    result = cli("admin", "grant", "--email", "a@example.com", "--amount", amount, env=env)
    assert result.exit_code == EXIT_USAGE, result.output
    assert reason in result.stderr and result.stdout == ""
    assert not (tmp_path / "data").exists()


def test_a_bad_email_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    env = {"PEERGPU_DATA_DIR": str(tmp_path / "data"), "PEERGPU_DATABASE_URL": ""}
    result = cli("admin", "grant", "--email", "not-an-email", "--amount", "5", env=env)
    assert result.exit_code == EXIT_USAGE and "not a valid e-mail" in result.stderr


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("25", 25 * USD),
        ("12.50", 12_500_000),
        (" $7 ", 7 * USD),
        (".5", 500_000),
        ("3.", 3 * USD),
        ("1,000", 1000 * USD),
        ("0.000001", 1),
        ("1.0000000", USD),  # trailing zeros are not a fraction of a micro-dollar
        ("1000000", MAX_GRANT_MICROS),
    ],
)
def test_amounts_in_dollars(text: str, micros: int) -> None:
    assert parse_amount_micros(text, "--amount") == micros


async def test_refund_reverses_a_settled_job_once(
    cli: Cli, env: dict[str, str], context: ServerContext
) -> None:
    from sqlalchemy import update

    from peergpu.server.db.base import utcnow
    from peergpu.server.db.job_models import JobModel
    from peergpu.server.services import scheduler
    from peergpu.server.services.billing import settlement
    from tests.unit.scheduling import make_host, make_job, make_renter

    renter = await make_renter(context, credit=10 * USD)
    owner = await make_renter(context, credit=0)
    await make_host(context, owner, price=3_600_000, gpus=[("T4", 16000)])
    job = await make_job(context, renter)
    await scheduler.schedule_once(context)
    now = utcnow()
    async with context.sessionmaker() as session:
        await session.execute(
            update(JobModel)
            .where(JobModel.id == job)
            .values(state="succeeded", started_at=now - timedelta(seconds=30), finished_at=now)
        )
        await session.commit()
    await settlement.settle_open(context)
    refunded = await asyncio.to_thread(
        cli, "admin", "refund", str(job), "--platform-pays", "--json", env=env
    )
    assert refunded.exit_code == 0, refunded.output
    body = as_json(refunded)
    assert (body["amount_micros"], body["paid_by"]) == (30_000, "platform")
    again = await asyncio.to_thread(cli, "admin", "refund", str(job), env=env)
    assert again.exit_code == EXIT_API and "Nothing to refund" in again.stderr
    missing = await asyncio.to_thread(cli, "admin", "refund", str(uuid.uuid4()), env=env)
    assert missing.exit_code == EXIT_NOT_FOUND
    async with context.sessionmaker() as session:
        wallet = accounts.available(accounts.user_wallet(renter))
        assert (await ledger.balances(session, [wallet]))[wallet] == 10 * USD
