"""Alembic environment.

Migrations always run on a connection handed in by ``peergpu.server.db.migrate`` through
``config.attributes["connection"]``; that keeps one code path for the server start, the CLI and
the tests, all of which are async.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from peergpu.server.db import all_models
from peergpu.server.db.base import Base

assert all_models  # every model module is imported so metadata is complete
target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with `peergpu db upgrade` (or peergpu.server.db.migrate), not bare alembic"
    )
run_migrations(connection)
