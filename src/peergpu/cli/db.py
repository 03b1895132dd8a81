"""``peergpu db``: schema migrations."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from peergpu.cli.common import console, load_settings
from peergpu.server.db import migrate
from peergpu.server.db.session import create_engine

app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
T = TypeVar("T")


def _with_engine(action: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    settings = load_settings()

    async def run() -> T:
        engine = create_engine(settings)
        try:
            return await action(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database (PEERGPU_DATABASE_URL, else SQLite in the data dir) to a revision."""
    _with_engine(lambda engine: migrate.upgrade(engine, revision))
    console.print(f"database at revision {_with_engine(migrate.current_revision)}")


@app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")],
) -> None:
    """Downgrade the database to an earlier revision."""
    _with_engine(lambda engine: migrate.downgrade(engine, revision))
    console.print(f"database at revision {_with_engine(migrate.current_revision)}")


@app.command()
def current() -> None:
    """Print the database's revision and the newest one this version knows."""
    console.print(
        f"current: {_with_engine(migrate.current_revision)}  head: {migrate.head_revision()}"
    )
