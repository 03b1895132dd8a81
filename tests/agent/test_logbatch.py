"""LogBatcher: sequence numbers, batching by size and time, backpressure, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from peergpu.agent.logbatch import LINE_OVERHEAD_BYTES, LogBatcher, LogLine


class Recorder:
    """A ``send`` that records batches, can be held shut, and notes concurrent calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[LogLine]] = []
        self.open = asyncio.Event()
        self.open.set()
        self.sent = asyncio.Event()
        self.delay = delay
        self.active = 0
        self.max_active = 0

    async def __call__(self, batch: list[LogLine]) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.open.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            self.batches.append(batch)
            self.sent.set()
        finally:
            self.active -= 1

    @property
    def lines(self) -> list[LogLine]:
        return [line for batch in self.batches for line in batch]


async def test_sequence_numbers_are_gap_free_and_ordered() -> None:
    send = Recorder(delay=0.001)
    batcher = LogBatcher(send, max_lines=64, first_seq=100)

    async def produce(stream: str) -> None:
        for i in range(2000):
            await batcher.add(stream, f"{stream} {i}")

    await asyncio.gather(produce("stdout"), produce("stderr"))
    assert batcher.next_seq == 4100
    await batcher.close()
    lines = send.lines
    assert [line.seq for line in lines] == list(range(100, 4100))
    for stream in ("stdout", "stderr"):
        assert [line.line for line in lines if line.stream == stream] == [
            f"{stream} {i}" for i in range(2000)
        ]
    assert all(len(batch) <= 64 for batch in send.batches)
    assert send.max_active == 1  # one send at a time
    assert all(line.ts <= time.time() for line in lines)


async def test_full_batch_is_sent_without_waiting_for_the_delay() -> None:
    send = Recorder()
    batcher = LogBatcher(send, max_lines=10, max_delay=60)
    for i in range(10):
        await batcher.add("stdout", str(i))
    await asyncio.wait_for(send.sent.wait(), 1)
    assert [line.line for line in send.lines] == [str(i) for i in range(10)]
    await batcher.close()


async def test_batches_respect_max_bytes() -> None:
    send = Recorder()
    batcher = LogBatcher(send, max_bytes=1000, max_delay=60)
    for _ in range(5):
        await batcher.add("stdout", "x" * 200)  # 232 bytes counted each
    await asyncio.wait_for(send.sent.wait(), 1)
    assert [len(batch) for batch in send.batches] == [4]
    await batcher.close()
    assert [len(batch) for batch in send.batches] == [4, 1]
    assert all(
        sum(len(line.line) + LINE_OVERHEAD_BYTES for line in batch) <= 1000
        for batch in send.batches
    )


async def test_single_line_is_sent_after_the_delay() -> None:
    send = Recorder()
    batcher = LogBatcher(send, max_delay=0.05)
    started = time.monotonic()
    await batcher.add("stderr", "lonely")
    await asyncio.wait_for(send.sent.wait(), 0.2)
    assert time.monotonic() - started < 0.2
    assert send.lines[0].line == "lonely" and send.lines[0].stream == "stderr"
    await batcher.close()


async def test_slow_send_makes_add_block() -> None:
    send = Recorder()
    send.open.clear()
    batcher = LogBatcher(send, max_lines=5, max_pending_bytes=1000)
    added = 0
    while True:  # fill until add blocks
        task = asyncio.create_task(batcher.add("stdout", "y" * 100))
        await asyncio.sleep(0.01)
        if not task.done():
            break
        added += 1
    assert 1000 // 132 <= added <= 1000 // 132 + 1  # blocked once more than 1000 bytes were unsent
    await asyncio.sleep(0.1)
    assert not task.done()
    send.open.set()
    await asyncio.wait_for(task, 1)
    await batcher.close()
    assert len(send.lines) == added + 1


async def test_send_error_surfaces_and_keeps_the_lines() -> None:
    async def failing(batch: list[LogLine]) -> None:
        raise ConnectionError("link down")

    batcher = LogBatcher(failing, max_delay=0.01)
    await batcher.add("stdout", "first")
    await asyncio.sleep(0.1)
    with pytest.raises(ConnectionError):
        await batcher.add("stdout", "second")
    with pytest.raises(ConnectionError):
        await batcher.close()
    assert [line.line for line in batcher.unsent()] == ["first"]


async def test_blocked_add_sees_a_send_error() -> None:
    gate = asyncio.Event()

    async def failing_later(batch: list[LogLine]) -> None:
        await gate.wait()
        raise ConnectionError("link down")

    batcher = LogBatcher(failing_later, max_lines=1, max_pending_bytes=10)
    await batcher.add("stdout", "one")
    blocked = asyncio.create_task(batcher.add("stdout", "two"))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    gate.set()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(blocked, 1)
    with pytest.raises(ConnectionError):
        await batcher.close()


async def test_close_flushes_and_is_idempotent() -> None:
    send = Recorder()
    batcher = LogBatcher(send, max_delay=60)
    for i in range(3):
        await batcher.add("stdout", str(i))
    await batcher.close()
    assert [line.line for line in send.lines] == ["0", "1", "2"]
    await batcher.close()
    with pytest.raises(RuntimeError):
        await batcher.add("stdout", "late")
    await LogBatcher(send).close()  # closing an unused batcher is fine
