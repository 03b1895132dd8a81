"""Job logs at the service level: storing (dedupe), paging, archiving and following, on both
backends; plus a Redis outage with a private redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.config import ServerSettings
from peergpu.errors import InvalidInput
from peergpu.protocol.messages import LogLineSpec
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostModel
from peergpu.server.db.job_models import JobLogChunkModel, JobModel, JobState
from peergpu.server.db.models import UserRole
from peergpu.server.services import accounts, job_logs, job_states
from peergpu.server.services.job_logs import End, FollowEvent, Idle, Lines, StateChange
from tests.factories import PASSWORD, unique_email
from tests.integration.harness import free_port

_prefixes = itertools.count()


# ------------------------------------------------ factories (the API tests use them too)


async def make_job(
    context: ServerContext,
    session: AsyncSession,
    *,
    owner_id: uuid.UUID | None = None,
    state: JobState = JobState.running,
    attempt: int = 1,
) -> JobModel:
    """A job running on a fresh host (and, without ``owner_id``, for a fresh renter)."""
    if owner_id is None:
        owner = await accounts.create_user(
            session=session,
            passwords=context.passwords,
            email=unique_email("renter"),
            password=PASSWORD,
            roles=[UserRole.renter, UserRole.host],
        )
        owner_id = owner.id
    prefix = f"t{next(_prefixes):07d}{uuid.uuid4().hex[:6]}"
    host = HostModel(
        owner_id=owner_id, name="h", credential_prefix=prefix, credential_hash="0" * 64
    )
    session.add(host)
    await session.flush()
    now = utcnow()
    job = JobModel(
        owner_id=owner_id,
        command=["python", "train.py"],
        max_duration_seconds=3600,
        queue_expires_at=now + timedelta(hours=1),
        state=state.value,
        attempt=attempt,
        host_id=host.id,
        started_at=now,
        env={},
        gpu_models=[],
        tags=[],
        gpu_indices=[],
        excluded_host_ids=[],
    )
    session.add(job)
    await session.commit()
    return job


def specs(seqs: range | list[int], text: str = "line {seq}") -> list[LogLineSpec]:
    return [
        LogLineSpec(seq=seq, stream="stdout", line=text.format(seq=seq), ts=time.time())
        for seq in seqs
    ]


async def finish(context: ServerContext, session: AsyncSession, job: JobModel) -> None:
    """running -> succeeded, committed and announced, as the agent-status handler does."""
    assert await job_states.transition(
        session,
        job,
        expected=JobState.running,
        to=JobState.succeeded,
        reason="succeeded",
        values={"finished_at": utcnow(), "exit_code": 0},
    )
    await session.commit()
    await session.refresh(job)
    await job_states.notify(context, job.id, JobState.succeeded)


async def _read_all(
    context: ServerContext, session: AsyncSession, job: JobModel, limit: int = 1000
) -> list[tuple[int, int]]:
    fresh = await session.get(JobModel, job.id, populate_existing=True)
    assert fresh is not None
    page = await job_logs.read_page(
        context=context, session=session, job=fresh, after=None, limit=limit
    )
    return [(line.attempt, line.seq) for line in page.lines]


async def _chunk_rows(session: AsyncSession, job_id: uuid.UUID) -> int:
    return int(
        await session.scalar(
            select(func.count())
            .select_from(JobLogChunkModel)
            .where(JobLogChunkModel.job_id == job_id, JobLogChunkModel.line_count > 0)
        )
        or 0
    )


# ---------------------------------------------------------------- storing


async def test_repeats_and_overlaps_are_stored_once(
    context: ServerContext, session: AsyncSession
) -> None:
    job = await make_job(context, session)
    assert await job_logs.store_batch(context, session, job, []) is None
    assert await job_logs.store_batch(context, session, job, specs(range(5))) == 4
    assert await job_logs.store_batch(context, session, job, specs(range(5))) == 4  # resend
    assert await job_logs.store_batch(context, session, job, specs(range(3, 8))) == 7  # overlap
    assert await job_logs.store_batch(context, session, job, specs([9, 8, 9, 8])) == 9
    assert await job_logs.store_batch(context, session, job, specs([2])) == 9  # old
    assert await _chunk_rows(session, job.id) == 3
    assert await _read_all(context, session, job) == [(1, seq) for seq in range(10)]


async def test_attempts_count_separately(context: ServerContext, session: AsyncSession) -> None:
    job = await make_job(context, session)
    await job_logs.store_batch(context, session, job, specs(range(3)))
    job.attempt = 2
    await session.commit()
    assert await job_logs.store_batch(context, session, job, specs(range(2))) == 1
    assert await _read_all(context, session, job) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]


async def test_long_lines_are_cut_at_a_character_boundary(
    context: ServerContext, session: AsyncSession
) -> None:
    job = await make_job(context, session)
    long = "é" * job_logs.MAX_LINE_BYTES  # 2 bytes each: twice the cap
    lone = "bad \ud800 surrogate"
    batch = [
        LogLineSpec(seq=0, stream="stderr", line=long, ts=1.0),
        LogLineSpec(seq=1, stream="system", line=lone, ts=2.0),
    ]
    await job_logs.store_batch(context, session, job, batch)
    page = await job_logs.read_page(context=context, session=session, job=job, after=None, limit=5)
    cut, replaced = page.lines
    assert cut.line.endswith(job_logs.TRUNCATED_MARKER)
    assert len(cut.line.encode()) <= job_logs.MAX_LINE_BYTES
    assert set(cut.line.removesuffix(job_logs.TRUNCATED_MARKER)) == {"é"}
    assert (cut.stream, cut.ts) == ("stderr", 1.0)
    assert replaced.line == "bad ? surrogate"


async def test_two_replicas_storing_the_same_batch(
    context: ServerContext, session: AsyncSession
) -> None:
    job = await make_job(context, session)
    await job_logs.store_batch(context, session, job, specs(range(2)))
    async with context.sessionmaker() as other:
        results = await asyncio.gather(
            job_logs.store_batch(context, session, job, specs(range(2, 6))),
            job_logs.store_batch(context, other, job, specs(range(2, 6))),
            return_exceptions=True,
        )
    assert results == [5, 5]
    assert await _read_all(context, session, job) == [(1, seq) for seq in range(6)]


# ---------------------------------------------------------------- paging


async def test_pages_follow_cursors(context: ServerContext, session: AsyncSession) -> None:
    job = await make_job(context, session)
    for start in range(0, 25, 7):
        await job_logs.store_batch(context, session, job, specs(range(start, min(start + 7, 25))))
    seen: list[int] = []
    after: str | None = None
    for _ in range(3):
        page = await job_logs.read_page(
            context=context, session=session, job=job, after=after, limit=10
        )
        seen += [line.seq for line in page.lines]
        assert page.next_cursor == page.lines[-1].cursor
        assert not page.complete  # still running
        after = page.next_cursor
    assert seen == list(range(25))
    empty = await job_logs.read_page(
        context=context, session=session, job=job, after=after, limit=10
    )
    assert (empty.lines, empty.next_cursor, empty.complete) == ([], "1-24", False)
    await finish(context, session, job)
    done = await job_logs.read_page(
        context=context, session=session, job=job, after="1-19", limit=5
    )
    assert [line.seq for line in done.lines] == [20, 21, 22, 23, 24]
    assert done.complete
    partial = await job_logs.read_page(
        context=context, session=session, job=job, after="1-18", limit=5
    )
    assert not partial.complete
    with pytest.raises(InvalidInput):
        await job_logs.read_page(context=context, session=session, job=job, after="1", limit=1)


@pytest.mark.parametrize("cursor", ["x", "1", "1-", "-1-2", "1-2-3", " 1-2", "1-99999999999"])
def test_malformed_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        job_logs.parse_cursor(cursor)
    assert raised.value.code == "invalid_cursor"


def test_cursors() -> None:
    assert job_logs.parse_cursor(None) is None
    assert job_logs.parse_cursor("") is None
    assert job_logs.parse_cursor("2-0") == (2, 0)
    assert job_logs.parse_cursor("1-2147483647") == (1, 2**31 - 1)


# ---------------------------------------------------------------- archiving


async def test_archive_then_read_and_late_lines(
    context: ServerContext, session: AsyncSession
) -> None:
    job = await make_job(context, session)
    await job_logs.store_batch(context, session, job, specs(range(4)))
    job.attempt = 2
    await session.commit()
    await job_logs.store_batch(context, session, job, specs(range(3)))
    await finish(context, session, job)

    assert await job_logs.archive(context, session, job.id)
    assert not await job_logs.archive(context, session, job.id)  # nothing new: a no-op
    stored = await (await context.storage.get(job_logs.archive_key(job.id))).read_all()
    archived = [json.loads(raw) for raw in stored.decode().splitlines()]
    assert [(item["attempt"], item["seq"]) for item in archived] == [
        (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2),
    ]  # fmt: skip
    assert await _chunk_rows(session, job.id) == 0
    refreshed = await session.get(JobModel, job.id, populate_existing=True)
    assert refreshed is not None and refreshed.logs_archived

    # A resend after the archive is still a repeat; new lines are stored as rows again.
    assert await job_logs.store_batch(context, session, job, specs(range(1, 3))) == 2
    assert await _chunk_rows(session, job.id) == 0
    assert await job_logs.store_batch(context, session, job, specs(range(2, 5))) == 4
    assert await _chunk_rows(session, job.id) == 1
    expected = [(1, s) for s in range(4)] + [(2, s) for s in range(5)]
    assert await _read_all(context, session, job) == expected
    page = await job_logs.read_page(
        context=context, session=session, job=refreshed, after="2-1", limit=2
    )
    assert [line.cursor for line in page.lines] == ["2-2", "2-3"]
    assert not page.complete

    assert await job_logs.archive(context, session, job.id)  # merges the late lines in
    assert await _chunk_rows(session, job.id) == 0
    assert await _read_all(context, session, job) == expected
    last = await job_logs.read_page(
        context=context, session=session, job=refreshed, after="2-3", limit=2
    )
    assert [line.cursor for line in last.lines] == ["2-4"] and last.complete


async def test_archive_of_a_job_without_lines(
    context: ServerContext, session: AsyncSession
) -> None:
    job = await make_job(context, session, state=JobState.failed)
    assert await job_logs.archive(context, session, job.id)
    page = await job_logs.read_page(context=context, session=session, job=job, after=None, limit=9)
    assert (page.lines, page.next_cursor, page.complete) == ([], "", True)


# ---------------------------------------------------------------- following


class Collector:
    """Runs ``follow`` in a task; ``until`` waits (on an event, not a clock) for a condition."""

    def __init__(self, context: ServerContext, job: JobModel, **options: object) -> None:
        self.events: list[FollowEvent] = []
        self._changed = asyncio.Event()
        self._follow = job_logs.follow(context=context, job=job, **options)  # type: ignore[arg-type]
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async with contextlib.aclosing(self._follow) as events:
                async for event in events:
                    self.events.append(event)
                    self._changed.set()
        finally:
            self._changed.set()

    @property
    def cursors(self) -> list[tuple[int, int]]:
        return [line.key for e in self.events if isinstance(e, Lines) for line in e.lines]

    @property
    def states(self) -> list[str]:
        return [e.job.state for e in self.events if isinstance(e, StateChange)]

    async def until(self, condition: object, timeout: float = 10) -> None:
        async def wait() -> None:
            while not condition():  # type: ignore[operator]
                if self.task.done():
                    self.task.result()  # raises what the follow raised
                    raise AssertionError(f"the follow ended early: {self.events}")
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"still waiting; the follow yielded {self.events}") from None

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def collectors() -> AsyncIterator[list[Collector]]:
    started: list[Collector] = []
    yield started
    for collector in started:
        await collector.close()


async def test_follow_backlog_then_live_without_gap_or_duplicate(
    context: ServerContext, session: AsyncSession, collectors: list[Collector]
) -> None:
    job = await make_job(context, session)
    await job_logs.store_batch(context, session, job, specs(range(5)))
    follower = Collector(context, job, after="1-1")
    collectors.append(follower)
    await follower.until(lambda: len(follower.cursors) == 3)
    assert isinstance(follower.events[0], StateChange) and follower.states == ["running"]

    await job_logs.store_batch(context, session, job, specs(range(3, 9)))  # overlaps
    await follower.until(lambda: len(follower.cursors) == 7)
    # A batch whose live message was lost (stored, never published) is found by the next
    # message not continuing where the follower is.
    await session.execute(
        insert(JobLogChunkModel).values(
            job_id=job.id,
            attempt=1,
            first_seq=9,
            last_seq=10,
            line_count=2,
            data="\n".join(
                json.dumps({"seq": s, "stream": "stdout", "line": "x", "ts": 0.0}) for s in (9, 10)
            ),
        )
    )
    await session.commit()
    await job_logs.store_batch(context, session, job, specs(range(11, 13)))
    await follower.until(lambda: len(follower.cursors) == 11)
    await finish(context, session, job)
    await follower.until(lambda: follower.task.done())
    assert follower.cursors == [(1, seq) for seq in range(2, 13)]
    assert follower.states == ["running", "succeeded"]
    assert isinstance(follower.events[-1], End)
    assert follower.events[-1].job.exit_code == 0


async def test_follow_a_finished_archived_job(
    context: ServerContext, session: AsyncSession, collectors: list[Collector]
) -> None:
    job = await make_job(context, session)
    await job_logs.store_batch(context, session, job, specs(range(7)))
    await finish(context, session, job)
    await job_logs.archive(context, session, job.id)
    await job_logs.store_batch(context, session, job, specs(range(7, 9)))  # late
    follower = Collector(context, job, after=None, page_size=3)
    collectors.append(follower)
    await asyncio.wait_for(follower.task, 10)
    assert follower.cursors == [(1, seq) for seq in range(9)]
    assert [len(e.lines) for e in follower.events if isinstance(e, Lines)] == [3, 3, 3]
    assert isinstance(follower.events[-1], End)


async def test_follow_notices_a_silent_change_and_goes_idle(
    context: ServerContext, session: AsyncSession, collectors: list[Collector]
) -> None:
    """With no message at all (a lost publish), the periodic re-read still finds lines and
    the end; while nothing happens it says so with ``Idle``."""
    job = await make_job(context, session)
    follower = Collector(context, job, after=None, poll_seconds=0.05, idle_seconds=0.1)
    collectors.append(follower)
    await follower.until(lambda: any(isinstance(e, Idle) for e in follower.events))
    await session.execute(
        insert(JobLogChunkModel).values(
            job_id=job.id,
            attempt=1,
            first_seq=0,
            last_seq=0,
            line_count=1,
            data=json.dumps({"seq": 0, "stream": "stdout", "line": "quiet", "ts": 0.0}),
        )
    )
    await session.commit()
    await follower.until(lambda: follower.cursors == [(1, 0)])
    assert await job_states.transition(
        session, job, expected=JobState.running, to=JobState.failed, reason="test"
    )
    await session.commit()  # and no notify
    await asyncio.wait_for(follower.task, 10)
    assert follower.states == ["running", "failed"]


# ---------------------------------------------------------------- a Redis outage


class PrivateRedis:
    """A redis-server of our own on a free loopback port (never the shared one)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._directory),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False
            ).stdout.strip()
            != b"PONG"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["postgres+redis"])
async def test_lines_stored_while_redis_restarts_are_all_kept(
    settings: ServerSettings, private_redis: PrivateRedis, collectors: list[Collector]
) -> None:
    context = ServerContext.build(settings.model_copy(update={"redis_url": private_redis.url}))
    try:
        async with context.sessionmaker() as session:
            job = await make_job(context, session)
            follower = Collector(context, job, after=None, poll_seconds=0.1)
            collectors.append(follower)
            await job_logs.store_batch(context, session, job, specs(range(3)))
            await follower.until(lambda: len(follower.cursors) == 3)

            private_redis.stop()
            assert await job_logs.store_batch(context, session, job, specs(range(3, 6))) == 5
            private_redis.start()  # empty: nothing of the outage survives in Redis
            assert await job_logs.store_batch(context, session, job, specs(range(6, 9))) == 8

            assert await _read_all(context, session, job) == [(1, s) for s in range(9)]
            await follower.until(lambda: len(follower.cursors) == 9)
            await finish(context, session, job)
            await asyncio.wait_for(follower.task, 10)
            assert follower.cursors == [(1, s) for s in range(9)]
    finally:
        for collector in collectors:
            await collector.close()
        await context.close()
