"""Migrations: an empty database goes to head and back to base, and head matches the models."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from peergpu.config import ServerSettings
from peergpu.server.db import migrate
from peergpu.server.db.all_models import models  # noqa: F401
from peergpu.server.db.base import Base
from peergpu.server.db.session import create_engine
from tests import testing_services as services


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"
        return
    url = services.create_postgres_database()
    try:
        yield url
    finally:
        services.drop_postgres_database(url)


def test_upgrade_to_head_and_down_to_base(empty_database_url: str) -> None:
    asyncio.run(_round_trip(empty_database_url))


async def _round_trip(url: str) -> None:
    engine = create_engine(ServerSettings(database_url=url))  # type: ignore[call-arg]
    expected_tables = set(Base.metadata.tables)

    async def tables() -> set[str]:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: inspect(c).get_table_names())
        return set(names) - {"alembic_version"}

    async def drift() -> list[object]:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )

    try:
        assert await tables() == set()
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
        assert await tables() == expected_tables
        assert await drift() == [], "models and migrations disagree: write a migration"

        await migrate.downgrade(engine, "base")
        assert await tables() == set()
        assert await migrate.current_revision(engine) is None

        await migrate.upgrade(engine)  # and up again: downgrades leave nothing behind
        assert await tables() == expected_tables
    finally:
        await engine.dispose()
