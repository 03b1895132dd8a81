"""The PostgreSQL pool pings only connections that sat idle, and replaces the dead ones."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from peergpu.config import ServerSettings
from peergpu.server.db import session as db_session


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def test_a_just_used_connection_is_not_pinged_and_an_idle_one_is(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db_session.create_engine(ServerSettings(database_url=postgres_url))  # type: ignore[call-arg]
    pings: list[Any] = []
    dialect = engine.sync_engine.dialect
    real_ping = dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(dialect, "do_ping", counting_ping)
    monkeypatch.setattr(db_session, "PING_IDLE_SECONDS", 0.2)
    try:
        for _ in range(5):  # back to back: each checkout finds a connection just checked in
            async with engine.connect() as connection:
                assert await connection.scalar(text("SELECT 1")) == 1
        assert pings == []
        await asyncio.sleep(0.3)
        async with engine.connect() as connection:
            assert await connection.scalar(text("SELECT 1")) == 1
        assert len(pings) == 1
    finally:
        await engine.dispose()


async def test_a_connection_the_server_dropped_while_idle_is_replaced(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_session, "PING_IDLE_SECONDS", 0.2)
    engine = db_session.create_engine(ServerSettings(database_url=postgres_url))  # type: ignore[call-arg]
    try:
        async with engine.connect() as connection:
            first = await connection.scalar(text("SELECT pg_backend_pid()"))
        await asyncio.sleep(0.3)
        admin = await asyncpg.connect(_plain_dsn(postgres_url))
        try:  # as a PostgreSQL restart would, while the connection sits in the pool
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        finally:
            await admin.close()
        await asyncio.sleep(0.1)
        async with engine.connect() as connection:  # no error: the ping found it dead
            second = await connection.scalar(text("SELECT pg_backend_pid()"))
        assert second != first
    finally:
        await engine.dispose()
