"""``peergpu admin``: operator commands that act on the database directly."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import EmailStr, TypeAdapter, ValidationError
from rich.markup import escape
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.cli.common import console, fail, load_settings
from peergpu.cli.output import (
    EXIT_API,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    parse_amount_micros,
    print_json,
)
from peergpu.cli.session import JsonOption
from peergpu.config import ServerSettings
from peergpu.errors import Conflict, NotFound, PeerGPUError
from peergpu.server.context import ServerContext
from peergpu.server.db import migrate
from peergpu.server.db.models import UserRole
from peergpu.server.services import accounts
from peergpu.server.services.billing import accounts as ledger_accounts
from peergpu.server.services.billing import admin as billing_admin
from peergpu.server.services.billing import ledger, postings
from peergpu.server.services.billing.ledger import LedgerReport, format_usd

T = TypeVar("T")

#: ``peergpu admin ledger-check`` found a problem (or ``--repair`` could not fix them all).
EXIT_LEDGER_PROBLEMS = 1

#: One grant at most: a typo guard (and far below what the balance columns hold).
MAX_GRANT_MICROS = 1_000_000 * postings.MICROS_PER_USD

#: ``25``, ``12.50``, ``$5``, ``1,000``, ``.5`` (the shape ``peergpu`` takes amounts in elsewhere)

app = typer.Typer(
    help="Operator commands (run where the server's settings are).", no_args_is_help=True
)


@app.command("create-user")
def create_user(
    email: Annotated[str, typer.Option(help="The user's e-mail.")],
    password: Annotated[
        str,
        typer.Option(
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            help="At least 10 characters; prompted if omitted.",
        ),
    ],
    role: Annotated[
        list[UserRole], typer.Option(help="Repeat for several roles: renter, host, admin.")
    ] = [UserRole.renter],  # noqa: B006 - Typer needs a literal default
    name: Annotated[str, typer.Option(help="Display name.")] = "",
) -> None:
    """Create a user with any roles, including admin."""
    try:
        email = TypeAdapter(EmailStr).validate_python(email)
    except ValidationError:
        fail(f"not a valid e-mail address: {email!r}")
    if len(password) < 10:
        fail("the password needs at least 10 characters")
    settings = load_settings()

    async def run() -> str:
        context = ServerContext.build(settings)
        try:
            await migrate.upgrade(context.engine)
            async with context.sessionmaker() as session:
                user = await accounts.create_user(
                    session=session,
                    passwords=context.passwords,
                    email=email,
                    password=password,
                    roles=list(role),
                    display_name=name,
                )
                return str(user.id)
        finally:
            await context.close()

    try:
        user_id = asyncio.run(run())
    except PeerGPUError as exc:
        fail(exc.message)
    console.print(f"created user {email} ({', '.join(r.value for r in role)}) id={user_id}")


@app.command("ledger-check")
def ledger_check(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair", help="Rewrite cached balances that differ from their entries' sum."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Re-derive the books from the ledger entries and report what does not add up.

    Checked: each transaction and all balances sum to zero; cached balances match their entries.

    Each wallet's held credit must equal its open job holds. Negative balances are only listed.

    Exit codes: 0 consistent (with --repair: once repaired); 1 a problem remains; 5 no database.
    """
    settings = load_settings()

    async def check(session: AsyncSession) -> tuple[LedgerReport, LedgerReport | None]:
        await _begin_snapshot(session, write=repair)
        found = await ledger.check(session, repair=repair)
        await session.commit()
        if not (repair and found.stale_balances):
            return found, None
        await _begin_snapshot(session, write=False)
        after = await ledger.check(session)
        await session.commit()
        return found, after

    found, after = _run_on_database(settings, check)
    final = after or found
    if as_json:
        data = _report_json(final)
        if repair:
            data["repaired"] = found.stale_balances if after is not None else []
        print_json(data)
    else:
        _print_report(found)
        if after is not None:
            console.print(f"[green]repaired {len(found.stale_balances)} cached balance(s):[/]")
            for stale in found.stale_balances:
                console.print(
                    f"  {escape(stale['account'])}: {format_usd(stale['cached_micros'])} -> "
                    f"{format_usd(stale['derived_micros'])}",
                    highlight=False,
                )
            if after.ok:
                console.print("[green]the books are consistent now[/]")
            else:
                console.print("[red]problems remain that --repair does not fix:[/]")
                _print_problems(after)
        elif repair and not found.ok:
            console.print("nothing that --repair fixes (only stale cached balances are).")
        elif found.stale_balances:
            console.print("--repair rewrites stale cached balances from their entries.")
    if not final.ok:
        raise typer.Exit(EXIT_LEDGER_PROBLEMS)


