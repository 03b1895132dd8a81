"""LocalObjectStore and URL signing on real files: round trips, atomicity, key validation."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from peergpu.config import ServerSettings
from peergpu.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, PermissionDenied
from peergpu.server.storage import (
    LocalObjectStore,
    UrlGrant,
    UrlSigner,
    create_object_store,
    derive_storage_secret,
)
from peergpu.server.storage.local import CHUNK_SIZE

SECRET = b"storage-test-secret-" + b"x" * 20
PUBLIC_URL = "http://testserver/api/v1"
MiB = 1 << 20


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "objects"


@pytest.fixture
def store(root: Path, clock: FakeClock) -> LocalObjectStore:
    return LocalObjectStore(root, public_url=PUBLIC_URL, secret=SECRET, clock=clock)


async def chunked(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[str]:
    """Every file below ``root`` (temp files and sidecars included), relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


# -- round trips ----------------------------------------------------------------------------


async def test_put_get_head_round_trip(store: LocalObjectStore, root: Path) -> None:
    info = await store.put("jobs/1/result.bin", b"hello world")

    assert (info.key, info.size, info.sha256) == ("jobs/1/result.bin", 11, sha(b"hello world"))
    assert isinstance(info.created_at, datetime) and info.created_at.tzinfo is not None
    assert (root / "jobs" / "1" / "result.bin").read_bytes() == b"hello world"
    assert await store.head("jobs/1/result.bin") == info
    assert await (await store.get("jobs/1/result.bin")).read_all() == b"hello world"


async def test_put_streams_from_an_async_iterator(store: LocalObjectStore) -> None:
    data = os.urandom(3 * MiB + 123)
    info = await store.put("bundles/b.zip", chunked(data, 10_000))
    assert (info.size, info.sha256) == (len(data), sha(data))

    stream = await store.get("bundles/b.zip")
    assert stream.info == info
    chunks = [chunk async for chunk in stream]
    assert b"".join(chunks) == data
    assert all(len(chunk) <= CHUNK_SIZE for chunk in chunks)


async def test_empty_object(store: LocalObjectStore) -> None:
    info = await store.put("empty", b"")
    assert (info.size, info.sha256) == (0, sha(b""))
    assert await (await store.get("empty")).read_all() == b""


async def test_put_replaces_and_head_of_missing_is_none(store: LocalObjectStore) -> None:
    await store.put("k", b"old")
    info = await store.put("k", b"newer")
    assert (await store.head("k")) == info and info.sha256 == sha(b"newer")
    assert await (await store.get("k")).read_all() == b"newer"
    assert await store.head("missing") is None
    assert await store.head("k/below-a-file") is None


