"""The agent's end of the socket, across reconnects.

Log batches and job statuses are kept until the server acknowledges them (``log_ack``,
``status_ack``) and are resent, in order, on every new connection; the server treats repeats as
no-ops. A job's artifact report has no acknowledgement of its own: it is kept until the job's
final status (always sent after it, and resent after it) is acknowledged, since the server
handles one socket's messages in order.

The unacknowledged log bytes are bounded: when the link is slow or down, ``send_logs`` waits,
which stops the runner from reading the job's output, which blocks the job on its own full pipe.
Memory stays bounded however long the network is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from peergpu.protocol.messages import (
    ArtifactReport,
    JobStatus,
    LogAck,
    LogBatch,
    LogLineSpec,
    StatusAck,
    UploadGrant,
    UploadRequest,
)

logger = logging.getLogger(__name__)

UPLOAD_GRANT_TIMEOUT_SECONDS = 60.0
_FINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass
class _Pending:
    key: tuple[uuid.UUID, int | str]
    payload: str
    size: int
    generation: int = -1  # the connection generation it was last sent on


class Link:
    def __init__(self, *, max_unacked_log_bytes: int) -> None:
        self._ws: ClientConnection | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._space = asyncio.Condition()
        self._max_unacked = max_unacked_log_bytes
        self._unacked_bytes = 0
        self._logs: dict[uuid.UUID, list[_Pending]] = {}
        self._statuses: dict[uuid.UUID, _Pending] = {}
        self._artifacts: dict[uuid.UUID, _Pending] = {}
        self._grants: dict[uuid.UUID, asyncio.Future[UploadGrant]] = {}

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def unacked_log_bytes(self) -> int:
        return self._unacked_bytes

    async def attach(self, ws: ClientConnection) -> None:
        """A new connection: resend everything unacknowledged, oldest first."""
        async with self._lock:
            self._ws = ws
            self._generation += 1
            await self._flush_locked()

    def detach(self) -> None:
        self._ws = None
        for future in self._grants.values():
            if not future.done():
                future.set_exception(ConnectionError("the connection to the server was lost"))
        self._grants.clear()

    async def send(self, payload: str) -> bool:
        """Best effort (heartbeats, acks): False when not connected."""
        async with self._lock:
            return await self._send_locked(payload)

    async def send_logs(self, job_id: uuid.UUID, lines: list[LogLineSpec]) -> None:
        batch = LogBatch(job_id=job_id, lines=lines).model_dump_json()
        size = len(batch)
        async with self._space:
            await self._space.wait_for(
                lambda: self._unacked_bytes == 0 or self._unacked_bytes + size <= self._max_unacked
            )
            self._unacked_bytes += size
        self._logs.setdefault(job_id, []).append(_Pending((job_id, lines[-1].seq), batch, size))
        async with self._lock:
            await self._flush_locked()

    async def send_status(self, status: JobStatus) -> None:
        """Kept (the latest per job) until the server acknowledges it."""
        payload = status.model_dump_json()
        self._statuses[status.job_id] = _Pending((status.job_id, status.state), payload, 0)
        async with self._lock:
            await self._flush_locked()

    async def send_artifacts(self, report: ArtifactReport) -> None:
        """Kept until the job's final status is acknowledged; send the final status after it."""
        self._artifacts[report.job_id] = _Pending((report.job_id, 0), report.model_dump_json(), 0)
        async with self._lock:
            await self._flush_locked()

    async def on_log_ack(self, ack: LogAck) -> None:
        pending = self._logs.get(ack.job_id, [])
        freed = sum(p.size for p in pending if int(p.key[1]) <= ack.seq)
        remaining = [p for p in pending if int(p.key[1]) > ack.seq]
        if remaining:
            self._logs[ack.job_id] = remaining
        else:
            self._logs.pop(ack.job_id, None)
        async with self._space:
            self._unacked_bytes -= freed
            self._space.notify_all()

    def on_status_ack(self, ack: StatusAck) -> None:
        pending = self._statuses.get(ack.job_id)
        if pending is not None and pending.key[1] == ack.state:
            del self._statuses[ack.job_id]
        if ack.state in _FINAL:  # handled after the artifact report that went before it
            self._artifacts.pop(ack.job_id, None)

    def pending_statuses(self) -> int:
        return len(self._statuses)

    async def wait_drained(self, job_id: uuid.UUID, timeout: float) -> bool:
        """Wait until the job's logs and status are acknowledged (True) or the timeout ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while job_id in self._logs or job_id in self._statuses or job_id in self._artifacts:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def request_uploads(self, request: UploadRequest) -> UploadGrant:
        future: asyncio.Future[UploadGrant] = asyncio.get_running_loop().create_future()
        self._grants[request.job_id] = future
        if not await self.send(request.model_dump_json()):
            self._grants.pop(request.job_id, None)
            raise ConnectionError("not connected to the server")
        try:
            return await asyncio.wait_for(future, UPLOAD_GRANT_TIMEOUT_SECONDS)
        finally:
            self._grants.pop(request.job_id, None)

    def on_upload_grant(self, grant: UploadGrant) -> None:
        future = self._grants.get(grant.job_id)
        if future is not None and not future.done():
            future.set_result(grant)

    async def _flush_locked(self) -> None:
        if self._ws is None:
            return
        for pending in [p for batches in self._logs.values() for p in batches]:
            if pending.generation != self._generation:
                if not await self._send_locked(pending.payload):
                    return
                pending.generation = self._generation
        for pending in [*self._artifacts.values(), *self._statuses.values()]:
            if pending.generation != self._generation:
                if not await self._send_locked(pending.payload):
                    return
                pending.generation = self._generation

    async def _send_locked(self, payload: str) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(payload)
        except ConnectionClosed:
            self._ws = None
            return False
        return True

    async def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
