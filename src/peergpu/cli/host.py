"""``peergpu host``: what your hosts earned, and getting it paid out (Stripe Connect).
A thin layer over the SDK. (Listing and enrolling hosts is ``peergpu hosts``.)"""

from __future__ import annotations

import webbrowser
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from peergpu.cli.common import console
from peergpu.cli.output import (
    EXIT_CODES_HELP,
    duration,
    handle_errors,
    notice,
    parse_amount_micros,
    print_json,
    print_table,
    styled_state,
    usd,
    when,
)
from peergpu.cli.session import JsonOption, connect
from peergpu.client.models import Earnings, Payout, PayoutAccount

app = typer.Typer(
    help="Your earnings as a host owner, and payouts to your bank through Stripe. Amounts "
    "are in dollars (25, 12.50, $5).\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
)

PAYOUT_STYLES = {"pending": "cyan", "paid": "green", "failed": "red", "reversed": "magenta"}


@app.command()
def earnings(
    days: Annotated[int, typer.Option(min=1, max=366, help="How many days back.")] = 30,
    as_json: JsonOption = False,
) -> None:
    """Your hosts' earnings per day (after the platform fee), what is payable now and what
    was paid out."""
    with connect() as client, handle_errors():
        found = client.earnings(days=days)
    if as_json:
        print_json(found.to_json())
        return
    _print_earnings(found, days)


@app.command()
def onboard(
    open_browser: Annotated[
        bool, typer.Option("--open/--no-open", help="Also open the link in your web browser.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Set up (or finish setting up) payouts: prints Stripe's onboarding link, where you
    give your bank details. The link works once, for a few minutes; run this again for a
    fresh one."""
    with connect() as client, handle_errors("cannot start onboarding"):
        link = client.start_payout_onboarding()
    if as_json:
        print_json(link.to_json())
    else:
        notice("finish setting up payouts on Stripe (the link works once):")
        console.print(link.url, highlight=False, soft_wrap=True)
        if link.expires_at is not None:
            notice(f"expires {when(link.expires_at)}; then see `peergpu host account`")
    if open_browser and not webbrowser.open(link.url):
        notice("[yellow]could not open a browser;[/] open the link above yourself")


@app.command()
def account(as_json: JsonOption = False) -> None:
    """Whether payouts are set up, what is payable now, and the smallest payout."""
    with connect() as client, handle_errors():
        found = client.payout_account()
    if as_json:
        print_json(found.to_json())
        return
    _print_account(found)


@app.command()
def payout(
    amount: Annotated[
        str | None,
        typer.Argument(
            metavar="AMOUNT",
            help="Dollars to pay out, e.g. 50 \\[default: everything payable].",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Pay earnings out to your Stripe account (set it up first with `peergpu host
    onboard`). More than is payable exits with 7."""
    micros = None if amount is None else parse_amount_micros(amount, "AMOUNT")
    with connect() as client, handle_errors("cannot pay out"):
        done = client.request_payout(micros)
    if as_json:
        print_json(done.to_json())
        return
    console.print(
        f"payout {done.id}: {escape(done.amount_usd or usd(done.amount_micros))} "
        f"{_styled(done.state)}",
        highlight=False,
    )
    if done.state == "pending":
        notice("Stripe has not confirmed it yet; the server retries (see `peergpu host payouts`)")
    elif done.message:
        notice(escape(done.message))


@app.command()
def payouts(
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (newest first).")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Your payouts, newest first."""
    with connect() as client, handle_errors():
        page = client.payouts(limit=limit, offset=offset)
    if as_json:
        print_json(page.to_json())
        return
    if not page.items:
        console.print("no payouts yet")
        return
    print_table(_payouts_table(page.items))
    if page.total > offset + len(page.items):
        notice(f"{len(page.items)} of {page.total} payouts; see more with --offset/--limit")


# -- helpers -------------------------------------------------------------------------------


def _print_earnings(found: Earnings, days: int) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("payable now", escape(found.payable_usd or usd(found.payable_micros)))
    grid.add_row("paid out", usd(found.paid_out_micros))
    print_table(grid)
    if not found.days:
        console.print(f"no earnings in the last {days} days")
        return
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("DAY", no_wrap=True)
    for column in ("JOBS", "GPU TIME", "EARNED"):
        table.add_column(column, justify="right")
    for day in found.days:
        table.add_row(
            day.day.isoformat(),
            str(day.jobs),
            duration(day.gpu_seconds),
            escape(day.earned_usd or usd(day.earned_micros)),
        )
    print_table(table)


def _print_account(found: PayoutAccount) -> None:
    if found.payouts_enabled:
        state = "[green]payouts enabled[/]"
    elif found.stripe_account_id:
        state = "[yellow]onboarding not finished[/]; run `peergpu host onboard`"
    else:
        state = "not set up; run `peergpu host onboard`"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("payouts", state)
    grid.add_row("stripe account", escape(found.stripe_account_id or "-"))
    grid.add_row("payable now", escape(found.payable_usd or usd(found.payable_micros)))
    grid.add_row("smallest payout", escape(found.payout_min_usd or usd(found.payout_min_micros)))
    print_table(grid)


def _payouts_table(items: list[Payout]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    table.add_column("AMOUNT", justify="right")
    table.add_column("STATE")
    table.add_column("REVERSED", justify="right")
    table.add_column("TRANSFER", no_wrap=True)
    table.add_column("MESSAGE")
    for item in items:
        table.add_row(
            item.id,
            when(item.created_at),
            escape(item.amount_usd or usd(item.amount_micros)),
            _styled(item.state),
            usd(item.reversed_micros) if item.reversed_micros else "-",
            escape(item.stripe_transfer_id or "-"),
            escape(item.message or ""),
        )
    return table


def _styled(state: str) -> str:
    if state in PAYOUT_STYLES:
        return f"[{PAYOUT_STYLES[state]}]{escape(state)}[/]"
    return styled_state(state)
