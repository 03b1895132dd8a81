"""Storage fixtures: one S3-compatible server (moto, see ``testing_s3``) for the session, on a
free loopback port, started only when a test asks for it; a fresh bucket for every test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from peergpu.server.storage.s3 import S3ObjectStore
from tests.storage.testing_s3 import S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "s3-server.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """An empty bucket of its own; every bucket is dropped (and the clock reset) after."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_server.client.create_bucket(Bucket=name)
    yield name
    s3_server.reset()


@pytest.fixture
async def s3_store(s3_server: S3Server, s3_bucket: str) -> AsyncIterator[S3ObjectStore]:
    store = s3_server.store(s3_bucket)
    yield store
    await store.close()
