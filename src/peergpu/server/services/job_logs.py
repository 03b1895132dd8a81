"""Job logs: stored before they are acknowledged, archived when the job ends, read and followed.

**Order and cursors.** A line is named by ``(attempt, seq)``: ``seq`` counts from 0 within one
attempt of the job and only grows. Lines are always served in ``(attempt, seq)`` order, and a
cursor ``"<attempt>-<seq>"`` (``"1-41"``) names one line; ``after=<cursor>`` means every line
after it, and no cursor (or ``""``) means from the start.

**Storage.** Each batch an agent sends becomes one ``job_log_chunks`` row (JSON lines), committed
before the server acknowledges it, so a bus (Redis) restart loses nothing acknowledged. Lines
at or below the highest ``seq`` already stored for the attempt are dropped, so a batch the agent
resends after a reconnect is a no-op. Once the job has ended, ``archive`` writes every line to
one object, ``jobs/<job_id>/logs.jsonl``, and deletes the rows, keeping one zero-line
*watermark* row per attempt (``first_seq = -1``, ``last_seq`` = the highest archived seq) so a
resend that arrives after the archive is still recognised as a repeat. Lines that arrive after
the archive are stored as rows again; readers merge both sources and drop duplicates.

**Following.** ``follow`` subscribes to the job's bus channel *first*, then reads the stored
backlog, then serves live messages, dropping whatever is at or before the last line it yielded.
Whenever a live message does not continue exactly where it left off (a lost message, a new
attempt, a bus restart), after every state change and after ``poll_seconds`` of silence it reads
the durable store again from its cursor. So a late subscriber gets the backlog, then the live
tail, with no gap and no duplicate, and a bus outage only slows it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any, NamedTuple

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import InvalidInput, NotFound, ServiceUnavailable
from peergpu.protocol.messages import LogLineSpec
from peergpu.server.agents.channels import job_channel
from peergpu.server.bus import Bus, Message, Subscription
from peergpu.server.context import ServerContext
from peergpu.server.db.job_models import FINAL_STATES, JobLogChunkModel, JobModel
from peergpu.server.storage.base import ObjectInfo

logger = logging.getLogger(__name__)

#: A longer line is cut to this many UTF-8 bytes, ending with ``TRUNCATED_MARKER``.
MAX_LINE_BYTES = 16 * 1024
TRUNCATED_MARKER = " [truncated by PeerGPU]"
#: A live message carrying more than this many bytes of lines is sent without them (followers
#: then read the lines from the database).
MAX_LIVE_PAYLOAD_BYTES = 1024 * 1024
#: ``first_seq`` of the zero-line row that remembers an archived attempt's highest seq.
WATERMARK_FIRST_SEQ = -1

_MAX_INT = 2**31 - 1
_CURSOR = re.compile(r"(\d{1,10})-(\d{1,10})", re.ASCII)
_ARCHIVE_KEY = re.compile(rb'\{"attempt":(\d+),"seq":(\d+),')
_MAX_ROWS_PER_QUERY = 64
_ARCHIVE_WRITE_BYTES = 256 * 1024


class Cursor(NamedTuple):
    attempt: int
    seq: int


class LogLine(NamedTuple):
    attempt: int
    seq: int
    stream: str
    line: str
    ts: float

    @property
    def key(self) -> Cursor:
        return Cursor(self.attempt, self.seq)

    @property
    def cursor(self) -> str:
        return f"{self.attempt}-{self.seq}"


@dataclass(frozen=True, slots=True)
class LogPage:
    lines: list[LogLine]
    #: The cursor of the last line returned (or the ``after`` given when there was none).
    next_cursor: str
    #: The job is final and no line exists after this page.
    complete: bool


@dataclass(frozen=True, slots=True)
class Lines:
    """Log lines, in order, continuing exactly after the previous ones yielded."""

    lines: list[LogLine]


@dataclass(frozen=True, slots=True)
class StateChange:
    """The job as just read from the database, its state differing from the last one sent."""

    job: JobModel


@dataclass(frozen=True, slots=True)
class End:
    """The job is final and every stored line was yielded; the follow ends."""

    job: JobModel


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing was yielded for ``idle_seconds`` (an SSE stream sends a keepalive)."""


FollowEvent = Lines | StateChange | End | Idle


