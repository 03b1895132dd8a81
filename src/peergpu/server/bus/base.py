"""The message bus contract: fire-and-forget pub/sub plus append-only streams.

Two kinds of traffic go over the bus:

* **Pub/sub** (``publish`` / ``subscribe``): live fan-out to whoever is subscribed *right now*.
  Nothing is stored; a subscriber that is not connected misses the message. Use it for wake-ups
  ("job 42 changed, go look in the database") and never as the only copy of something.
* **Streams** (``append`` / ``read``): an ordered, bounded log per key, read by id. Readers keep
  track of the last id they have seen and ask for what came after it, so a reader that falls
  behind or reconnects loses nothing that has not been trimmed away.

The ``*_many`` variants take a batch that ``RedisBus`` sends in one round trip; they behave
exactly like the single calls made one after another, in list order.

Every implementation (``InProcessBus``, ``RedisBus``) is held to the same contract by
``tests/bus/test_bus_contract.py``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

#: The id a reader passes to start from the very beginning of a stream.
STREAM_START = "0"

_STREAM_ID = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)


@dataclass(frozen=True, slots=True)
class Message:
    """One pub/sub message, as received by a subscriber."""

    channel: str
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One stream entry. ``id`` is Redis-style ``"<ms>-<seq>"``, strictly increasing per stream."""

    id: str
    data: bytes


class Subscription(ABC):
    """Messages for the channels of one ``Bus.subscribe`` call, in publish order per channel.

    A subscription has a single consumer: call ``get`` (or iterate) from one task at a time.
    Iterating with ``async for`` yields messages until the subscription is closed.
    """

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            message = await self.get()
            if message is None:
                return
            yield message

    @abstractmethod
    async def get(self, timeout: float | None = None) -> Message | None:
        """The next message; ``None`` when ``timeout`` seconds pass first or once closed.

        ``timeout=None`` waits until a message arrives or the subscription is closed (possibly
        by another task), which also returns ``None``.
        """

    async def drain(self, limit: int = 100) -> int:
        """Take and drop messages that have already arrived, at most ``limit``; how many.

        For wake-up channels, where a burst asks for one round of work. The bound matters:
        under a steady stream (a busy replica's submits), "until none is left" may never end.
        """
        for taken in range(limit):
            if await self.get(timeout=0) is None:
                return taken
        return limit

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving. Idempotent; messages not yet taken with ``get`` are dropped."""


class Bus(ABC):
    """Pub/sub and streams behind one interface; see the module docstring for the semantics."""

    @abstractmethod
    async def publish(self, channel: str, data: bytes) -> int:
        """Deliver ``data`` to every subscription to ``channel`` that exists now.

        Fire-and-forget: returns once the bus has accepted the message, whether or not anyone
        is subscribed, and nothing is kept for later subscribers. Returns how many received it
        (subscriptions in process; subscribed Redis connections), 0 when nobody listens.
        """

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish every ``(channel, data)`` pair as ``publish`` would, in list order.

        Subscriptions receive exactly what the same ``publish`` calls made one after another
        would deliver, so on each channel messages arrive in list order. An empty list does
        nothing (and does not touch the backend). Not atomic: when it raises, some of the
        messages may have been delivered already.

        This default calls ``publish`` once per message; implementations with a network round
        trip per call override it to send the whole batch at once.
        """
        for channel, data in messages:
            await self.publish(channel, data)

    @abstractmethod
    def subscribe(self, *channels: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to one or more channels for the duration of an ``async with`` block.

        Once the block has been entered the subscription is confirmed: every publish that
        starts after that point is delivered, in publish order per channel. Leaving the block
        closes the subscription. At least one channel is required.
        """

    @abstractmethod
    async def append(self, stream: str, data: bytes, *, maxlen: int | None = None) -> str:
        """Append an entry and return its id.

        With ``maxlen`` the stream is trimmed to exactly its newest ``maxlen`` entries (not
        approximately). Ids keep increasing even after trimming; deleting the stream resets it.
        """

    async def append_many(
        self, entries: Sequence[tuple[str, bytes]], *, maxlen: int | None = None
    ) -> list[str]:
        """Append every ``(stream, data)`` pair in list order; return their ids in that order.

        Each entry is appended as ``append(stream, data, maxlen=maxlen)`` would be, so ids
        increase per stream in list order and, with ``maxlen``, every stream in the batch ends
        up holding exactly its newest ``maxlen`` entries. An empty list returns ``[]`` (and does
        not touch the backend). Raises ``ValueError`` for ``maxlen < 1`` before appending
        anything. Not atomic: when it raises, some of the entries may have been appended.

        This default calls ``append`` once per entry; implementations with a network round
        trip per call override it to send the whole batch at once.
        """
        check_maxlen(maxlen)
        return [await self.append(stream, data, maxlen=maxlen) for stream, data in entries]

    @abstractmethod
    async def read(
        self,
        stream: str,
        *,
        after: str = STREAM_START,
        count: int = 100,
        block: float | None = None,
    ) -> list[StreamEntry]:
        """Entries with an id strictly greater than ``after``, oldest first, at most ``count``.

        ``block=None`` answers at once; ``block=seconds`` waits up to that long for at least
        one entry and then returns, possibly with ``[]``. ``after="$"`` is not supported:
        callers keep the last id they have seen. A stream that does not exist reads as ``[]``.
        Raises ``ValueError`` for a malformed ``after``, ``count < 1`` or ``block < 0``.
        """

    @abstractmethod
    async def stream_length(self, stream: str) -> int:
        """How many entries the stream holds now (0 when it does not exist)."""

    @abstractmethod
    async def delete_stream(self, stream: str) -> None:
        """Remove the stream and all its entries. Idempotent."""

    @abstractmethod
    async def ping(self) -> None:
        """Check the backend; raises ``ServiceUnavailable`` if it cannot be reached."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and close open subscriptions; the bus is not used afterwards."""


def parse_stream_id(value: str) -> tuple[int, int]:
    """``"<ms>-<seq>"`` (or a bare ``"<ms>"``, meaning ``"<ms>-0"``) as a comparable pair.

    Raises ``ValueError`` for anything else, ``"$"`` included.
    """
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        raise ValueError(f"invalid stream id {value!r}: expected '<ms>-<seq>'")
    ms_text, seq_text = match.groups()
    return int(ms_text), int(seq_text or 0)


def format_stream_id(ms: int, seq: int) -> str:
    return f"{ms}-{seq}"


def check_read_arguments(*, after: str, count: int, block: float | None) -> tuple[int, int]:
    """Validate ``Bus.read`` arguments; returns ``after`` parsed by ``parse_stream_id``."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if block is not None and block < 0:
        raise ValueError(f"block must be None or >= 0 seconds, got {block}")
    return parse_stream_id(after)


def check_maxlen(maxlen: int | None) -> None:
    if maxlen is not None and maxlen < 1:
        raise ValueError(f"maxlen must be None or at least 1, got {maxlen}")


def check_channels(channels: tuple[str, ...]) -> tuple[str, ...]:
    """The channels without duplicates, in order; at least one is required."""
    if not channels:
        raise ValueError("subscribe() needs at least one channel")
    return tuple(dict.fromkeys(channels))
