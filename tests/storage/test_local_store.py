"""What is particular to ``LocalObjectStore``: files, sidecars and folders on disk, symlinks
and special files, and its own URL signing. The contract every store honours (round trips,
atomicity, keys, memory) is tested on both backends in ``test_store_contract.py``."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from peergpu.config import ServerSettings
from peergpu.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from peergpu.server.storage import (
    LocalObjectStore,
    UrlGrant,
    UrlSigner,
    create_object_store,
    derive_storage_secret,
)

SECRET = b"storage-test-secret-" + b"x" * 20
PUBLIC_URL = "http://testserver/api/v1"


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


def files_under(root: Path) -> list[str]:
    """Every file below ``root`` (temp files and sidecars included), relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


# -- files on disk ---------------------------------------------------------------------------


async def test_objects_are_files_with_a_sidecar(store: LocalObjectStore, root: Path) -> None:
    info = await store.put("jobs/1/result.bin", b"hello world")

    assert (root / "jobs" / "1" / "result.bin").read_bytes() == b"hello world"
    assert files_under(root) == ["jobs/1/result.bin", "jobs/1/result.bin~meta"]
    assert await store.head("jobs/1/result.bin") == info  # created_at is the file's mtime
    assert (await store.get("jobs/1/result.bin")).info == info


async def test_delete_prunes_empty_folders(store: LocalObjectStore, root: Path) -> None:
    await store.put("a/b/c", b"1")
    await store.put("a/keep", b"2")
    await store.delete("a/b/c")

    assert not (root / "a" / "b").exists()
    assert files_under(root) == ["a/keep", "a/keep~meta"]


# -- sidecars, clashes and what else a folder can hold ---------------------------------------


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
