"""``peergpu usage``: your wallet's inference requests through the OpenAI-compatible gateway
(``/v1``), or their totals by API key, model or day. A thin layer over the SDK's usage
methods."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from peergpu.cli.common import console, fail
from peergpu.cli.output import (
    EXIT_USAGE,
    handle_errors,
    notice,
    print_json,
    print_table,
    usd,
    when,
)
from peergpu.cli.session import JsonOption, connect
from peergpu.client.usage import UsageLine, UsageSummary

_RELATIVE = re.compile(r"^(\d{1,6})([mhd])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
_OUTCOME_STYLES = {"ok": "green", "cancelled": "yellow", "error": "red"}


class By(StrEnum):
    key = "key"
    model = "model"
    day = "day"


def usage(
    summary: Annotated[
        bool, typer.Option("--summary", help="Totals per group instead of the requests.")
    ] = False,
    by: Annotated[
        By | None,
        typer.Option(
            "--by",
            help="Group the summary by API key, model or UTC day (implies "
            "--summary; default: model).",
        ),
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this API key's (its id).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model's.")] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="TIME|AGO",
            help="From this time (ISO 8601, UTC without an offset) or this long ago (30m, "
            "24h, 7d). The summary's default: 30 days.",
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", metavar="TIME|AGO", help="Before this time.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="How many requests.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (newest first).")] = 0,
    org: Annotated[
        str | None, typer.Option("--org", help="An organization's wallet instead of your own.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Your inference requests (newest first: tokens, cost, latency, whether billed yet), or
    with --summary their requests, tokens and cost per API key, model or day."""
    start, end = _moment(since, "--since"), _moment(until, "--until")
    filters = {"org_id": org, "api_key_id": key, "model": model, "since": start, "until": end}
    if summary or by is not None:
        with connect() as client, handle_errors():
            found = client.usage_summary(group_by=(by or By.model).value, **filters)
        if as_json:
            print_json(found.to_json())
        else:
            _print_summary(found)
        return
    with connect() as client, handle_errors():
        page = client.usage(limit=limit, offset=offset, **filters)
    if as_json:
        print_json(page.to_json())
        return
    if not page.items:
        console.print("no inference requests")
        return
    print_table(_requests_table(page.items))
    if page.total > offset + len(page.items):
        notice(f"{len(page.items)} of {page.total} requests; see more with --offset/--limit")


def _moment(text: str | None, option: str) -> str | None:
    """``7d`` / ``24h`` / ``30m`` ago as an ISO time; anything else goes to the server as
    given (it answers a time it cannot read with a clear error)."""
    if text is None:
        return None
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative is None:
        if not text:
            fail(f"{option}: give a time (2025-01-31T12:00) or a duration (7d)", code=EXIT_USAGE)
        return text
    amount, unit = int(relative.group(1)), _UNITS[relative.group(2)]
    return (datetime.now(UTC) - timedelta(**{unit: amount})).isoformat()


def _requests_table(items: list[UsageLine]) -> Table:
    table = Table(show_edge=False, pad_edge=False)
    for column in ("AT", "MODEL", "KEY"):
        table.add_column(column, no_wrap=True)
    for column in ("PROMPT", "COMPLETION", "COST", "LATENCY"):
        table.add_column(column, justify="right")
    table.add_column("OUTCOME", no_wrap=True)
    table.add_column("BILLED", no_wrap=True)
    for line in items:
        style = _OUTCOME_STYLES.get(line.outcome, "white")
        table.add_row(
            when(line.created_at),
            escape(line.model),
            (line.api_key_id or "-")[:8],
            f"{line.prompt_tokens:,}",
            f"{line.completion_tokens:,}",
            escape(line.cost_usd or usd(line.cost_micros)),
            f"{line.latency_ms:,} ms",
            f"[{style}]{escape(line.outcome)}[/]",
            "yes" if line.billed_at else "[dim]not yet[/]",
        )
    return table


def _print_summary(found: UsageSummary) -> None:
    window = f"since {when(found.since)}" + (f" until {when(found.until)}" if found.until else "")
    notice(escape(f"{found.wallet}, {window}"))
    if not found.groups:
        console.print("no inference requests")
        return
    table = Table(show_edge=False, pad_edge=False, show_footer=True)
    table.add_column(found.group_by.upper(), no_wrap=True, footer="TOTAL")
    totals = found.total
    for column, total in (
        ("REQUESTS", f"{totals.requests:,}"),
        ("PROMPT", f"{totals.prompt_tokens:,}"),
        ("COMPLETION", f"{totals.completion_tokens:,}"),
        ("COST", escape(totals.cost_usd or usd(totals.cost_micros))),
    ):
        table.add_column(column, justify="right", footer=total)
    for group in found.groups:
        label = group.key or "(session tokens)"
        if group.name:
            label = f"{group.name} ({label[:8]})"
        table.add_row(
            escape(label),
            f"{group.requests:,}",
            f"{group.prompt_tokens:,}",
            f"{group.completion_tokens:,}",
            escape(group.cost_usd or usd(group.cost_micros)),
        )
    print_table(table)
