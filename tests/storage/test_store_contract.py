"""The ``ObjectStore`` contract (``storage/base.py``), run against every backend: the local
folder and S3 (moto on loopback, see ``testing_s3``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from peergpu.errors import InvalidInput, NotFound, PayloadTooLarge
from peergpu.server.storage import LocalObjectStore, ObjectInfo, ObjectStore
from peergpu.server.storage.local import CHUNK_SIZE as LOCAL_CHUNK_SIZE
from peergpu.server.storage.s3 import MIN_PART_SIZE
from tests.storage.testing_s3 import S3Server

MiB = 1 << 20
SECRET = b"storage-contract-secret-" + b"x" * 16


@dataclass
class StorageBackend:
    name: str
    store: ObjectStore
    #: A body this large goes to storage in more than one step (chunks written, parts sent).
    step: int
    #: Peak memory (traced) allowed to move ``big_object`` bytes through put and get.
    memory_bound: int
    big_object: int
    #: Everything the storage holds: files (temp files and sidecars included) or bucket keys
    #: (staging objects and open multipart uploads included).
    stored: Callable[[], list[str]]
    #: What ``stored`` shows when exactly ``keys`` are stored.
    holding: Callable[[list[str]], list[str]]


@pytest.fixture(params=["local", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StorageBackend]:
    if request.param == "local":
        root = tmp_path / "objects"
        store = LocalObjectStore(root, public_url="http://testserver/api/v1", secret=SECRET)
        yield StorageBackend(
            "local",
            store,
            step=LOCAL_CHUNK_SIZE,
            memory_bound=4 * MiB,
            big_object=20 * MiB,
            stored=lambda: files_under(root),
            holding=lambda keys: sorted([*keys, *(f"{key}~meta" for key in keys)]),
        )
        return
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    s3 = server.store(bucket, part_size=MIN_PART_SIZE)
    yield StorageBackend(
        "s3",
        s3,
        step=MIN_PART_SIZE,
        # Two parts (the one filling and the one being sent) and boto's buffers.
        memory_bound=14 * MiB,
        big_object=32 * MiB,
        stored=lambda: server.objects(bucket),
        holding=sorted,
    )
    await s3.close()


async def chunked(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def summary(info: ObjectInfo | None) -> tuple[str, int, str | None] | None:
    """Key, size and digest; ``created_at`` is exact on ``head`` but only to the second on an
    S3 ``put`` (which has no ``Last-Modified`` of its own)."""
    return None if info is None else (info.key, info.size, info.sha256)


# -- round trips ----------------------------------------------------------------------------


async def test_put_get_head_round_trip(storage: StorageBackend) -> None:
    store = storage.store
    info = await store.put("jobs/1/result.bin", b"hello world")

    assert summary(info) == ("jobs/1/result.bin", 11, sha(b"hello world"))
    assert isinstance(info.created_at, datetime) and info.created_at.tzinfo is not None
    head = await store.head("jobs/1/result.bin")
    assert head is not None and summary(head) == summary(info)
    assert head.created_at is not None and head.created_at.tzinfo is not None
    stream = await store.get("jobs/1/result.bin")
    assert stream.info == head
    assert await stream.read_all() == b"hello world"
    assert storage.stored() == storage.holding(["jobs/1/result.bin"])


async def test_put_streams_from_an_async_iterator(storage: StorageBackend) -> None:
    data = os.urandom(2 * storage.step + 123)  # several chunks or parts
    info = await storage.store.put("bundles/b.zip", chunked(data, 10_000))
    assert summary(info) == ("bundles/b.zip", len(data), sha(data))

    stream = await storage.store.get("bundles/b.zip")
    assert summary(stream.info) == summary(info)
    chunks = [chunk async for chunk in stream]
    assert b"".join(chunks) == data
    assert all(len(chunk) <= 4 * MiB for chunk in chunks)
    assert storage.stored() == storage.holding(["bundles/b.zip"])  # no staging left


async def test_a_large_body_with_a_known_digest(storage: StorageBackend) -> None:
    data = os.urandom(storage.step + 1)
    info = await storage.store.put("k", chunked(data), sha256=sha(data))
    assert summary(info) == summary(await storage.store.head("k")) == ("k", len(data), sha(data))
    assert await (await storage.store.get("k")).read_all() == data


async def test_empty_object(storage: StorageBackend) -> None:
    info = await storage.store.put("empty", b"")
    assert summary(info) == ("empty", 0, sha(b""))
    assert await (await storage.store.get("empty")).read_all() == b""


async def test_put_replaces_and_head_of_missing_is_none(storage: StorageBackend) -> None:
    store = storage.store
    await store.put("k", b"old")
    info = await store.put("k", b"newer")
    assert summary(await store.head("k")) == summary(info) and info.sha256 == sha(b"newer")
    assert await (await store.get("k")).read_all() == b"newer"
    assert await store.head("missing") is None
    assert await store.head("k/below-a-file") is None


async def test_get_missing_raises_not_found(storage: StorageBackend) -> None:
    with pytest.raises(NotFound):
        await storage.store.get("nothing/here")
    await storage.store.put("folder/file", b"x")
    with pytest.raises(NotFound):
        await storage.store.get("folder")  # a folder is not an object


async def test_reading_is_a_snapshot(storage: StorageBackend) -> None:
    store = storage.store
    await store.put("k", b"version one")
    async with await store.get("k") as stream:
        await store.put("k", b"version two, longer")
        await store.delete("k")
        assert stream.info.size == len(b"version one")
        assert b"".join([chunk async for chunk in stream]) == b"version one"


async def test_delete_is_idempotent(storage: StorageBackend) -> None:
    store = storage.store
    await store.put("a/b/c", b"1")
    await store.put("a/keep", b"2")
    await store.delete("a/b/c")
    await store.delete("a/b/c")
    await store.delete("never/existed")

    assert await store.head("a/b/c") is None
    await store.delete("a")  # a folder of other keys: not an object, left alone
    assert await store.head("a/keep") is not None
    assert storage.stored() == storage.holding(["a/keep"])


async def test_list_uses_string_prefixes(storage: StorageBackend) -> None:
    store = storage.store
    for key in ("jobs/1/a", "jobs/12/b", "jobs/2/c", "models/x", "jobs/1/.log"):
        await store.put(key, key.encode())

    assert [i.key for i in await store.list("jobs/1")] == ["jobs/1/.log", "jobs/1/a", "jobs/12/b"]
    assert [i.key for i in await store.list("jobs/1/")] == ["jobs/1/.log", "jobs/1/a"]
    assert [i.key for i in await store.list("jobs/1/.")] == ["jobs/1/.log"]
    assert [i.key for i in await store.list("mod")] == ["models/x"]
    assert await store.list("nope/") == []
    everything = await store.list("")
    assert [i.key for i in everything] == [
        "jobs/1/.log",
        "jobs/1/a",
        "jobs/12/b",
        "jobs/2/c",
        "models/x",
    ]
    assert all(i.sha256 == sha(i.key.encode()) and i.size == len(i.key) for i in everything)
    assert all(i.created_at is not None for i in everything)


async def test_list_when_empty(storage: StorageBackend) -> None:
    assert await storage.store.list("") == []
    assert await storage.store.list("a/b/") == []


# -- atomicity ------------------------------------------------------------------------------


async def test_too_large_put_leaves_nothing(storage: StorageBackend) -> None:
    store = storage.store
    with pytest.raises(PayloadTooLarge) as too_large:
        await store.put("big", chunked(b"x" * (3 * storage.step)), max_bytes=2 * storage.step)
    assert too_large.value.details == {"max_bytes": 2 * storage.step}
    with pytest.raises(PayloadTooLarge):
        await store.put("big", b"x" * 11, max_bytes=10)
    assert await store.head("big") is None
    assert storage.stored() == []

    assert (await store.put("exactly", b"x" * 10, max_bytes=10)).size == 10


async def test_failed_put_keeps_the_previous_version(storage: StorageBackend) -> None:
    store = storage.store
    await store.put("k", b"previous")

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * (2 * storage.step)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put("k", broken())
    with pytest.raises(PayloadTooLarge):
        await store.put("k", chunked(b"y" * 100, 7), max_bytes=50)
    with pytest.raises(InvalidInput) as mismatch:
        await store.put("k", b"other bytes", sha256=sha(b"something else"))
    assert mismatch.value.code == "checksum_mismatch"
    big = os.urandom(storage.step + 10)
    with pytest.raises(InvalidInput) as big_mismatch:
        await store.put("k", chunked(big), sha256=sha(big[:-1]))
    assert big_mismatch.value.code == "checksum_mismatch"

    assert await (await store.get("k")).read_all() == b"previous"
    assert summary(await store.head("k")) == ("k", 8, sha(b"previous"))
    assert storage.stored() == storage.holding(["k"])


async def test_cancelled_put_leaves_nothing(storage: StorageBackend) -> None:
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * (2 * storage.step)  # past the first part on S3
        started.set()
        await asyncio.Event().wait()  # never finishes
        yield b""

    task = asyncio.create_task(storage.store.put("k", slow()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert storage.stored() == []


async def test_checksum_is_checked_when_given(storage: StorageBackend) -> None:
    info = await storage.store.put("k", b"data", sha256=sha(b"data").upper())
    assert info.sha256 == sha(b"data")
    with pytest.raises(InvalidInput):
        await storage.store.put("k", b"data", sha256="not-a-digest")


async def test_concurrent_puts_never_report_a_wrong_hash(storage: StorageBackend) -> None:
    bodies = [bytes([n]) * 50_000 for n in range(12)]
    await asyncio.gather(*(storage.store.put("same", body) for body in bodies))
    info = await storage.store.head("same")
    content = await (await storage.store.get("same")).read_all()
    assert info is not None and content in bodies
    assert info.sha256 in (None, sha(content))  # unknown at worst, never wrong


# -- keys -----------------------------------------------------------------------------------

BAD_KEYS = [
    "",
    "../escape",
    "a/../../b",
    "a/./b",
    "..",
    ".",
    "/absolute",
    "trailing/",
    "a//b",
    "with space",
    "tab\t",
    "line\nbreak",
    "back\\slash",
    "ünïcode",
    "tilde~meta",
    "percent%2e",
    "x" * 201,
    "/".join(["x" * 200] * 5) + "/" + "x" * 20,  # 1025 characters
]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_invalid_keys_are_refused_everywhere(storage: StorageBackend, key: str) -> None:
    store = storage.store
    calls = (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.head(key),
        lambda: store.delete(key),
    )
    for call in calls:
        with pytest.raises(InvalidInput) as refused:
            await call()
        assert refused.value.code == "invalid_key"
    with pytest.raises(InvalidInput):
        store.presign_get(key, expires_in=60)
    with pytest.raises(InvalidInput):
        store.presign_put(key, expires_in=60, max_bytes=1)


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "...",
        ".hidden",
        "A-z_0.9/b",
        "x" * 200,
        "/".join(["x" * 200] * 5) + "/" + "x" * 19,
        "a/b/c/d/e",
    ],
)
async def test_valid_keys(storage: StorageBackend, key: str) -> None:
    assert (await storage.store.put(key, b"ok")).key == key
    assert [i.key for i in await storage.store.list(key)] == [key]


@pytest.mark.parametrize("prefix", ["../", "/a", "a//", "a/../", "a b", "~", "x" * 201])
async def test_invalid_prefixes(storage: StorageBackend, prefix: str) -> None:
    with pytest.raises(InvalidInput):
        await storage.store.list(prefix)


# -- pre-signed URLs (argument checks; each storage's own tests follow the URLs) ------------


@pytest.mark.parametrize("expires_in", [0, -5, 7 * 24 * 3600 + 1])
def test_presign_refuses_bad_lifetimes(storage: StorageBackend, expires_in: int) -> None:
    with pytest.raises(InvalidInput):
        storage.store.presign_get("k", expires_in=expires_in)
    with pytest.raises(InvalidInput):
        storage.store.presign_put("k", expires_in=expires_in, max_bytes=1)


@pytest.mark.parametrize("filename", ["", "a/b", "a\\b", "bad\r\nheader: x", "..", "x" * 256])
def test_presign_refuses_bad_filenames(storage: StorageBackend, filename: str) -> None:
    with pytest.raises(InvalidInput):
        storage.store.presign_get("k", expires_in=60, filename=filename)


def test_presign_refuses_bad_limits(storage: StorageBackend) -> None:
    with pytest.raises(InvalidInput):
        storage.store.presign_put("k", expires_in=60, max_bytes=-1)
    with pytest.raises(InvalidInput):
        storage.store.presign_put("k", expires_in=60, max_bytes=1, sha256="abc")


def test_presigned_urls_are_absolute(storage: StorageBackend) -> None:
    for url in (
        storage.store.presign_put("jobs/1/out.bin", expires_in=300, max_bytes=5),
        storage.store.presign_get("jobs/1/out.bin", expires_in=300, filename="out.bin"),
    ):
        assert url.startswith(("http://", "https://")) and "/jobs/1/out.bin?" in url


# -- memory ---------------------------------------------------------------------------------


async def test_large_objects_stream_with_bounded_memory(storage: StorageBackend) -> None:
    store = storage.store
    await store.put("warm-up", b"x")  # the S3 client loads its models once, before measuring
    piece = os.urandom(64 * 1024)
    expected = hashlib.sha256()

    async def source() -> AsyncIterator[bytes]:
        for _ in range(storage.big_object // len(piece)):
            expected.update(piece)
            yield piece

    tracemalloc.start()
    try:
        info = await store.put("big/model.bin", source())
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        read = hashlib.sha256()
        async for chunk in await store.get("big/model.bin"):
            read.update(chunk)
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (info.size, info.sha256) == (storage.big_object, expected.hexdigest())
    assert read.hexdigest() == expected.hexdigest()
    assert put_peak < storage.memory_bound, put_peak
    assert get_peak < storage.memory_bound, get_peak
