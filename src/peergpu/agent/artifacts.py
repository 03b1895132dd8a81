"""Uploads a finished job's output files through pre-signed URLs the server grants.

Each file's size and sha256 are computed first and sent with the request, so the server can
bind each URL to that exact content; the agent then PUTs the bytes, with the length and the
digest as headers (an S3 URL is signed over both), and reports what landed.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from peergpu.agent.link import Link
from peergpu.protocol.messages import ArtifactReport, FileSpec, UploadRequest

logger = logging.getLogger(__name__)

MAX_FILES = 1000
_CHUNK = 1024 * 1024


async def upload_outputs(*, link: Link, job_id: uuid.UUID, outputs_dir: Path) -> None:
    files, skipped = _collect(outputs_dir)
    if not files:
        if skipped:
            await link.send_artifacts(ArtifactReport(job_id=job_id, files=[], skipped=skipped))
        return
    try:
        grant = await link.request_uploads(UploadRequest(job_id=job_id, files=files))
    except (ConnectionError, TimeoutError) as exc:
        skipped += [f"{f.path}: not uploaded ({exc})" for f in files]
        await link.send_artifacts(ArtifactReport(job_id=job_id, files=[], skipped=skipped))
        return
    skipped += [f"{path}: {reason}" for path, reason in grant.refused.items()]
    by_path = {f.path: f for f in files}
    uploaded: list[FileSpec] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=15)) as http:
        for target in grant.uploads:
            spec = by_path.get(target.path)
            if spec is None:
                continue
            try:
                response = await http.put(
                    target.url,
                    content=_read(outputs_dir / target.path),
                    headers={
                        "content-length": str(spec.size),
                        # S3's pre-signed PUTs sign this header (the body must hash to it);
                        # the server's own upload route ignores it.
                        "x-amz-checksum-sha256": _checksum_header(spec.sha256),
                    },
                )
            except httpx.HTTPError as exc:
                skipped.append(f"{target.path}: upload failed ({exc})")
                continue
            if response.status_code >= 300:
                skipped.append(f"{target.path}: upload refused (HTTP {response.status_code})")
                continue
            uploaded.append(spec)
    await link.send_artifacts(ArtifactReport(job_id=job_id, files=uploaded, skipped=skipped))


def _collect(outputs_dir: Path) -> tuple[list[FileSpec], list[str]]:
    files: list[FileSpec] = []
    skipped: list[str] = []
    if outputs_dir.is_symlink():
        # The job controls outputs/: never follow it out of the work dir.
        return files, ["outputs: a symlink, not a folder; nothing uploaded"]
    if not outputs_dir.is_dir():
        return files, skipped
    root = outputs_dir
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink() or not path.is_file():
                skipped.append(f"{relative}: not a regular file")
                continue
            if len(files) >= MAX_FILES:
                skipped.append(f"{relative}: more than {MAX_FILES} output files")
                continue
            files.append(FileSpec(path=relative, size=path.stat().st_size, sha256=_sha256(path)))
    return files, skipped


def _checksum_header(sha256: str) -> str:
    """``x-amz-checksum-sha256`` wants the digest in base64, not hex."""
    return base64.b64encode(bytes.fromhex(sha256)).decode()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def _read(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk
