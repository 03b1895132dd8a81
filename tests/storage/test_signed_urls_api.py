"""Signed object URLs over real HTTP: a small app with the storage router, our error handlers
and the body-size middleware configured as the server does (storage paths exempt)."""

from __future__ import annotations

import base64
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from fastapi import FastAPI

from peergpu.server.api import storage as storage_api
from peergpu.server.api.errors import install_error_handlers
from peergpu.server.api.middleware import BodySizeLimitMiddleware
from peergpu.server.app import operation_id
from peergpu.server.storage import LocalObjectStore
from tests.factories import assert_error

SECRET = b"storage-api-test-secret-" + b"x" * 16
PUBLIC_URL = "http://testserver/api/v1"
MiB = 1 << 20


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_app(storage: object) -> FastAPI:
    """The storage router mounted as the server mounts it, with the same error handlers and
    body-size middleware (storage paths exempt)."""
    app = FastAPI(generate_unique_id_function=operation_id)
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimitMiddleware, max_bytes=MiB, exempt_prefixes=("/api/v1/storage/",)
    )
    app.include_router(storage_api.router, prefix="/api/v1")
    app.state.context = SimpleNamespace(storage=storage)
    return app


def http_client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "objects"


@pytest.fixture
def store(root: Path, clock: FakeClock) -> LocalObjectStore:
    return LocalObjectStore(root, public_url=PUBLIC_URL, secret=SECRET, clock=clock)


@pytest.fixture
async def client(store: LocalObjectStore) -> AsyncIterator[httpx.AsyncClient]:
    async with http_client(make_app(store)) as http:
        yield http


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_query(url: str, **changes: str | None) -> str:
    """``url`` with query parameters replaced (``None`` removes one)."""
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    for name, value in changes.items():
        if value is None:
            query.pop(name, None)
        else:
            query[name] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


async def test_presigned_put_then_get(client: httpx.AsyncClient, store: LocalObjectStore) -> None:
    data = os.urandom(300_000)
    put_url = store.presign_put("jobs/7/out.bin", expires_in=300, max_bytes=len(data))

    uploaded = await client.put(put_url, content=data)
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json() == {"key": "jobs/7/out.bin", "size": len(data), "sha256": sha(data)}

    downloaded = await client.get(store.presign_get("jobs/7/out.bin", expires_in=300))
    assert downloaded.status_code == 200, downloaded.text
    assert downloaded.content == data
    assert downloaded.headers["content-length"] == str(len(data))
    assert downloaded.headers["content-type"] == "application/octet-stream"
    assert downloaded.headers["content-disposition"] == "attachment"


async def test_uploads_tolerate_the_s3_checksum_header(
    client: httpx.AsyncClient, store: LocalObjectStore
) -> None:
    """The agent sends ``x-amz-checksum-sha256`` on every upload (S3 URLs are signed over it);
    here the signed ``sha256`` in the query is what counts and the header is ignored."""
    body = b"artifact bytes"
    header = {"x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(body).digest()).decode()}
    url = store.presign_put("jobs/7/a.txt", expires_in=60, max_bytes=len(body), sha256=sha(body))
    uploaded = await client.put(url, content=body, headers=header)
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["sha256"] == sha(body)

    unbound = store.presign_put("jobs/7/b.txt", expires_in=60, max_bytes=100)
    assert (await client.put(unbound, content=body, headers=header)).status_code == 200


async def test_download_under_a_signed_filename(
    client: httpx.AsyncClient, store: LocalObjectStore
) -> None:
    await store.put("models/m/weights", b"weights")
    url = store.presign_get("models/m/weights", expires_in=60, filename='résumé "v2".bin')

    response = await client.get(url)
    assert response.status_code == 200 and response.content == b"weights"
    assert response.headers["content-disposition"] == (
        "attachment; filename=\"r_sum_ _v2_.bin\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%22v2%22.bin"
    )


async def test_upload_with_a_signed_checksum(
    client: httpx.AsyncClient, store: LocalObjectStore, root: Path
) -> None:
    body = b"exactly these bytes"
    url = store.presign_put("bundles/x.zip", expires_in=60, max_bytes=100, sha256=sha(body))

    refused = await client.put(url, content=b"other bytes")
    error = assert_error(refused, 422, "checksum_mismatch")
    assert error["details"] == {"expected": sha(body), "actual": sha(b"other bytes")}
    assert await store.head("bundles/x.zip") is None
    assert files_under(root) == []

    accepted = await client.put(url, content=body)
    assert accepted.status_code == 200 and accepted.json()["sha256"] == sha(body)


async def test_expired_urls_are_refused(
    client: httpx.AsyncClient, store: LocalObjectStore, clock: FakeClock
) -> None:
    await store.put("k", b"data")
    get_url = store.presign_get("k", expires_in=60)
    put_url = store.presign_put("k", expires_in=60, max_bytes=10)
    clock.now += 60

    assert_error(await client.get(get_url), 403, "url_expired")
    assert_error(await client.put(put_url, content=b"new"), 403, "url_expired")
    assert await (await store.get("k")).read_all() == b"data"


async def test_tampered_urls_are_refused(
    client: httpx.AsyncClient, store: LocalObjectStore, root: Path
) -> None:
    await store.put("mine", b"private")
    put_url = store.presign_put("uploads/a", expires_in=60, max_bytes=10, sha256=sha(b"0123"))
    get_url = store.presign_get("mine", expires_in=60)
    signature = parse_qs(urlsplit(get_url).query)["signature"][0]
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]

    tampered_puts = [
        with_query(put_url, max_bytes="1000000"),
        with_query(put_url, expires=str(int(parse_qs(urlsplit(put_url).query)["expires"][0]) + 9)),
        with_query(put_url, sha256=None),
        with_query(put_url, signature=flipped),
        with_path(put_url, "/api/v1/storage/o/uploads/b"),
        with_path(put_url, "/api/v1/storage/o/uploads/a%2F..%2F..%2Fmine"),
    ]
    for url in tampered_puts:
        assert_error(await client.put(url, content=b"0123"), 403, "invalid_signature")
    assert files_under(root) == ["mine", "mine~meta"]

    tampered_gets = [
        with_query(get_url, signature=flipped),
        with_query(get_url, signature=None) + "&signature=%C3%BC",
        with_query(get_url, filename="evil.html"),
        with_path(get_url, "/api/v1/storage/o/other"),
        put_url,  # an upload URL does not allow a download
    ]
    for url in tampered_gets:
        assert_error(await client.get(url), 403, "invalid_signature")


