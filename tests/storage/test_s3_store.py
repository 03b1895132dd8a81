"""What is particular to ``S3ObjectStore``, against a real S3-compatible server on loopback
(moto, with the pre-signed URL checks AWS makes; see ``testing_s3``): S3's own pre-signed
URLs followed with httpx, the key prefix, configuration from settings, and errors when S3 is
missing or unreachable."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from peergpu.config import ServerSettings
from peergpu.errors import InvalidInput, ServiceUnavailable
from peergpu.server.storage import create_object_store, derive_storage_secret
from peergpu.server.storage import s3 as s3_module
from peergpu.server.storage.base import content_disposition
from peergpu.server.storage.s3 import (
    MIN_PART_SIZE,
    S3ObjectStore,
    checksum_header,
)
from tests.integration.harness import free_port
from tests.storage.testing_s3 import SECRET_KEY, S3Server

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def s3_error(response: httpx.Response) -> tuple[int, str]:
    """The status and S3's error code (``<Error><Code>...``)."""
    code = response.text.split("<Code>", 1)[-1].split("</Code>", 1)[0]
    return response.status_code, code


def upload_headers(body: bytes) -> dict[str, str]:
    """What the agent sends with every upload."""
    return {
        "content-length": str(len(body)),
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
    }


# -- pre-signed PUT ---------------------------------------------------------------------------


async def test_presigned_put_accepts_the_bound_body(
    s3_store: S3ObjectStore, s3_server: S3Server, s3_bucket: str
) -> None:
    body = os.urandom(100_000)
    url = s3_store.presign_put(
        "jobs/1/out.bin", expires_in=300, max_bytes=len(body), sha256=sha(body)
    )
    assert "x-amz-checksum-sha256" in urlsplit(url).query  # among the signed headers

    async with httpx.AsyncClient() as http:
        response = await http.put(url, content=body, headers=upload_headers(body))
    assert response.status_code == 200, response.text

    info = await s3_store.head("jobs/1/out.bin")
    assert info is not None and (info.size, info.sha256) == (len(body), sha(body))
    assert await (await s3_store.get("jobs/1/out.bin")).read_all() == body
    assert [i.sha256 for i in await s3_store.list("jobs/")] == [sha(body)]
    assert s3_server.objects(s3_bucket) == ["jobs/1/out.bin"]


async def test_presigned_put_refuses_any_other_body(
    s3_store: S3ObjectStore, s3_server: S3Server, s3_bucket: str
) -> None:
    body = b"exactly these bytes"
    url = s3_store.presign_put("k", expires_in=300, max_bytes=len(body), sha256=sha(body))
    same_length = b"exactly those bytes"
    attempts = {
        # the signed digest, another body: S3 hashes the body and refuses it
        "wrong body": (same_length, upload_headers(body), (400, "BadDigest")),
        # a digest that matches the other body: the header is signed
        "other digest": (same_length, upload_headers(same_length), (403, "SignatureDoesNotMatch")),
        "no digest": (body, {}, (403, "SignatureDoesNotMatch")),
        "longer": (body + b"!", upload_headers(body + b"!"), (403, "SignatureDoesNotMatch")),
        "shorter": (body[:-1], upload_headers(body[:-1]), (403, "SignatureDoesNotMatch")),
    }
    async with httpx.AsyncClient() as http:
        for name, (content, headers, expected) in attempts.items():
            response = await http.put(url, content=content, headers=headers)
            assert s3_error(response) == expected, name
        tampered = url.replace("/k?", "/other?")
        response = await http.put(tampered, content=body, headers=upload_headers(body))
        assert s3_error(response) == (403, "SignatureDoesNotMatch")
    assert s3_server.objects(s3_bucket) == []


async def test_presigned_put_without_a_digest_binds_the_length(s3_store: S3ObjectStore) -> None:
    url = s3_store.presign_put("k", expires_in=300, max_bytes=5)
    async with httpx.AsyncClient() as http:
        assert s3_error(await http.put(url, content=b"123456"))[0] == 403  # over max_bytes
        assert s3_error(await http.put(url, content=b"1234"))[0] == 403  # S3 binds it exactly
        assert (await http.put(url, content=b"12345")).status_code == 200
    info = await s3_store.head("k")
    # Nobody vouched for a digest: S3 has no checksum to report, and we never saw the bytes.
    assert info is not None and (info.size, info.sha256) == (5, None)


