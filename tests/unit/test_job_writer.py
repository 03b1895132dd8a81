"""The job writer (group-committed submits) against the real database and bus: submits that
arrive together share a transaction and a wake-up, a racing idempotency key fails only its
own submit (which then replays the winner), and closing writes what is queued."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import func, select

from peergpu.errors import ServiceUnavailable
from peergpu.server.agents.channels import SCHEDULER_WAKE_CHANNEL
from peergpu.server.context import ServerContext
from peergpu.server.db.job_models import JobEventModel, JobModel
from peergpu.server.db.models import UserModel
from peergpu.server.security.principal import Principal
from peergpu.server.services import jobs
from peergpu.server.services.job_writer import JobWriter
from tests.unit.scheduling import make_renter

pytestmark = pytest.mark.timeout(60)


async def _principal(context: ServerContext) -> Principal:
    owner = await make_renter(context)
    async with context.sessionmaker() as session:
        user = await session.get(UserModel, owner)
        assert user is not None
        session.expunge(user)
    return Principal.for_session(user)


async def _submit(
    context: ServerContext, principal: Principal, key: str | None = None, name: str = ""
) -> tuple[JobModel, bool]:
    async with context.sessionmaker() as session:
        return await jobs.submit(
            context=context,
            session=session,
            principal=principal,
            spec=jobs.JobSpec(command=["true"], name=name),
            idempotency_key=key,
        )


async def _count(context: ServerContext, model: type, owner: uuid.UUID) -> int:
    async with context.sessionmaker() as session:
        if model is JobModel:
            query = select(func.count()).where(JobModel.owner_id == owner)
        else:
            query = (
                select(func.count())
                .select_from(JobEventModel)
                .join(JobModel, JobModel.id == JobEventModel.job_id)
                .where(JobModel.owner_id == owner)
            )
        return int(await session.scalar(query) or 0)


async def test_submits_that_arrive_together_share_one_commit_and_one_wake_up(
    context: ServerContext,
) -> None:
    principal = await _principal(context)
    await _submit(context, principal)  # the credit check's read done: nothing awaits before
    commits = 0  # the writer, so the 20 below are queued before any worker runs
    original = JobWriter._commit

    async def counting(self: JobWriter, batch: list) -> list[None]:
        nonlocal commits
        commits += 1
        return await original(self, batch)

    async with context.bus.subscribe(SCHEDULER_WAKE_CHANNEL) as wakeups:
        JobWriter._commit = counting  # type: ignore[method-assign]
        try:
            results = await asyncio.gather(*(_submit(context, principal) for _ in range(20)))
        finally:
            JobWriter._commit = original  # type: ignore[method-assign]
        await wakeups.get(timeout=5)
        woken = 1 + await wakeups.drain(100)
    assert all(created for _job, created in results)
    assert len({job.id for job, _ in results}) == 20
    assert await _count(context, JobModel, principal.user_id) == 21
    assert await _count(context, JobEventModel, principal.user_id) == 21
    assert commits == 1
    assert woken == 1


async def test_a_racing_idempotency_key_fails_only_its_own_submit(
    context: ServerContext,
) -> None:
    """Two submits with one key in one batch: the batch's INSERT fails, the writer writes its
    jobs one by one, the loser gets the IntegrityError and replays the winner's job."""
    principal = await _principal(context)
    await _submit(context, principal)  # a first submit, so the next ones queue up together
    key = f"race-{uuid.uuid4()}"
    results = await asyncio.gather(
        *(_submit(context, principal, key) for _ in range(2)),
        *(_submit(context, principal) for _ in range(5)),
    )
    keyed = results[:2]
    assert keyed[0][0].id == keyed[1][0].id
    assert sorted(created for _job, created in keyed) == [False, True]
    assert all(created for _job, created in results[2:])
    assert await _count(context, JobModel, principal.user_id) == 1 + 1 + 5
    assert await _count(context, JobEventModel, principal.user_id) == 1 + 1 + 5


async def test_closing_writes_what_is_queued_then_refuses(context: ServerContext) -> None:
    principal = await _principal(context)
    writer = context.job_writer
    submits = [asyncio.create_task(_submit(context, principal)) for _ in range(10)]
    async with asyncio.timeout(10):
        while len(writer._queue) < 5:  # queued behind the first, not yet written
            await asyncio.sleep(0.001)
    queued = len(writer._queue)
    await writer.close()
    results = await asyncio.gather(*submits, return_exceptions=True)
    written = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, ServiceUnavailable)]
    assert len(written) + len(refused) == 10 and len(written) >= queued
    assert await _count(context, JobModel, principal.user_id) == len(written)
    with pytest.raises(ServiceUnavailable, match="shutting down"):
        await _submit(context, principal)