def parse_cursor(value: str | None) -> Cursor | None:
    """``"<attempt>-<seq>"`` as a ``Cursor``; ``None`` or ``""`` means from the start.
    Anything else is ``InvalidInput`` (code ``invalid_cursor``)."""
    if not value:
        return None
    match = _CURSOR.fullmatch(value)
    if match is None or max(int(match[1]), int(match[2])) > _MAX_INT:
        raise InvalidInput(
            "A log cursor looks like '<attempt>-<seq>' (e.g. '1-41'): use a line's cursor or "
            "next_cursor as given.",
            code="invalid_cursor",
            details={"cursor": value[:100]},
        )
    return Cursor(int(match[1]), int(match[2]))


async def store_batch(
    context: ServerContext,
    session: AsyncSession,
    job: JobModel,
    lines: Sequence[LogLineSpec],
) -> int | None:
    """Store the lines of one agent batch for the job's current ``attempt`` and commit; then
    publish them on the job's channel (best effort: after the commit, a bus failure is logged).

    Lines at or below the highest seq already stored for the attempt, and repeats within the
    batch, are dropped. Returns the highest seq stored for the attempt (the one to acknowledge),
    or ``None`` when none is. Two replicas storing the same batch at once is harmless: the loser
    of the insert race stores nothing and returns what the winner stored.
    """
    job_id, attempt = job.id, job.attempt
    stored = await _highest_seq(session, job_id, attempt)
    fresh = _new_lines(lines, after=-1 if stored is None else stored)
    if not fresh:
        await session.commit()
        return stored
    encoded = [_chunk_json(spec) for spec in fresh]
    data = "\n".join(encoded)
    insert = _insert_ignoring_conflict(
        session,
        {
            "job_id": job_id,
            "attempt": attempt,
            "first_seq": fresh[0].seq,
            "last_seq": fresh[-1].seq,
            "line_count": len(fresh),
            "data": data,
        },
    )
    inserted = (await session.execute(insert)).scalar_one_or_none()
    await session.commit()
    if inserted is None:  # another replica stored a batch starting here first
        return await _highest_seq(session, job_id, attempt)
    await _publish_lines(context.bus, job_id, attempt, encoded, len(data))
    return fresh[-1].seq


async def read_page(
    *,
    context: ServerContext,
    session: AsyncSession,
    job: JobModel,
    after: str | None,
    limit: int,
) -> LogPage:
    """Up to ``limit`` lines after the cursor ``after``, from the archive and the stored rows,
    merged in ``(attempt, seq)`` order without duplicates. ``job`` must have just been loaded
    (its state decides ``complete``). A malformed cursor is ``InvalidInput``."""
    cursor = parse_cursor(after)
    final = job.state in FINAL_STATES  # read before the lines: no line is missed after it

    @contextlib.asynccontextmanager
    async def this_session() -> AsyncIterator[AsyncSession]:
        yield session

    lines, more, _archived = await _read_lines(
        context, this_session, job.id, job.logs_archived, cursor, limit
    )
    next_cursor = lines[-1].cursor if lines else (after or "")
    return LogPage(lines=lines, next_cursor=next_cursor, complete=final and not more)


