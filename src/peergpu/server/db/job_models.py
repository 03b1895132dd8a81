"""Job-side tables: jobs, their state history, log chunks, artifacts, and uploaded bundles.

A job's row is the source of truth for its state; every change of ``state`` is one conditional
UPDATE (see ``services.jobs``) and one ``job_events`` row. GPUs are claimed by writing the job's
id into ``host_gpus.job_id`` with a conditional UPDATE (``WHERE job_id IS NULL``), so two
schedulers can never hand one GPU to two jobs.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from peergpu.server.db.base import Base, CreatedAtMixin, IdMixin, utcnow


class JobState(StrEnum):
    queued = "queued"
    assigned = "assigned"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    expired = "expired"
    #: Transient: the host vanished; the job goes back to ``queued`` or on to ``failed``.
    lost = "lost"


FINAL_STATES = frozenset(
    {JobState.succeeded, JobState.failed, JobState.cancelled, JobState.expired}
)
#: States in which a job holds GPUs on a host.
ACTIVE_STATES = frozenset({JobState.assigned, JobState.running})


class BundleModel(CreatedAtMixin, Base):
    """An uploaded zip, stored once under ``bundles/<sha256>.zip``."""

    __tablename__ = "bundles"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    members: Mapped[int] = mapped_column(Integer)
    uncompressed_bytes: Mapped[int] = mapped_column(BigInteger)


class BundleGrantModel(CreatedAtMixin, Base):
    """Who uploaded a bundle, and so may run it: knowing a digest is not enough."""

    __tablename__ = "bundle_grants"

    sha256: Mapped[str] = mapped_column(
        ForeignKey("bundles.sha256", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )


class JobModel(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_id_idempotency_key"),
        Index("ix_jobs_queue", "state", "priority", "created_at"),
        #: The scheduler's bounded queue read: each renter's queued jobs in order.
        Index("ix_jobs_fair_queue", "state", "owner_id", "priority", "created_at", "id"),
        Index("ix_jobs_host_state", "host_id", "state"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
    )

    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    org_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("organizations.id", ondelete="SET NULL"), default=None, index=True
    )
    name: Mapped[str] = mapped_column(String(100), default="")
    state: Mapped[str] = mapped_column(String(16), default=JobState.queued.value)

    # The spec, as submitted.
    image: Mapped[str | None] = mapped_column(String(255), default=None)
    bundle_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    command: Mapped[list[str]] = mapped_column(JSON)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    gpu_count: Mapped[int] = mapped_column(Integer, default=1)
    min_vram_mib: Mapped[int] = mapped_column(Integer, default=0)
    gpu_models: Mapped[list[str]] = mapped_column(JSON, default=list)
    max_price_per_gpu_hour_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    #: The most this job may cost the renter; the hold and the run time are cut to fit it.
    max_cost_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    max_duration_seconds: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    network: Mapped[bool] = mapped_column(default=False)
    max_retries: Mapped[int] = mapped_column(Integer, default=2)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str] = mapped_column(String(64), default="")

    # The current (or last) assignment.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    host_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("hosts.id", ondelete="SET NULL"), default=None
    )
    gpu_indices: Mapped[list[int]] = mapped_column(JSON, default=list)
    price_per_gpu_hour_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    manifest_nonce: Mapped[str | None] = mapped_column(String(64), default=None)
    #: Hosts that lost or refused this job: it is not offered to them again.
    excluded_host_ids: Mapped[list[str]] = mapped_column(JSON, default=list)

    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    queue_expires_at: Mapped[datetime]
    assigned_at: Mapped[datetime | None] = mapped_column(default=None)
    ack_deadline: Mapped[datetime | None] = mapped_column(default=None)
    acked_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    #: Set while the job's host is connected but no longer reports the job as running.
    missing_since: Mapped[datetime | None] = mapped_column(default=None)

    # The outcome.
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    failure_reason: Mapped[str | None] = mapped_column(String(64), default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    duration_seconds: Mapped[float | None] = mapped_column(default=None)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    cpu_seconds: Mapped[float | None] = mapped_column(default=None)
    last_log_seq: Mapped[int | None] = mapped_column(Integer, default=None)
    logs_archived: Mapped[bool] = mapped_column(default=False)


class JobEventModel(IdMixin, Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_at", "job_id", "at"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16), default=None)
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    host_id: Mapped[uuid.UUID | None] = mapped_column(default=None)


class JobLogChunkModel(Base):
    """One acknowledged log batch, as JSON lines. The durable copy until the job ends and its
    log is archived to the object store (then the chunks are deleted)."""

    __tablename__ = "job_log_chunks"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", "first_seq", name="uq_job_log_chunks_start"),
        Index("ix_job_log_chunks_job_order", "job_id", "attempt", "last_seq"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    first_seq: Mapped[int] = mapped_column(Integer)
    last_seq: Mapped[int] = mapped_column(Integer)
    line_count: Mapped[int] = mapped_column(Integer)
    data: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobArtifactModel(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "job_artifacts"
    __table_args__ = (UniqueConstraint("job_id", "path", name="uq_job_artifacts_job_id_path"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(1024))
