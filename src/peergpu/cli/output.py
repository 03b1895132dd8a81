"""Output and exit codes shared by the client commands (``login``, ``jobs``, ``hosts``,
``billing``, ``host``).

Human output goes to stdout through rich; progress bars, notices and errors go to stderr, so a
command's stdout stays usable in pipes. ``--json`` writes plain JSON to stdout and nothing else
there. Every failure is one red line on stderr and one of the exit codes below, never a
traceback.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from peergpu.cli.common import console, err_console, fail
from peergpu.client.config import ConfigError
from peergpu.client.errors import BundleError, DownloadError, PeerGPUError, PeerGPUUnavailable
from peergpu.client.models import MICROS_PER_DOLLAR, Job, dollars_to_micros

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_UNREACHABLE = 5
EXIT_API = 6
EXIT_PAYMENT = 7

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 the job failed, was cancelled or expired (with --follow: the "
    "job's own exit code when it has one); 2 usage error; 3 not logged in or authentication "
    "failed; 4 not found; 5 server unreachable or a service it needs unavailable (HTTP 503, "
    "e.g. card payments not set up); 6 any other error from the server; 7 not enough credit, "
    "a spending cap reached, or more asked than is payable (HTTP 402)."
)

_PIPE_WIDTH = 500

STATE_STYLES = {
    "queued": "cyan",
    "assigned": "blue",
    "running": "bold blue",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "expired": "magenta",
    "lost": "red",
    "online": "green",
    "offline": "dim",
    "paused": "yellow",
}


@contextmanager
def handle_errors(action: str = "") -> Iterator[None]:
    """Turn the SDK's exceptions into one red line and the documented exit code."""
    prefix = f"{action}: " if action else ""
    try:
        yield
    except PeerGPUUnavailable as exc:
        fail(escape(f"{prefix}{exc}"), code=EXIT_UNREACHABLE)
    except PeerGPUError as exc:
        fail(escape(f"{prefix}{exc.message} ({exc.code})" + _hint(exc)), code=exit_code_for(exc))
    except (BundleError, ConfigError) as exc:
        fail(escape(f"{prefix}{exc}"), code=EXIT_USAGE)
    except DownloadError as exc:
        fail(escape(f"{prefix}{exc}"), code=EXIT_API)
    except OSError as exc:
        fail(escape(f"{prefix}{exc}"), code=EXIT_USAGE)


def exit_code_for(error: PeerGPUError) -> int:
    if error.status == 401:
        return EXIT_AUTH
    if error.status == 402:
        return EXIT_PAYMENT
    if error.status == 404:
        return EXIT_NOT_FOUND
    if error.status == 503:
        return EXIT_UNREACHABLE
    return EXIT_API


def job_exit_code(job: Job) -> int:
    """0 for a job that succeeded; its own exit code when it failed with one (as a shell would
    report it: a signal N is 128+N); 1 otherwise."""
    if job.state == "succeeded":
        return EXIT_OK
    code = job.exit_code
    if job.state == "failed" and code is not None:
        if code < 0:
            return min(128 - code, 255)
        if 0 < code <= 255:
            return code
    return EXIT_JOB_FAILED


def print_json(data: Any) -> None:
    """Machine-readable output: one JSON document (or one per line for streams) on stdout."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def print_table(table: Table) -> None:
    """A table on stdout: fitted to a terminal, or at its natural width when piped (so that
    ``grep`` sees whole ids and names, not columns cut to 80 characters)."""
    if console.is_terminal:
        console.print(table)
        return
    Console(file=sys.stdout, width=_PIPE_WIDTH, soft_wrap=True).print(table)


def notice(message: str) -> None:
    """A human note on stderr (so it never mixes with stdout that a script reads)."""
    err_console.print(message, highlight=False)


def styled_state(state: str) -> str:
    return f"[{STATE_STYLES.get(state, 'white')}]{escape(state)}[/]"


def dollars(micros: int | None) -> str:
    if micros is None:
        return "-"
    return f"${Decimal(micros) / MICROS_PER_DOLLAR:.4f}".rstrip("0").rstrip(".")


def usd(micros: int | None) -> str:
    """Money as the server writes it: ``$1,000.00``, ``$0.042``, ``-$3.60`` (cents always
    shown, micro-dollars when there are any)."""
    if micros is None:
        return "-"
    sign = "-" if micros < 0 else ""
    whole, rest = divmod(abs(micros), MICROS_PER_DOLLAR)
    return f"{sign}${whole:,}.{f'{rest:06d}'.rstrip('0').ljust(2, '0')}"


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{seconds:.1f}s"


def mib(value: int) -> str:
    return f"{value / 1024:.0f} GiB" if value >= 1024 else f"{value} MiB"


@contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A byte-progress bar on stderr that disappears when done; yields the ``progress(done,
    total)`` callback the SDK takes. Disabled, or when stderr is not a terminal (scripts, CI
    logs), it yields a callback that does nothing."""
    if not enabled or not err_console.is_terminal:
        yield lambda _done, _total: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    task: TaskID = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update


def parse_price_micros(text: str | None, option: str) -> int | None:
    price = parse_price(text, option)
    return None if price is None else dollars_to_micros(price)


def parse_price(text: str | None, option: str) -> Decimal | None:
    """``"2.50"`` or ``"$2.50"`` as dollars; a usage error (exit 2) for anything else."""
    if text is None:
        return None
    try:
        price = Decimal(text.strip().lstrip("$"))
    except InvalidOperation:
        fail(f"{option} {escape(text)!r}: expected dollars, e.g. 2.50", code=EXIT_USAGE)
    if not price.is_finite() or price < 0:
        fail(f"{option} {escape(text)!r}: expected a positive amount", code=EXIT_USAGE)
    return price


#: ``25``, ``12.50``, ``$5``, ``1,000``, ``.5``: digits (grouped by commas, or not) and a fraction
_AMOUNT = re.compile(r"\$?(?P<number>(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+)")


def parse_amount_micros(text: str, what: str, *, allow_zero: bool = False) -> int:
    """Dollars (``"25"``, ``"12.50"``, ``"$5"``, ``"1,000"``) as integer micro-dollars,
    exactly (through ``Decimal``). A usage error (exit 2) for a negative amount, for zero
    unless ``allow_zero``, for more than six decimals (less than a micro-dollar) and for
    anything that is not an amount (``1e3``, ``nan``, ``ten``)."""
    cleaned = text.strip()
    if cleaned.startswith(("-", "$-")):
        fail(f"{what} {escape(text)!r}: the amount cannot be negative", code=EXIT_USAGE)
    match = _AMOUNT.fullmatch(cleaned)
    if match is None:
        fail(f"{what} {escape(text)!r}: expected dollars, e.g. 25 or 12.50", code=EXIT_USAGE)
    micros = Decimal(match["number"].replace(",", "")) * MICROS_PER_DOLLAR
    if micros != micros.to_integral_value():
        fail(f"{what} {escape(text)!r}: at most 6 decimals (a micro-dollar)", code=EXIT_USAGE)
    if micros == 0 and not allow_zero:
        fail(f"{what} {escape(text)!r}: the amount must be more than zero", code=EXIT_USAGE)
    return int(micros)


def _hint(error: PeerGPUError) -> str:
    if error.status == 401:
        return "; run `peergpu login`"
    if error.status == 402 and "peergpu " not in error.message:
        if error.code == "insufficient_payable":
            return "; see `peergpu host earnings`"
        return "; see `peergpu billing balance`"
    if error.code == "permission_denied" and "host" in error.message.lower():
        return "; your account needs the host role"
    return ""
