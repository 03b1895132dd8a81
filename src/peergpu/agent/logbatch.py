"""Batching job output for the wire: sequence numbers, size/time batching and backpressure.

A :class:`LogBatcher` sits between a runner (its ``add`` is an ``OutputSink``) and the connection
(``send``). Every line gets the next sequence number (gap-free, starting at ``first_seq``). A
background task sends a batch as soon as it holds ``max_lines`` lines or ``max_bytes`` bytes, and
otherwise ``max_delay`` seconds after its first line arrived (or after the previous batch was sent,
for lines that did not fit in it). Batches are sent one at a time, in order.

Backpressure: ``add`` blocks while more than ``max_pending_bytes`` are unsent (queued or being
sent), so a slow network slows the job's output down instead of growing memory. Sizes are counted
as each line's UTF-8 length plus :data:`LINE_OVERHEAD_BYTES` (its seq, stream and time on the
wire). A failing ``send`` stops the batcher; the error is raised by the next ``add`` or ``close``
and the unsent lines stay available through :meth:`LogBatcher.unsent` (for a resend after
reconnecting), so no line is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

#: Bytes counted for each line on top of its text.
LINE_OVERHEAD_BYTES = 32


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of job output: ``ts`` is ``time.time()`` when the line was added."""

    seq: int
    stream: str
    line: str
    ts: float


class LogBatcher:
    """See the module docstring. Use from one event loop; always ``close`` it when done."""

    def __init__(
        self,
        send: Callable[[list[LogLine]], Awaitable[None]],
        *,
        max_lines: int = 500,
        max_bytes: int = 64 * 1024,
        max_delay: float = 0.05,
        max_pending_bytes: int = 4 * 1024 * 1024,
        first_seq: int = 0,
    ) -> None:
        if max_lines < 1 or max_bytes < 1 or max_pending_bytes < 1 or max_delay < 0:
            raise ValueError("LogBatcher limits must be positive.")
        self._send = send
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._max_delay = max_delay
        self._max_pending_bytes = max_pending_bytes
        self._next_seq = first_seq
        self._pending: deque[tuple[LogLine, int]] = deque()  # (line, counted bytes)
        self._pending_bytes = 0
        self._in_flight: list[LogLine] = []
        self._in_flight_bytes = 0
        self._first_pending_at = 0.0  # loop time from which the pending lines' delay counts
        self._has_data = asyncio.Event()
        self._urgent = asyncio.Event()  # a full batch is waiting, or closing
        self._has_room = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._closing = False
        self._closed = False

    @property
    def next_seq(self) -> int:
        """The sequence number the next added line will get."""
        return self._next_seq

    def unsent(self) -> list[LogLine]:
        """Lines added but not (successfully) sent yet, oldest first."""
        return [*self._in_flight, *(line for line, _ in self._pending)]

    async def add(self, stream: str, line: str) -> None:
        """Queue one line. Blocks while too much is unsent; raises the error of a failed send,
        or ``RuntimeError`` after :meth:`close`."""
        self._raise_if_failed()
        if self._closing:
            raise RuntimeError("The log batcher is closed.")
        while self._unsent_bytes > self._max_pending_bytes:
            self._has_room.clear()
            await self._has_room.wait()
            self._raise_if_failed()
            if self._closing:
                raise RuntimeError("The log batcher was closed while this line waited.")
        loop = asyncio.get_running_loop()
        entry = LogLine(seq=self._next_seq, stream=stream, line=line, ts=time.time())
        self._next_seq += 1
        if not self._pending:
            self._first_pending_at = loop.time()
        size = _counted_bytes(line)
        self._pending.append((entry, size))
        self._pending_bytes += size
        self._has_data.set()
        if self._batch_full():
            self._urgent.set()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())

    async def close(self) -> None:
        """Send everything still queued, then stop. Idempotent; raises the error of a failed
        send (every time it is called)."""
        self._closing = True
        self._urgent.set()
        self._has_data.set()
        if self._flusher is not None and not self._closed:
            with contextlib.suppress(Exception):  # its failure is recorded in self._error
                await self._flusher
        self._closed = True
        self._raise_if_failed()

    # ------------------------------------------------------------ internals

    @property
    def _unsent_bytes(self) -> int:
        return self._pending_bytes + self._in_flight_bytes

    def _batch_full(self) -> bool:
        return len(self._pending) >= self._max_lines or self._pending_bytes >= self._max_bytes

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._has_data.clear()
                await self._has_data.wait()
                continue
            delay = self._first_pending_at + self._max_delay - loop.time()
            if delay > 0 and not (self._batch_full() or self._closing):
                self._urgent.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), delay)
            if not await self._send_one_batch(loop):
                return

    async def _send_one_batch(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Send the oldest batch; ``False`` if sending failed (the batcher then stops)."""
        batch: list[LogLine] = []
        batch_bytes = 0
        while self._pending and len(batch) < self._max_lines:
            line, size = self._pending[0]
            if batch and batch_bytes + size > self._max_bytes:
                break
            self._pending.popleft()
            batch.append(line)
            batch_bytes += size
        self._pending_bytes -= batch_bytes
        self._in_flight, self._in_flight_bytes = batch, batch_bytes
        try:
            await self._send(batch)
        except Exception as error:
            self._error = error
            self._has_room.set()  # wake blocked adders so they see the error
            return False
        self._in_flight, self._in_flight_bytes = [], 0
        self._first_pending_at = loop.time()
        if self._unsent_bytes <= self._max_pending_bytes:
            self._has_room.set()
        return True


def _counted_bytes(line: str) -> int:
    text_bytes = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
    return text_bytes + LINE_OVERHEAD_BYTES
