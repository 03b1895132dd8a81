"""``S3ObjectStore``: objects in an S3 bucket (AWS or any S3-compatible service), through
botocore (boto3's engine).

Every key lives at ``<prefix><key>`` in one bucket; ``list`` strips the prefix again. botocore
is blocking, so each call runs in a worker thread (``anyio.to_thread``: a cancelled caller
still waits for the thread, so no request outlives the ``put`` that started it). One client
serves the store; it is created on first use, so building a store does no I/O.

**Writes.** ``put`` buffers the body up to ``part_size`` while hashing it. A body that fits is
sent with one ``PutObject``; a larger one goes up as a multipart upload, one part at a time, so
memory stays around two parts whatever the size (parts grow after the first 1,000, see
``_Multipart.next_part_size``). S3 makes an object visible only when its ``PutObject`` or
``CompleteMultipartUpload`` succeeds: that is the commit point. A body that is too large,
hashes wrongly, fails or is cancelled before then stores nothing (an open multipart upload is
aborted, shielded from the cancellation); one cancelled while that last request is in flight
may be stored, as with any commit.

**SHA-256.** Each object carries its digest as user metadata (``x-amz-meta-sha256``), written
in the same request as the bytes, so it describes them exactly. Multipart uploads must declare
metadata before the first part: with an expected ``sha256`` the upload goes straight to the key
with that digest (and is aborted if the body hashes differently); without one the upload lands
on a staging key (``<prefix>.uploads~/<uuid>``, never a valid key, so never listed) and is then
copied server-side to the key with the digest it turned out to have, and the staging object
deleted. Objects uploaded through ``presign_put`` with a ``sha256`` carry S3's own full-object
``x-amz-checksum-sha256`` instead, which ``head``/``get``/``list`` read when there is no
metadata. ``list`` issues one ``HeadObject`` per object (16 at a time) to report that digest.

**Pre-signed URLs** are S3's own (SigV4, at most seven days), signed locally without I/O when
credentials are configured (with the default credential chain, the first call may look the
credentials up). ``presign_put`` binds ``Content-Length`` to ``max_bytes`` (S3 cannot enforce a
range on a pre-signed PUT, only an exact length) and, with ``sha256``, the
``x-amz-checksum-sha256`` header: the uploader must send both, and S3 refuses a body whose
SHA-256 differs (400 ``BadDigest``) or a missing or changed header (403). ``presign_get`` asks
S3 to answer with ``Content-Disposition: attachment`` (RFC 6266 / 5987 for the name) and
``application/octet-stream``.

**Errors.** A missing object is ``NotFound`` (``get``) or ``None`` (``head``; a ``HEAD`` cannot
tell a missing bucket from a missing key). Anything else S3 or the network answers (a missing
bucket, refused credentials, 5xx, timeouts, no connection) is ``ServiceUnavailable`` with code
``storage_unavailable``; the botocore error is logged and chained, never shown to a client.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, TypeVar

import anyio
import botocore.session
from anyio import to_thread
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from peergpu.errors import InvalidInput, NotFound, PayloadTooLarge, ServiceUnavailable
from peergpu.server.storage.base import (
    MAX_KEY_LENGTH,
    ObjectInfo,
    ObjectStore,
    ObjectStream,
    content_disposition,
    is_valid_key,
    validate_filename,
    validate_key,
    validate_lifetime,
    validate_prefix,
    validate_sha256,
)

logger = logging.getLogger(__name__)

#: S3's smallest part (all but the last) and largest single ``PutObject``/``CopyObject``.
MIN_PART_SIZE = 5 << 20
MAX_SINGLE_REQUEST_BYTES = 5 << 30
#: Bodies up to this size go up in one request; larger ones in parts of this size.
DEFAULT_PART_SIZE = 8 << 20
#: Bodies are read back in chunks of this size.
CHUNK_SIZE = 1 << 20
#: Parts of a server-side multipart copy (objects over 5 GiB).
COPY_PART_SIZE = 1 << 30
#: How many ``HeadObject`` calls ``list`` runs at once (also the connection pool size).
LIST_CONCURRENCY = 16

_SHA256_METADATA = "sha256"
_STAGING = ".uploads~/"
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_CREDENTIAL_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}
)

_UNREACHABLE = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
)

T = TypeVar("T")


class S3ObjectStore(ObjectStore):
    """Objects under ``prefix`` in ``bucket``; see the module docstring for how each part of
    the contract is kept. ``access_key_id`` empty means boto3's default credential chain
    (environment, shared files, instance or task role)."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: str = "auto",
        part_size: int = DEFAULT_PART_SIZE,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is required")
        if not MIN_PART_SIZE <= part_size <= MAX_SINGLE_REQUEST_BYTES:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and 5 GiB")
        self.bucket = bucket
        self.prefix = _normalize_prefix(prefix)
        self.part_size = part_size
        self.endpoint_url = endpoint_url or None
        self._region = region
        self._credentials = (access_key_id or None, secret_access_key or None)
        self._config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=LIST_CONCURRENCY,
            # We send our own SHA-256; no SDK-default CRC headers that some S3-compatible
            # services do not understand.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client_lock = threading.Lock()
        self._client_instance: Any = None

    # -- the contract -------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        data: AsyncIterator[bytes] | bytes,
        *,
        max_bytes: int | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        validate_key(key)
        target = self._object_key(key)
        expected = validate_sha256(sha256) if sha256 is not None else None
        if max_bytes is not None and max_bytes < 0:
            raise InvalidInput("max_bytes cannot be negative.", details={"max_bytes": max_bytes})
        if isinstance(data, bytes | bytearray | memoryview) and max_bytes is not None:
            _check_size(len(data), max_bytes)  # refuse before sending anything
        hasher = hashlib.sha256()
        size = 0
        pending = bytearray()
        # With a known digest the parts go straight to the key, metadata included; else to a
        # staging key, copied into place with the digest once it is known.
        upload = _Multipart(self, target if expected else self._staging_key(), expected)
        try:
            async for chunk in _chunks(data):
                size += len(chunk)
                if max_bytes is not None:
                    _check_size(size, max_bytes)
                pending += chunk
                if len(pending) >= upload.next_part_size:
                    part, pending = pending, bytearray()
                    await to_thread.run_sync(hasher.update, part)
                    await upload.send(part)
            await to_thread.run_sync(hasher.update, pending)
            digest = hasher.hexdigest()
            if expected is not None and digest != expected:
                raise InvalidInput(
                    "The uploaded bytes do not have the expected SHA-256; nothing was stored.",
                    code="checksum_mismatch",
                    details={"expected": expected, "actual": digest},
                )
            if upload.upload_id is None:
                headers = await self._put_single(target, pending, digest)
            else:
                if pending:
                    await upload.send(pending)
                del pending
                headers = await upload.complete()
                if expected is None:
                    headers = await self._publish_staged(upload.key, target, size, digest)
        except BaseException:
            with anyio.CancelScope(shield=True):  # clean up even when cancelled
                await upload.discard()
            raise
        return ObjectInfo(key=key, size=size, sha256=digest, created_at=_written_at(headers))

    async def get(self, key: str) -> ObjectStream:
        validate_key(key)
        response = await self._call("GetObject", partial(self._get_sync, self._object_key(key)))
        if response is None:
            raise NotFound(f"No object under key '{key}'.", details={"key": key})
        return _S3Stream(response["Body"], _info(key, response))

    async def head(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        return await self._call("HeadObject", partial(self._head_sync, key))

    async def delete(self, key: str) -> None:
        validate_key(key)
        await self._call("DeleteObject", partial(self._delete_sync, self._object_key(key)))

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        validate_prefix(prefix)
        return await self._call("ListObjectsV2", partial(self._list_sync, prefix))

    def presign_put(
        self, key: str, *, expires_in: int, max_bytes: int, sha256: str | None = None
    ) -> str:
        validate_key(key)
        if max_bytes < 0:
            raise InvalidInput("max_bytes cannot be negative.", details={"max_bytes": max_bytes})
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._object_key(key),
            "ContentLength": max_bytes,
        }
        if sha256 is not None:
            params["ChecksumSHA256"] = checksum_header(validate_sha256(sha256))
        return self._presign("put_object", params, validate_lifetime(expires_in))

    def presign_get(self, key: str, *, expires_in: int, filename: str | None = None) -> str:
        validate_key(key)
        params = {
            "Bucket": self.bucket,
            "Key": self._object_key(key),
            "ResponseContentDisposition": content_disposition(
                validate_filename(filename) if filename is not None else None
            ),
            "ResponseContentType": "application/octet-stream",
        }
        return self._presign("get_object", params, validate_lifetime(expires_in))

    async def close(self) -> None:
        with self._client_lock:
            client, self._client_instance = self._client_instance, None
        if client is not None:
            await to_thread.run_sync(client.close)

    # -- operations ---------------------------------------------------------------------------

    async def check(self) -> None:
        await self.ensure_bucket()

    async def ensure_bucket(self, *, create: bool = False) -> None:
        """Check that the bucket exists and the credentials reach it, for a clear error at
        startup rather than on the first upload. With ``create`` (tests, a dev setup) a
        missing bucket is created; production buckets are made by the operator, with their
        own policies (docs/storage.md). Raises ``ServiceUnavailable`` saying what is wrong."""
        if await self._call("HeadBucket", self._bucket_exists):
            return
        if not create:
            raise ServiceUnavailable(
                f"The S3 bucket '{self.bucket}' does not exist"
                f"{f' at {self.endpoint_url}' if self.endpoint_url else ''}: create it, "
                "or point PEERGPU_S3_BUCKET at one that does.",
                code="storage_unavailable",
            )
        location = {} if self._region == "us-east-1" else {"LocationConstraint": self._region}
        await self._call(
            "CreateBucket",
            lambda: self._client().create_bucket(
                Bucket=self.bucket,
                **({"CreateBucketConfiguration": location} if location else {}),
            ),
        )

    # -- helpers ------------------------------------------------------------------------------

    def _client(self) -> Any:
        """The botocore client, created on first use (loading its models reads files, so not
        in ``__init__``); thread-safe, as botocore clients are."""
        with self._client_lock:
            if self._client_instance is None:
                access_key_id, secret_access_key = self._credentials
                self._client_instance = _create_client(
                    region_name=self._region,
                    endpoint_url=self.endpoint_url,
                    aws_access_key_id=access_key_id,
                    aws_secret_access_key=secret_access_key,
                    config=self._config,
                )
            return self._client_instance

    async def _call(self, operation: str, call: Callable[[], T]) -> T:
        """Run one blocking botocore call in a worker thread, translating its errors."""
        try:
            return await to_thread.run_sync(call)
        except (ClientError, BotoCoreError) as error:
            raise self._translate(operation, error) from error

    def _translate(self, operation: str, error: Exception) -> ServiceUnavailable:
        if isinstance(error, ClientError):
            code = _code(error)
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                reason = f"the bucket '{self.bucket}' does not exist"
            elif code in _CREDENTIAL_CODES:
                reason = f"it refused the configured credentials ({code})"
            else:
                reason = f"it answered {status} {code}".rstrip()
        elif isinstance(error, _UNREACHABLE):
            reason = "it could not be reached"
        elif isinstance(error, NoCredentialsError):
            reason = "no credentials were found"
        else:
            reason = f"the request failed ({type(error).__name__})"
        logger.warning("S3 %s on bucket %s failed: %r", operation, self.bucket, error)
        return ServiceUnavailable(
            f"Object storage is unavailable: {reason} ({operation}). Try again later.",
            code="storage_unavailable",
            details={"operation": operation},
        )

    def _presign(self, method: str, params: dict[str, Any], expires_in: int) -> str:
        try:
            url = self._client().generate_presigned_url(method, Params=params, ExpiresIn=expires_in)
        except BotoCoreError as error:  # no credentials found
            raise self._translate(f"presign {method}", error) from error
        return str(url)

    def _object_key(self, key: str) -> str:
        full = self.prefix + key
        if len(full.encode()) > MAX_KEY_LENGTH:
            raise InvalidInput(
                f"The key is too long once the store's prefix is added (S3 allows "
                f"{MAX_KEY_LENGTH} bytes).",
                code="invalid_key",
                details={"key": key},
            )
        return full

    def _staging_key(self) -> str:
        return f"{self.prefix}{_STAGING}{uuid.uuid4().hex}"

    # The ``*_sync`` methods run in a worker thread; a 404 for the key is an answer there
    # (``None``), any other error goes up to ``_call``.

    def _get_sync(self, target: str) -> dict[str, Any] | None:
        try:
            response: dict[str, Any] = self._client().get_object(
                Bucket=self.bucket, Key=target, ChecksumMode="ENABLED"
            )
        except ClientError as error:
            if _code(error) in _NOT_FOUND_CODES:
                return None
            raise
        return response

    def _head_sync(self, key: str) -> ObjectInfo | None:
        try:
            response = self._client().head_object(
                Bucket=self.bucket, Key=self._object_key(key), ChecksumMode="ENABLED"
            )
        except ClientError as error:
            if _code(error) in _NOT_FOUND_CODES:
                return None
            raise
        return _info(key, response)

    def _delete_sync(self, target: str) -> None:
        try:
            self._client().delete_object(Bucket=self.bucket, Key=target)
        except ClientError as error:
            # S3 answers 204 for a missing key; some compatible services answer 404.
            if _code(error) not in _NOT_FOUND_CODES:
                raise

    def _list_sync(self, prefix: str) -> builtins.list[ObjectInfo]:
        """List every page, then HEAD each key (``LIST_CONCURRENCY`` at a time) for its
        digest; a key deleted in between is left out, one replaced is described as it is now.
        """
        paginator = self._client().get_paginator("list_objects_v2")
        keys: builtins.list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for entry in page.get("Contents", []):
                key = str(entry["Key"])[len(self.prefix) :]
                if is_valid_key(key):  # skips staging objects and foreign names
                    keys.append(key)
        if not keys:
            return []
        with ThreadPoolExecutor(min(LIST_CONCURRENCY, len(keys))) as pool:
            found = [info for info in pool.map(self._head_sync, keys) if info is not None]
        return sorted(found, key=lambda info: info.key)

    def _bucket_exists(self) -> bool:
        try:
            self._client().head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _code(error) in (*_NOT_FOUND_CODES, "NoSuchBucket"):
                return False
            raise
        return True

    async def _put_single(self, target: str, body: bytearray, digest: str) -> dict[str, str]:
        response = await self._call(
            "PutObject",
            lambda: self._client().put_object(
                Bucket=self.bucket,
                Key=target,
                Body=body,
                ContentType="application/octet-stream",
                Metadata={_SHA256_METADATA: digest},
                ChecksumSHA256=checksum_header(digest),
            ),
        )
        return _headers(response)

    async def _publish_staged(
        self, staged: str, target: str, size: int, digest: str
    ) -> dict[str, str]:
        """Copy the staged object to ``target`` with its digest as metadata (one atomic
        replace on S3), then delete the staging object."""
        metadata = {_SHA256_METADATA: digest}
        if size <= MAX_SINGLE_REQUEST_BYTES:
            response = await self._call(
                "CopyObject",
                lambda: self._client().copy_object(
                    Bucket=self.bucket,
                    Key=target,
                    CopySource={"Bucket": self.bucket, "Key": staged},
                    MetadataDirective="REPLACE",
                    Metadata=metadata,
                    ContentType="application/octet-stream",
                ),
            )
            headers = _headers(response)
        else:
            copy = _Multipart(self, target, digest)
            try:
                for start in range(0, size, COPY_PART_SIZE):
                    end = min(start + COPY_PART_SIZE, size) - 1
                    await copy.copy_range(staged, start, end)
                headers = await copy.complete()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await copy.discard()
                raise
        await self._delete_quietly(staged)
        return headers

    async def _delete_quietly(self, target: str) -> None:
        try:
            await self._call(
                "DeleteObject", lambda: self._client().delete_object(Bucket=self.bucket, Key=target)
            )
        except Exception as error:  # a lifecycle rule on '.uploads~/' collects what is left
            logger.warning("could not delete staging object %s: %r", target, error)


