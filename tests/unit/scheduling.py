"""Rows for scheduler and job-report tests: renters, hosts with GPUs, jobs in any state."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel, HostModel
from peergpu.server.db.job_models import JobModel
from peergpu.server.db.models import UserModel
from peergpu.server.services.billing import accounts as billing_accounts
from peergpu.server.services.billing import ledger, postings


async def make_renter(context: ServerContext, *, credit: int = 1_000_000_000) -> uuid.UUID:
    """A renter with ``credit`` micro-dollars of promotional credit ($1,000 by default)."""
    async with context.sessionmaker() as session:
        user = UserModel(email=f"{uuid.uuid4().hex[:10]}@example.com", password_hash="x")
        session.add(user)
        await session.flush()
        if credit:
            await ledger.post(
                session,
                postings.grant(
                    wallet=billing_accounts.user_wallet(user.id), amount=credit, key=f"t:{user.id}"
                ),
            )
        await session.commit()
        return user.id


async def make_host(
    context: ServerContext,
    owner: uuid.UUID,
    *,
    price: int,
    gpus: list[tuple[str, int]],
    reliability: float = 0.5,
    tags: list[str] | None = None,
    runners: list[str] | None = None,
    online: bool = True,
) -> uuid.UUID:
    async with context.sessionmaker() as session:
        host = HostModel(
            owner_id=owner,
            name="h",
            tags=tags or [],
            price_per_gpu_hour_micros=price,
            status="online" if online else "offline",
            credential_prefix=uuid.uuid4().hex[:12],
            credential_hash="x" * 64,
            last_seen_at=utcnow(),
            runners=runners or ["process"],
            reliability=reliability,
        )
        session.add(host)
        await session.flush()
        for index, (model, memory) in enumerate(gpus):
            session.add(
                HostGpuModel(
                    host_id=host.id,
                    index=index,
                    uuid=f"GPU-{uuid.uuid4()}",
                    model=model,
                    memory_total_mib=memory,
                )
            )
        await session.commit()
        return host.id


async def make_job(context: ServerContext, owner: uuid.UUID, **fields: Any) -> uuid.UUID:
    now = utcnow()
    values: dict[str, Any] = {
        "owner_id": owner,
        "command": ["true"],
        "max_duration_seconds": 60,
        "queue_expires_at": now + timedelta(hours=1),
        "created_at": now,
        "updated_at": now,
        **fields,
    }
    async with context.sessionmaker() as session:
        job = JobModel(**values)
        session.add(job)
        await session.commit()
        return job.id


async def get_job(context: ServerContext, job_id: uuid.UUID) -> JobModel:
    async with context.sessionmaker() as session:
        job = await session.get(JobModel, job_id)
        assert job is not None
        return job
