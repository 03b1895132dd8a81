"""An in-process bus for a single server process: dev mode, tests and the demo.

Everything lives in this process's memory and event loop, so it only connects publishers and
subscribers inside one process; run several server processes against ``RedisBus`` instead.

Trade-offs, stated once:

* Each subscription buffers in an **unbounded** ``asyncio.Queue``. Publishing never blocks or
  drops, so a subscriber that stops reading makes memory grow until it closes. (Redis instead
  disconnects a pub/sub client whose output buffer overflows.)
* Streams are Python lists with Redis-style ids built from the wall clock in milliseconds plus
  a sequence number, strictly increasing per stream even within one millisecond or when the
  clock steps back. Blocking readers wait on an ``asyncio.Event`` that ``append`` sets; there
  is no polling loop.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

from peergpu.server.bus.base import (
    STREAM_START,
    Bus,
    Message,
    StreamEntry,
    Subscription,
    check_channels,
    check_maxlen,
    check_read_arguments,
    format_stream_id,
)


class InProcessBus(Bus):
    """``Bus`` over asyncio primitives; must be used from a single event loop."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[_MemorySubscription]] = {}
        self._streams: dict[str, _Stream] = {}
        # One event per stream with blocked readers; ``append`` sets it and drops it, so the
        # next reader to wait gets a fresh one.
        self._append_events: dict[str, asyncio.Event] = {}
        self._waiting_readers: dict[str, int] = {}
        self._closed = False

    async def publish(self, channel: str, data: bytes) -> int:
        message = Message(channel=channel, data=bytes(data))
        receivers = tuple(self._subscribers.get(channel, ()))
        for subscription in receivers:
            subscription.deliver(message)
        return len(receivers)

    def subscribe(self, *channels: str) -> AbstractAsyncContextManager[Subscription]:
        return self._subscription(check_channels(channels))

    async def append(self, stream: str, data: bytes, *, maxlen: int | None = None) -> str:
        check_maxlen(maxlen)
        state = self._streams.setdefault(stream, _Stream())
        entry_id = state.add(bytes(data), now_ms=time.time_ns() // 1_000_000)
        if maxlen is not None:
            state.trim(maxlen)
        event = self._append_events.pop(stream, None)
        if event is not None:
            event.set()
        return entry_id

    async def read(
        self,
        stream: str,
        *,
        after: str = STREAM_START,
        count: int = 100,
        block: float | None = None,
    ) -> list[StreamEntry]:
        after_key = check_read_arguments(after=after, count=count, block=block)
        entries = self._entries_after(stream, after_key, count)
        if entries or not block:
            return entries
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block
        while not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self._wait_for_append(stream, remaining):
                return []
            # The new entry may already be trimmed or deleted again: look before returning.
            entries = self._entries_after(stream, after_key, count)
            if entries:
                return entries
        return []

    async def stream_length(self, stream: str) -> int:
        state = self._streams.get(stream)
        return 0 if state is None else len(state.entries)

    async def delete_stream(self, stream: str) -> None:
        self._streams.pop(stream, None)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
        subscriptions = {sub for subs in self._subscribers.values() for sub in subs}
        for subscription in subscriptions:
            await subscription.close()
        for event in self._append_events.values():
            event.set()
        self._append_events.clear()

    @asynccontextmanager
    async def _subscription(self, channels: tuple[str, ...]) -> AsyncIterator[Subscription]:
        # Registration is synchronous, so the subscription is live before ``async with`` enters.
        subscription = _MemorySubscription(channels=channels, on_close=self._unregister)
        for channel in channels:
            self._subscribers.setdefault(channel, set()).add(subscription)
        try:
            yield subscription
        finally:
            await subscription.close()

    def _unregister(self, subscription: _MemorySubscription) -> None:
        for channel in subscription.channels:
            subscribers = self._subscribers.get(channel)
            if subscribers is None:
                continue
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[channel]

    def _entries_after(
        self, stream: str, after_key: tuple[int, int], count: int
    ) -> list[StreamEntry]:
        state = self._streams.get(stream)
        if state is None:
            return []
        start = bisect_right(state.keys, after_key)
        return state.entries[start : start + count]

    async def _wait_for_append(self, stream: str, timeout: float) -> bool:
        """Wait until something is appended to ``stream``; False when ``timeout`` passes first."""
        event = self._append_events.get(stream)
        if event is None:
            event = self._append_events[stream] = asyncio.Event()
        self._waiting_readers[stream] = self._waiting_readers.get(stream, 0) + 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            # Forget the event once nobody waits, so streams read once don't pile up here.
            left = self._waiting_readers.pop(stream) - 1
            if left:
                self._waiting_readers[stream] = left
            else:
                self._append_events.pop(stream, None)
        return True


@dataclass(slots=True)
class _Stream:
    entries: list[StreamEntry] = field(default_factory=list)
    keys: list[tuple[int, int]] = field(default_factory=list)  # parsed ids, for bisect
    last_key: tuple[int, int] = (0, 0)  # survives trimming, like Redis's last-generated-id

    def add(self, data: bytes, *, now_ms: int) -> str:
        last_ms, last_seq = self.last_key
        key = (now_ms, 0) if now_ms > last_ms else (last_ms, last_seq + 1)
        entry_id = format_stream_id(*key)
        self.entries.append(StreamEntry(id=entry_id, data=data))
        self.keys.append(key)
        self.last_key = key
        return entry_id

    def trim(self, maxlen: int) -> None:
        excess = len(self.entries) - maxlen
        if excess > 0:
            del self.entries[:excess]
            del self.keys[:excess]


class _MemorySubscription(Subscription):
    def __init__(
        self,
        *,
        channels: tuple[str, ...],
        on_close: Callable[[_MemorySubscription], None],
    ) -> None:
        self.channels = channels
        self._on_close = on_close
        # ``None`` in the queue is the "closed" sentinel that wakes a blocked ``get``.
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._closed = False

    def deliver(self, message: Message) -> None:
        if not self._closed:
            self._queue.put_nowait(message)

    async def get(self, timeout: float | None = None) -> Message | None:
        if self._closed:
            return None
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_close(self)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
