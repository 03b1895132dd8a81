"""Host-side tables: hosts, their GPUs, enrolment tokens and online sessions (for uptime)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from uuid import UUID

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from peergpu.server.db.base import Base, CreatedAtMixin, IdMixin, utcnow


class HostStatus(StrEnum):
    online = "online"
    offline = "offline"


#: ``taking_jobs()`` as SQL, per dialect: the predicate of the partial indexes the scheduler's
#: free-GPU read walks (``status`` is compared with a literal there too, so that a generic plan
#: of the prepared statement can still prove it).
TAKING_JOBS_SQL = {
    "postgresql": "status = 'online' AND paused IS false AND revoked_at IS NULL"
    " AND price_per_gpu_hour_micros IS NOT NULL",
    "sqlite": "status = 'online' AND paused IS 0 AND revoked_at IS NULL"
    " AND price_per_gpu_hour_micros IS NOT NULL",
}


class HostModel(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "hosts"
    __table_args__ = (
        # The hosts taking jobs in the scheduler's ranking order (cheapest, then most reliable):
        # the free-GPU read walks it and stops at its limit, instead of joining every
        # registered host's GPUs and sorting them all.
        Index(
            "ix_hosts_ranking",
            "price_per_gpu_hour_micros",
            "reliability",
            "id",
            postgresql_where=text(TAKING_JOBS_SQL["postgresql"]),
            sqlite_where=text(TAKING_JOBS_SQL["sqlite"]),
        ),
    )

    owner_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    region: Mapped[str] = mapped_column(String(64), default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: Micro-dollars per GPU-hour; None means not priced yet (the host gets no jobs).
    price_per_gpu_hour_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    paused: Mapped[bool] = mapped_column(default=False)
    verified: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16), default=HostStatus.offline.value)
    credential_prefix: Mapped[str] = mapped_column(String(16), unique=True)
    credential_hash: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    hostname: Mapped[str] = mapped_column(String(255), default="")
    os: Mapped[str] = mapped_column(String(255), default="")
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    protocol_version: Mapped[int | None] = mapped_column(default=None)
    gpu_probe: Mapped[str] = mapped_column(String(32), default="")
    runners: Mapped[list[str]] = mapped_column(JSON, default=list)
    connection_id: Mapped[str | None] = mapped_column(String(64), default=None)
    last_seen_at: Mapped[datetime | None] = mapped_column(default=None)
    #: Share of the last 30 days online (0..1), refreshed by the sweeper; the scheduler's
    #: tie-breaker after price.
    reliability: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))


def taking_work() -> tuple[ColumnElement[bool], ...]:
    """Conditions on ``HostModel`` for hosts that take work now: online, unpaused, enrolled."""
    return (
        # A literal, not a bind parameter: see ``TAKING_JOBS_SQL``.
        HostModel.status == literal_column(f"'{HostStatus.online.value}'", String),
        HostModel.paused.is_(False),
        HostModel.revoked_at.is_(None),
    )


def taking_jobs() -> tuple[ColumnElement[bool], ...]:
    """:func:`taking_work`, and priced (an unpriced host gets no jobs)."""
    return (*taking_work(), HostModel.price_per_gpu_hour_micros.is_not(None))


class HostGpuModel(IdMixin, Base):
    __tablename__ = "host_gpus"
    __table_args__ = (
        UniqueConstraint("host_id", "index", name="uq_host_gpus_host_id_index"),
        # A host's free GPUs, for the free-GPU read (a busy host's probe finds nothing in it).
        Index(
            "ix_host_gpus_free",
            "host_id",
            "index",
            postgresql_where=text("job_id IS NULL"),
            sqlite_where=text("job_id IS NULL"),
        ),
    )

    host_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    index: Mapped[int]
    uuid: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128), index=True)
    memory_total_mib: Mapped[int]
    driver_version: Mapped[str] = mapped_column(String(64), default="")
    cuda_version: Mapped[str | None] = mapped_column(String(16), default=None)
    compute_capability: Mapped[str | None] = mapped_column(String(16), default=None)
    utilization_percent: Mapped[float | None] = mapped_column(default=None)
    memory_used_mib: Mapped[int | None] = mapped_column(default=None)
    temperature_c: Mapped[float | None] = mapped_column(default=None)
    power_watts: Mapped[float | None] = mapped_column(default=None)
    sampled_at: Mapped[datetime | None] = mapped_column(default=None)
    #: The job holding this GPU; claimed with ``UPDATE ... WHERE job_id IS NULL``.
    job_id: Mapped[UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL", use_alter=True), default=None, index=True
    )


class HostServedModelModel(Base):
    """A model a host serves through the inference gateway, as its agent's ``hello`` declared
    it (replaced on every connection)."""

    __tablename__ = "host_served_models"

    host_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    max_concurrency: Mapped[int] = mapped_column(default=4)
    input_price_per_million_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    output_price_per_million_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    declared_at: Mapped[datetime] = mapped_column(default=utcnow)


class EnrollmentTokenModel(IdMixin, CreatedAtMixin, Base):
    """A one-time token a host owner hands to ``peergpu agent enroll``. Settings given here
    (name, region, tags, price) become the new host's."""

    __tablename__ = "enrollment_tokens"

    owner_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    region: Mapped[str] = mapped_column(String(64), default="")
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    price_per_gpu_hour_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    host_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("hosts.id", ondelete="SET NULL"), default=None
    )


class HostSessionModel(IdMixin, Base):
    """One stretch of time a host was online; uptime is the share of a window they cover."""

    __tablename__ = "host_sessions"
    __table_args__ = (Index("ix_host_sessions_host_started", "host_id", "started_at"),)

    host_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    connection_id: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None] = mapped_column(default=None)
