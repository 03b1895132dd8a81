"""A real ``peergpu server`` process: it migrates an empty database at start and answers
register -> login -> me -> create key -> use key, on SQLite and on PostgreSQL + Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import testing_services as services


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["sqlite+memory", "postgres+redis"])
def server_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PEERGPU_")}
    env.update(
        PEERGPU_DATA_DIR=str(tmp_path),
        PEERGPU_ARGON2_TIME_COST="1",
        PEERGPU_ARGON2_MEMORY_COST_KIB="64",
    )
    if request.param == "sqlite+memory":
        yield env
        return
    services.check_redis()
    url = services.create_postgres_database()
    env.update(
        PEERGPU_DATABASE_URL=url.replace("+asyncpg", ""),
        PEERGPU_REDIS_URL=services.REDIS_URL,
        PEERGPU_REDIS_PREFIX="peergpu-proc-test:",
    )
    try:
        yield env
    finally:
        services.drop_postgres_database(url)
        services.delete_redis_prefix("peergpu-proc-test:")


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path / "server.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "peergpu", "server", "--port", str(port), "--log-level", "warning"],
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {process.returncode}:\n{log.read()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not become ready in 60 s")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_register_login_me_key_against_a_real_server(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        body = {"email": "proc@example.com", "password": "correct horse battery"}
        assert http.post("/api/v1/auth/register", json=body).status_code == 201
        tokens = http.post("/api/v1/auth/login", json=body).json()
        auth = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert http.get("/api/v1/users/me", headers=auth).json()["email"] == body["email"]
        key = http.post("/api/v1/keys", json={"name": "proc"}, headers=auth).json()["key"]
        me = http.get("/api/v1/users/me", headers={"Authorization": f"Bearer {key}"})
        assert me.status_code == 200 and me.json()["email"] == body["email"]
        ready = http.get("/readyz").json()
        assert ready["checks"] == {"database": "ok", "bus": "ok", "storage": "ok"}