async def archive(context: ServerContext, session: AsyncSession, job_id: uuid.UUID) -> bool:
    """Write every line of the job (all attempts, in ``(attempt, seq)`` order) to the object
    ``jobs/<job_id>/logs.jsonl``, mark the job ``logs_archived`` and delete the archived rows.

    Memory stays bounded (rows are read a page at a time, each in its own short transaction,
    while the object is uploaded). Idempotent: with nothing new since the last archive it does
    nothing and returns False; lines stored after an archive are merged into the object by the
    next call. Run it from one place per job (the job-end path), not concurrently.
    """
    job = await session.get(JobModel, job_id, populate_existing=True)
    if job is None:
        raise NotFound("No such job.", details={"id": str(job_id)})
    was_archived = job.logs_archived
    pending = await session.scalar(
        select(JobLogChunkModel.id)
        .where(JobLogChunkModel.job_id == job_id, JobLogChunkModel.line_count > 0)
        .limit(1)
    )
    await session.commit()  # no transaction stays open during the upload
    if was_archived and pending is None:
        return False
    archived_rows: list[int] = []
    highest: dict[int, int] = {}

    async def body() -> AsyncIterator[bytes]:
        buffer: list[str] = []
        size = 0
        async with contextlib.aclosing(
            _merged_lines(
                context, context.sessionmaker, job_id, was_archived, None, seen_rows=archived_rows
            )
        ) as lines:
            async for line in lines:
                highest[line.attempt] = line.seq
                encoded = _archive_json(line)
                buffer.append(encoded)
                size += len(encoded)
                if size >= _ARCHIVE_WRITE_BYTES:
                    yield "".join(buffer).encode()
                    buffer, size = [], 0
        if buffer:
            yield "".join(buffer).encode()

    key = archive_key(job_id)
    written = await context.storage.put(key, body())
    current = await context.storage.head(key)
    if not _same_object(written, current):
        # Another archive of this job (a repeated final status) replaced ours meanwhile: its
        # rows stay and the next archive merges them; readers merge both sources anyway.
        logger.warning("job %s: log archive replaced concurrently; rows kept", job_id)
        return False
    for start in range(0, len(archived_rows), 500):
        await session.execute(
            delete(JobLogChunkModel).where(
                JobLogChunkModel.id.in_(archived_rows[start : start + 500])
            )
        )
    for attempt, seq in highest.items():
        await _raise_watermark(session, job_id, attempt, seq)
    await session.execute(update(JobModel).where(JobModel.id == job_id).values(logs_archived=True))
    await session.commit()
    return True


