"""The ``peergpu`` command line (Typer). A thin layer: it parses, then calls the package.

Renter and host-owner commands (``login``, ``jobs``, ``hosts``) talk to a server through the SDK
(``peergpu.client``) and import nothing of the server, so they start quickly. The commands that
run parts of the system on this machine (``server``, ``demo``, ``db``, ``admin``, ``agent``) are
imported only when one of them is invoked (or help lists them): importing the server stack
(SQLAlchemy, Alembic, FastAPI) costs seconds on a small machine.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

import typer
from typer.core import TyperGroup

from peergpu.cli import billing, host, hosts, jobs, session, usage
from peergpu.cli.output import EXIT_CODES_HELP

if TYPE_CHECKING:  # Typer vendors its own click (typer._click); only the types are needed
    from typer._click import Command, Context

#: command name -> (module, attribute): a Typer app or a command function
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "server": ("peergpu.cli.server", "serve"),
    "demo": ("peergpu.cli.server", "demo"),
    "db": ("peergpu.cli.db", "app"),
    "admin": ("peergpu.cli.admin", "app"),
    "agent": ("peergpu.cli.agent", "app"),
    "engine": ("peergpu.cli.engine", "app"),
}


class _LazyGroup(TyperGroup):
    """The top-level group: registered commands first, then the lazily imported ones."""

    def list_commands(self, ctx: Context) -> list[str]:
        return [*super().list_commands(ctx), *_LAZY_COMMANDS]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name in _LAZY_COMMANDS:
            return _load_command(cmd_name)
        return super().get_command(ctx, cmd_name)


@functools.cache
def _load_command(name: str) -> Command:
    module, attribute = _LAZY_COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    command: Command
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)  # a group even with one subcommand
    else:
        single = typer.Typer(add_completion=False)
        single.command(name)(target)
        command = typer.main.get_command(single)
    command.name = name
    return command


app = typer.Typer(
    name="peergpu",
    cls=_LazyGroup,
    help="PeerGPU: a peer-to-peer GPU cloud. Rent GPUs (login, jobs, hosts, billing), earn "
    "from yours (host), or run the control plane, a host agent, or the demo.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.command("login")(session.login)
app.command("logout")(session.logout)
app.command("whoami")(session.whoami)
app.add_typer(jobs.app, name="jobs")
app.add_typer(hosts.app, name="hosts")
app.add_typer(billing.app, name="billing")
app.add_typer(host.app, name="host")
app.command("usage")(usage.usage)


def main() -> None:
    app()