async def test_expired_urls_are_refused(s3_store: S3ObjectStore, s3_server: S3Server) -> None:
    await s3_store.put("k", b"data")
    body = b"new data"
    put_url = s3_store.presign_put("k", expires_in=60, max_bytes=len(body), sha256=sha(body))
    get_url = s3_store.presign_get("k", expires_in=60)
    async with httpx.AsyncClient() as http:
        s3_server.set_clock_offset(90)
        assert s3_error(await http.get(get_url)) == (403, "AccessDenied")
        put = await http.put(put_url, content=body, headers=upload_headers(body))
        assert s3_error(put) == (403, "AccessDenied")
        s3_server.set_clock_offset(30)
        assert (await http.get(get_url)).content == b"data"
        put = await http.put(put_url, content=body, headers=upload_headers(body))
        assert put.status_code == 200


# -- pre-signed GET ---------------------------------------------------------------------------


async def test_presigned_get_offers_the_file_under_its_name(s3_store: S3ObjectStore) -> None:
    await s3_store.put("models/m/weights", b"weights")
    named = s3_store.presign_get("models/m/weights", expires_in=60, filename='résumé "v2".bin')
    plain = s3_store.presign_get("models/m/weights", expires_in=60)
    missing = s3_store.presign_get("models/m/other", expires_in=60)

    async with httpx.AsyncClient() as http:
        response = await http.get(named)
        assert response.status_code == 200 and response.content == b"weights"
        assert response.headers["content-disposition"] == (
            'attachment; filename="r_sum_ _v2_.bin"; '
            "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22v2%22.bin"
        )
        assert response.headers["content-type"] == "application/octet-stream"
        response = await http.get(plain)
        assert response.headers["content-disposition"] == "attachment"
        # S3 says 404 only to callers that may list the bucket, 403 to the others.
        assert (await http.get(missing)).status_code in (403, 404)
        tampered = named.replace("weights?", "other?")
        assert s3_error(await http.get(tampered)) == (403, "SignatureDoesNotMatch")


@pytest.mark.parametrize(
    ("filename", "header"),
    [
        (None, "attachment"),
        ("a.txt", "attachment; filename=\"a.txt\"; filename*=UTF-8''a.txt"),
        (
            'résumé "v2".bin',
            'attachment; filename="r_sum_ _v2_.bin"; '
            "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22v2%22.bin",
        ),
        (
            "日本語.csv",
            "attachment; filename=\"___.csv\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC%E8%AA%9E.csv",
        ),
        ("a;b=c", "attachment; filename=\"a;b=c\"; filename*=UTF-8''a%3Bb%3Dc"),
    ],
)
def test_content_disposition_is_rfc_6266(filename: str | None, header: str) -> None:
    """One function builds the header for the local route and for S3's presigned GETs."""
    assert content_disposition(filename) == header


# -- the prefix -------------------------------------------------------------------------------


async def test_the_prefix_keeps_stores_apart(s3_server: S3Server, s3_bucket: str) -> None:
    tenant_a = s3_server.store(s3_bucket, prefix="tenant-a")
    tenant_b = s3_server.store(s3_bucket, prefix="/deploy/tenant-b/")
    try:
        assert (tenant_a.prefix, tenant_b.prefix) == ("tenant-a/", "deploy/tenant-b/")
        await tenant_a.put("jobs/1/out", b"a")
        await tenant_b.put("jobs/1/out", b"b")
        await tenant_b.put("jobs/2/out", b"b2")

        assert await (await tenant_a.get("jobs/1/out")).read_all() == b"a"
        assert [i.key for i in await tenant_a.list("")] == ["jobs/1/out"]
        assert [i.key for i in await tenant_b.list("jobs/")] == ["jobs/1/out", "jobs/2/out"]
        assert await tenant_a.head("jobs/2/out") is None
        await tenant_a.delete("jobs/1/out")
        assert await tenant_b.head("jobs/1/out") is not None

        body = b"uploaded"
        url = tenant_a.presign_put("up", expires_in=60, max_bytes=len(body), sha256=sha(body))
        assert urlsplit(url).path == f"/{s3_bucket}/tenant-a/up"
        async with httpx.AsyncClient() as http:
            assert (await http.put(url, content=body, headers=upload_headers(body))).is_success
        assert [i.key for i in await tenant_a.list("")] == ["up"]
        assert s3_server.objects(s3_bucket) == [
            "deploy/tenant-b/jobs/1/out",
            "deploy/tenant-b/jobs/2/out",
            "tenant-a/up",
        ]
    finally:
        await tenant_a.close()
        await tenant_b.close()