async def test_get_missing_raises_not_found(store: LocalObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.get("nothing/here")
    await store.put("folder/file", b"x")
    with pytest.raises(NotFound):
        await store.get("folder")  # a folder is not an object


async def test_reading_is_a_snapshot(store: LocalObjectStore) -> None:
    await store.put("k", b"version one")
    async with await store.get("k") as stream:
        await store.put("k", b"version two, longer")
        await store.delete("k")
        assert b"".join([chunk async for chunk in stream]) == b"version one"


async def test_delete_is_idempotent_and_prunes_empty_folders(
    store: LocalObjectStore, root: Path
) -> None:
    await store.put("a/b/c", b"1")
    await store.put("a/keep", b"2")
    await store.delete("a/b/c")
    await store.delete("a/b/c")
    await store.delete("never/existed")

    assert await store.head("a/b/c") is None
    assert not (root / "a" / "b").exists()
    assert files_under(root) == ["a/keep", "a/keep~meta"]
    await store.delete("a")  # a folder of other keys: not an object, left alone
    assert await store.head("a/keep") is not None


async def test_list_uses_string_prefixes(store: LocalObjectStore) -> None:
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


async def test_list_on_an_empty_or_missing_root(store: LocalObjectStore) -> None:
    assert await store.list("") == []
    assert await store.list("a/b/") == []


# -- atomicity ------------------------------------------------------------------------------


async def test_too_large_put_leaves_nothing(store: LocalObjectStore, root: Path) -> None:
    with pytest.raises(PayloadTooLarge) as too_large:
        await store.put("big", chunked(b"x" * (2 * MiB)), max_bytes=MiB)
    assert too_large.value.details == {"max_bytes": MiB}
    with pytest.raises(PayloadTooLarge):
        await store.put("big", b"x" * 11, max_bytes=10)
    assert await store.head("big") is None
    assert files_under(root) == []

    assert (await store.put("exactly", b"x" * 10, max_bytes=10)).size == 10


async def test_failed_put_keeps_the_previous_version(store: LocalObjectStore, root: Path) -> None:
    await store.put("k", b"previous")

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * (2 * CHUNK_SIZE)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put("k", broken())
    with pytest.raises(PayloadTooLarge):
        await store.put("k", chunked(b"y" * 100, 7), max_bytes=50)
    with pytest.raises(InvalidInput) as mismatch:
        await store.put("k", b"other bytes", sha256=sha(b"something else"))

    assert mismatch.value.code == "checksum_mismatch"
    assert await (await store.get("k")).read_all() == b"previous"
    assert (await store.head("k")) is not None
    assert files_under(root) == ["k", "k~meta"]


async def test_cancelled_put_leaves_nothing(store: LocalObjectStore, root: Path) -> None:
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"x" * (2 * CHUNK_SIZE)
        started.set()
        await asyncio.Event().wait()  # never finishes
        yield b""

    task = asyncio.create_task(store.put("k", slow()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(root) == []


async def test_checksum_is_checked_when_given(store: LocalObjectStore) -> None:
    info = await store.put("k", b"data", sha256=sha(b"data").upper())
    assert info.sha256 == sha(b"data")
    with pytest.raises(InvalidInput):
        await store.put("k", b"data", sha256="not-a-digest")


async def test_concurrent_puts_never_report_a_wrong_hash(store: LocalObjectStore) -> None:
    bodies = [bytes([n]) * 50_000 for n in range(12)]
    await asyncio.gather(*(store.put("same", body) for body in bodies))
    info = await store.head("same")
    content = await (await store.get("same")).read_all()
    assert info is not None and content in bodies
    assert info.sha256 in (None, sha(content))  # unknown at worst, never wrong


async def test_hash_is_unknown_once_the_file_changes_behind_our_back(
    store: LocalObjectStore, root: Path
) -> None:
    await store.put("k", b"original")
    (root / "k").write_bytes(b"tampered")  # same inode, new mtime
    info = await store.head("k")
    assert info is not None and info.sha256 is None and info.size == 8


async def test_file_and_folder_clash_is_a_conflict(store: LocalObjectStore, root: Path) -> None:
    await store.put("a", b"file")
    with pytest.raises(Conflict):
        await store.put("a/b", b"below a file")
    await store.put("x/y", b"in a folder")
    with pytest.raises(Conflict):
        await store.put("x", b"where a folder is")
    assert sorted(files_under(root)) == ["a", "a~meta", "x/y", "x/y~meta"]

    await store.delete("x/y")
    assert (await store.put("x", b"now fine")).size == 8


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
async def test_invalid_keys_are_refused_everywhere(store: LocalObjectStore, key: str) -> None:
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
async def test_valid_keys(store: LocalObjectStore, key: str) -> None:
    assert (await store.put(key, b"ok")).key == key
    assert [i.key for i in await store.list(key)] == [key]


@pytest.mark.parametrize("prefix", ["../", "/a", "a//", "a/../", "a b", "~", "x" * 201])
async def test_invalid_prefixes(store: LocalObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidInput):
        await store.list(prefix)


async def test_symlinks_cannot_lead_outside_the_root(
    store: LocalObjectStore, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root.mkdir()
    (root / "link").symlink_to(outside)

    for call in (store.get("link/secret"), store.put("link/new", b"x"), store.head("link/x")):
        with pytest.raises(InvalidInput):
            await call
    with pytest.raises(InvalidInput):
        await store.list("link/")
    assert await store.list("") == []  # the walk does not follow the link
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


# -- pre-signed URLs and signing -------------------------------------------------------------


def test_presigned_urls_are_absolute_and_carry_the_grant(
    store: LocalObjectStore, clock: FakeClock
) -> None:
    url = store.presign_put("jobs/1/out.bin", expires_in=300, max_bytes=99, sha256="A" * 64)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == (
        "http://testserver/api/v1/storage/o/jobs/1/out.bin"
    )
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    assert query["expires"] == str(int(clock.now) + 300)
    assert query["max_bytes"] == "99" and query["sha256"] == "a" * 64
    grant = UrlGrant("PUT", "jobs/1/out.bin", int(clock.now) + 300, 99, "a" * 64)
    store.signer.verify(grant, query["signature"])

    get_url = store.presign_get("k", expires_in=60, filename="résumé v2.pdf")
    get_query = parse_qs(urlsplit(get_url).query)
    assert get_query["filename"] == ["résumé v2.pdf"] and "max_bytes" not in get_query


@pytest.mark.parametrize("expires_in", [0, -5, 7 * 24 * 3600 + 1])
def test_presign_refuses_bad_lifetimes(store: LocalObjectStore, expires_in: int) -> None:
    with pytest.raises(InvalidInput):
        store.presign_get("k", expires_in=expires_in)
    with pytest.raises(InvalidInput):
        store.presign_put("k", expires_in=expires_in, max_bytes=1)


@pytest.mark.parametrize("filename", ["", "a/b", "a\\b", "bad\r\nheader: x", "..", "x" * 256])
def test_presign_refuses_bad_filenames(store: LocalObjectStore, filename: str) -> None:
    with pytest.raises(InvalidInput):
        store.presign_get("k", expires_in=60, filename=filename)


def test_presign_refuses_bad_limits(store: LocalObjectStore) -> None:
    with pytest.raises(InvalidInput):
        store.presign_put("k", expires_in=60, max_bytes=-1)
    with pytest.raises(InvalidInput):
        store.presign_put("k", expires_in=60, max_bytes=1, sha256="abc")


def test_signatures_cover_every_field_and_expire(clock: FakeClock) -> None:
    signer = UrlSigner(SECRET, clock=clock)
    grant = signer.grant("PUT", "k", expires_in=60, max_bytes=10, sha256="0" * 64)
    signature = signer.sign(grant)
    signer.verify(grant, signature)

    altered = [
        UrlGrant("GET", "k", grant.expires, 10, "0" * 64),
        UrlGrant("PUT", "k2", grant.expires, 10, "0" * 64),
        UrlGrant("PUT", "k", grant.expires + 1, 10, "0" * 64),
        UrlGrant("PUT", "k", grant.expires, 11, "0" * 64),
        UrlGrant("PUT", "k", grant.expires, 10, None),
        UrlGrant("PUT", "k", grant.expires, 10, "0" * 64, "name"),
    ]
    for other in altered:
        with pytest.raises(PermissionDenied) as refused:
            signer.verify(other, signature)
        assert refused.value.code == "invalid_signature"
    for bad in ("", signature[:-1], signature + "A", "ü" * 43):
        with pytest.raises(PermissionDenied):
            signer.verify(grant, bad)
    with pytest.raises(PermissionDenied):
        UrlSigner(b"another-secret-of-enough-length", clock=clock).verify(grant, signature)

    clock.now += 59
    signer.verify(grant, signature)
    clock.now += 1
    with pytest.raises(PermissionDenied) as expired:
        signer.verify(grant, signature)
    assert expired.value.code == "url_expired"


def test_secret_derivation_and_minimum_length() -> None:
    derived = derive_storage_secret("server-secret")
    assert derived == derive_storage_secret(b"server-secret") != b"server-secret"
    assert len(derived) == 32 and derived != derive_storage_secret("other")
    with pytest.raises(ValueError):
        UrlSigner(b"short")


def test_create_object_store_from_settings(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path, public_url="https://gpu.example/")
    store = create_object_store(settings, secret=derive_storage_secret("s" * 40))
    assert isinstance(store, LocalObjectStore)
    assert store.root == (tmp_path / "objects").resolve()
    assert store.presign_get("k", expires_in=5).startswith(
        "https://gpu.example/api/v1/storage/o/k?"
    )
    assert not (tmp_path / "objects").exists()  # no I/O until the first upload


def test_public_url_must_be_absolute(root: Path) -> None:
    with pytest.raises(ValueError):
        LocalObjectStore(root, public_url="/api/v1", secret=SECRET)


async def test_special_files_in_the_folder_are_not_objects(
    store: LocalObjectStore, root: Path
) -> None:
    root.mkdir()
    os.mkfifo(root / "pipe")  # opening it for reading must not hang
    with pytest.raises(NotFound):
        await store.get("pipe")
    assert await store.head("pipe") is None
    assert await store.list("") == []


# -- memory ---------------------------------------------------------------------------------


async def test_large_objects_stream_with_bounded_memory(store: LocalObjectStore) -> None:
    total = 20 * MiB
    piece = os.urandom(64 * 1024)
    expected = hashlib.sha256()

    async def source() -> AsyncIterator[bytes]:
        for _ in range(total // len(piece)):
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

    assert (info.size, info.sha256) == (total, expected.hexdigest())
    assert read.hexdigest() == expected.hexdigest()
    assert put_peak < 4 * MiB, put_peak
    assert get_peak < 4 * MiB, get_peak
