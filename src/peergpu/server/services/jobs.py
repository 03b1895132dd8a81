"""Jobs for renters: submit (idempotently), read, list and cancel; visibility in one place.

State changes go through ``job_states.transition`` (one conditional UPDATE plus a
``job_events`` row). After a commit that changes a job, callers publish with
``job_states.notify`` so followers and schedulers on every replica wake up.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from peergpu.config import ServerSettings
from peergpu.errors import Conflict, InvalidInput, NotFound
from peergpu.server.agents import dispatch
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.bulk import table_of
from peergpu.server.db.job_models import (
    ACTIVE_STATES,
    FINAL_STATES,
    BundleGrantModel,
    JobArtifactModel,
    JobEventModel,
    JobModel,
    JobState,
)
from peergpu.server.db.models import MembershipModel
from peergpu.server.security.principal import Principal
from peergpu.server.services import job_states, memberships
from peergpu.server.services.billing import accounts as billing_accounts
from peergpu.server.services.billing import estimates

#: A Docker image reference: [registry[:port]/]name[:tag][@sha256:digest], lower-case name.
_IMAGE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[0-9a-f]{64})?$"
)
RESERVED_ENV_PREFIX = "PEERGPU_"
#: Every column of ``jobs`` whose default is a constant (or that has none: ``None``), as a new
#: row gets it. Submit's Core INSERT sets the rest, so the job it returns, built from the row,
#: has every attribute without a read, and follows the model's defaults as they change.
_CONSTANT_DEFAULTS: dict[str, object] = {
    column.key: column.default.arg
    if isinstance(column.default, ScalarElementColumnDefault)
    else None
    for column in table_of(JobModel).columns
    if column.default is None or column.default.is_scalar
}


@dataclass(frozen=True)
class JobSpec:
    """What a renter asks for; field checks (types, ranges) are done by the API schema."""

    command: list[str]
    name: str = ""
    org_id: uuid.UUID | None = None
    image: str | None = None
    bundle_sha256: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    gpu_count: int = 1
    min_vram_mib: int = 0
    gpu_models: list[str] = field(default_factory=list)
    max_price_per_gpu_hour_micros: int | None = None
    tags: list[str] = field(default_factory=list)
    max_duration_seconds: int | None = None
    priority: int = 0
    network: bool = False
    max_retries: int | None = None
    max_cost_micros: int | None = None

    def fingerprint(self) -> str:
        """A digest of the request, to tell a retry from a different request under one key."""
        payload = asdict(self)
        payload["org_id"] = str(self.org_id) if self.org_id else None
        if self.max_cost_micros is None:
            del payload["max_cost_micros"]  # requests from before cost caps hash as they did
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class JobPage:
    items: list[JobModel]
    total: int


async def submit(
    *,
    context: ServerContext,
    session: AsyncSession,
    principal: Principal,
    spec: JobSpec,
    idempotency_key: str | None = None,
) -> tuple[JobModel, bool]:
    """Queue a job; returns ``(job, created)``. A retry with the same idempotency key and the
    same request returns the first job (``created`` False); a different request under a used
    key is a ``Conflict``."""
    settings = context.settings
    fingerprint = spec.fingerprint()
    if idempotency_key is not None:
        existing = await _by_idempotency_key(session, principal.user_id, idempotency_key)
        if existing is not None:
            return _replayed(existing, fingerprint), False
    org_id = spec.org_id or principal.organization_id
    await _check_spec(session=session, principal=principal, spec=spec, org_id=org_id)
    max_duration = _max_duration(settings, spec)
    wallet = billing_accounts.wallet_of(owner_id=principal.user_id, org_id=org_id)
    if not context.credit_seen.has_credit(wallet):
        await estimates.require_some_credit(session=session, wallet=wallet)
        context.credit_seen.remember(wallet)
    now = utcnow()
    row = {
        **_CONSTANT_DEFAULTS,
        "id": uuid.uuid4(),
        "owner_id": principal.user_id,
        "org_id": org_id,
        "name": spec.name,
        "state": JobState.queued.value,
        "image": spec.image,
        "bundle_sha256": spec.bundle_sha256,
        "command": list(spec.command),
        "env": dict(spec.env),
        "gpu_count": spec.gpu_count,
        "min_vram_mib": spec.min_vram_mib,
        "gpu_models": list(spec.gpu_models),
        "max_price_per_gpu_hour_micros": spec.max_price_per_gpu_hour_micros,
        "max_cost_micros": spec.max_cost_micros,
        "tags": sorted(set(spec.tags)),
        "max_duration_seconds": max_duration,
        "priority": spec.priority,
        "network": spec.network,
        "max_retries": (
            spec.max_retries if spec.max_retries is not None else settings.job_default_max_retries
        ),
        "idempotency_key": idempotency_key,
        "request_hash": fingerprint,
        "created_at": now,
        "updated_at": now,
        "queue_expires_at": now + timedelta(seconds=settings.job_queue_timeout_seconds),
        "excluded_host_ids": [],
        "gpu_indices": [],
    }
    event = {
        "job_id": row["id"],
        "at": now,
        "from_state": None,
        "to_state": JobState.queued.value,
        "reason": "submit",
        "message": "",
        "host_id": None,
    }
    if session.in_transaction():  # the checks' reads: no connection held while waiting
        await session.rollback()
    # Group-committed with the submits around it (``services.job_writer``): Core INSERTs of
    # every waiting job and event, one commit, one wake-up. The job returned is built from
    # the row.
    try:
        await context.job_writer.write(row, event)
    except IntegrityError:
        # Two submits with one key raced; the other one won.
        if idempotency_key is None:
            raise
        existing = await _by_idempotency_key(session, principal.user_id, idempotency_key)
        if existing is None:
            raise
        return _replayed(existing, fingerprint), False
    return JobModel(**row), True


async def estimate(
    *, context: ServerContext, session: AsyncSession, principal: Principal, spec: JobSpec
) -> estimates.Estimate:
    """What the job would cost if submitted now (the same checks as a submit; nothing is
    queued)."""
    org_id = spec.org_id or principal.organization_id
    await _check_spec(session=session, principal=principal, spec=spec, org_id=org_id)
    return await estimates.estimate(
        session=session,
        need=estimates.Need(
            wallet=billing_accounts.wallet_of(owner_id=principal.user_id, org_id=org_id),
            gpu_count=spec.gpu_count,
            min_vram_mib=spec.min_vram_mib,
            gpu_models=list(spec.gpu_models),
            tags=list(spec.tags),
            runner="docker" if spec.image else "process",
            max_price_per_gpu_hour_micros=spec.max_price_per_gpu_hour_micros,
            max_duration_seconds=_max_duration(context.settings, spec),
            max_cost_micros=spec.max_cost_micros,
        ),
    )


def _max_duration(settings: ServerSettings, spec: JobSpec) -> int:
    max_duration = spec.max_duration_seconds or settings.job_default_max_duration_seconds
    if max_duration > settings.job_max_duration_seconds:
        raise InvalidInput(
            f"max_duration_seconds is at most {settings.job_max_duration_seconds}.",
            details={"max_duration_seconds": max_duration},
        )
    return max_duration


async def get_job(*, session: AsyncSession, principal: Principal, job_id: uuid.UUID) -> JobModel:
    """The job if the caller may see it (its owner, or a member of its organization)."""
    job = await session.get(JobModel, job_id, populate_existing=True)
    if job is None or not await can_see(session=session, principal=principal, job=job):
        raise NotFound("No such job.", details={"id": str(job_id)})
    return job


async def can_see(*, session: AsyncSession, principal: Principal, job: JobModel) -> bool:
    if principal.organization_id is not None and job.org_id != principal.organization_id:
        return False
    if job.owner_id == principal.user_id:
        return True
    if job.org_id is None:
        return False
    role = await memberships.find_role(
        session=session, organization_id=job.org_id, user_id=principal.user_id
    )
    return role is not None


async def list_jobs(
    *,
    session: AsyncSession,
    principal: Principal,
    state: JobState | None = None,
    org_id: uuid.UUID | None = None,
    limit: int = 50,
    offset: int = 0,
) -> JobPage:
    """The caller's jobs and their organizations' jobs, newest first."""
    query = select(JobModel)
    if principal.organization_id is not None:
        query = query.where(JobModel.org_id == principal.organization_id)
        visible = JobModel.org_id == principal.organization_id
    else:
        member_of = select(MembershipModel.organization_id).where(
            MembershipModel.user_id == principal.user_id
        )
        visible = or_(JobModel.owner_id == principal.user_id, JobModel.org_id.in_(member_of))
    query = query.where(visible)
    if state is not None:
        query = query.where(JobModel.state == state.value)
    if org_id is not None:
        query = query.where(JobModel.org_id == org_id)
    total = await session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = await session.scalars(
        query.order_by(JobModel.created_at.desc(), JobModel.id.desc()).limit(limit).offset(offset)
    )
    return JobPage(items=list(rows), total=total)


async def list_events(
    *, session: AsyncSession, principal: Principal, job_id: uuid.UUID
) -> list[JobEventModel]:
    await get_job(session=session, principal=principal, job_id=job_id)
    rows = await session.scalars(
        select(JobEventModel)
        .where(JobEventModel.job_id == job_id)
        .order_by(JobEventModel.at, JobEventModel.id)
    )
    return list(rows)


async def cancel(
    *, context: ServerContext, session: AsyncSession, principal: Principal, job_id: uuid.UUID
) -> JobModel:
    """Cancel a queued or running job. A running job's host is told to kill it; its GPUs are
    freed when the host confirms (or when the host is lost)."""
    for _ in range(5):
        job = await get_job(session=session, principal=principal, job_id=job_id)
        state = JobState(job.state)
        if state in FINAL_STATES:
            raise Conflict(
                f"The job already ended ({state.value}).",
                code="job_finished",
                details={"state": state.value},
            )
        host_id = job.host_id if state in ACTIVE_STATES else None
        changed = await job_states.transition(
            session,
            job,
            expected=state,
            to=JobState.cancelled,
            reason="cancelled_by_user",
            message=f"Cancelled by {principal.user.email}.",
            values={"finished_at": utcnow(), "failure_reason": "cancelled"},
        )
        if not changed:
            await session.rollback()
            continue  # lost a race with the scheduler or the host; look again
        await session.commit()
        if host_id is not None:
            await dispatch.send_cancel(
                context=context, host_id=host_id, job_id=job_id, reason="cancelled by the renter"
            )
        await job_states.notify(context, job_id, JobState.cancelled)
        return await get_job(session=session, principal=principal, job_id=job_id)
    raise Conflict("The job is changing state; try again.", code="job_busy")


async def _check_spec(
    *, session: AsyncSession, principal: Principal, spec: JobSpec, org_id: uuid.UUID | None
) -> None:
    if org_id is not None:
        await memberships.require_org_role(
            session=session, principal=principal, organization_id=org_id
        )
    if spec.image is not None and spec.bundle_sha256 is not None:
        raise InvalidInput(
            "Give an image or a bundle, not both (a bundle runs with the process runner; to "
            "use both, build an image).",
            details={"fields": ["image", "bundle_sha256"]},
        )
    if spec.image is not None and not _IMAGE.fullmatch(spec.image):
        raise InvalidInput(
            "image is not a valid Docker image reference (e.g. 'pytorch/pytorch:2.4.0').",
            code="invalid_image",
            details={"image": spec.image},
        )
    for name in spec.env:
        if name.upper().startswith(RESERVED_ENV_PREFIX):
            raise InvalidInput(
                f"Environment variables starting with {RESERVED_ENV_PREFIX} are reserved.",
                details={"env": name},
            )
    if spec.bundle_sha256 is not None:
        granted = await session.scalar(
            select(BundleGrantModel.sha256).where(
                BundleGrantModel.sha256 == spec.bundle_sha256,
                BundleGrantModel.user_id == principal.user_id,
            )
        )
        if granted is None:
            raise InvalidInput(
                "No bundle with that sha256 was uploaded by you; upload it with POST "
                "/api/v1/bundles first.",
                code="unknown_bundle",
                details={"bundle_sha256": spec.bundle_sha256},
            )


async def _by_idempotency_key(
    session: AsyncSession, owner_id: uuid.UUID, key: str
) -> JobModel | None:
    return await session.scalar(
        select(JobModel).where(JobModel.owner_id == owner_id, JobModel.idempotency_key == key)
    )


def _replayed(job: JobModel, fingerprint: str) -> JobModel:
    if job.request_hash != fingerprint:
        raise Conflict(
            "This Idempotency-Key was used for a different request.",
            code="idempotency_key_reused",
            details={"job_id": str(job.id)},
        )
    return job


async def list_artifacts(
    *, session: AsyncSession, principal: Principal, job_id: uuid.UUID
) -> list[JobArtifactModel]:
    await get_job(session=session, principal=principal, job_id=job_id)
    rows = await session.scalars(
        select(JobArtifactModel)
        .where(JobArtifactModel.job_id == job_id)
        .order_by(JobArtifactModel.path)
    )
    return list(rows)