@app.command("grant")
def grant(
    email: Annotated[str, typer.Option(help="The user's e-mail.", show_default=False)],
    amount: Annotated[
        str,
        typer.Option(help="Dollars, e.g. 25 or 12.50 (at most 6 decimals).", show_default=False),
    ],
    memo: Annotated[str, typer.Option(help="Why, kept on the ledger transaction.")] = "",
    as_json: JsonOption = False,
) -> None:
    """Give a user promotional credit (from platform:promotions to their available credit).

    Exit codes: 0 granted; 2 a bad amount or e-mail; 4 no such user; 5 no database.
    """
    micros = parse_amount_micros(amount, "--amount")
    if micros > MAX_GRANT_MICROS:
        fail(
            escape(f"--amount {amount!r}: at most {format_usd(MAX_GRANT_MICROS)} in one grant"),
            code=EXIT_USAGE,
        )
    try:
        address = TypeAdapter(EmailStr).validate_python(email)
    except ValidationError:
        fail(escape(f"not a valid e-mail address: {email!r}"), code=EXIT_USAGE)
    settings = load_settings()

    async def give(session: AsyncSession) -> dict[str, Any] | None:
        try:
            wallet = await billing_admin.grant_wallet(session=session, email=address)
        except NotFound:
            return None
        # the service's path (as POST /admin/billing/grants): a fresh grant:<uuid4> key each time
        transaction_id = await billing_admin.grant(
            session=session,
            wallet=wallet,
            amount=micros,
            memo=memo or "Promotional credit granted by an operator.",
            actor_id=None,
        )
        available = ledger_accounts.available(wallet)
        balance = (await ledger.balances(session, [available]))[available]
        return {
            "transaction_id": str(transaction_id),
            "email": accounts.normalize_email(address),
            "wallet": wallet,
            "amount_micros": micros,
            "available_micros": balance,
        }

    granted = _run_on_database(settings, give)
    if granted is None:
        fail(escape(f"no user with the e-mail {address}"), code=EXIT_NOT_FOUND)
    if as_json:
        print_json(granted)
        return
    console.print(
        f"granted {format_usd(micros)} to {escape(granted['email'])} "
        f"({granted['wallet']}); available credit now "
        f"{format_usd(granted['available_micros'])} (transaction {granted['transaction_id']})",
        highlight=False,
    )


@app.command("refund")
def refund(
    job_id: Annotated[uuid.UUID, typer.Argument(help="The job to refund.", show_default=False)],
    platform_pays: Annotated[
        bool,
        typer.Option(
            "--platform-pays",
            help="The platform pays the refund; the host keeps its earnings (default: the "
            "charge is reversed, the host's share and the fee included).",
        ),
    ] = False,
    memo: Annotated[str, typer.Option(help="Why, kept on the ledger transaction.")] = "",
    as_json: JsonOption = False,
) -> None:
    """Refund what a job was charged, as reversing transactions; once per job.

    Exit codes: 0 refunded; 4 no such job; 5 no database; 6 nothing left to refund.
    """
    settings = load_settings()

    async def give_back(session: AsyncSession) -> dict[str, Any] | PeerGPUError:
        try:
            txs, amount, wallet = await billing_admin.refund_job(
                session=session,
                job_id=job_id,
                memo=memo,
                actor_id=None,
                platform_pays=platform_pays,
            )
        except (NotFound, Conflict) as exc:
            return exc
        return {
            "job_id": str(job_id),
            "wallet": wallet,
            "amount_micros": amount,
            "transaction_ids": [str(tx) for tx in txs],
            "paid_by": "platform" if platform_pays else "reversal",
        }

    done = _run_on_database(settings, give_back)
    if isinstance(done, PeerGPUError):
        fail(escape(done.message), code=EXIT_NOT_FOUND if isinstance(done, NotFound) else EXIT_API)
    if as_json:
        print_json(done)
        return
    console.print(
        f"refunded {format_usd(done['amount_micros'])} of job {job_id} to {done['wallet']}"
        + (" (paid by the platform)" if platform_pays else " (charge reversed)"),
        highlight=False,
    )


