"""Serves the local object store's pre-signed URLs: ``PUT`` and ``GET /storage/o/{key}``.

There is no login here: the signature in the query string is the authorization (see
``peergpu.server.storage.signing``), checked before a byte of the body is read. Mounted under
``/api/v1``; the body-size middleware must exempt ``/api/v1/storage/`` because an upload is
bounded by the ``max_bytes`` it was signed for, counted here as the body streams in.

When the configured store is not the local one (S3), its URLs point at S3 and these routes
answer 404.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from peergpu.errors import NotFound, PayloadTooLarge
from peergpu.server.schemas.errors import ErrorBody
from peergpu.server.storage.base import ObjectStore, content_disposition
from peergpu.server.storage.local import LocalObjectStore
from peergpu.server.storage.signing import UrlGrant

router = APIRouter(prefix="/storage", tags=["storage"])


class StoredObject(BaseModel):
    """What an upload stored: the key, its size in bytes and the SHA-256 of the bytes."""

    key: str
    size: int
    sha256: str


def get_object_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.context.storage
    return store


def get_local_store(
    store: Annotated[ObjectStore, Depends(get_object_store)],
) -> LocalObjectStore:
    if not isinstance(store, LocalObjectStore):
        raise NotFound("This server does not serve objects itself; use the URLs it hands out.")
    return store


LocalStoreDep = Annotated[LocalObjectStore, Depends(get_local_store)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorBody, "description": "Bad or expired signature"},
    404: {"model": ErrorBody, "description": "No such object"},
    409: {"model": ErrorBody, "description": "The key clashes with another object's folder"},
    413: {"model": ErrorBody, "description": "Body larger than the signed max_bytes"},
    422: {"model": ErrorBody, "description": "Invalid parameters or checksum mismatch"},
}


@router.put("/o/{key:path}", responses=_ERRORS)
async def upload_object(
    key: str,
    request: Request,
    store: LocalStoreDep,
    expires: int,
    signature: str,
    max_bytes: Annotated[int, Query(ge=0)],
    sha256: str | None = None,
) -> StoredObject:
    """Upload the raw request body to a URL handed out by the API (any content type).

    Replaces the object under the key atomically. Refused with 413 past the signed
    `max_bytes`, and with 422 `checksum_mismatch` when a signed `sha256` does not match the
    body; either way nothing is stored."""
    store.signer.verify(UrlGrant("PUT", key, expires, max_bytes, sha256), signature)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(
            f"The object is larger than the {max_bytes} bytes allowed; nothing was stored.",
            details={"max_bytes": max_bytes},
        )
    info = await store.put(key, request.stream(), max_bytes=max_bytes, sha256=sha256)
    assert info.sha256 is not None  # a put always knows the hash of what it wrote
    return StoredObject(key=info.key, size=info.size, sha256=info.sha256)


@router.get(
    "/o/{key:path}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS},
)
async def download_object(
    key: str,
    store: LocalStoreDep,
    expires: int,
    signature: str,
    filename: str | None = None,
) -> StreamingResponse:
    """Download an object from a URL handed out by the API. Always served as an
    `application/octet-stream` attachment (never rendered inline), under the signed
    `filename` when there is one."""
    store.signer.verify(UrlGrant("GET", key, expires, filename=filename), signature)
    stream = await store.get(key)
    headers = {
        "content-length": str(stream.info.size),
        "content-disposition": content_disposition(filename),
    }
    return StreamingResponse(
        stream,
        media_type="application/octet-stream",
        headers=headers,
        background=BackgroundTask(stream.aclose),
    )
