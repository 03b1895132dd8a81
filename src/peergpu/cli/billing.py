"""``peergpu billing``: your wallet's balance, card top-ups, transactions and settings.
A thin layer over the SDK's billing methods; amounts are typed in dollars."""

from __future__ import annotations

import webbrowser
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from peergpu.cli.common import console, fail
from peergpu.cli.output import (
    EXIT_CODES_HELP,
    EXIT_PAYMENT,
    EXIT_USAGE,
    dollars,
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
from peergpu.client.billing import UNSET, Setting
from peergpu.client.models import Balance, JobEstimate, Receipt, Transaction

app = typer.Typer(
    help="Your credit: balance, card top-ups, transactions, spending cap and automatic "
    "top-up. Amounts are in dollars (25, 12.50, $5).\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
)

OrgOption = Annotated[
    str | None, typer.Option("--org", help="An organization's wallet instead of your own.")
]
OpenOption = Annotated[
    bool, typer.Option("--open/--no-open", help="Also open the link in your web browser.")
]


@app.command()
def balance(org: OrgOption = None, as_json: JsonOption = False) -> None:
    """Credit available and held by running jobs, the monthly cap and automatic top-up."""
    with connect() as client, handle_errors():
        found = client.balance(org_id=org)
    if as_json:
        print_json(found.to_json())
        return
    print_balance(found)


@app.command()
def topup(
    amount: Annotated[
        str,
        typer.Argument(
            metavar="AMOUNT", help="Dollars to add, e.g. 25 or 12.50.", show_default=False
        ),
    ],
    org: OrgOption = None,
    open_browser: OpenOption = False,
    as_json: JsonOption = False,
) -> None:
    """Buy credit by card: prints the Stripe Checkout link to pay on. The credit arrives
    once the payment goes through (see `peergpu billing balance`)."""
    micros = parse_amount_micros(amount, "AMOUNT")
    with connect() as client, handle_errors("cannot start a top-up"):
        checkout = client.checkout(micros, org_id=org)
    if as_json:
        print_json(checkout.to_json())
    else:
        what = escape(f"{checkout.amount_usd or usd(micros)} for {checkout.wallet}")
        notice(f"pay {what} here (the credit arrives once the payment goes through):")
        console.print(checkout.url, highlight=False, soft_wrap=True)
    if open_browser and not webbrowser.open(checkout.url):
        notice("[yellow]could not open a browser;[/] open the link above yourself")


@app.command()
def transactions(
    kind: Annotated[
        str | None,
        typer.Option(help="Only this kind: topup, grant, hold, settle, release, refund, ..."),
    ] = None,
    job: Annotated[str | None, typer.Option("--job", help="Only this job's.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="How many.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (newest first).")] = 0,
    org: OrgOption = None,
    as_json: JsonOption = False,
) -> None:
    """The wallet's transactions, newest first, with their effect on available and held
    credit (a hold moves credit from available to held until the job is settled)."""
    with connect() as client, handle_errors():
        page = client.transactions(org_id=org, kind=kind, job_id=job, limit=limit, offset=offset)
    if as_json:
        print_json(page.to_json())
        return
    if not page.items:
        console.print("no transactions")
        return
    print_table(_transactions_table(page.items))
    if page.total > offset + len(page.items):
        notice(f"{len(page.items)} of {page.total} transactions; see more with --offset/--limit")


@app.command()
def settings(
    monthly_cap: Annotated[
        str | None,
        typer.Option(
            "--monthly-cap",
            metavar="USD|none",
            help="Spend at most this much per calendar month; `none` removes the cap.",
        ),
    ] = None,
    auto_topup_below: Annotated[
        str | None,
        typer.Option(
            "--auto-topup-below",
            metavar="USD",
            help="Charge the saved card when available credit falls below this "
            "(with --auto-topup-amount).",
        ),
    ] = None,
    auto_topup_amount: Annotated[
        str | None,
        typer.Option("--auto-topup-amount", metavar="USD", help="How much to charge then."),
    ] = None,
    no_auto_topup: Annotated[
        bool, typer.Option("--no-auto-topup", help="Turn the automatic top-up off.")
    ] = False,
    org: OrgOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show or change the spending cap and the automatic top-up (without options: show).
    An organization's settings need its admin role."""
    cap = _cap(monthly_cap)
    below, top_up = _auto_topup(auto_topup_below, auto_topup_amount, no_auto_topup)
    changing = any(setting is not UNSET for setting in (cap, below, top_up))
    with connect() as client, handle_errors("cannot change the settings"):
        if changing:
            found = client.update_billing_settings(
                org_id=org,
                monthly_cap_micros=cap,
                auto_topup_below_micros=below,
                auto_topup_amount_micros=top_up,
            )
        else:
            found = client.balance(org_id=org)
    if as_json:
        print_json(found.to_json())
        return
    print_balance(found)
    if changing:
        notice("settings saved")


# -- shown elsewhere too -----------------------------------------------------------------------


def print_balance(found: Balance) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    cap = "none"
    if found.monthly_cap_micros is not None:
        cap = f"{usd(found.monthly_cap_micros)} a month ({usd(found.monthly_cap_left_micros)} left)"
    auto = "off"
    if found.auto_topup_amount_micros is not None:
        auto = (
            f"add {usd(found.auto_topup_amount_micros)} when below "
            f"{usd(found.auto_topup_below_micros)}"
        )
        if not found.card_saved:
            auto += " (no card saved yet: top up once by card)"
    rows = [
        ("wallet", found.wallet),
        ("available", found.available_usd or usd(found.available_micros)),
        ("held", f"{found.held_usd or usd(found.held_micros)} (by running jobs)"),
        ("monthly cap", cap),
        ("auto top-up", auto),
        ("card saved", "yes" if found.card_saved else "no"),
    ]
    for label, value in rows:
        grid.add_row(label, escape(value))
    print_table(grid)


def print_estimate(found: JobEstimate, *, as_json: bool) -> int:
    """``jobs submit --dry-run``: print an estimate; the exit code: 0 when the credit covers
    the job's hold, else 7 (like a 402)."""
    code = 0 if found.enough_credit else EXIT_PAYMENT
    if as_json:
        print_json(found.to_json())
        return code
    price = "-"
    if found.price_per_gpu_hour_micros is not None:
        price = f"{dollars(found.price_per_gpu_hour_micros)} per GPU-hour (cheapest eligible host)"
    cap_left = found.monthly_cap_left_micros
    rows = [
        ("hosts", f"{found.eligible_hosts} can run it, {found.free_hosts} free now"),
        ("price", price),
        ("cost per hour", usd(found.cost_per_hour_micros)),
        ("run time", f"at most {duration(found.run_seconds)}"),
        ("hold", found.hold_usd or usd(found.hold_micros)),
        ("available", usd(found.available_micros)),
        ("monthly cap left", "no cap" if cap_left is None else usd(cap_left)),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, escape(value))
    grid.add_row("credit", "[green]enough[/]" if found.enough_credit else "[red]not enough[/]")
    print_table(grid)
    if found.enough_credit:
        notice(escape(found.message))
    else:
        notice(f"[bold red]not enough credit:[/] {escape(found.message)}")
    return code


def print_receipt(found: Receipt) -> None:
    """``jobs receipt``: the totals, then one row per attempt."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    settled = "yes" if found.settled else "no (credit is still held while the job runs)"
    for label, value in (
        ("job", found.job_id),
        ("state", styled_state(found.state)),
        ("wallet", escape(found.wallet)),
        ("held", usd(found.held_micros)),
        ("charged", usd(found.charged_micros)),
        ("refunded", usd(found.refunded_micros)),
        ("total", f"[bold]{escape(found.total_usd or usd(found.total_micros))}[/]"),
        ("settled", settled),
    ):
        grid.add_row(label, value)
    print_table(grid)
    if not found.charges:
        notice("no charges: the job never started on a host")
        return
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("ATTEMPT", justify="right")
    table.add_column("HOST", no_wrap=True)
    table.add_column("$/GPU-H", justify="right")
    table.add_column("GPUS", justify="right")
    table.add_column("HOLD", justify="right")
    table.add_column("BILLED", justify="right")
    table.add_column("CHARGED", justify="right")
    table.add_column("OUTCOME")
    for charge in found.charges:
        ended = charge.settled_at is not None
        table.add_row(
            str(charge.attempt),
            charge.host_id or "-",
            dollars(charge.price_per_gpu_hour_micros),
            str(charge.gpu_count),
            usd(charge.hold_micros),
            duration(charge.billed_seconds) if ended else "-",
            usd(charge.charged_micros) if ended else "-",
            escape(charge.outcome or "-") if ended else "[blue]running[/]",
        )
    print_table(table)


# -- helpers -------------------------------------------------------------------------------


def _cap(text: str | None) -> Setting:
    if text is None:
        return UNSET
    if text.strip().lower() in ("none", "off"):
        return None
    return parse_amount_micros(text, "--monthly-cap", allow_zero=True)


def _auto_topup(below: str | None, amount: str | None, off: bool) -> tuple[Setting, Setting]:
    if off:
        if below is not None or amount is not None:
            fail("--no-auto-topup cannot be combined with --auto-topup-below/-amount", EXIT_USAGE)
        return None, None
    if below is None and amount is None:
        return UNSET, UNSET
    if below is None or amount is None:
        fail("give --auto-topup-below and --auto-topup-amount together", EXIT_USAGE)
    return (
        parse_amount_micros(below, "--auto-topup-below", allow_zero=True),
        parse_amount_micros(amount, "--auto-topup-amount"),
    )


def _transactions_table(items: list[Transaction]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    for column in ("AT", "KIND"):
        table.add_column(column, no_wrap=True)
    table.add_column("AVAILABLE", justify="right")
    table.add_column("HELD", justify="right")
    table.add_column("JOB", no_wrap=True)
    table.add_column("MEMO")
    for line in items:
        table.add_row(
            when(line.at),
            escape(line.kind),
            _signed(line.available_change_micros),
            _signed(line.held_change_micros),
            line.job_id or "-",
            escape(line.memo or ""),
        )
    return table


def _signed(micros: int) -> str:
    if micros == 0:
        return "[dim]-[/]"
    text = usd(micros)
    return f"[green]+{text}[/]" if micros > 0 else f"[red]{text}[/]"