def archive_key(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/logs.jsonl"


async def follow(
    *,
    context: ServerContext,
    job: JobModel,
    after: str | None,
    poll_seconds: float = 2.0,
    idle_seconds: float = 15.0,
    page_size: int = 1000,
) -> AsyncGenerator[FollowEvent, None]:
    """The job's log from the cursor ``after`` on, then live, plus its state changes (see the
    module docstring): ``StateChange`` first and on every change, ``Lines`` in order with no
    gap or duplicate, ``Idle`` after ``idle_seconds`` without anything to say, and ``End`` once
    the job is final and every stored line was yielded. ``job`` is one the caller may see; the
    cursor is checked before anything is read (validate it with ``parse_cursor`` before
    starting a response). Holds no database connection while waiting."""
    follower = _Follower(context, job.id, parse_cursor(after), page_size)
    loop = asyncio.get_running_loop()
    async with _LiveFeed(context.bus, job_channel(job.id)) as feed:
        async for event in follower.catch_up():
            yield event
        last_sent = loop.time()
        while not follower.done:
            message = await feed.get(poll_seconds)
            live = None if message is None else follower.take_live(message)
            sent = bool(live)
            if live is None:
                async for event in follower.catch_up():
                    yield event
                    sent = True
            elif live:
                yield Lines(live)
            if sent:
                last_sent = loop.time()
            elif loop.time() - last_sent >= idle_seconds:
                yield Idle()
                last_sent = loop.time()


# ---------------------------------------------------------------- following


class _Follower:
    """The state of one follow: the last line and state yielded."""

    def __init__(
        self, context: ServerContext, job_id: uuid.UUID, cursor: Cursor | None, page_size: int
    ) -> None:
        self.context = context
        self.job_id = job_id
        self.cursor = cursor
        self.page_size = page_size
        self.state: str | None = None
        self.done = False

    async def catch_up(self) -> AsyncGenerator[FollowEvent, None]:
        """Re-read the job and every stored line after the cursor."""
        async with self.context.sessionmaker() as session:
            job = await session.get(JobModel, self.job_id)
        if job is None:  # deleted
            self.done = True
            return
        if job.state != self.state:
            self.state = job.state
            yield StateChange(job)
        if job.logs_archived:
            # One pass over the archive (whose flag never goes back), not one scan per page.
            batch: list[LogLine] = []
            async with contextlib.aclosing(
                _merged_lines(
                    self.context, self.context.sessionmaker, self.job_id, True, self.cursor
                )
            ) as lines:
                async for line in lines:
                    batch.append(line)
                    if len(batch) >= self.page_size:
                        yield self._sent(batch)
                        batch = []
            if batch:
                yield self._sent(batch)
        else:
            archived, more = False, True
            while more:
                batch, more, archived = await _read_lines(
                    self.context,
                    self.context.sessionmaker,
                    self.job_id,
                    archived,
                    self.cursor,
                    self.page_size,
                )
                if batch:
                    yield self._sent(batch)
        if job.state in FINAL_STATES:
            self.done = True
            yield End(job)

    def take_live(self, message: Message) -> list[LogLine] | None:
        """The lines of a live message that continue exactly after the cursor: ``[]`` when they
        were all sent already, ``None`` when the store must be read (a gap, a new attempt, a
        state change, anything unexpected)."""
        cursor = self.cursor
        try:
            payload = json.loads(message.data)
            if payload.get("kind") != "log" or "lines" not in payload or cursor is None:
                return None
            attempt, items = int(payload["attempt"]), payload["lines"]
            if attempt != cursor.attempt:
                return None
            # ``store_batch`` publishes seqs in order without repeats: drop those already
            # sent; the rest must start right after the cursor and have no hole.
            skip = 0
            while skip < len(items) and items[skip]["seq"] <= cursor.seq:
                skip += 1
            items = items[skip:]
            if not items:
                return []
            first, last = items[0]["seq"], items[-1]["seq"]
            if first != cursor.seq + 1 or last - first != len(items) - 1:
                return None
            fresh = [LogLine(attempt, i["seq"], i["stream"], i["line"], i["ts"]) for i in items]
        except (ValueError, TypeError, KeyError, AttributeError):
            logger.warning("job %s: unreadable live message ignored", self.job_id)
            return None
        self.cursor = Cursor(attempt, last)
        return fresh

    def _sent(self, batch: list[LogLine]) -> Lines:
        self.cursor = batch[-1].key
        return Lines(batch)


class _LiveFeed:
    """The job's channel, kept subscribed across bus failures: ``get`` returns ``None`` on a
    timeout, after a failure and after re-subscribing, each a cue to read the store again."""

    def __init__(self, bus: Bus, channel: str) -> None:
        self._bus = bus
        self._channel = channel
        self._stack: AsyncExitStack | None = None
        self._subscription: Subscription | None = None

    async def __aenter__(self) -> _LiveFeed:
        await self._subscribe()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._unsubscribe()

    async def get(self, timeout: float) -> Message | None:
        if self._subscription is None:
            await asyncio.sleep(timeout)
            await self._subscribe()
            return None
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            message = await self._subscription.get(timeout)
        except ServiceUnavailable as exc:
            logger.warning("job feed %s: bus unavailable, polling: %s", self._channel, exc)
            await self._unsubscribe()
            return None
        if message is None and loop.time() - started < timeout * 0.9:
            await self._unsubscribe()  # closed under us (the bus is shutting down)
        return message

    async def _subscribe(self) -> None:
        stack = AsyncExitStack()
        try:
            self._subscription = await stack.enter_async_context(self._bus.subscribe(self._channel))
        except ServiceUnavailable as exc:
            logger.warning("job feed %s: bus unavailable, polling: %s", self._channel, exc)
            await stack.aclose()
            return
        self._stack = stack

    async def _unsubscribe(self) -> None:
        stack, self._stack, self._subscription = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(ServiceUnavailable):
                await stack.aclose()


# ---------------------------------------------------------------- reading

SessionScope = Callable[[], AbstractAsyncContextManager[AsyncSession]]


async def _read_lines(
    context: ServerContext,
    scope: SessionScope,
    job_id: uuid.UUID,
    archived: bool,
    cursor: Cursor | None,
    limit: int,
) -> tuple[list[LogLine], bool, bool]:
    """Up to ``limit`` lines after ``cursor``; returns ``(lines, more, archived)``.

    The archive flag is read again afterwards: an archive that completed meanwhile deleted the
    rows being read (in the transaction that set the flag), so the read is done again from the
    archive."""
    while True:
        lines: list[LogLine] = []
        async with contextlib.aclosing(
            _merged_lines(context, scope, job_id, archived, cursor)
        ) as source:
            async for line in source:
                lines.append(line)
                if len(lines) > limit:
                    break
        if not archived:
            async with scope() as session:
                archived = bool(
                    await session.scalar(
                        select(JobModel.logs_archived).where(JobModel.id == job_id)
                    )
                )
            if archived:
                continue
        return lines[:limit], len(lines) > limit, archived


async def _merged_lines(
    context: ServerContext,
    scope: SessionScope,
    job_id: uuid.UUID,
    archived: bool,
    cursor: Cursor | None,
    *,
    seen_rows: list[int] | None = None,
) -> AsyncGenerator[LogLine, None]:
    """Every line after ``cursor`` from the archive (when ``archived``) and the rows, in
    order, without duplicates."""
    async with contextlib.aclosing(_row_lines(scope, job_id, cursor, seen_rows)) as rows:
        if not archived:
            async for line in rows:
                yield line
            return
        async with contextlib.aclosing(_archive_lines(context, job_id, cursor)) as stored:
            sources = (stored, rows)
            heads = [await anext(stored, None), await anext(rows, None)]
            last: Cursor | None = None
            while True:
                ready = [(h.key, i, h) for i, h in enumerate(heads) if h is not None]
                if not ready:
                    return
                key, index, head = min(ready)
                heads[index] = await anext(sources[index], None)
                if last is None or key > last:
                    last = key
                    yield head


async def _row_lines(
    scope: SessionScope, job_id: uuid.UUID, cursor: Cursor | None, seen_rows: list[int] | None
) -> AsyncGenerator[LogLine, None]:
    """Lines after ``cursor`` from the rows, in order and without duplicates, a page of rows
    per short transaction. Rows may overlap (two replicas storing resends at once): lines wait
    in ``pending`` until no later row can hold a smaller one."""
    chunk = JobLogChunkModel
    query = select(chunk.id, chunk.attempt, chunk.first_seq, chunk.data).where(
        chunk.job_id == job_id, chunk.line_count > 0
    )
    if cursor is not None:
        query = query.where(
            or_(
                chunk.attempt > cursor.attempt,
                and_(chunk.attempt == cursor.attempt, chunk.last_seq > cursor.seq),
            )
        )
    pending: deque[LogLine] = deque()
    last = cursor
    position: tuple[int, int] | None = None
    # Few rows first (a page of lines is a few agent batches), more while the reader keeps on.
    rows_per_query = 4
    while True:
        page = query
        if position is not None:
            page = page.where(
                or_(
                    chunk.attempt > position[0],
                    and_(chunk.attempt == position[0], chunk.first_seq > position[1]),
                )
            )
        async with scope() as session:
            rows = (
                await session.execute(
                    page.order_by(chunk.attempt, chunk.first_seq).limit(rows_per_query)
                )
            ).all()
        for row_id, attempt, first_seq, data in rows:
            if seen_rows is not None:
                seen_rows.append(row_id)
            while pending and pending[0].key < (attempt, first_seq):
                line = pending.popleft()
                if last is None or line.key > last:
                    last = line.key
                    yield line
            lines = _parse_chunk(attempt, data)
            if pending and lines and lines[0].key <= pending[-1].key:
                lines = sorted([*pending, *lines], key=lambda item: item.key)
                pending.clear()
            pending.extend(lines)
            position = (attempt, first_seq)
        if len(rows) < rows_per_query:
            break
        rows_per_query = min(rows_per_query * 2, _MAX_ROWS_PER_QUERY)
    for line in pending:
        if last is None or line.key > last:
            last = line.key
            yield line


async def _archive_lines(
    context: ServerContext, job_id: uuid.UUID, cursor: Cursor | None
) -> AsyncGenerator[LogLine, None]:
    """Lines after ``cursor`` from the archive object, scanned from its start (only the
    ``attempt`` and ``seq`` of the lines skipped are parsed)."""
    try:
        stream = await context.storage.get(archive_key(job_id))
    except NotFound:
        logger.error("job %s is marked archived but has no log object", job_id)
        return
    async with stream:
        rest = b""
        async for block in stream:
            *complete, rest = (rest + block).split(b"\n")
            for raw in complete:
                line = _parse_archived(raw, cursor)
                if line is not None:
                    yield line
        line = _parse_archived(rest, cursor)
        if line is not None:
            yield line


def _parse_archived(raw: bytes, cursor: Cursor | None) -> LogLine | None:
    if not raw.strip():
        return None
    if cursor is not None:
        match = _ARCHIVE_KEY.match(raw)
        if match is not None and (int(match[1]), int(match[2])) <= cursor:
            return None
    item = json.loads(raw)
    line = LogLine(item["attempt"], item["seq"], item["stream"], item["line"], item["ts"])
    return None if cursor is not None and line.key <= cursor else line


def _parse_chunk(attempt: int, data: str) -> list[LogLine]:
    # JSON strings never hold a raw newline, so the lines are one JSON array away.
    items = json.loads("[" + data.replace("\n", ",") + "]")
    return [LogLine(attempt, i["seq"], i["stream"], i["line"], i["ts"]) for i in items]


# ---------------------------------------------------------------- writing


async def _highest_seq(session: AsyncSession, job_id: uuid.UUID, attempt: int) -> int | None:
    value = await session.scalar(
        select(func.max(JobLogChunkModel.last_seq)).where(
            JobLogChunkModel.job_id == job_id, JobLogChunkModel.attempt == attempt
        )
    )
    return None if value is None else int(value)


def _new_lines(lines: Sequence[LogLineSpec], *, after: int) -> list[LogLineSpec]:
    """The lines above ``after``, sorted by seq, each seq once (the first copy wins)."""
    fresh: dict[int, LogLineSpec] = {}
    for spec in lines:
        if spec.seq > after and spec.seq not in fresh:
            fresh[spec.seq] = spec
    return [fresh[seq] for seq in sorted(fresh)]


def _cap_line(text: str) -> str:
    """At most ``MAX_LINE_BYTES`` of valid UTF-8 (lone surrogates become '?')."""
    if text.isascii() and len(text) <= MAX_LINE_BYTES:
        return text
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= MAX_LINE_BYTES:
        return encoded.decode()
    room = MAX_LINE_BYTES - len(TRUNCATED_MARKER.encode())
    return encoded[:room].decode("utf-8", "ignore") + TRUNCATED_MARKER


def _chunk_json(spec: LogLineSpec) -> str:
    # Formatted by hand: this runs for every line, and json.dumps of a dict costs 3x more.
    ts = spec.ts if math.isfinite(spec.ts) else 0.0
    text = encode_basestring(_cap_line(spec.line))
    return f'{{"seq":{spec.seq},"stream":"{spec.stream}","line":{text},"ts":{ts!r}}}'


def _archive_json(line: LogLine) -> str:
    # ``attempt`` and ``seq`` first and compact: ``_ARCHIVE_KEY`` reads them without parsing.
    return (
        f'{{"attempt":{line.attempt},"seq":{line.seq},"stream":"{line.stream}",'
        f'"line":{encode_basestring(line.line)},"ts":{line.ts!r}}}\n'
    )


def _insert_ignoring_conflict(session: AsyncSession, values: dict[str, Any]) -> Any:
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(JobLogChunkModel)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["job_id", "attempt", "first_seq"])
        .returning(JobLogChunkModel.id)
    )


