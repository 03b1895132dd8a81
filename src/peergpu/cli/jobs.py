"""``peergpu jobs``: submit jobs, watch them, fetch their results. A thin layer over the SDK."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, TypedDict

import typer
from rich.markup import escape
from rich.table import Table

from peergpu.cli.billing import print_estimate, print_receipt
from peergpu.cli.common import console, fail
from peergpu.cli.output import (
    EXIT_CODES_HELP,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    dollars,
    duration,
    handle_errors,
    job_exit_code,
    mib,
    notice,
    parse_amount_micros,
    parse_price_micros,
    print_json,
    print_table,
    progress_bar,
    styled_state,
    usd,
    when,
)
from peergpu.cli.session import JsonOption, connect
from peergpu.client import Job, JobUpdate, LogLine, PeerGPU, zip_directory

app = typer.Typer(
    help="Submit jobs, follow their logs, download their results.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
)


class _Spec(TypedDict):
    """The job options ``submit`` and ``submit --dry-run`` pass on alike."""

    image: str | None
    name: str | None
    org_id: str | None
    env: dict[str, str] | None
    gpu_count: int | None
    min_vram_mib: int | None
    gpu_models: list[str] | None
    max_price_per_gpu_hour_micros: int | None
    max_cost_micros: int | None
    tags: list[str] | None
    max_duration_seconds: int | None
    priority: int | None
    network: bool | None
    max_retries: int | None


JobId = Annotated[str, typer.Argument(help="The job's id.", show_default=False)]
FollowOption = Annotated[
    bool, typer.Option("--follow", "-f", help="Stream logs until the job ends.")
]


@app.command(context_settings={"allow_interspersed_args": False})
def submit(
    command: Annotated[
        list[str],
        typer.Argument(
            metavar="CMD",
            help="The command to run, after the options (put `--` before it if it has options).",
            show_default=False,
        ),
    ],
    image: Annotated[str | None, typer.Option(help="Docker image to run the command in.")] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="A folder (zipped for you) or a .zip of code and data to run with."),
    ] = None,
    gpus: Annotated[
        int | None, typer.Option("--gpus", help="Number of GPUs \\[default: 1].")
    ] = None,
    min_vram: Annotated[
        int | None, typer.Option("--min-vram", help="Minimum memory per GPU, MiB.")
    ] = None,
    gpu_model: Annotated[
        list[str] | None,
        typer.Option("--gpu-model", help='Acceptable GPU model, e.g. "H100" (repeatable).'),
    ] = None,
    max_price: Annotated[
        str | None,
        typer.Option("--max-price", help="Highest price, dollars per GPU-hour, e.g. 2.50."),
    ] = None,
    max_cost: Annotated[
        str | None,
        typer.Option("--max-cost", help="The most the job may cost, dollars; it is stopped there."),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="A tag the host must carry (repeatable).")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="K=V environment variable; K alone copies yours."),
    ] = None,
    max_duration: Annotated[
        int | None, typer.Option("--max-duration", help="Wall-clock limit, seconds.")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="-10..10, higher runs first.")] = None,
    network: Annotated[
        bool, typer.Option("--network", help="Give the job network access.")
    ] = False,
    retries: Annotated[
        int | None, typer.Option("--retries", help="Re-runs if a host is lost.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A name to recognise the job by.")] = None,
    org: Annotated[
        str | None, typer.Option("--org", help="Run and bill under this organization id.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Re-running the command with the same key returns the same job."),
    ] = None,
    follow: FollowOption = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Submit nothing: print what the job would cost and whether your credit "
            "covers it (exit 7 when it does not).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Submit a job; prints its id (with --follow, streams its logs and exits with its outcome).

    Options go before the command: peergpu jobs submit --bundle . --gpus 1 -- python train.py"""
    variables = _parse_env(env or [])
    cost_micros = None if max_cost is None else parse_amount_micros(max_cost, "--max-cost")
    spec: _Spec = {
        "image": image,
        "name": name,
        "org_id": org,
        "env": variables or None,
        "gpu_count": gpus,
        "min_vram_mib": min_vram,
        "gpu_models": gpu_model or None,
        "max_price_per_gpu_hour_micros": parse_price_micros(max_price, "--max-price"),
        "max_cost_micros": cost_micros,
        "tags": tag or None,
        "max_duration_seconds": max_duration,
        "priority": priority,
        "network": network or None,
        "max_retries": retries,
    }
    if dry_run:
        if follow:
            fail("--dry-run submits nothing to follow; leave out --follow", code=EXIT_USAGE)
        if bundle is not None:
            notice("dry run: the bundle is not uploaded (the price does not depend on it)")
        with connect() as client, handle_errors("cannot estimate"):
            found = client.estimate_job(command, **spec)
        raise typer.Exit(print_estimate(found, as_json=as_json))
    with connect() as client, handle_errors():
        bundle_sha256 = _upload(client, bundle) if bundle is not None else None
        job = client.submit_job(
            command, bundle_sha256=bundle_sha256, idempotency_key=idempotency_key, **spec
        )
        if not follow:
            if as_json:
                print_json(job.to_json())
                return
            notice(f"submitted job {job.id} ({styled_state(job.state)})")
            console.print(job.id, highlight=False)
            return
        if as_json:
            print_json({"type": "submitted", "job": job.to_json()})
        else:
            notice(f"submitted job [bold]{job.id}[/] ({styled_state(job.state)})")
        code = _follow(client, job.id, as_json=as_json, shown=job.state)
    raise typer.Exit(code)


