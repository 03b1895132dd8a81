"""A database that cannot be reached is a 503 with Retry-After, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from peergpu.config import ServerSettings
from peergpu.server.app import create_app
from tests.factories import assert_error


@pytest.fixture(
    params=["postgresql://postgres@127.0.0.1:1/nothing", "sqlite:///{tmp}/no/such/dir/x.db"]
)
async def unreachable_client(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    settings = ServerSettings(
        database_url=request.param.format(tmp=tmp_path),
        data_dir=tmp_path,
        migrate_on_start=False,
        secret_key="s" * 40,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


async def test_requests_get_503_when_the_database_is_unreachable(
    unreachable_client: httpx.AsyncClient,
) -> None:
    login = await unreachable_client.post(
        "/api/v1/auth/login", json={"email": "a@example.com", "password": "whatever123"}
    )
    assert_error(login, 503, "service_unavailable")
    assert login.headers["retry-after"] == "5"
    ready = await unreachable_client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"].startswith("error")
    assert (await unreachable_client.get("/healthz")).status_code == 200
