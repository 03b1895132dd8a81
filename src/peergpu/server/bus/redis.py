"""A bus over Redis (``redis.asyncio``), shared by every server process of a deployment.

* Every channel and stream key is prefixed with ``prefix`` so several deployments (or test
  runs) can share one Redis database.
* Pub/sub uses one dedicated connection per subscription; ``subscribe`` waits for Redis to
  confirm every channel before the ``async with`` body runs.
* Streams use ``XADD`` (``MAXLEN`` exact when asked) and ``XREAD``. A blocking read is split
  into ``XREAD BLOCK`` calls shorter than the socket timeout, so a pooled connection is never
  held longer than that and a dead server is noticed.
* ``publish_many`` and ``append_many`` send their batch as one non-transactional pipeline
  (one round trip); a command Redis rejects does not stop the others in the batch.
* Redis connection errors and timeouts surface as ``ServiceUnavailable("Redis is
  unreachable")``, any other Redis error as ``ServiceUnavailable("Redis command failed")``;
  no ``redis`` exception escapes. Commands are retried a few times on connection errors
  (``XADD`` included, so an append that fails mid-flight may land twice; a pipeline is retried
  as a whole, so part of a batch may land twice).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from peergpu.errors import ServiceUnavailable
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

#: The stream entry field that holds the payload.
_DATA_FIELD = b"d"
DEFAULT_SOCKET_TIMEOUT = 5.0


#: Every subscription holds a connection of its own (one per agent socket on this replica),
#: so the pool must be far larger than redis-py's default of 100.
DEFAULT_MAX_CONNECTIONS = 10_000


class RedisBus(Bus):
    """``Bus`` over Redis; see the module docstring for key layout and error mapping."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "peergpu:",
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if socket_timeout <= 0:
            raise ValueError(f"socket_timeout must be positive, got {socket_timeout}")
        self._prefix = prefix
        self._socket_timeout = socket_timeout
        self._redis = _create_client(
            url, socket_timeout=socket_timeout, retries=3, max_connections=max_connections
        )
        self._subscriptions: set[_RedisSubscription] = set()

    async def publish(self, channel: str, data: bytes) -> int:
        with _translate_errors("publish"):
            return int(await self._redis.publish(self._key(channel), data))

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if not messages:
            return
        with _translate_errors("publish_many"):
            async with self._redis.pipeline(transaction=False) as pipeline:
                for channel, data in messages:
                    pipeline.publish(self._key(channel), data)
                await pipeline.execute()

    def subscribe(self, *channels: str) -> AbstractAsyncContextManager[Subscription]:
        return self._subscription(check_channels(channels))

    async def append(self, stream: str, data: bytes, *, maxlen: int | None = None) -> str:
        check_maxlen(maxlen)
        with _translate_errors("append"):
            entry_id = await self._redis.xadd(
                self._key(stream), {_DATA_FIELD: data}, maxlen=maxlen, approximate=False
            )
        return _text(entry_id)

    async def append_many(
        self, entries: Sequence[tuple[str, bytes]], *, maxlen: int | None = None
    ) -> list[str]:
        check_maxlen(maxlen)
        if not entries:
            return []
        with _translate_errors("append_many"):
            async with self._redis.pipeline(transaction=False) as pipeline:
                for stream, data in entries:
                    pipeline.xadd(
                        self._key(stream), {_DATA_FIELD: data}, maxlen=maxlen, approximate=False
                    )
                entry_ids = await pipeline.execute()
        return [_text(entry_id) for entry_id in entry_ids]

    async def read(
        self,
        stream: str,
        *,
        after: str = STREAM_START,
        count: int = 100,
        block: float | None = None,
    ) -> list[StreamEntry]:
        # Normalized so that a bare "<ms>" means "<ms>-0" here exactly as in InProcessBus.
        after_id = format_stream_id(*check_read_arguments(after=after, count=count, block=block))
        key = self._key(stream)
        if not block:
            return await self._xread(key, after_id, count=count, block_ms=None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block
        while True:
            chunk = min(deadline - loop.time(), self._socket_timeout / 2)
            if chunk <= 0:
                return []
            # BLOCK 0 would mean "forever" to Redis: never send less than 1 ms.
            block_ms = max(1, math.ceil(chunk * 1000))
            entries = await self._xread(key, after_id, count=count, block_ms=block_ms)
            if entries:
                return entries

    async def stream_length(self, stream: str) -> int:
        with _translate_errors("stream_length"):
            return int(await self._redis.xlen(self._key(stream)))

    async def delete_stream(self, stream: str) -> None:
        with _translate_errors("delete_stream"):
            await self._redis.delete(self._key(stream))

    async def ping(self) -> None:
        with _translate_errors("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        for subscription in tuple(self._subscriptions):
            await subscription.close()
        await self._redis.aclose()

    @asynccontextmanager
    async def _subscription(self, channels: tuple[str, ...]) -> AsyncIterator[Subscription]:
        subscription = _RedisSubscription(pubsub=self._redis.pubsub(), prefix=self._prefix)
        self._subscriptions.add(subscription)
        try:
            await subscription.start(channels, timeout=self._socket_timeout)
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            await subscription.close()

    async def _xread(
        self, key: str, after_id: str, *, count: int, block_ms: int | None
    ) -> list[StreamEntry]:
        with _translate_errors("read"):
            response = await self._redis.xread({key: after_id}, count=count, block=block_ms)
        return _parse_xread(response)

    def _key(self, name: str) -> str:
        return self._prefix + name


class _RedisSubscription(Subscription):
    """One ``PubSub`` connection. Reads run in an inner task so ``close`` can interrupt them."""

    def __init__(self, *, pubsub: PubSub, prefix: str) -> None:
        self._pubsub = pubsub
        self._prefix = prefix
        # Messages that arrived while waiting for the subscribe confirmations.
        self._pending: deque[Message] = deque()
        self._read_task: asyncio.Task[Any] | None = None
        self._closed = False

    async def start(self, channels: tuple[str, ...], *, timeout: float) -> None:
        """Subscribe and wait until Redis has confirmed every channel."""
        keys = [self._prefix + channel for channel in channels]
        unconfirmed = {key.encode() for key in keys}
        with _translate_errors("subscribe"):
            await self._pubsub.subscribe(*keys)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while unconfirmed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ServiceUnavailable(
                    "Redis is unreachable",
                    details={"operation": "subscribe", "error": "no subscribe confirmation"},
                )
            raw = await self._read(remaining)
            if raw is None:
                continue
            if raw["type"] == "subscribe":
                unconfirmed.discard(raw["channel"])
            elif raw["type"] == "message":
                self._pending.append(self._to_message(raw))

    async def get(self, timeout: float | None = None) -> Message | None:
        if self._closed:
            return None
        if self._pending:
            return self._pending.popleft()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._closed:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            raw = await self._read(remaining)
            if raw is not None and raw["type"] == "message":
                return self._to_message(raw)
            if deadline is not None and loop.time() >= deadline:
                return None
        return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        if self._read_task is not None:
            self._read_task.cancel()
        # Dropping the connection ends the subscription on the server side as well.
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]  # unannotated upstream

    async def _read(self, timeout: float | None) -> dict[str, Any] | None:
        """One raw pub/sub reply (``timeout=None`` waits); ``None`` on timeout or once closed."""
        task = asyncio.ensure_future(self._pubsub.get_message(timeout=timeout))
        self._read_task = task
        try:
            with _translate_errors("subscription.get"):
                raw: dict[str, Any] | None = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._closed and (current is None or not current.cancelling()):
                return None  # interrupted by close(), not by our caller
            raise
        except ServiceUnavailable:
            if self._closed:
                return None
            raise
        finally:
            self._read_task = None
        current = asyncio.current_task()
        if current is not None and current.cancelling() and not self._closed:
            # Our caller was cancelled while the read finished anyway (redis-py can swallow
            # the cancellation of its read and return normally): honour the cancel.
            raise asyncio.CancelledError
        return raw

    def _to_message(self, raw: dict[str, Any]) -> Message:
        channel = _text(raw["channel"]).removeprefix(self._prefix)
        return Message(channel=channel, data=bytes(raw["data"]))


def _create_client(
    url: str, *, socket_timeout: float, retries: int, max_connections: int | None = None
) -> Redis:
    """A pooled binary-safe client with bounded timeouts and short jittered retries."""
    return Redis.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.01), retries),
        decode_responses=False,
    )


@contextmanager
def _translate_errors(operation: str) -> Iterator[None]:
    """Turn ``redis`` exceptions into ``ServiceUnavailable`` (the URL is never included)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise ServiceUnavailable(
            "Redis is unreachable", details={"operation": operation, "error": str(exc)}
        ) from exc
    except RedisError as exc:
        raise ServiceUnavailable(
            "Redis command failed", details={"operation": operation, "error": str(exc)}
        ) from exc


def _parse_xread(response: Any) -> list[StreamEntry]:
    # RESP2 replies [[key, [(id, fields), ...]]] and RESP3 {key: [[(id, fields), ...]]}; we
    # read one stream, so take the first (only) value either way.
    if not response:
        return []
    if isinstance(response, dict):
        records = next(iter(response.values()))
        if records and isinstance(records[0], list):
            records = records[0]
    else:
        records = response[0][1]
    return [
        StreamEntry(id=_text(entry_id), data=bytes(fields.get(_DATA_FIELD, b"")))
        for entry_id, fields in records
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
