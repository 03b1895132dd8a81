"""Agents' job reports and heartbeats applied in batches: the same end state as one by one,
idempotent, group-committed, and one bad message does not fail the others."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, update

from peergpu.protocol.messages import GpuSampleSpec, JobStatus, ManifestAck
from peergpu.server.agents.inbox import AgentInbox
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostGpuModel, HostModel
from peergpu.server.db.job_models import JobEventModel, JobModel, JobState
from peergpu.server.services import job_reports, presence, scheduler
from tests.unit.scheduling import get_job, make_host, make_job, make_renter

pytestmark = pytest.mark.timeout(60)


async def _assigned(context: ServerContext) -> tuple[uuid.UUID, uuid.UUID, list[uuid.UUID]]:
    """Host H (3 GPUs, cheapest) and host X (1 GPU); four jobs: three on H, one on X."""
    owner = await make_renter(context)
    h = await make_host(context, owner, price=1, gpus=[("T4", 16000)] * 3)
    x = await make_host(context, owner, price=2, gpus=[("T4", 16000)])
    jobs = [await make_job(context, owner, max_retries=1) for _ in range(4)]
    result = await scheduler.schedule_once(context)
    assert len(result.assigned) == 4
    assert [(await get_job(context, j)).host_id for j in jobs] == [h, h, h, x]
    return h, x, jobs


def _count_sessions(
    context: ServerContext, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], Any]:
    """Count the sessions opened from now on (in a one-item list); returns it and the real
    sessionmaker."""
    sessions = [0]
    real = context.sessionmaker

    def counting() -> Any:
        sessions[0] += 1
        return real()

    monkeypatch.setattr(context, "sessionmaker", counting)
    return sessions, real


async def _events(context: ServerContext, job_id: uuid.UUID) -> list[tuple[str, str]]:
    async with context.sessionmaker() as session:
        rows = await session.execute(
            select(JobEventModel.from_state, JobEventModel.to_state)
            .where(JobEventModel.job_id == job_id)
            .order_by(JobEventModel.at, JobEventModel.id)
        )
        return [(a, b) for a, b in rows]


async def test_one_batch_ends_where_applying_reports_one_by_one_would(
    context: ServerContext,
) -> None:
    h, x, (j1, j2, j3, j4) = await _assigned(context)
    nonce1 = (await get_job(context, j1)).manifest_nonce
    async with context.sessionmaker() as session:  # an answer to an older manifest: ignored
        await job_reports.apply_reports(
            session, [job_reports.Report(h, ManifestAck(job_id=j2, nonce="stale", accepted=True))]
        )
        await session.commit()
    assert (await get_job(context, j2)).acked_at is None
    reports = [
        job_reports.Report(h, ManifestAck(job_id=j1, nonce=nonce1, accepted=True)),
        job_reports.Report(h, ManifestAck(job_id=j2, nonce="stale", accepted=True)),
        job_reports.Report(h, JobStatus(job_id=j1, state="running")),
        job_reports.Report(
            h, JobStatus(job_id=j1, state="succeeded", exit_code=0, duration_seconds=1.5)
        ),
        job_reports.Report(h, JobStatus(job_id=j2, state="running")),
        job_reports.Report(
            h, JobStatus(job_id=j3, state="failed", exit_code=2, failure_reason="nonzero_exit")
        ),
        job_reports.Report(h, JobStatus(job_id=j4, state="running")),  # not H's job
        job_reports.Report(x, ManifestAck(job_id=j4, nonce=None, accepted=False, reason="expired")),
    ]
    async with context.sessionmaker() as session:
        applied = await job_reports.apply_reports(session, reports)
        await session.commit()
    assert applied.changes == [
        (j4, JobState.queued),
        (j1, JobState.running),
        (j2, JobState.running),
        (j1, JobState.succeeded),
        (j3, JobState.failed),
    ]
    assert applied.freed_gpus and applied.requeued and applied.archive == []
    one, two, three, four = [await get_job(context, j) for j in (j1, j2, j3, j4)]
    assert (one.state, one.exit_code, one.duration_seconds) == ("succeeded", 0, 1.5)
    assert one.acked_at is not None and one.started_at is not None and one.finished_at
    assert two.state == "running" and two.acked_at == two.started_at  # the stale ack is ignored
    assert (three.state, three.exit_code, three.failure_reason) == ("failed", 2, "nonzero_exit")
    assert three.started_at is not None  # a job that failed to start still has a start
    assert (four.state, four.host_id, four.excluded_host_ids) == ("queued", None, [str(x)])
    assert await _events(context, j1) == [
        ("queued", "assigned"),
        ("assigned", "running"),
        ("running", "succeeded"),
    ]
    assert await _events(context, j3) == [("queued", "assigned"), ("assigned", "failed")]
    async with context.sessionmaker() as session:
        holders = set(await session.scalars(select(HostGpuModel.job_id)))
        events = await session.scalar(select(func.count()).select_from(JobEventModel))
    assert holders == {None, j2}

    # The agent resends everything after a reconnect: nothing changes.
    async with context.sessionmaker() as session:
        again = await job_reports.apply_reports(session, reports)
        await session.commit()
    assert again.changes == [] and not again.freed_gpus
    async with context.sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(JobEventModel)) == events
    assert (await get_job(context, j1)).finished_at == one.finished_at


async def test_the_inbox_group_commits_and_answers_each_socket(
    context: ServerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _x, jobs = await _assigned(context)
    async with context.sessionmaker() as session:
        await session.execute(update(HostModel).values(connection_id="c-" + HostModel.name))
        await session.execute(
            update(HostModel).where(HostModel.id == h).values(connection_id="current")
        )
        await session.commit()
    sessions, real = _count_sessions(context, monkeypatch)
    inbox = AgentInbox(context)
    sample = [GpuSampleSpec(index=i, utilization_percent=90, memory_used_mib=7) for i in range(3)]
    try:
        results = await asyncio.gather(
            inbox.heartbeat(h, "current", sample),
            inbox.heartbeat(h, "superseded", sample),
            *(inbox.report(h, JobStatus(job_id=j, state="running")) for j in jobs[:3]),
        )
    finally:
        await inbox.close()
    assert results == [[], None, None, None, None]
    assert sessions == [1]  # five messages, one transaction
    assert {(await get_job(context, j)).state for j in jobs[:3]} == {"running"}
    async with real() as session:
        gpus = list(
            await session.execute(
                select(HostGpuModel.index, HostGpuModel.utilization_percent).where(
                    HostGpuModel.host_id == h
                )
            )
        )
    assert sorted(gpus) == [(0, 90.0), (1, 90.0), (2, 90.0)]


async def test_a_heartbeat_reconciles_in_its_batch_after_the_reports(
    context: ServerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a host says it runs, against the jobs table, in the batch's one transaction: an
    acknowledged job it does not mention starts the missing clock, one it mentions stops it,
    one it runs that is not its own is returned to stop, a manifest in flight is left alone,
    and a job that ends in the same batch is not left missing."""
    owner = await make_renter(context)
    h = await make_host(context, owner, price=1, gpus=[("T4", 16000)] * 4)
    x = await make_host(context, owner, price=2, gpus=[("T4", 16000)])
    jobs = [await make_job(context, owner) for _ in range(5)]
    assert len((await scheduler.schedule_once(context)).assigned) == 5
    j1, j2, j3, j4, j5 = jobs
    assert (await get_job(context, j5)).host_id == x
    async with context.sessionmaker() as session:
        reports = []
        for job_id in (j1, j2, j3):
            nonce = (await get_job(context, job_id)).manifest_nonce
            reports += [
                job_reports.Report(h, ManifestAck(job_id=job_id, nonce=nonce, accepted=True)),
                job_reports.Report(h, JobStatus(job_id=job_id, state="running")),
            ]
        await job_reports.apply_reports(session, reports)
        await session.execute(update(HostModel).where(HostModel.id == h).values(connection_id="c"))
        await session.execute(update(HostModel).where(HostModel.id == x).values(connection_id="d"))
        await session.execute(
            update(JobModel).where(JobModel.id == j1).values(missing_since=utcnow())
        )
        await session.commit()
    sessions, real = _count_sessions(context, monkeypatch)
    stray = uuid.uuid4()
    inbox = AgentInbox(context)
    try:
        results = await asyncio.gather(
            inbox.report(
                h, JobStatus(job_id=j2, state="succeeded", exit_code=0, duration_seconds=1.0)
            ),
            inbox.heartbeat(h, "c", [], running=[j1, j5, stray]),
            inbox.heartbeat(x, "d", []),  # not reconciled this beat
            inbox.heartbeat(x, "superseded", [], running=[]),
        )
    finally:
        await inbox.close()
    assert results == [None, [j5, stray], [], None]
    assert sessions == [1]
    j1_, j2_, j3_, j4_, j5_ = [await get_job(context, j) for j in jobs]
    assert j1_.missing_since is None  # mentioned: the clock stops
    assert (j2_.state, j2_.missing_since) == ("succeeded", None)  # ended in the batch
    assert j3_.state == "running" and j3_.missing_since is not None  # acknowledged, absent
    assert (j4_.state, j4_.acked_at, j4_.missing_since) == ("assigned", None, None)  # in flight
    assert j5_.missing_since is None  # x's beat did not reconcile; a superseded one changes nothing

    async with real() as session:  # the same through the one-host path of a ``hello``
        assert await job_reports.reconcile_hosts(session, {}) == {}
    assert await job_reports.reconcile(context, x, []) == []
    assert (await get_job(context, j5)).missing_since is None  # in flight: not missing
    assert await job_reports.reconcile(context, h, [j3, stray]) == [stray]
    assert (await get_job(context, j3)).missing_since is None


