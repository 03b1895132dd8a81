"""The ``peergpu`` command line (Typer). A thin layer: it parses, then calls the package."""

from __future__ import annotations

import typer

from peergpu.cli import admin, agent, db, server

app = typer.Typer(
    name="peergpu",
    help="PeerGPU: a peer-to-peer GPU cloud. Run the control plane, a host agent, or the demo.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.command("server")(server.serve)
app.command("demo")(server.demo)
app.add_typer(db.app, name="db")
app.add_typer(admin.app, name="admin")
app.add_typer(agent.app, name="agent")


def main() -> None:
    app()
