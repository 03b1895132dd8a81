"""``peergpu hosts``: browse the marketplace, list your own hosts, enrol a new machine."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from peergpu.cli.common import console
from peergpu.cli.output import (
    EXIT_CODES_HELP,
    dollars,
    handle_errors,
    mib,
    notice,
    parse_price,
    parse_price_micros,
    print_json,
    print_table,
    styled_state,
)
from peergpu.cli.session import JsonOption, connect
from peergpu.client import Host, MarketHost

app = typer.Typer(
    help="Find GPUs to rent, or manage the machines you rent out.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
)

TagOption = Annotated[list[str] | None, typer.Option("--tag", help="A tag (repeatable).")]


@app.command("list")
def list_hosts(
    gpu_model: Annotated[
        str | None, typer.Option("--gpu-model", help='GPU model contains this, e.g. "H100".')
    ] = None,
    min_vram: Annotated[
        int | None, typer.Option("--min-vram", help="At least this much memory per GPU, MiB.")
    ] = None,
    min_gpus: Annotated[
        int | None, typer.Option("--min-gpus", help="At least this many free GPUs.")
    ] = None,
    max_price: Annotated[
        str | None, typer.Option("--max-price", help="Dollars per GPU-hour at most.")
    ] = None,
    region: Annotated[str | None, typer.Option(help="Only hosts in this region.")] = None,
    tag: TagOption = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include offline hosts.")] = False,
    mine: Annotated[
        bool, typer.Option("--mine", help="Your own hosts instead of the marketplace.")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, max=500, help="How many.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Hosts on the marketplace, cheapest first (with --mine: your own hosts, online or not,
    with the same filters applied here)."""
    price_micros = parse_price_micros(max_price, "--max-price")
    with connect() as client, handle_errors():
        if mine:
            hosts = [
                h
                for h in client.list_my_hosts()
                if _matches(h, gpu_model, min_vram, min_gpus, price_micros, region, tag or [])
            ]
        else:
            page = client.list_marketplace_hosts(
                gpu_model=gpu_model,
                min_vram_mib=min_vram,
                min_gpus=min_gpus,
                max_price_per_gpu_hour_micros=price_micros,
                region=region,
                tags=tag or [],
                online=not show_all,
                limit=limit,
            )
    if mine:
        _print_my_hosts(hosts, as_json=as_json)
    else:
        _print_market(page.items, page.total, as_json=as_json)


@app.command("enroll-token")
def enroll_token(
    name: Annotated[str | None, typer.Option(help="The host's name.")] = None,
    region: Annotated[str | None, typer.Option(help='Where it is, e.g. "eu-west".')] = None,
    tag: TagOption = None,
    price: Annotated[
        str | None, typer.Option("--price", help="Your price, dollars per GPU-hour, e.g. 1.25.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a one-time token to enrol a machine as your host, and print the command to run
    on that machine (needs the host role)."""
    dollars_per_hour = parse_price(price, "--price")  # a bad amount never reaches the server
    with connect() as client, handle_errors("cannot create an enrolment token"):
        token = client.create_enrollment_token(
            name=name, region=region, tags=tag, price_per_gpu_hour=dollars_per_hour
        )
    if as_json:
        print_json(token.to_json())
        return
    console.print(f"token: [bold]{escape(token.token)}[/] (works once)", highlight=False)
    if token.expires_at is not None:
        notice(f"expires {token.expires_at.astimezone():%Y-%m-%d %H:%M}")
    notice("run this on the machine with the GPUs:")
    console.print(f"  {escape(token.command)}", highlight=False, soft_wrap=True)
    notice("then start it with: peergpu agent run")


# -- helpers -------------------------------------------------------------------------------


def _print_market(hosts: Sequence[MarketHost], total: int, *, as_json: bool) -> None:
    if as_json:
        print_json({"items": [h.to_json() for h in hosts], "total": total})
        return
    if not hosts:
        console.print("no hosts match")
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("ID", "NAME", "STATUS", "GPUS", "FREE", "$/GPU-H", "REGION", "UPTIME", "TAGS"):
        table.add_column(column, no_wrap=column == "ID")
    for host in hosts:
        table.add_row(
            host.id,
            escape(host.name),
            styled_state(host.status or "-"),
            escape(_gpu_summary([(g.model, g.memory_total_mib) for g in host.gpus])),
            str(host.free_gpus),
            dollars(host.price_per_gpu_hour_micros),
            escape(host.region or "-"),
            f"{host.uptime_30d:.0%}",
            escape(", ".join(host.tags) or "-"),
        )
    print_table(table)
    if total > len(hosts):
        notice(f"{len(hosts)} of {total} hosts; narrow the filters or raise --limit")


def _print_my_hosts(hosts: Sequence[Host], *, as_json: bool) -> None:
    if as_json:
        print_json({"items": [h.to_json() for h in hosts], "total": len(hosts)})
        return
    if not hosts:
        console.print("no hosts; enrol one with `peergpu hosts enroll-token`")
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("ID", "NAME", "STATUS", "GPUS", "$/GPU-H", "REGION", "UPTIME", "TAGS"):
        table.add_column(column, no_wrap=column == "ID")
    for host in hosts:
        table.add_row(
            host.id,
            escape(host.name),
            styled_state(host.availability or host.status or "-"),
            escape(_gpu_summary([(g.model, g.memory_total_mib) for g in host.gpus])),
            dollars(host.price_per_gpu_hour_micros),
            escape(host.region or "-"),
            f"{host.uptime_30d:.0%}",
            escape(", ".join(host.tags) or "-"),
        )
    print_table(table)


def _gpu_summary(gpus: Sequence[tuple[str, int]]) -> str:
    if not gpus:
        return "-"
    counts = Counter(gpus)
    return ", ".join(f"{n}x {model} ({mib(memory)})" for (model, memory), n in counts.items())


def _matches(
    host: Host,
    gpu_model: str | None,
    min_vram: int | None,
    min_gpus: int | None,
    max_price_micros: int | None,
    region: str | None,
    tags: Sequence[str],
) -> bool:
    """The marketplace's filters, applied to your own hosts."""
    gpus = [
        g
        for g in host.gpus
        if (gpu_model is None or gpu_model.lower() in g.model.lower())
        and (min_vram is None or g.memory_total_mib >= min_vram)
    ]
    price = host.price_per_gpu_hour_micros
    return (
        (bool(gpus) or (gpu_model is None and min_vram is None))
        and (min_gpus is None or len(gpus) >= min_gpus)
        and (max_price_micros is None or (price is not None and price <= max_price_micros))
        and (region is None or host.region == region)
        and set(tags) <= set(host.tags)
    )