class _Multipart:
    """One multipart upload to ``key``, started by the first part. ``discard`` aborts it and,
    once completed (a staging upload), deletes the object; it never raises."""

    def __init__(self, store: S3ObjectStore, key: str, sha256: str | None) -> None:
        self.store = store
        self.key = key
        self.sha256 = sha256
        self.upload_id: str | None = None
        self.completed = False
        self._parts: builtins.list[dict[str, Any]] = []

    @property
    def next_part_size(self) -> int:
        """``part_size``, growing by one ``part_size`` every 1,000 parts so that S3's 10,000
        parts reach 55,000 part sizes (440 GiB at the default 8 MiB)."""
        return self.store.part_size * (1 + len(self._parts) // 1000)

    async def send(self, body: bytearray) -> None:
        upload_id = await self._start()
        number = len(self._parts) + 1
        response = await self.store._call(
            "UploadPart",
            lambda: self.store._client().upload_part(
                Bucket=self.store.bucket,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentMD5=_md5(body),  # S3 checks each part (in this thread: 10 ms a part)
            ),
        )
        self._parts.append({"ETag": response["ETag"], "PartNumber": number})

    async def copy_range(self, source: str, start: int, end: int) -> None:
        upload_id = await self._start()
        number = len(self._parts) + 1
        response = await self.store._call(
            "UploadPartCopy",
            lambda: self.store._client().upload_part_copy(
                Bucket=self.store.bucket,
                Key=self.key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.store.bucket, "Key": source},
                CopySourceRange=f"bytes={start}-{end}",
            ),
        )
        self._parts.append({"ETag": response["CopyPartResult"]["ETag"], "PartNumber": number})

    async def complete(self) -> dict[str, str]:
        assert self.upload_id is not None
        upload_id = self.upload_id
        response = await self.store._call(
            "CompleteMultipartUpload",
            lambda: self.store._client().complete_multipart_upload(
                Bucket=self.store.bucket,
                Key=self.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": self._parts},
            ),
        )
        self.completed = True
        return _headers(response)

    async def discard(self) -> None:
        if self.upload_id is None:
            return
        upload_id = self.upload_id
        client = self.store._client()
        try:
            if self.completed:
                if self.key.startswith(self.store.prefix + _STAGING):
                    await self.store._delete_quietly(self.key)
                return
            await to_thread.run_sync(
                lambda: client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=upload_id
                )
            )
        except Exception as error:  # the bucket's AbortIncompleteMultipartUpload rule cleans up
            logger.warning("could not abort multipart upload %s: %r", upload_id, error)

    async def _start(self) -> str:
        if self.upload_id is None:
            metadata = {_SHA256_METADATA: self.sha256} if self.sha256 else {}
            response = await self.store._call(
                "CreateMultipartUpload",
                lambda: self.store._client().create_multipart_upload(
                    Bucket=self.store.bucket,
                    Key=self.key,
                    ContentType="application/octet-stream",
                    Metadata=metadata,
                ),
            )
            self.upload_id = str(response["UploadId"])
        return self.upload_id


