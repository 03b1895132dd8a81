"""The scheduler and the job sweep against the real database: matching, ranking, fair share,
atomic GPU claims, ack deadlines, lost hosts, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from peergpu.server.agents.channels import SCHEDULER_WAKE_CHANNEL
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel, HostModel
from peergpu.server.db.job_models import JobEventModel, JobModel
from peergpu.server.services import job_maintenance, job_queue, scheduler
from tests.unit.scheduling import get_job, make_host, make_job, make_renter

pytestmark = pytest.mark.timeout(60)


async def test_cheapest_then_most_reliable_host_that_fits(context: ServerContext) -> None:
    owner = await make_renter(context)
    pricey = await make_host(context, owner, price=3_000_000, gpus=[("NVIDIA H100", 81920)])
    cheap_flaky = await make_host(
        context, owner, price=1_000_000, gpus=[("NVIDIA A100", 40960)], reliability=0.2
    )
    cheap_solid = await make_host(
        context, owner, price=1_000_000, gpus=[("NVIDIA A100", 40960)], reliability=0.9
    )
    small = await make_host(context, owner, price=100_000, gpus=[("RTX 3060", 12288)])
    big = await make_job(context, owner, min_vram_mib=30000)
    h100 = await make_job(context, owner, gpu_models=["h100"])
    result = await scheduler.schedule_once(context)
    assert {a.job_id for a in result.assigned} == {big, h100}
    assert (await get_job(context, big)).host_id == cheap_solid
    assert (await get_job(context, h100)).host_id == pricey
    job = await get_job(context, big)
    assert (job.state, job.attempt, job.price_per_gpu_hour_micros) == ("assigned", 1, 1_000_000)
    assert job.gpu_indices == [0] and job.manifest_nonce and job.ack_deadline
    # The next A100 job takes the other A100; the one after that waits (the 3060 is too small).
    again = await make_job(context, owner, min_vram_mib=30000)
    waits = await make_job(context, owner, min_vram_mib=30000)
    await scheduler.schedule_once(context)
    assert (await get_job(context, again)).host_id == cheap_flaky
    assert (await get_job(context, waits)).state == "queued"
    del small


async def test_between_equal_hosts_the_least_loaded_one_gets_the_job(
    context: ServerContext,
) -> None:
    owner = await make_renter(context)
    gpus = [("NVIDIA A100", 40960)] * 3
    hosts = [await make_host(context, owner, price=1_000_000, gpus=gpus) for _ in range(2)]
    # The loaded one is read first (by id): a scheduler blind to load would pick it.
    loaded, idle = sorted(hosts)
    # Two of the loaded host's three GPUs run jobs already; its third is as free as idle's.
    first, second = [await make_job(context, owner) for _ in range(2)]
    async with context.sessionmaker() as session:
        rows = await session.scalars(
            select(HostGpuModel).where(HostGpuModel.host_id == loaded).order_by("index")
        )
        for gpu, job_id in zip(list(rows)[:2], [first, second], strict=True):
            gpu.job_id = job_id
        await session.execute(
            update(JobModel)
            .where(JobModel.id.in_([first, second]))
            .values(state="running", host_id=loaded)
        )
        await session.commit()
    job = await make_job(context, owner)
    result = await scheduler.schedule_once(context)
    assert [a.job_id for a in result.assigned] == [job]
    assert (await get_job(context, job)).host_id == idle


async def test_price_tags_runner_gpu_count_and_exclusions(context: ServerContext) -> None:
    owner = await make_renter(context)
    two = await make_host(context, owner, price=2_000_000, gpus=[("L4", 24000), ("L4", 24000)])
    tagged = await make_host(context, owner, price=2_500_000, gpus=[("L4", 24000)], tags=["eu"])
    docker = await make_host(
        context, owner, price=2_600_000, gpus=[("L4", 24000)], runners=["docker"]
    )
    too_cheap_for = await make_job(context, owner, max_price_per_gpu_hour_micros=1_000_000)
    pair = await make_job(context, owner, gpu_count=2)
    eu = await make_job(context, owner, tags=["eu"])
    image = await make_job(context, owner, image="python:3.12")
    await scheduler.schedule_once(context)
    assert (await get_job(context, too_cheap_for)).state == "queued"
    paired = await get_job(context, pair)
    assert (paired.host_id, paired.gpu_indices) == (two, [0, 1])
    assert (await get_job(context, eu)).host_id == tagged
    assert (await get_job(context, image)).host_id == docker

    excluded = await make_host(context, owner, price=10, gpus=[("T4", 16000)])
    avoid = await make_job(context, owner, excluded_host_ids=[str(excluded)])
    await scheduler.schedule_once(context)
    assert (await get_job(context, avoid)).state == "queued"


async def test_priority_then_fair_share_between_renters(context: ServerContext) -> None:
    owner = await make_renter(context)
    hog, other = await make_renter(context), await make_renter(context)
    hog_jobs = [await make_job(context, hog) for _ in range(4)]
    other_job = await make_job(context, other)
    urgent = await make_job(context, hog, priority=5)
    await make_host(context, owner, price=1, gpus=[("T4", 16000)] * 3)
    await scheduler.schedule_once(context)
    assigned = {j for j in [*hog_jobs, other_job, urgent] if (await get_job(context, j)).host_id}
    # The urgent job first, then each renter's oldest before anyone's second.
    assert assigned == {urgent, hog_jobs[0], other_job}


@pytest.mark.parametrize("backend", ["postgres+redis"], indirect=True)
async def test_concurrent_schedulers_never_double_assign(settings: Any) -> None:
    """Several scheduler passes at once on separate connections (as on separate replicas):
    every GPU goes to one job, every job gets at most one host."""
    contexts = [ServerContext.build(settings) for _ in range(4)]
    try:
        owner = await make_renter(contexts[0])
        for _ in range(10):
            await make_host(contexts[0], owner, price=1, gpus=[("T4", 16000)] * 2)
        jobs = [await make_job(contexts[0], owner) for _ in range(40)]
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


async def test_a_claim_takes_only_free_gpus_and_skips_rows_another_pass_holds(
    context: ServerContext,
) -> None:
    """The claim statement sets each free GPU to its own job and returns what it set; a GPU
    already taken keeps its job, and on PostgreSQL a GPU another pass has locked is skipped
    at once (no wait), so the two passes never block each other."""
    owner = await make_renter(context)
    host = await make_host(context, owner, price=1, gpus=[("T4", 16000)] * 4)
    jobs = [await make_job(context, owner) for _ in range(4)]
    async with context.sessionmaker() as session:
        gpus = list(
            await session.scalars(
                select(HostGpuModel.id)
                .where(HostGpuModel.host_id == host)
                .order_by(HostGpuModel.index)
            )
        )
        await session.execute(
            update(HostGpuModel).where(HostGpuModel.id == gpus[0]).values(job_id=jobs[0])
        )
        await session.commit()
    postgresql = not context.settings.is_sqlite
    async with contextlib.AsyncExitStack() as stack:
        if postgresql:  # another pass holds GPU 1 (SQLite has no row locks)
            other = await stack.enter_async_context(context.sessionmaker())
            await other.execute(
                select(HostGpuModel.id).where(HostGpuModel.id == gpus[1]).with_for_update()
            )
        wanted = {gpus[0]: jobs[1], gpus[1]: jobs[1], gpus[2]: jobs[2], gpus[3]: jobs[3]}
        statement, parameters = scheduler.claim_statement(wanted, postgresql=postgresql)
        async with context.sessionmaker() as session:
            result = await asyncio.wait_for(session.execute(statement, parameters), 5)
            claimed = dict(result.all())
            await session.commit()
    expected = {gpus[2]: jobs[2], gpus[3]: jobs[3]}
    if not postgresql:
        expected[gpus[1]] = jobs[1]
    assert claimed == expected
    async with context.sessionmaker() as session:
        rows = await session.execute(
            select(HostGpuModel.id, HostGpuModel.job_id).where(HostGpuModel.host_id == host)
        )
        holders = dict(rows.all())
    assert holders == {gpus[0]: jobs[0], gpus[1]: expected.get(gpus[1]), **expected}


async def test_unacknowledged_manifest_goes_back_to_the_queue(context: ServerContext) -> None:
    owner = await make_renter(context)
    silent = await make_host(context, owner, price=1, gpus=[("T4", 16000)])
    job_id = await make_job(context, owner, max_retries=1)
    await scheduler.schedule_once(context)
    async with context.sessionmaker() as session:
        await session.execute(
            update(JobModel)
            .where(JobModel.id == job_id)
            .values(ack_deadline=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    assert await job_maintenance.run_once(context) == 1
    job = await get_job(context, job_id)
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
    owner = await make_renter(context)
    job_id = await make_job(context, owner, max_retries=1)
    for attempt, expected in ((1, "queued"), (2, "failed")):
        host = await make_host(context, owner, price=1, gpus=[("T4", 16000)])
        await scheduler.schedule_once(context)
        assert (await get_job(context, job_id)).host_id == host
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
        job = await get_job(context, job_id)
        assert (job.attempt, job.state) == (attempt, expected)
    assert job.failure_reason == "host_lost"
    assert job.finished_at is not None


async def test_queued_jobs_expire(context: ServerContext) -> None:
    owner = await make_renter(context)
    job_id = await make_job(context, owner, queue_expires_at=utcnow() - timedelta(seconds=1))
    await job_maintenance.run_once(context)
    job = await get_job(context, job_id)
    assert (job.state, job.failure_reason) == ("expired", "expired")


async def test_the_sweep_archives_logs_the_job_end_path_missed(context: ServerContext) -> None:
    from peergpu.protocol.messages import LogLineSpec
    from peergpu.server.db.job_models import JobLogChunkModel
    from peergpu.server.services import job_logs

    owner = await make_renter(context)
    job_id = await make_job(context, owner, attempt=1)
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
    job = await get_job(context, job_id)
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

    owner = await make_renter(context)
    host_id = await make_host(context, owner, price=1, gpus=[("T4", 16000)], reliability=0.0)
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
    renters = [await make_renter(context) for _ in range(5)]
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
        await make_job(context, row.pop("owner_id"), **row)
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
            batch = [job.id for job in await job_queue.take_batch(session, size)]
            # The two ways of finding the queue heads (a skip scan on PostgreSQL, a GROUP BY
            # on SQLite) agree on either backend, with renters left out too.
            for skipped in ([], renters[:2]):
                heads = [
                    list(
                        await session.execute(
                            job_queue.heads_statement(size, skipped, skip_scan=skip_scan)
                        )
                    )
                    for skip_scan in (True, False)
                ]
                assert heads[0] == heads[1]
                assert not {owner for owner, _priority in heads[0]} & set(skipped)
            await session.rollback()
        assert batch == expected[:size]


async def test_a_job_cancelled_between_the_read_and_the_write_is_not_assigned(
    context: ServerContext,
) -> None:
    """SQLite has no row locks: a cancel can land between the pass's read and its UPDATE.
    The pass must notice (the nonce did not land), give the GPU back and assign the rest."""
    owner = await make_renter(context)
    host = await make_host(context, owner, price=1, gpus=[("T4", 16000)] * 2)
    kept, cancelled = await make_job(context, owner), await make_job(context, owner)
    async with context.sessionmaker() as session:
        hosts, _ = await scheduler._free_capacity(session)
        jobs = await job_queue.read_jobs(session, [kept, cancelled])
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
    assert (await get_job(context, cancelled)).state == "cancelled"


async def test_the_queue_read_takes_more_renter_queues_than_one_compound_select_may(
    context: ServerContext,
) -> None:
    """SQLite refuses a UNION ALL of more than 500 terms; a big batch can have more heads."""
    owner = await make_renter(context)
    job_id = await make_job(context, owner)
    heads = [(uuid.uuid4(), 0) for _ in range(1200)] + [(owner, 0)]
    async with context.sessionmaker() as session:
        ids = list(await session.scalars(job_queue.order_statement(heads, {0: 5000})))
    assert ids == [job_id]


async def test_a_steady_stream_of_wake_ups_does_not_hold_passes_back(
    context: ServerContext,
) -> None:
    """Wake-ups that arrive while the loop coalesces them must not keep it from passing: a
    replica taking ~200 submits/s (each one a wake-up) once ran no pass for 20 s."""
    owner = await make_renter(context)
    await make_host(context, owner, price=1, gpus=[("T4", 16000)])
    loop = asyncio.create_task(scheduler.run_scheduler(context))
    flooding = True

    async def flood() -> None:
        while flooding:  # faster than a reader drains them, one at a time
            await context.bus.publish_many([(SCHEDULER_WAKE_CHANNEL, b"1")] * 50)
            await asyncio.sleep(0)

    await asyncio.sleep(0.3)  # the first pass found nothing: the loop waits for a wake-up
    flooder = asyncio.create_task(flood())
    try:
        await asyncio.sleep(0.3)
        job = await make_job(context, owner)  # (the flood wakes the loop for it)
        for _ in range(100):
            if (await get_job(context, job)).state == "assigned":
                break
            await asyncio.sleep(0.1)
        assert (await get_job(context, job)).state == "assigned"
    finally:
        flooding = False
        await flooder
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_a_job_beyond_the_cheapest_free_gpus_read_first_still_finds_its_host(
    context: ServerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass reads only the cheapest free GPUs first (a few per GPU its batch wants); a job
    that fits none of them gets everything read, and its host."""
    monkeypatch.setattr(scheduler, "FREE_READ_MIN", 1)
    monkeypatch.setattr(scheduler, "FREE_READ_FACTOR", 1)
    owner = await make_renter(context)
    cheap = [await make_host(context, owner, price=100 + i, gpus=[("T4", 16000)]) for i in range(3)]
    big = await make_host(context, owner, price=5_000, gpus=[("NVIDIA A100", 81920)])
    small, large = (
        await make_job(context, owner),
        await make_job(context, owner, min_vram_mib=40000),
    )
    result = await scheduler.schedule_once(context)
    assert {a.job_id for a in result.assigned} == {small, large}
    assert (await get_job(context, small)).host_id == cheap[0]
    assert (await get_job(context, large)).host_id == big
    async with context.sessionmaker() as session:
        first, cut = await scheduler._free_capacity(session, limit=1)
        everything, whole = await scheduler._free_capacity(session)
    assert (list(first), cut) == ([cheap[1]], True)  # the cheapest free one left
    assert (set(everything), whole) == ({cheap[1], cheap[2]}, False)
