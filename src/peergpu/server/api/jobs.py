"""Jobs for renters: upload a bundle, submit, list, read, cancel, history and artifacts.
Logs (paged, SSE, WebSocket) are in ``job_logs``."""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from peergpu.server.api.bare import bearer_token, documented, json_body
from peergpu.server.api.deps import (
    ContextDep,
    Reader,
    SessionDep,
    Writer,
    require_scope_of,
    require_token,
)
from peergpu.server.api.responses import AUTHENTICATED, errors
from peergpu.server.context import ServerContext
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
from peergpu.server.security.scopes import Scope
from peergpu.server.services import bundles, callers, jobs
from peergpu.server.services.jobs import JobSpec

router = APIRouter(tags=["jobs"], responses=AUTHENTICATED)

ARTIFACT_URL_SECONDS = 3600
_IDEMPOTENCY_KEY_MAX = 200
_IDEMPOTENCY_KEY_DOC = "retrying a submit with the same key returns the same job"
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=_IDEMPOTENCY_KEY_MAX,
        description=_IDEMPOTENCY_KEY_DOC,
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


#: The ``Idempotency-Key`` header, as the OpenAPI document shows it.
_IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": _IDEMPOTENCY_KEY_DOC,
    "schema": {"type": "string", "minLength": 1, "maxLength": _IDEMPOTENCY_KEY_MAX},
}


@router.post(
    "/jobs",
    status_code=status.HTTP_201_CREATED,
    response_model=None,
    responses={
        **errors(402, 404, 409, 413),
        201: {"model": JobPublic, "description": "Queued"},
        200: {"model": JobPublic, "description": "Idempotent replay"},
    },
    openapi_extra=documented(JobCreate, security="HTTPBearer", parameters=[_IDEMPOTENCY_PARAMETER]),
)
async def submit_job(request: Request) -> Response:
    """Queue a job: an image or a bundle, a command, and what it needs (GPUs, VRAM, models,
    price, tags, duration). The scheduler assigns it to the cheapest eligible host.

    The busiest route of the API, so it takes the bare request (``api.bare``): the same
    checks in the same order as the dependencies would (401/403, then 422), with the caller
    remembered for a few seconds (``services.callers``)."""
    context: ServerContext = request.app.state.context
    token = require_token(bearer_token(request))
    principal = require_scope_of(await callers.authenticate(context, token), Scope.write)
    idempotency_key = _idempotency_key(request)
    _raw, _size, body = await json_body(request, JobCreate)
    async with context.sessionmaker() as session:
        job, created = await jobs.submit(
            context=context,
            session=session,
            principal=principal,
            spec=JobSpec(**body.model_dump()),
            idempotency_key=idempotency_key,
        )
    return Response(
        JobPublic.model_validate(job).model_dump_json(),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        media_type="application/json",
    )


def _idempotency_key(request: Request) -> str | None:
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not 1 <= len(value) <= _IDEMPOTENCY_KEY_MAX:
        raise RequestValidationError(
            [
                {
                    "type": "string_too_short" if not value else "string_too_long",
                    "loc": ("header", "Idempotency-Key"),
                    "msg": f"Idempotency-Key must be 1 to {_IDEMPOTENCY_KEY_MAX} characters long",
                    "input": value,
                }
            ]
        )
    return value


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
