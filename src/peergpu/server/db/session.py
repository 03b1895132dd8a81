"""Engine and session factory."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from peergpu.config import ServerSettings


def create_engine(settings: ServerSettings) -> AsyncEngine:
    url = settings.effective_database_url
    options: dict[str, Any] = {"echo": settings.database_echo}
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"timeout": 30}
    else:
        options.update(pool_size=10, max_overflow=20)
    engine = create_async_engine(url, **options)
    if url.startswith("sqlite"):
        _tune_sqlite(engine)
    else:
        _ping_idle_connections(engine)
    return engine


#: A pooled connection idle for longer than this is pinged before it is handed out.
PING_IDLE_SECONDS = 1.0


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """Pessimistic disconnect handling, for connections that sat idle only.

    ``pool_pre_ping`` pings every checkout, and on asyncpg a ping is three round trips
    (BEGIN, an empty query, ROLLBACK): on a busy server that was three of a submit's seven.
    A connection checked back in less than :data:`PING_IDLE_SECONDS` ago was just used, so it
    is handed out as is; one idle for longer (the database may have restarted meanwhile) is
    pinged first, and replaced if the ping fails. A restart inside that second is noticed by
    the statement that fails: SQLAlchemy then invalidates the whole pool, and that request
    gets the API's 503."""
    dialect = engine.sync_engine.dialect

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < PING_IDLE_SECONDS:
            return
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception as error:  # the pool connects afresh (up to three times)
            raise exc.DisconnectionError(str(error)) from error
        if not alive:
            raise exc.DisconnectionError("the ping failed")


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the single writer; foreign keys are off by default.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