class _S3Stream(ObjectStream):
    """The body of one ``GetObject`` response: S3 streams the version it started with, so
    the bytes match ``info`` even if the key is replaced meanwhile."""

    def __init__(self, body: Any, info: ObjectInfo) -> None:
        self.info = info
        self._body: Any = body

    async def __anext__(self) -> bytes:
        body = self._body
        if body is None:
            raise StopAsyncIteration
        try:
            chunk = await to_thread.run_sync(body.read, CHUNK_SIZE)
        except (BotoCoreError, OSError) as error:
            await self.aclose()
            logger.warning("reading %s from S3 failed: %r", self.info.key, error)
            raise ServiceUnavailable(
                "Object storage stopped answering while the object was read. Try again later.",
                code="storage_unavailable",
            ) from error
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return bytes(chunk)

    async def aclose(self) -> None:
        if self._body is not None:
            body, self._body = self._body, None
            body.close()


_session_lock = threading.Lock()
_session: Any = None


def _create_client(**options: Any) -> Any:
    """An S3 client from one botocore session per process: the session caches the service
    models it loads (a tenth of a second or more per fresh session), and credentials and
    settings are the client's own. Sessions are not thread-safe, hence the lock."""
    global _session
    with _session_lock:
        if _session is None:
            _session = botocore.session.get_session()
        return _session.create_client("s3", **options)


