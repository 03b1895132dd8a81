"""Inference streams between the gateway and the hosts' sockets, across replicas.

A gateway request on replica A for a host whose socket replica B holds:

1. A opens a stream (a bounded queue under a random ``stream_id``) and sends ``infer_start``
   with ``reply_to`` = A's id: straight to the socket when A holds it, else on the host's bus
   channel, as manifests go.
2. The agent answers with ``infer_chunk`` / ``infer_end`` frames that echo ``reply_to``. B's
   read loop hands them to :meth:`InferenceStreams.route`: into the stream's queue when it is
   B's own, else published on A's channel (``infer:<replica id>``) with the host's id in
   front, which A's listener delivers.
3. A frame is only accepted from the host the stream was opened for: a host cannot write into
   another's stream even if it learnt its id.

When a socket closes, every stream it carried ends with ``host_disconnected`` (the gateway may
retry on another host). Nothing here touches the database; chunks are never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from peergpu.protocol.messages import InferCancel, InferChunk, InferEnd, parse_agent_message
from peergpu.server.agents.channels import host_channel
from peergpu.server.context import ServerContext

logger = logging.getLogger(__name__)

#: Frames waiting in one stream's queue before the slowest readers are cut off. A stream's
#: output is bounded by its ``max_tokens``; this only stops a host flooding the server.
MAX_QUEUED_FRAMES = 4096
_HOST_ID_BYTES = 32  # hex

InferFrame = InferChunk | InferEnd
SendLocal = Callable[[uuid.UUID, str], Awaitable[bool]]


def infer_channel(replica_id: str) -> str:
    """The bus channel a replica receives its streams' frames on."""
    return f"infer:{replica_id}"


@dataclass
class OpenStream:
    stream_id: str
    host_id: uuid.UUID
    queue: asyncio.Queue[InferFrame] = field(
        default_factory=lambda: asyncio.Queue(MAX_QUEUED_FRAMES)
    )
    overflowed: bool = False


class InferenceStreams:
    def __init__(self, context: ServerContext, send_local: SendLocal) -> None:
        self.context = context
        self.replica_id = uuid.uuid4().hex
        self._send_local = send_local
        self._streams: dict[str, OpenStream] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        """Listen on this replica's channel (once; later calls wait for it to be ready)."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="inference-streams")
        await self._listening.wait()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    def open(self, host_id: uuid.UUID) -> OpenStream:
        stream = OpenStream(uuid.uuid4().hex, host_id)
        self._streams[stream.stream_id] = stream
        return stream

    def discard(self, stream: OpenStream) -> None:
        self._streams.pop(stream.stream_id, None)

    async def send(self, host_id: uuid.UUID, frame: str) -> bool:
        """A frame for a host's agent: through its socket here, else through the replica
        holding it. False when no replica holds the host's socket now."""
        if await self._send_local(host_id, frame):
            return True
        return await self.context.bus.publish(host_channel(host_id), frame.encode()) > 0

    async def cancel(self, stream: OpenStream) -> None:
        await self.send(stream.host_id, InferCancel(stream_id=stream.stream_id).model_dump_json())

    async def route(self, host_id: uuid.UUID, frame: InferFrame, raw: str) -> None:
        """A frame from an agent on this replica: to its stream, wherever that is."""
        if frame.reply_to == self.replica_id:
            self.deliver(host_id, frame)
        else:
            await self.context.bus.publish(
                infer_channel(frame.reply_to), host_id.hex.encode() + raw.encode()
            )

    def deliver(self, host_id: uuid.UUID, frame: InferFrame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.host_id != host_id or stream.overflowed:
            return  # finished, abandoned, or not this host's to write
        try:
            stream.queue.put_nowait(frame)
        except asyncio.QueueFull:
            stream.overflowed = True
            logger.warning("host %s flooded inference stream %s", host_id, stream.stream_id)
            stream.queue.get_nowait()  # make room for the end
            stream.queue.put_nowait(
                InferEnd(
                    stream_id=stream.stream_id,
                    reply_to=self.replica_id,
                    ok=False,
                    status=502,
                    code="engine_error",
                    message="The host sent more than the gateway relays for one request.",
                )
            )

    async def host_gone(self, host_id: uuid.UUID, streams: dict[str, str]) -> None:
        """The socket that carried ``streams`` (id -> reply_to) closed: end them all."""
        for stream_id, reply_to in streams.items():
            end = InferEnd(
                stream_id=stream_id,
                reply_to=reply_to,
                ok=False,
                status=502,
                code="host_disconnected",
                message="The host serving this request disconnected.",
            )
            with contextlib.suppress(Exception):
                await self.route(host_id, end, end.model_dump_json())

    async def _listen(self) -> None:
        while True:
            try:
                async with self.context.bus.subscribe(
                    infer_channel(self.replica_id)
                ) as subscription:
                    self._listening.set()
                    async for message in subscription:
                        self._on_bus_frame(message.data)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("inference stream listener failed; resubscribing")
                await asyncio.sleep(1.0)

    def _on_bus_frame(self, data: bytes) -> None:
        try:
            host_id = uuid.UUID(data[:_HOST_ID_BYTES].decode())
            frame = parse_agent_message(data[_HOST_ID_BYTES:])
        except (ValueError, ValidationError):
            logger.warning("ignoring a malformed inference frame on the bus")
            return
        if isinstance(frame, InferChunk | InferEnd):
            self.deliver(host_id, frame)


def started_stream(frame: bytes | str) -> tuple[str, str] | None:
    """``(stream_id, reply_to)`` of an ``infer_start`` frame, else None (cheap for others)."""
    text = frame.decode() if isinstance(frame, bytes) else frame
    if not text.startswith('{"type":"infer_start"'):
        return None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        parsed = json.loads(text)
        return str(parsed["stream_id"]), str(parsed["reply_to"])
    return None