@app.command("list")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    org: Annotated[str | None, typer.Option("--org", help="An organization's jobs.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="How many.")] = 20,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many (newest first).")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Your jobs, newest first."""
    with connect() as client, handle_errors():
        page = client.list_jobs(state=state, org_id=org, limit=limit, offset=offset)
    if as_json:
        print_json(page.to_json())
        return
    if not page.items:
        console.print("no jobs" + (f" in state {escape(state)}" if state else ""))
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("ID", "NAME", "STATE", "GPUS", "RUNS", "CREATED", "TOOK", "EXIT"):
        table.add_column(column, no_wrap=column in ("ID", "STATE"))
    for job in page.items:
        table.add_row(
            job.id,
            escape(job.name or "-"),
            styled_state(job.state),
            str(job.gpu_count),
            escape(_what_runs(job)),
            when(job.created_at),
            duration(job.duration_seconds),
            "-" if job.exit_code is None else str(job.exit_code),
        )
    print_table(table)
    if page.total > offset + len(page.items):
        notice(f"{len(page.items)} of {page.total} jobs; see more with --offset/--limit")


@app.command()
def status(job_id: JobId, as_json: JsonOption = False) -> None:
    """Show a job's state and spec."""
    with connect() as client, handle_errors():
        job = client.get_job(job_id)
    if as_json:
        print_json(job.to_json())
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in _job_fields(job):
        grid.add_row(label, value)
    print_table(grid)


@app.command()
def logs(job_id: JobId, follow: FollowOption = False, as_json: JsonOption = False) -> None:
    """Print a job's logs (its stdout on stdout, its stderr on stderr).

    With --follow, keep streaming until the job ends and exit with its outcome."""
    with connect() as client, handle_errors():
        if follow:
            code = _follow(client, job_id, as_json=as_json)
        else:
            for line in client.iter_logs(job_id, follow=False):
                if isinstance(line, LogLine):
                    _show_line(line, as_json=as_json)
            code = 0
    raise typer.Exit(code)


@app.command()
def cancel(job_id: JobId, as_json: JsonOption = False) -> None:
    """Cancel a job (one that already ended is an error, exit code 6)."""
    with connect() as client, handle_errors("cannot cancel"):
        job = client.cancel_job(job_id)
    if as_json:
        print_json(job.to_json())
        return
    console.print(f"job {job.id}: {styled_state(job.state)}")


@app.command()
def download(
    job_id: JobId,
    dest: Annotated[
        Path | None, typer.Option(help="Folder to save into \\[default: ./<job id>].")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Download a job's output files, checking each one's size and SHA-256."""
    folder = dest or Path(job_id)
    with connect() as client, handle_errors("download failed"):
        with progress_bar("downloading", enabled=not as_json) as progress:
            saved = client.download_artifacts(job_id, folder, progress=progress)
    if as_json:
        files = [{**a.to_json(), "local_path": str(p)} for a, p in saved]
        print_json({"dest": str(folder), "files": files})
        return
    if not saved:
        console.print(f"job {job_id} has no output files")
        return
    for artifact, path in saved:
        console.print(f"{escape(str(path))}  {artifact.size} bytes", highlight=False)
    total = sum(a.size for a, _ in saved)
    count = "1 file" if len(saved) == 1 else f"{len(saved)} files"
    notice(f"{count} ({total} bytes) in {escape(str(folder))}, SHA-256 verified")


@app.command()
def events(job_id: JobId, as_json: JsonOption = False) -> None:
    """A job's state changes, oldest first."""
    with connect() as client, handle_errors():
        items = client.job_events(job_id)
    if as_json:
        print_json({"items": [e.to_json() for e in items]})
        return
    table = Table(show_edge=False, pad_edge=False)
    for column in ("AT", "FROM", "TO", "REASON", "MESSAGE"):
        table.add_column(column)
    for event in items:
        table.add_row(
            when(event.at),
            event.from_state or "-",
            styled_state(event.to_state),
            escape(event.reason or "-"),
            escape(event.message or ""),
        )
    print_table(table)


@app.command()
def receipt(job_id: JobId, as_json: JsonOption = False) -> None:
    """What a job cost: each attempt's hold, seconds billed and charge, and refunds."""
    with connect() as client, handle_errors():
        found = client.receipt(job_id)
    if as_json:
        print_json(found.to_json())
        return
    print_receipt(found)


# -- helpers -------------------------------------------------------------------------------


def _follow(client: PeerGPU, job_id: str, *, as_json: bool, shown: str | None = None) -> int:
    """Stream a job's logs and state changes until it ends; the exit code for its outcome.
    ``shown`` is the state already on screen (a state is printed once, not again on ``end``)."""
    try:
        for event in client.iter_logs(job_id, follow=True):
            if isinstance(event, LogLine):
                _show_line(event, as_json=as_json)
                continue
            if as_json or event.job.state != shown:
                _show_update(event, as_json=as_json)
                shown = event.job.state
            if event.end:
                return job_exit_code(event.job)
    except KeyboardInterrupt:
        notice(f"stopped following; the job keeps running (peergpu jobs cancel {job_id})")
        return 130
    fail(f"the log stream of job {job_id} ended before the job did", code=EXIT_UNREACHABLE)


def _show_line(line: LogLine, *, as_json: bool) -> None:
    if as_json:
        print_json({"type": "log", **line.to_json()})
        return
    if line.stream == "stdout":
        sys.stdout.write(line.line + "\n")
        sys.stdout.flush()
    elif line.stream == "stderr":
        sys.stderr.write(line.line + "\n")
        sys.stderr.flush()
    else:
        notice(f"[dim]\\[peergpu] {escape(line.line)}[/]")


def _show_update(update: JobUpdate, *, as_json: bool) -> None:
    job = update.job
    if as_json:
        print_json({"type": "end" if update.end else "state", "job": job.to_json()})
        return
    details = []
    if job.host_id and job.state in ("assigned", "running"):
        details.append(f"on host {job.host_id}")
    if job.is_final:
        details.append(f"after {duration(job.duration_seconds)}")
        if job.exit_code is not None:
            details.append(f"exit code {job.exit_code}")
        if job.failure_reason:
            details.append(escape(job.failure_reason))
        if job.message:
            details.append(escape(job.message))
    suffix = f" ({', '.join(details)})" if details else ""
    notice(f"job {job.id}: {styled_state(job.state)}{suffix}")


def _upload(client: PeerGPU, bundle: Path) -> str:
    """Zip a folder (or take a .zip as it is) and upload it; the bundle's SHA-256."""
    if bundle.is_dir():
        with tempfile.TemporaryDirectory(prefix="peergpu-bundle-") as tmp:
            archive = Path(tmp) / "bundle.zip"
            with progress_bar(f"zipping {bundle.name or bundle}") as progress:
                zip_directory(bundle, archive, progress=progress)
            return _send(client, archive)
    if bundle.is_file():
        if not zipfile.is_zipfile(bundle):
            fail(f"--bundle {escape(str(bundle))}: not a zip file or a folder", code=EXIT_USAGE)
        return _send(client, bundle)
    fail(f"--bundle {escape(str(bundle))}: no such file or folder", code=EXIT_USAGE)


def _send(client: PeerGPU, archive: Path) -> str:
    with progress_bar("uploading") as progress:
        info = client.upload_bundle(archive, progress=progress)
    notice(f"bundle {info.sha256[:12]} uploaded ({info.members} files, {info.size} bytes)")
    return info.sha256


def _parse_env(pairs: list[str]) -> dict[str, str]:
    variables: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key:
            fail(f"--env {escape(pair)!r}: expected K=V", code=EXIT_USAGE)
        if not sep:
            if key not in os.environ:
                fail(f"--env {escape(key)}: not set in your environment", code=EXIT_USAGE)
            value = os.environ[key]
        variables[key] = value
    return variables


def _what_runs(job: Job) -> str:
    parts = []
    if job.image:
        parts.append(job.image)
    if job.bundle_sha256:
        parts.append(f"bundle {job.bundle_sha256[:12]}")
    parts.append(shlex.join(job.command))
    text = " ".join(parts)
    return text if len(text) <= 48 else text[:47] + "…"


def _per_gpu_hour(micros: int | None) -> str:
    return "-" if micros is None else f"{dollars(micros)} per GPU-hour"


def _job_fields(job: Job) -> list[tuple[str, str]]:
    gpus = f"{job.gpu_count}"
    if job.min_vram_mib:
        gpus += f", at least {mib(job.min_vram_mib)} each"
    if job.gpu_models:
        gpus += f", models: {', '.join(job.gpu_models)}"
    rows = [
        ("id", job.id),
        ("name", job.name or "-"),
        ("state", styled_state(job.state)),
        ("image", job.image or "-"),
        ("bundle", job.bundle_sha256 or "-"),
        ("command", shlex.join(job.command)),
        ("gpus", gpus),
        ("max price", _per_gpu_hour(job.max_price_per_gpu_hour_micros)),
        ("max cost", usd(job.max_cost_micros)),
        ("tags", ", ".join(job.tags) or "-"),
        ("network", "yes" if job.network else "no"),
        ("attempt", f"{job.attempt} (retries allowed: {job.max_retries})"),
        ("host", job.host_id or "-"),
        ("price", _per_gpu_hour(job.price_per_gpu_hour_micros)),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
        ("finished", when(job.finished_at)),
        ("duration", duration(job.duration_seconds)),
        ("exit code", "-" if job.exit_code is None else str(job.exit_code)),
        ("failure", job.failure_reason or "-"),
        ("message", job.message or "-"),
    ]
    markup = {"state"}
    return [(label, value if label in markup else escape(value)) for label, value in rows]