def checksum_header(sha256: str) -> str:
    """The value of ``x-amz-checksum-sha256`` for a hex digest: the digest in base64."""
    return base64.b64encode(bytes.fromhex(sha256)).decode()


def _md5(body: bytearray) -> str:
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def _normalize_prefix(prefix: str) -> str:
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    if not is_valid_key(stripped):
        raise ValueError(
            f"the S3 prefix {prefix!r} must be '/'-separated segments of letters, digits, "
            "'.', '_' and '-'"
        )
    return stripped + "/"


def _info(key: str, response: dict[str, Any]) -> ObjectInfo:
    metadata = response.get("Metadata") or {}
    recorded = metadata.get(_SHA256_METADATA)
    sha256 = recorded if _is_hex_digest(recorded) else _from_checksum(response)
    modified = response.get("LastModified")
    return ObjectInfo(
        key=key,
        size=int(response["ContentLength"]),
        sha256=sha256,
        created_at=modified.astimezone(UTC) if isinstance(modified, datetime) else None,
    )


def _from_checksum(response: dict[str, Any]) -> str | None:
    """S3's full-object SHA-256 checksum in hex; ``None`` for none or a composite one (the
    hash of the parts' hashes, written ``<base64>-<parts>``)."""
    checksum = response.get("ChecksumSHA256")
    if not isinstance(checksum, str) or response.get("ChecksumType") == "COMPOSITE":
        return None
    try:
        digest = base64.b64decode(checksum, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None


def _is_hex_digest(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and value == value.lower()
        and all(char in "0123456789abcdef" for char in value)
    )


def _headers(response: dict[str, Any]) -> dict[str, str]:
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    return {str(name).lower(): str(value) for name, value in headers.items()}


def _written_at(headers: dict[str, str]) -> datetime:
    """When S3 wrote the object, to the second: its ``Last-Modified`` if the response has
    one, else the response's ``Date`` (``head`` reports S3's exact ``LastModified``)."""
    for name in ("last-modified", "date"):
        if name in headers:
            try:
                return parsedate_to_datetime(headers[name]).astimezone(UTC)
            except (TypeError, ValueError):
                continue
    return datetime.now(UTC)


async def _chunks(data: AsyncIterator[bytes] | bytes) -> AsyncIterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), CHUNK_SIZE):
            yield bytes(view[start : start + CHUNK_SIZE])
        return
    async for chunk in data:
        yield chunk


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise PayloadTooLarge(
            f"The object is larger than the {max_bytes} bytes allowed; nothing was stored.",
            details={"max_bytes": max_bytes},
        )


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