async def test_missing_signature_parameters_are_a_validation_error(
    client: httpx.AsyncClient, store: LocalObjectStore
) -> None:
    url = store.presign_get("k", expires_in=60)
    assert_error(await client.get(with_query(url, signature=None)), 422, "validation_error")
    assert_error(await client.get(with_query(url, expires="soon")), 422, "validation_error")


async def test_upload_over_max_bytes_is_refused_and_stores_nothing(
    client: httpx.AsyncClient, store: LocalObjectStore, root: Path
) -> None:
    url = store.presign_put("big", expires_in=60, max_bytes=100_000)

    declared = await client.put(url, content=b"x" * 100_001)  # Content-Length says too much
    assert assert_error(declared, 413, "payload_too_large")["details"] == {"max_bytes": 100_000}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b"x" * 65536

    streamed = await client.put(url, content=chunks())
    assert_error(streamed, 413, "payload_too_large")
    assert await store.head("big") is None
    assert files_under(root) == []


async def test_large_streaming_upload_with_bounded_memory(
    client: httpx.AsyncClient, store: LocalObjectStore
) -> None:
    total = 20 * MiB  # far over the app's 1 MiB body limit: storage paths are exempt
    piece = os.urandom(64 * 1024)
    expected = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total // len(piece)):
            expected.update(piece)
            yield piece

    url = store.presign_put("models/big.safetensors", expires_in=600, max_bytes=total)
    tracemalloc.start()
    try:
        response = await client.put(url, content=body())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response.status_code == 200, response.text
    assert response.json() == {
        "key": "models/big.safetensors",
        "size": total,
        "sha256": expected.hexdigest(),
    }
    assert peak < 6 * MiB, peak

    received = hashlib.sha256()
    size = 0
    async with client.stream("GET", store.presign_get(response.json()["key"], expires_in=60)) as r:
        assert r.headers["content-length"] == str(total)
        async for chunk in r.aiter_bytes():
            received.update(chunk)
            size += len(chunk)
    assert (size, received.hexdigest()) == (total, expected.hexdigest())


async def test_missing_object_is_a_404_in_our_error_shape(
    client: httpx.AsyncClient, store: LocalObjectStore
) -> None:
    error = assert_error(await client.get(store.presign_get("no/such", expires_in=60)), 404)
    assert error["code"] == "not_found" and error["details"] == {"key": "no/such"}


async def test_key_clash_is_a_409(client: httpx.AsyncClient, store: LocalObjectStore) -> None:
    await store.put("a", b"file")
    response = await client.put(store.presign_put("a/b", expires_in=60, max_bytes=5), content=b"x")
    assert_error(response, 409, "key_conflict")


async def test_routes_answer_404_when_the_store_is_not_local(store: LocalObjectStore) -> None:
    await store.put("k", b"data")
    url = store.presign_get("k", expires_in=60)
    async with http_client(make_app(storage=object())) as elsewhere:  # e.g. an S3 store
        assert_error(await elsewhere.get(url), 404, "not_found")


def test_openapi_documents_the_routes(store: LocalObjectStore) -> None:
    paths = make_app(store).openapi()["paths"]
    operations = paths["/api/v1/storage/o/{key}"]
    assert operations["put"]["operationId"] == "storage-upload_object"
    assert operations["get"]["operationId"] == "storage-download_object"
    assert {"403", "404", "413", "422"} <= set(operations["put"]["responses"])
    assert "application/octet-stream" in operations["get"]["responses"]["200"]["content"]