async def _raise_watermark(
    session: AsyncSession, job_id: uuid.UUID, attempt: int, seq: int
) -> None:
    where = (
        JobLogChunkModel.job_id == job_id,
        JobLogChunkModel.attempt == attempt,
        JobLogChunkModel.first_seq == WATERMARK_FIRST_SEQ,
    )
    await session.execute(
        _insert_ignoring_conflict(
            session,
            {
                "job_id": job_id,
                "attempt": attempt,
                "first_seq": WATERMARK_FIRST_SEQ,
                "last_seq": seq,
                "line_count": 0,
                "data": "",
            },
        )
    )
    await session.execute(
        update(JobLogChunkModel).where(*where, JobLogChunkModel.last_seq < seq).values(last_seq=seq)
    )


def _same_object(written: ObjectInfo, current: ObjectInfo | None) -> bool:
    if current is None or current.size != written.size:
        return False
    return current.sha256 is None or current.sha256 == written.sha256


async def _publish_lines(
    bus: Bus, job_id: uuid.UUID, attempt: int, encoded: list[str], size: int
) -> None:
    """``{"kind": "log", "attempt": n, "lines": [...]}``; without ``lines`` when they are too
    big for one message (followers then read them from the database)."""
    lines = f',"lines":[{",".join(encoded)}]' if size <= MAX_LIVE_PAYLOAD_BYTES else ""
    payload = f'{{"kind":"log","attempt":{attempt}{lines}}}'
    try:
        await bus.publish(job_channel(job_id), payload.encode())
    except ServiceUnavailable as exc:
        logger.warning("bus unavailable; job %s log lines not broadcast: %s", job_id, exc)
