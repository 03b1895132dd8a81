"""Job bundles: a renter uploads a zip once; it is validated, stored content-addressed by its
sha256 under ``bundles/<sha256>.zip``, and granted to the uploader (knowing a digest is not
enough to run someone else's code)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.bundles import BundleError, BundleLimits, validate_bundle
from peergpu.errors import InvalidInput, PayloadTooLarge
from peergpu.server.context import ServerContext
from peergpu.server.db.job_models import BundleGrantModel, BundleModel
from peergpu.server.security.principal import Principal

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredBundle:
    sha256: str
    size: int
    members: int
    uncompressed_bytes: int
    created: bool


def bundle_key(sha256: str) -> str:
    return f"bundles/{sha256}.zip"


async def upload(
    *,
    context: ServerContext,
    session: AsyncSession,
    principal: Principal,
    body: AsyncIterator[bytes],
) -> StoredBundle:
    """Spool the body to a temporary file (bounded), validate it as a bundle, store it."""
    limit = context.settings.bundle_max_bytes
    spool_dir = context.settings.data_dir / "tmp"
    await asyncio.to_thread(spool_dir.mkdir, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="bundle-", suffix=".zip", dir=spool_dir)
    path = Path(name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as spool:
            async for chunk in body:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"A bundle is at most {limit} bytes.", details={"max_bytes": limit}
                    )
                digest.update(chunk)
                await asyncio.to_thread(spool.write, chunk)
        if size == 0:
            raise InvalidInput(
                "The body is empty: send the zip file as the request body.",
                code="invalid_bundle",
                details={"reason": "empty"},
            )
        limits = BundleLimits(max_total_bytes=max(limit * 8, 1 << 30))
        try:
            summary = await asyncio.to_thread(validate_bundle, path, limits)
        except BundleError as exc:
            raise InvalidInput(
                f"The bundle was refused: {exc.message}",
                code="invalid_bundle",
                details={"reason": exc.reason},
            ) from exc
        sha256 = digest.hexdigest()
        existing = await session.get(BundleModel, sha256)
        created = existing is None
        if created:
            await context.storage.put(bundle_key(sha256), _read(path), sha256=sha256)
            session.add(
                BundleModel(
                    sha256=sha256,
                    size=size,
                    members=summary.members,
                    uncompressed_bytes=summary.total_bytes,
                )
            )
            try:
                await session.commit()
            except IntegrityError:  # someone else stored the same bundle at the same time
                await session.rollback()
        await _grant(session, sha256, principal)
        return StoredBundle(
            sha256=sha256,
            size=size,
            members=summary.members,
            uncompressed_bytes=summary.total_bytes,
            created=created,
        )
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _grant(session: AsyncSession, sha256: str, principal: Principal) -> None:
    granted = await session.scalar(
        select(BundleGrantModel.sha256).where(
            BundleGrantModel.sha256 == sha256, BundleGrantModel.user_id == principal.user_id
        )
    )
    if granted is None:
        session.add(BundleGrantModel(sha256=sha256, user_id=principal.user_id))
    try:
        await session.commit()
    except IntegrityError:  # the same user uploaded the same bundle twice at once
        await session.rollback()


async def _read(path: Path) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, _CHUNK):
            yield chunk
    finally:
        handle.close()
