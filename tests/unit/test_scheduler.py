"""The scheduler and the job sweep against the real database: matching, ranking, fair share,
atomic GPU claims, ack deadlines, lost hosts, expiry."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel, HostModel
from peergpu.server.db.job_models import JobEventModel, JobModel
from peergpu.server.db.models import UserModel
from peergpu.server.services import job_maintenance, scheduler

pytestmark = pytest.mark.timeout(60)


async def _user(context: ServerContext) -> uuid.UUID:
    async with context.sessionmaker() as session:
        user = UserModel(email=f"{uuid.uuid4().hex[:10]}@example.com", password_hash="x")
        session.add(user)
        await session.commit()
        return user.id


async def _host(
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


async def _job(context: ServerContext, owner: uuid.UUID, **fields: Any) -> uuid.UUID:
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


async def _get(context: ServerContext, job_id: uuid.UUID) -> JobModel:
    async with context.sessionmaker() as session:
        job = await session.get(JobModel, job_id)
        assert job is not None
        return job


async def test_cheapest_then_most_reliable_host_that_fits(context: ServerContext) -> None:
    owner = await _user(context)
    pricey = await _host(context, owner, price=3_000_000, gpus=[("NVIDIA H100", 81920)])
    cheap_flaky = await _host(
        context, owner, price=1_000_000, gpus=[("NVIDIA A100", 40960)], reliability=0.2
    )
    cheap_solid = await _host(
        context, owner, price=1_000_000, gpus=[("NVIDIA A100", 40960)], reliability=0.9
    )
    small = await _host(context, owner, price=100_000, gpus=[("RTX 3060", 12288)])
    big = await _job(context, owner, min_vram_mib=30000)
    h100 = await _job(context, owner, gpu_models=["h100"])
    result = await scheduler.schedule_once(context)
    assert {a.job_id for a in result.assigned} == {big, h100}
    assert (await _get(context, big)).host_id == cheap_solid
    assert (await _get(context, h100)).host_id == pricey
    job = await _get(context, big)
    assert (job.state, job.attempt, job.price_per_gpu_hour_micros) == ("assigned", 1, 1_000_000)
    assert job.gpu_indices == [0] and job.manifest_nonce and job.ack_deadline
    # The next A100 job takes the other A100; the one after that waits (the 3060 is too small).
    again = await _job(context, owner, min_vram_mib=30000)
    waits = await _job(context, owner, min_vram_mib=30000)
    await scheduler.schedule_once(context)
    assert (await _get(context, again)).host_id == cheap_flaky
    assert (await _get(context, waits)).state == "queued"
    del small


async def test_price_tags_runner_gpu_count_and_exclusions(context: ServerContext) -> None:
    owner = await _user(context)
    two = await _host(context, owner, price=2_000_000, gpus=[("L4", 24000), ("L4", 24000)])
    tagged = await _host(context, owner, price=2_500_000, gpus=[("L4", 24000)], tags=["eu"])
    docker = await _host(context, owner, price=2_600_000, gpus=[("L4", 24000)], runners=["docker"])
    too_cheap_for = await _job(context, owner, max_price_per_gpu_hour_micros=1_000_000)
    pair = await _job(context, owner, gpu_count=2)
    eu = await _job(context, owner, tags=["eu"])
    image = await _job(context, owner, image="python:3.12")
    await scheduler.schedule_once(context)
    assert (await _get(context, too_cheap_for)).state == "queued"
    paired = await _get(context, pair)
    assert (paired.host_id, paired.gpu_indices) == (two, [0, 1])
    assert (await _get(context, eu)).host_id == tagged
    assert (await _get(context, image)).host_id == docker

    excluded = await _host(context, owner, price=10, gpus=[("T4", 16000)])
    avoid = await _job(context, owner, excluded_host_ids=[str(excluded)])
    await scheduler.schedule_once(context)
    assert (await _get(context, avoid)).state == "queued"


async def test_priority_then_fair_share_between_renters(context: ServerContext) -> None:
    owner = await _user(context)
    hog, other = await _user(context), await _user(context)
    hog_jobs = [await _job(context, hog) for _ in range(4)]
    other_job = await _job(context, other)
    urgent = await _job(context, hog, priority=5)
    await _host(context, owner, price=1, gpus=[("T4", 16000)] * 3)
    await scheduler.schedule_once(context)
    assigned = {j for j in [*hog_jobs, other_job, urgent] if (await _get(context, j)).host_id}
    # The urgent job first, then each renter's oldest before anyone's second.
    assert assigned == {urgent, hog_jobs[0], other_job}


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_concurrent_schedulers_never_double_assign(settings: Any) -> None:
    """Several scheduler passes at once on separate connections (as on separate replicas):
    every GPU goes to one job, every job gets at most one host."""
    contexts = [ServerContext.build(settings) for _ in range(4)]
    try:
        owner = await _user(contexts[0])
        for _ in range(10):
            await _host(contexts[0], owner, price=1, gpus=[("T4", 16000)] * 2)
        jobs = [await _job(contexts[0], owner) for _ in range(40)]
        for _ in range(3):
            await asyncio.gather(*(scheduler.schedule_once(c) for c in contexts))
        async with contexts[0].sessionmaker() as session:
            claimed = list(
                await session.execute(
                    select(HostGpuModel.id, HostGpuModel.job_id).where(
                        HostGpuModel.job_id.is_not(None)
                    )
                )
            )
            assigned = list(
                await session.scalars(
                    select(JobModel).where(JobModel.id.in_(jobs), JobModel.state == "assigned")
                )
            )
            events = list(
                await session.scalars(
                    select(JobEventModel).where(JobEventModel.to_state == "assigned")
                )
            )
        assert len(claimed) == 20
        assert len({job_id for _, job_id in claimed}) == 20
        assert len(assigned) == 20 and len(events) == 20
        assert {job.id for job in assigned} == {job_id for _, job_id in claimed}
    finally:
        for context in contexts:
            await context.close()


async def test_unacknowledged_manifest_goes_back_to_the_queue(context: ServerContext) -> None:
    owner = await _user(context)
    silent = await _host(context, owner, price=1, gpus=[("T4", 16000)])
    job_id = await _job(context, owner, max_retries=1)
    await scheduler.schedule_once(context)
    async with context.sessionmaker() as session:
        await session.execute(
            update(JobModel)
            .where(JobModel.id == job_id)
            .values(ack_deadline=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    assert await job_maintenance.run_once(context) == 1
    job = await _get(context, job_id)
    assert (job.state, job.host_id, job.excluded_host_ids) == ("queued", None, [str(silent)])
    async with context.sessionmaker() as session:
        gpu = await session.scalar(select(HostGpuModel).where(HostGpuModel.host_id == silent))
        assert gpu is not None and gpu.job_id is None
        reasons = list(
            await session.execute(
                select(JobEventModel.to_state, JobEventModel.reason)
                .where(JobEventModel.job_id == job_id)
                .order_by(JobEventModel.at, JobEventModel.id)
            )
        )
    assert [tuple(r) for r in reasons] == [
        ("assigned", "scheduled"),
        ("lost", "no_ack"),
        ("queued", "requeued"),
    ]


async def test_lost_host_requeues_then_fails_when_retries_run_out(
    context: ServerContext,
) -> None:
    context.settings.host_lost_grace_seconds = 0
    owner = await _user(context)
    job_id = await _job(context, owner, max_retries=1)
    for attempt, expected in ((1, "queued"), (2, "failed")):
        host = await _host(context, owner, price=1, gpus=[("T4", 16000)])
        await scheduler.schedule_once(context)
        assert (await _get(context, job_id)).host_id == host
        async with context.sessionmaker() as session:
            await session.execute(
                update(JobModel)
                .where(JobModel.id == job_id)
                .values(state="running", acked_at=utcnow())
            )
            await session.execute(
                update(HostModel)
                .where(HostModel.id == host)
                .values(status="offline", last_seen_at=utcnow() - timedelta(seconds=5))
            )
            await session.commit()
        await job_maintenance.run_once(context)
        job = await _get(context, job_id)
        assert (job.attempt, job.state) == (attempt, expected)
    assert job.failure_reason == "host_lost"
    assert job.finished_at is not None


async def test_queued_jobs_expire(context: ServerContext) -> None:
    owner = await _user(context)
    job_id = await _job(context, owner, queue_expires_at=utcnow() - timedelta(seconds=1))
    await job_maintenance.run_once(context)
    job = await _get(context, job_id)
    assert (job.state, job.failure_reason) == ("expired", "expired")


async def test_the_sweep_archives_logs_the_job_end_path_missed(context: ServerContext) -> None:
    from peergpu.protocol.messages import LogLineSpec
    from peergpu.server.db.job_models import JobLogChunkModel
    from peergpu.server.services import job_logs

    owner = await _user(context)
    job_id = await _job(context, owner, attempt=1)
    async with context.sessionmaker() as session:
        job = await session.get(JobModel, job_id)
        assert job is not None
        lines = [LogLineSpec(seq=i, stream="stdout", line=f"l{i}", ts=0.0) for i in range(3)]
        await job_logs.store_batch(context, session, job, lines)
        await session.execute(
            update(JobModel)
            .where(JobModel.id == job_id)
            .values(state="failed", finished_at=utcnow() - timedelta(minutes=5))
        )
        await session.commit()
    await job_maintenance.run_once(context)
    job = await _get(context, job_id)
    assert job.logs_archived
    async with context.sessionmaker() as session:
        left = await session.scalar(
            select(JobLogChunkModel.id).where(
                JobLogChunkModel.job_id == job_id, JobLogChunkModel.line_count > 0
            )
        )
    assert left is None  # (an empty row may stay as the dedupe watermark)
    stored = await context.storage.get(job_logs.archive_key(job_id))
    assert (await stored.read_all()).count(b'"line"') == 3


async def test_the_sweep_refreshes_host_reliability_when_asked(context: ServerContext) -> None:
    from peergpu.server.db.host_models import HostSessionModel

    owner = await _user(context)
    host_id = await _host(context, owner, price=1, gpus=[("T4", 16000)], reliability=0.0)
    now = utcnow()
    async with context.sessionmaker() as session:
        session.add(
            HostSessionModel(
                host_id=host_id,
                connection_id="c",
                started_at=now - timedelta(days=3),
                ended_at=now,
            )
        )
        await session.commit()
    await job_maintenance.run_once(context)
    async with context.sessionmaker() as session:
        untouched = await session.get(HostModel, host_id)
    assert untouched is not None and untouched.reliability == 0.0
    await job_maintenance.run_once(context, refresh_reliability=True)
    async with context.sessionmaker() as session:
        host = await session.get(HostModel, host_id)
    assert host is not None and host.reliability == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_bounded_queue_read_matches_ranking_the_whole_queue(
    context: ServerContext, seed: int
) -> None:
    """The scheduler reads only each renter's first jobs; the batch must be exactly what
    ranking every queued job (priority, then turn within the renter, then age) would give."""
    rng = random.Random(seed)
    renters = [await _user(context) for _ in range(5)]
    start = utcnow() - timedelta(hours=1)
    rows = []
    for n in range(120):
        owner = rng.choice(renters[: rng.randint(1, 5)])  # lopsided: early renters submit more
        rows.append(
            {
                "owner_id": owner,
                "priority": rng.choice([0, 0, 0, 1, 5]),
                "created_at": start + timedelta(seconds=rng.randint(0, 600), microseconds=n),
                "state": rng.choice(["queued"] * 4 + ["running"]),
            }
        )
    for row in rows:
        await _job(context, row.pop("owner_id"), **row)
    async with context.sessionmaker() as session:
        queued = list(
            await session.execute(
                select(JobModel.id, JobModel.owner_id, JobModel.priority, JobModel.created_at)
                .where(JobModel.state == "queued")
                .order_by(JobModel.created_at, JobModel.id)
            )
        )
    turns: dict[tuple[uuid.UUID, int], int] = {}
    keyed = []
    for job_id, owner, priority, created in queued:
        turns[(owner, priority)] = turn = turns.get((owner, priority), 0) + 1
        keyed.append(((-priority, turn, created, job_id), job_id))
    expected = [job_id for _key, job_id in sorted(keyed)]
    for size in (1, 7, 30, 500):
        async with context.sessionmaker() as session:
            batch = [job.id for job in await scheduler._take_batch(session, size)]
            await session.rollback()
        assert batch == expected[:size]


async def test_a_job_cancelled_between_the_read_and_the_write_is_not_assigned(
    context: ServerContext,
) -> None:
    """SQLite has no row locks: a cancel can land between the pass's read and its UPDATE.
    The pass must notice (the nonce did not land), give the GPU back and assign the rest."""
    owner = await _user(context)
    host = await _host(context, owner, price=1, gpus=[("T4", 16000)] * 2)
    kept, cancelled = await _job(context, owner), await _job(context, owner)
    async with context.sessionmaker() as session:
        hosts = await scheduler._free_capacity(session)
        jobs = list(
            await session.scalars(select(JobModel).where(JobModel.id.in_([kept, cancelled])))
        )
        await session.commit()  # no lock held, as on SQLite
        async with context.sessionmaker() as other:
            await other.execute(
                update(JobModel).where(JobModel.id == cancelled).values(state="cancelled")
            )
            await other.commit()
        free = hosts[host].free
        matches = [scheduler._Match(job, hosts[host], [free[i]]) for i, job in enumerate(jobs)]
        claimed = await scheduler._claim(session, matches)
        assert len(claimed) == 2
        now = utcnow()
        assigned = await scheduler._assign(session, claimed, now=now, deadline=now)
        await session.commit()
    assert [a.job_id for a in assigned] == [kept]
    async with context.sessionmaker() as session:
        holders = set(
            await session.scalars(select(HostGpuModel.job_id).where(HostGpuModel.host_id == host))
        )
        events = list(
            await session.scalars(
                select(JobEventModel.job_id).where(JobEventModel.to_state == "assigned")
            )
        )
    assert holders == {kept, None}
    assert events == [kept]
    assert (await _get(context, cancelled)).state == "cancelled"
