"""What the benchmarks share: a scratch database (a SQLite file, or a fresh PostgreSQL database
plus a Redis key prefix, both removed afterwards), and small process and socket probes.

PostgreSQL comes from ``PEERGPU_BENCH_POSTGRES_DSN`` and Redis from ``PEERGPU_BENCH_REDIS_URL``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import redis

from peergpu.config import ServerSettings
from peergpu.server.context import ServerContext
from peergpu.server.db import migrate

POSTGRES_DSN = os.environ.get(
    "PEERGPU_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PEERGPU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = "bench-secret-" + "x" * 40
PASSWORD = "correct horse battery"


@contextlib.asynccontextmanager
async def environment(backend: str, stem: str, **overrides: Any) -> AsyncIterator[ServerSettings]:
    """Migrated server settings on ``backend`` (``sqlite`` or ``postgres``), on a free port,
    with everything they point at removed on exit."""
    with tempfile.TemporaryDirectory(prefix=f"{stem}-") as data_dir:
        common: dict[str, Any] = {
            "data_dir": Path(data_dir),
            "secret_key": SECRET,
            "port": free_port(),
            "host": "127.0.0.1",
            "migrate_on_start": False,
            "argon2_time_cost": 1,
            "argon2_memory_cost_kib": 64,
            **overrides,
        }
        if backend == "sqlite":
            settings = ServerSettings(**common)
            await migrate_database(settings)
            yield settings
            return
        name = f"peergpu_bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(POSTGRES_DSN)
        await admin.execute(f'CREATE DATABASE "{name}"')
        prefix = f"{stem}-{uuid.uuid4().hex[:8]}:"
        base = POSTGRES_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        try:
            settings = ServerSettings(
                **common, database_url=f"{base}/{name}", redis_url=REDIS_URL, redis_prefix=prefix
            )
            await migrate_database(settings)
            yield settings
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
            client.close()


async def migrate_database(settings: ServerSettings) -> None:
    context = ServerContext.build(settings)
    try:
        await migrate.upgrade(context.engine)
    finally:
        await context.close()


def process_cpu(pid: int, path: str = "") -> float:
    """CPU seconds (user + system) of a process, or of the thread whose ``stat`` is ``path``."""
    try:
        fields = Path(path or f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = sum(int(v) for v in fields) - int(fields[3]) - int(fields[4])
    return busy / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