def _run_on_database(settings: ServerSettings, action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Migrate, then run ``action`` in one session; database errors become one line."""

    async def run() -> T:
        context = ServerContext.build(settings)
        try:
            await migrate.upgrade(context.engine)
            async with AsyncSession(context.engine, expire_on_commit=False) as session:
                return await action(session)
        finally:
            await context.close()

    try:
        return asyncio.run(run())
    except PeerGPUError as exc:
        fail(escape(exc.message))
    except DBAPIError as exc:
        if _changed_meanwhile(exc):
            fail("the books changed (or the database was busy) while this ran; run it again")
        fail(escape(f"database error: {exc.orig}"), code=EXIT_UNREACHABLE)
    except OSError as exc:
        fail(escape(f"cannot reach the database: {exc}"), code=EXIT_UNREACHABLE)


async def _begin_snapshot(session: AsyncSession, *, write: bool) -> None:
    """Start a transaction that reads one consistent snapshot, so that a check beside a live
    server sees no posting half-way (its entries but not its balances), and a repair never
    overwrites a balance that a posting moved after the check read it. PostgreSQL: REPEATABLE
    READ (such a repair fails with a serialization error instead). SQLite: BEGIN (its reads
    otherwise run outside any transaction), BEGIN IMMEDIATE to repair (the write lock is taken
    first, so postings wait for the repair)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    else:
        await session.execute(text("BEGIN IMMEDIATE" if write else "BEGIN"))


def _changed_meanwhile(error: DBAPIError) -> bool:
    """A serialization failure or deadlock (PostgreSQL), or a stale snapshot (SQLite)."""
    code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    return code in ("40001", "40P01") or "database is locked" in str(error.orig)


def _report_json(report: LedgerReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "transactions": report.transactions,
        "accounts": report.accounts,
        "total_micros": report.total_micros,
        "unbalanced_transactions": report.unbalanced_transactions,
        "unknown_accounts": report.unknown_accounts,
        "stale_balances": report.stale_balances,
        "holds_mismatched": report.holds_mismatched,
        "negative_accounts": report.negative_accounts,
    }


def _print_report(report: LedgerReport) -> None:
    console.print(
        f"{report.transactions} transactions, {report.accounts} accounts, "
        f"balances sum to {format_usd(report.total_micros)}",
        highlight=False,
    )
    if report.ok:
        console.print(
            "[green]ok[/]: every transaction balances, cached balances match their entries, "
            "held credit matches the open holds"
        )
    else:
        _print_problems(report)
    if report.negative_accounts:
        console.print(f"{len(report.negative_accounts)} negative account(s), for information:")
        for negative in report.negative_accounts:
            console.print(
                f"  {escape(negative['account'])}: {format_usd(negative['balance_micros'])}",
                highlight=False,
            )


def _print_problems(report: LedgerReport) -> None:
    if report.total_micros:
        console.print(
            f"[red]problem[/]: all balances sum to {format_usd(report.total_micros)}, not zero",
            highlight=False,
        )
    for transaction in report.unbalanced_transactions:
        console.print(f"[red]unbalanced transaction[/] {transaction}", highlight=False)
    for code in report.unknown_accounts:
        console.print(f"[red]entries name a missing account[/] {escape(code)}", highlight=False)
    for stale in report.stale_balances:
        console.print(
            f"[red]stale balance[/] {escape(stale['account'])}: cached "
            f"{format_usd(stale['cached_micros'])}, its entries sum to "
            f"{format_usd(stale['derived_micros'])}",
            highlight=False,
        )
    for mismatch in report.holds_mismatched:
        console.print(
            f"[red]held credit mismatch[/] {escape(mismatch['wallet'])}: held "
            f"{format_usd(mismatch['held_micros'])}, open holds "
            f"{format_usd(mismatch['open_holds_micros'])}",
            highlight=False,
        )
