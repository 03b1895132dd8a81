"""Shared fixtures.

Every test that asks for ``context`` or ``client`` runs twice: on SQLite with the in-process
bus (``sqlite+memory``) and on PostgreSQL with Redis (``postgres+redis``). Each run gets a fresh
PostgreSQL database, migrated once and emptied between tests; SQLite tests copy a migrated file.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.config import ServerSettings
from peergpu.server.app import create_app
from peergpu.server.context import ServerContext
from peergpu.server.db import migrate
from peergpu.server.db.all_models import models  # noqa: F401 - fills the metadata
from peergpu.server.db.base import Base
from peergpu.server.db.session import create_engine
from peergpu.server.services.billing import ledger
from tests import testing_services as services

BACKENDS = ["sqlite+memory", "postgres+redis"]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = services.create_postgres_database()
    try:
        asyncio.run(_migrate(url))
        yield url
    finally:
        services.drop_postgres_database(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "peergpu.db"
    asyncio.run(_migrate(f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def redis_url() -> str:
    services.check_redis()
    return services.REDIS_URL


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ServerSettings]:
    common = {
        "data_dir": tmp_path,
        "secret_key": "test-secret-" + "x" * 40,
        "migrate_on_start": False,
        "argon2_time_cost": 1,
        "argon2_memory_cost_kib": 64,
        "auth_rate_limit": 10_000,
        "public_url": "http://testserver",
        # Every registered account starts with $1,000 of credit, so jobs can be paid for.
        "signup_credit_micros": 1_000_000_000,
    }
    if backend == "sqlite+memory":
        template: Path = request.getfixturevalue("sqlite_template")
        shutil.copy(template, tmp_path / "peergpu.db")
        sqlite_settings = ServerSettings(**common)  # type: ignore[arg-type]
        yield sqlite_settings
        asyncio.run(check_ledger(sqlite_settings.effective_database_url))
        return
    pg_url: str = request.getfixturevalue("postgres_url")
    redis_url: str = request.getfixturevalue("redis_url")
    prefix = f"peergpu-test-{uuid.uuid4().hex[:10]}:"
    yield ServerSettings(  # type: ignore[arg-type]
        **common, database_url=pg_url, redis_url=redis_url, redis_prefix=prefix
    )
    try:
        asyncio.run(check_ledger(pg_url))
    finally:
        asyncio.run(_truncate_all(pg_url))
        services.delete_redis_prefix(prefix)


@pytest.fixture
async def context(settings: ServerSettings) -> AsyncIterator[ServerContext]:
    ctx = ServerContext.build(settings)
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest.fixture
async def session(context: ServerContext) -> AsyncIterator[AsyncSession]:
    async with context.sessionmaker() as db_session:
        yield db_session


@pytest.fixture
async def app(settings: ServerSettings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


async def _migrate(url: str) -> None:
    engine = create_engine(ServerSettings(database_url=url))  # type: ignore[call-arg]
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


async def check_ledger(url: str) -> None:
    """Every test leaves balanced books: run after each test that had a database."""
    engine = create_engine(ServerSettings(database_url=url))  # type: ignore[call-arg]
    try:
        async with AsyncSession(engine) as session:
            report = await ledger.check(session)
    finally:
        await engine.dispose()
    assert report.ok, f"the ledger check failed after this test: {report}"


async def _truncate_all(url: str) -> None:
    engine = create_engine(ServerSettings(database_url=url))  # type: ignore[call-arg]
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()


#: fixture name -> how its parameter values name the database and bus a test ran on
_BACKEND_FIXTURES = ("backend", "empty_database_url", "server_env", "bus", "rate_limiter")
_LABELS = {
    "sqlite": "SQLite",
    "postgres": "PostgreSQL",
    "memory": "in-process bus",
    "redis": "Redis",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for fixture in _BACKEND_FIXTURES:
            if fixture in params:
                value = str(params[fixture])
                labels = [label for key, label in _LABELS.items() if key in value]
                item.user_properties.append(("backends", labels))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line saying how many tests ran on each database and each bus (CI's log shows it)."""
    tally: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if outcome == "passed" and getattr(report, "when", "call") != "call":
                continue
            for name, labels in getattr(report, "user_properties", []):
                if name != "backends":
                    continue
                for label in labels:
                    counts = tally.setdefault(label, {})
                    counts[outcome] = counts.get(outcome, 0) + 1
    if tally:
        parts = [
            f"{label}: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
            for label, counts in sorted(tally.items())
        ]
        terminalreporter.write_line("backends exercised -- " + "; ".join(parts))
