"""Two ``peergpu server`` processes on one PostgreSQL and one Redis, both scheduling: no job is
assigned twice and no GPU goes to two jobs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel, HostModel
from peergpu.server.db.job_models import JobEventModel, JobModel
from peergpu.server.db.models import UserModel
from tests import testing_services as services
from tests.factories import PASSWORD, unique_email
from tests.integration.harness import free_port

pytestmark = pytest.mark.timeout(180)

HOSTS, GPUS_PER_HOST, JOBS = 15, 2, 50


@pytest.fixture
def database() -> Iterator[str]:
    services.check_redis()
    url = services.create_postgres_database()
    try:
        yield url
    finally:
        services.drop_postgres_database(url)


def _start(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "peergpu", "server", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_ready(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"server not ready:\n{log.read_text()}")


async def _seed_hosts(url: str) -> None:
    """Online, priced hosts (no agents: manifests go nowhere, and the long ack deadline keeps
    the assignments in place while the test looks at them)."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            owner = uuid.uuid4()
            await conn.execute(
                UserModel.__table__.insert(),
                [
                    {
                        "id": owner,
                        "email": unique_email("owner"),
                        "password_hash": "x",
                        "display_name": "",
                        "is_renter": False,
                        "is_host": True,
                        "is_admin": False,
                        "is_active": True,
                        "created_at": utcnow(),
                    }
                ],
            )
            for n in range(HOSTS):
                host_id = uuid.uuid4()
                await conn.execute(
                    HostModel.__table__.insert(),
                    [
                        {
                            "id": host_id,
                            "owner_id": owner,
                            "name": f"h{n}",
                            "region": "",
                            "tags": [],
                            "price_per_gpu_hour_micros": 100_000 + n,
                            "paused": False,
                            "verified": False,
                            "status": "online",
                            "credential_prefix": f"p{n:06d}",
                            "credential_hash": "x" * 64,
                            "hostname": "",
                            "os": "",
                            "agent_version": "",
                            "gpu_probe": "",
                            "runners": ["process"],
                            "last_seen_at": utcnow(),
                            "reliability": 0.5,
                            "created_at": utcnow(),
                        }
                    ],
                )
                await conn.execute(
                    HostGpuModel.__table__.insert(),
                    [
                        {
                            "id": uuid.uuid4(),
                            "host_id": host_id,
                            "index": i,
                            "uuid": f"GPU-{n}-{i}",
                            "model": "NVIDIA L4",
                            "memory_total_mib": 23034,
                            "driver_version": "",
                        }
                        for i in range(GPUS_PER_HOST)
                    ],
                )
    finally:
        await engine.dispose()


async def _outcome(url: str) -> tuple[list[tuple[uuid.UUID, uuid.UUID]], int, int, int]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            claims = [
                (row[0], row[1])
                for row in await conn.execute(
                    select(HostGpuModel.id, HostGpuModel.job_id).where(
                        HostGpuModel.job_id.is_not(None)
                    )
                )
            ]
            assigned = await conn.scalar(
                select(func.count()).select_from(JobModel).where(JobModel.state == "assigned")
            )
            queued = await conn.scalar(
                select(func.count()).select_from(JobModel).where(JobModel.state == "queued")
            )
            events = await conn.scalar(
                select(func.count())
                .select_from(JobEventModel)
                .where(JobEventModel.to_state == "assigned")
            )
        return claims, int(assigned or 0), int(queued or 0), int(events or 0)
    finally:
        await engine.dispose()


def test_two_server_processes_never_double_assign(database: str, tmp_path: Path) -> None:
    prefix = f"peergpu-replicas-{uuid.uuid4().hex[:8]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERGPU_")}
    env.update(
        PEERGPU_DATA_DIR=str(tmp_path),
        PEERGPU_SECRET_KEY="replica-test-secret-" + "x" * 40,
        PEERGPU_DATABASE_URL=database,
        PEERGPU_REDIS_URL=services.REDIS_URL,
        PEERGPU_REDIS_PREFIX=prefix,
        PEERGPU_ARGON2_TIME_COST="1",
        PEERGPU_ARGON2_MEMORY_COST_KIB="64",
        PEERGPU_AGENT_HEARTBEAT_SECONDS="600",
        PEERGPU_MANIFEST_ACK_TIMEOUT_SECONDS="600",
        PEERGPU_SCHEDULER_SWEEP_SECONDS="0.2",
        PEERGPU_SCHEDULER_BATCH_SIZE="7",
        PEERGPU_SIGNUP_CREDIT_MICROS="1000000000",
    )
    ports = [free_port(), free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    first = _start(env, ports[0], logs[0])
    processes = [first]
    try:
        _wait_ready(f"http://127.0.0.1:{ports[0]}", first, logs[0])  # it migrates the database
        processes.append(_start(env, ports[1], logs[1]))
        _wait_ready(f"http://127.0.0.1:{ports[1]}", processes[1], logs[1])
        asyncio.run(_seed_hosts(database))
        bases = [f"http://127.0.0.1:{port}/api/v1" for port in ports]
        email = unique_email("renter")
        httpx.post(f"{bases[0]}/auth/register", json={"email": email, "password": PASSWORD})
        token = httpx.post(
            f"{bases[1]}/auth/login", json={"email": email, "password": PASSWORD}
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}

        def submit(n: int) -> int:
            response = httpx.post(
                f"{bases[n % 2]}/jobs", json={"command": ["true"]}, headers=headers, timeout=30
            )
            return response.status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(submit, range(JOBS))) == {201}

        capacity = HOSTS * GPUS_PER_HOST
        deadline = time.monotonic() + 60
        while True:
            claims, assigned, queued, events = asyncio.run(_outcome(database))
            if assigned == capacity or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert assigned == capacity, (assigned, logs[0].read_text()[-2000:])
        assert queued == JOBS - capacity
        assert len(claims) == capacity
        assert len({job for _, job in claims}) == capacity  # no job holds two GPUs
        assert events == capacity  # no job was assigned twice
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        services.delete_redis_prefix(prefix)
