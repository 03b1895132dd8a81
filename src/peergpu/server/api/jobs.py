"""Jobs for renters: upload a bundle, submit, list, read, cancel, history and artifacts.
Logs (paged, SSE, WebSocket) are in ``job_logs``."""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from peergpu.server.api.deps import ContextDep, Reader, SessionDep, Writer
from peergpu.server.api.responses import AUTHENTICATED, errors
from peergpu.server.db.job_models import JobState
from peergpu.server.schemas.jobs import (
    ArtifactPublic,
    ArtifactsPublic,
    BundlePublic,
    JobCreate,
    JobEventPublic,
    JobEventsPublic,
    JobPublic,
    JobsPublic,
)
from peergpu.server.services import bundles, jobs
from peergpu.server.services.jobs import JobSpec

router = APIRouter(tags=["jobs"], responses=AUTHENTICATED)

ARTIFACT_URL_SECONDS = 3600
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="retrying a submit with the same key returns the same job",
    ),
]


@router.post(
    "/bundles",
    status_code=status.HTTP_201_CREATED,
    responses={**errors(413, 422), 200: {"model": BundlePublic, "description": "Already stored"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_bundle(
    request: Request,
    response: Response,
    principal: Writer,
    session: SessionDep,
    context: ContextDep,
) -> BundlePublic:
    """Upload a zip of code and data (the raw body). It is checked (paths, links, sizes, zip
    bombs) and stored once by sha256; submit jobs with the returned ``sha256``."""
    stored = await bundles.upload(
        context=context, session=session, principal=principal, body=request.stream()
    )
    if not stored.created:
        response.status_code = status.HTTP_200_OK
    return BundlePublic(
        sha256=stored.sha256,
        size=stored.size,
        members=stored.members,
        uncompressed_bytes=stored.uncompressed_bytes,
    )


@router.post(
    "/jobs",
    status_code=status.HTTP_201_CREATED,
    responses={
        **errors(402, 404, 409, 413),
        200: {"model": JobPublic, "description": "Idempotent replay"},
    },
)
async def submit_job(
    body: JobCreate,
    response: Response,
    principal: Writer,
    session: SessionDep,
    context: ContextDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Queue a job: an image or a bundle, a command, and what it needs (GPUs, VRAM, models,
    price, tags, duration). The scheduler assigns it to the cheapest eligible host."""
    job, created = await jobs.submit(
        context=context,
        session=session,
        principal=principal,
        spec=JobSpec(**body.model_dump()),
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return JobPublic.model_validate(job)


@router.get("/jobs")
async def list_jobs(
    principal: Reader,
    session: SessionDep,
    state: JobState | None = None,
    org_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> JobsPublic:
    """Your jobs and your organizations' jobs, newest first."""
    page = await jobs.list_jobs(
        session=session, principal=principal, state=state, org_id=org_id, limit=limit, offset=offset
    )
    return JobsPublic(data=[JobPublic.model_validate(j) for j in page.items], count=page.total)


@router.get("/jobs/{job_id}", responses=errors(404))
async def get_job(job_id: uuid.UUID, principal: Reader, session: SessionDep) -> JobPublic:
    return JobPublic.model_validate(
        await jobs.get_job(session=session, principal=principal, job_id=job_id)
    )


@router.post("/jobs/{job_id}/cancel", responses=errors(404, 409))
async def cancel_job(
    job_id: uuid.UUID, principal: Writer, session: SessionDep, context: ContextDep
) -> JobPublic:
    """Cancel a queued or running job (its host kills it)."""
    job = await jobs.cancel(context=context, session=session, principal=principal, job_id=job_id)
    return JobPublic.model_validate(job)


@router.get("/jobs/{job_id}/events", responses=errors(404))
async def job_events(job_id: uuid.UUID, principal: Reader, session: SessionDep) -> JobEventsPublic:
    """Every state change of the job, oldest first."""
    events = await jobs.list_events(session=session, principal=principal, job_id=job_id)
    return JobEventsPublic(
        data=[JobEventPublic.model_validate(e) for e in events], count=len(events)
    )


@router.get("/jobs/{job_id}/artifacts", responses=errors(404))
async def list_artifacts(
    job_id: uuid.UUID, principal: Reader, session: SessionDep, context: ContextDep
) -> ArtifactsPublic:
    """The job's output files with size and sha256, each with a signed download URL."""
    rows = await jobs.list_artifacts(session=session, principal=principal, job_id=job_id)
    items = [
        ArtifactPublic(
            path=row.path,
            size=row.size,
            sha256=row.sha256,
            created_at=row.created_at,
            download_url=context.storage.presign_get(
                row.key, expires_in=ARTIFACT_URL_SECONDS, filename=PurePosixPath(row.path).name
            ),
        )
        for row in rows
    ]
    return ArtifactsPublic(data=items, count=len(items))