@pytest.mark.parametrize("prefix", ["a b", "../x", "x/../y", "a//b", "tilde~"])
def test_a_bad_prefix_is_a_configuration_error(prefix: str) -> None:
    with pytest.raises(ValueError):
        S3ObjectStore("bucket", prefix=prefix)


def test_keys_must_fit_with_the_prefix() -> None:
    store = S3ObjectStore("bucket", prefix="p" * 10, access_key_id="k", secret_access_key="s")
    longest = "/".join(["x" * 200] * 5) + "/" + "x" * 19  # 1,024 characters: a valid key
    with pytest.raises(InvalidInput) as refused:
        store.presign_get(longest, expires_in=60)
    assert refused.value.code == "invalid_key"


# -- large bodies -----------------------------------------------------------------------------


async def test_objects_over_the_copy_limit_are_published_by_a_multipart_copy(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a known digest a multipart body is staged, then copied into place with its
    digest; past S3's 5 GiB copy limit the copy itself goes in parts. The limits are
    shrunk here so that 12 MiB takes that path."""
    store = s3_server.store(s3_bucket, part_size=MIN_PART_SIZE)
    monkeypatch.setattr(s3_module, "MAX_SINGLE_REQUEST_BYTES", 6 * MiB)
    monkeypatch.setattr(s3_module, "COPY_PART_SIZE", MIN_PART_SIZE)
    data = os.urandom(12 * MiB)
    try:
        info = await store.put("big", data)
        assert (info.size, info.sha256) == (len(data), sha(data))
        head = await store.head("big")
        assert head is not None and head.sha256 == sha(data)
        assert await (await store.get("big")).read_all() == data
        assert s3_server.objects(s3_bucket) == ["big"]  # the staging object is gone
    finally:
        await store.close()


# -- configuration and failures -----------------------------------------------------------


async def test_create_object_store_picks_s3_from_the_environment(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.settings_env(s3_bucket, prefix="peergpu/").items():
        monkeypatch.setenv(name, value)
    settings = ServerSettings(data_dir=tmp_path)
    store = create_object_store(settings, secret=derive_storage_secret("s" * 40))
    assert isinstance(store, S3ObjectStore)
    try:
        assert (store.bucket, store.prefix, store.endpoint_url) == (
            s3_bucket,
            "peergpu/",
            s3_server.url,
        )
        await store.ensure_bucket()
        await store.put("k", b"v")
        assert s3_server.objects(s3_bucket) == ["peergpu/k"]
        assert store.presign_get("k", expires_in=5).startswith(
            f"{s3_server.url}/{s3_bucket}/peergpu/k?"
        )
        assert not (tmp_path / "objects").exists()
    finally:
        await store.close()


async def test_a_missing_bucket_is_reported_and_can_be_created(s3_server: S3Server) -> None:
    store = s3_server.store("peergpu-missing-bucket")
    try:
        with pytest.raises(ServiceUnavailable) as missing:
            await store.put("k", b"v")
        assert missing.value.code == "storage_unavailable"
        assert "peergpu-missing-bucket' does not exist" in missing.value.message
        with pytest.raises(ServiceUnavailable) as at_startup:
            await store.ensure_bucket()
        assert "create it" in at_startup.value.message

        await store.ensure_bucket(create=True)
        await store.ensure_bucket()
        assert (await store.put("k", b"v")).size == 1
    finally:
        await store.close()
        s3_server.reset()


async def test_an_unreachable_endpoint_is_service_unavailable() -> None:
    store = S3ObjectStore(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        access_key_id="key",
        secret_access_key=SECRET_KEY,
        addressing_style="path",
        max_attempts=1,
        connect_timeout=2,
    )
    calls = {
        "put": lambda: store.put("k", b"v"),
        "put a large body": lambda: store.put("k", b"v" * (MIN_PART_SIZE + 1)),
        "get": lambda: store.get("k"),
        "head": lambda: store.head("k"),
        "delete": lambda: store.delete("k"),
        "list": lambda: store.list(""),
        "ensure_bucket": lambda: store.ensure_bucket(),
    }
    try:
        for name, call in calls.items():
            with pytest.raises(ServiceUnavailable) as unavailable:
                await call()
            error = unavailable.value
            assert error.code == "storage_unavailable", name
            assert "could not be reached" in error.message, name
            assert SECRET_KEY not in f"{error.message} {error.details}", name
        # Signing needs no connection.
        assert store.presign_get("k", expires_in=60).startswith("http://127.0.0.1:")
    finally:
        await store.close()


def test_the_checksum_header_is_the_digest_in_base64() -> None:
    digest = sha(b"abc")
    assert checksum_header(digest) == base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