async def test_one_bad_message_fails_alone(
    context: ServerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _x, (j1, *_rest) = await _assigned(context)
    real = presence.record_heartbeats

    async def flaky(session: Any, beats: Any) -> Any:
        if any(beat.connection_id == "boom" for beat in beats):
            raise RuntimeError("boom")
        return await real(session, beats)

    monkeypatch.setattr(presence, "record_heartbeats", flaky)
    inbox = AgentInbox(context)
    try:
        results = await asyncio.gather(
            inbox.heartbeat(h, "boom", []),
            inbox.report(h, JobStatus(job_id=j1, state="running")),
            return_exceptions=True,
        )
    finally:
        await inbox.close()
    assert isinstance(results[0], RuntimeError) and results[1] is None
    assert (await get_job(context, j1)).state == "running"


async def test_an_ending_that_lost_a_race_is_not_announced(context: ServerContext) -> None:
    """Between reading a job's state and ending it, another replica moved it on: that row's
    conditional UPDATE changes nothing, and neither a change nor an event is reported."""
    h, _x, (j1, j2, *_rest) = await _assigned(context)
    async with context.sessionmaker() as session:
        await session.execute(update(JobModel).where(JobModel.id == j2).values(state="lost"))
        await session.commit()
    statuses = [JobStatus(job_id=j, state="succeeded", exit_code=0) for j in (j1, j2)]
    rows = [  # every column ``_apply_finals`` sets, as it builds them
        {
            "b_id": j,
            "b_expected": "assigned",
            "state": "succeeded",
            "failure_reason": None,
            "message": "",
            "started_at": utcnow(),
            "exit_code": 0,
            "duration_seconds": 1.0,
            "peak_memory_bytes": None,
            "cpu_seconds": None,
            "last_log_seq": None,
        }
        for j in (j1, j2)
    ]
    endings = [(h, s, JobState.assigned, JobState.succeeded) for s in statuses]
    async with context.sessionmaker() as session:
        landed = await job_reports._end_jobs(session, rows, endings, utcnow())
        await session.commit()
    assert [ending[1].job_id for ending in landed] == [j1]
    assert [(await get_job(context, j)).state for j in (j1, j2)] == ["succeeded", "lost"]
