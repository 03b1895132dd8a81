"""The agent hub: the lifecycle of one agent socket on this replica.

Handshake: the agent connects with ``Authorization: Bearer pgh_...`` and sends ``hello``; the
server checks the credential, negotiates the protocol version (refusing with
``unsupported_protocol_version`` and close code 4426 when there is none in common), marks the
host online and answers ``welcome``. Then two loops run until the socket closes: one reads the
agent's messages and hands them to ``AgentEvents`` (inference frames to ``InferenceStreams``);
one forwards what other replicas publish on the host's bus channel (manifests, cancels,
inference requests) to the socket. A newer connection of the same host,
on any replica, supersedes this one (close code 4409).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from peergpu.errors import AuthenticationFailed, ServiceUnavailable
from peergpu.protocol.messages import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SUPERSEDED,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION,
    SUPPORTED_VERSIONS,
    Cancel,
    ErrorMessage,
    Heartbeat,
    Hello,
    InferChunk,
    InferEnd,
    Welcome,
    negotiate_version,
    parse_agent_message,
)
from peergpu.server.agents.channels import (
    REVOKED_CONTROL,
    SUPERSEDED_CONTROL,
    control_message,
    host_channel,
    parse_control,
)
from peergpu.server.agents.events import AgentEvents
from peergpu.server.agents.inbox import AgentInbox
from peergpu.server.agents.inference import InferenceStreams, started_stream
from peergpu.server.bus import Subscription
from peergpu.server.context import ServerContext
from peergpu.server.services import hosts, job_reports, job_states, presence

logger = logging.getLogger(__name__)

HELLO_TIMEOUT_SECONDS = 10.0
#: Heartbeats with an unchanged ``running_jobs`` between two reconciliations.
RECONCILE_EVERY = 4


@dataclass
class _Socket:
    websocket: WebSocket
    host_id: uuid.UUID
    connection_id: str
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: What the last reconciled report said the host runs, and heartbeats since then.
    reported: frozenset[uuid.UUID] = frozenset()
    unreconciled: int = 0
    #: Inference streams this socket carries: stream id -> the replica waiting for it.
    streams: dict[str, str] = field(default_factory=dict)

    async def send(self, payload: str) -> None:
        async with self.send_lock:
            await self.websocket.send_text(payload)


class AgentHub:
    def __init__(self, context: ServerContext) -> None:
        self.context = context
        self.inbox = AgentInbox(context)
        self.events = AgentEvents(context, self.inbox)
        self._sockets: dict[str, _Socket] = {}
        self._by_host: dict[uuid.UUID, _Socket] = {}
        self.streams = InferenceStreams(context, self._send_local)

    @property
    def connected_hosts(self) -> set[uuid.UUID]:
        return {s.host_id for s in self._sockets.values()}

    async def serve(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            host_id = await self._authenticate(websocket)
            hello = await self._receive_hello(websocket)
        except _Refused as refused:
            await _refuse(websocket, refused.code, refused.message, refused.close_code)
            return
        version = negotiate_version(hello.protocol_versions)
        if version is None:
            await _refuse(
                websocket,
                "unsupported_protocol_version",
                f"This server speaks protocol versions {sorted(SUPPORTED_VERSIONS)}; the agent "
                f"offered {hello.protocol_versions}. Upgrade the agent (or the server).",
                CLOSE_UNSUPPORTED_VERSION,
            )
            return
        socket = _Socket(websocket, host_id, uuid.uuid4().hex)
        await self._run(socket, hello, version)

    async def close_all(self) -> None:
        for socket in list(self._sockets.values()):
            with contextlib.suppress(Exception):
                await socket.websocket.close(code=1001)
        await self.streams.close()
        await self.inbox.close()

    async def _run(self, socket: _Socket, hello: Hello, version: int) -> None:
        context = self.context
        try:
            async with context.bus.subscribe(host_channel(socket.host_id)) as subscription:
                # Tell any older socket of this host, on any replica, to go away.
                await context.bus.publish(
                    host_channel(socket.host_id),
                    control_message(SUPERSEDED_CONTROL, connection_id=socket.connection_id),
                )
                async with context.sessionmaker() as session:
                    await presence.mark_connected(
                        session=session,
                        host_id=socket.host_id,
                        connection_id=socket.connection_id,
                        hello=hello,
                        protocol_version=version,
                    )
                self._sockets[socket.connection_id] = socket
                self._by_host[socket.host_id] = socket
                logger.info("host %s connected (%d GPUs)", socket.host_id, len(hello.gpus))
                await socket.send(
                    Welcome(
                        protocol_version=version,
                        host_id=socket.host_id,
                        heartbeat_interval=context.settings.agent_heartbeat_seconds,
                        server_time=time.time(),
                    ).model_dump_json()
                )
                await self._reconcile(socket, list(hello.running_jobs))
                await job_states.wake_schedulers(context)
                await _first_completed(
                    self._read_loop(socket), self._forward_loop(socket, subscription)
                )
        except ServiceUnavailable as exc:
            logger.warning("host %s: bus unavailable, closing its socket: %s", socket.host_id, exc)
            await _close(socket.websocket, 1011)
        finally:
            self._sockets.pop(socket.connection_id, None)
            if self._by_host.get(socket.host_id) is socket:
                del self._by_host[socket.host_id]
            if socket.streams:
                await self.streams.host_gone(socket.host_id, socket.streams)
            with contextlib.suppress(Exception):
                async with context.sessionmaker() as session:
                    await presence.mark_disconnected(
                        session=session,
                        host_id=socket.host_id,
                        connection_id=socket.connection_id,
                    )
            logger.info("host %s disconnected", socket.host_id)

    async def _read_loop(self, socket: _Socket) -> None:
        while True:
            try:
                raw = await socket.websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                message = parse_agent_message(raw)
            except ValidationError as exc:
                await socket.send(
                    ErrorMessage(code="malformed_message", message=_short(exc)).model_dump_json()
                )
                continue
            if isinstance(message, InferChunk | InferEnd):
                if isinstance(message, InferEnd):
                    socket.streams.pop(message.stream_id, None)
                await self.streams.route(socket.host_id, message, raw)
                continue
            if isinstance(message, Heartbeat):
                reported = frozenset(message.running_jobs)
                socket.unreconciled += 1
                # Reconcile when the report changes, and every few beats anyway (a job the
                # host never started does not change its report); in the beat's batch.
                running = None
                if reported != socket.reported or socket.unreconciled >= RECONCILE_EVERY:
                    running = list(message.running_jobs)
                    socket.reported, socket.unreconciled = reported, 0
                stop = await self.inbox.heartbeat(
                    socket.host_id, socket.connection_id, message.gpus, running
                )
                if stop is None:
                    await _close(socket.websocket, CLOSE_SUPERSEDED)
                    return
                await self._stop(socket, stop)
                continue
            replies = await self.events.handle(socket.host_id, message)
            try:
                for reply in replies:
                    await socket.send(reply.model_dump_json())
            except (WebSocketDisconnect, RuntimeError):
                return  # the agent went away; what it sent is applied, it resends the rest

    async def _reconcile(self, socket: _Socket, running: list[uuid.UUID]) -> None:
        """Stop what the host runs that it should not (cancelled, or re-queued elsewhere)."""
        socket.reported, socket.unreconciled = frozenset(running), 0
        await self._stop(socket, await job_reports.reconcile(self.context, socket.host_id, running))

    async def _stop(self, socket: _Socket, jobs: list[uuid.UUID]) -> None:
        for job_id in jobs:
            logger.info(
                "host %s runs job %s, which is not its to run: cancelling", socket.host_id, job_id
            )
            await socket.send(
                Cancel(
                    job_id=job_id, reason="this job is not assigned to this host"
                ).model_dump_json()
            )

    async def _forward_loop(self, socket: _Socket, subscription: Subscription) -> None:
        async for message in subscription:
            control = parse_control(message.data)
            if control is not None:
                if control.get("kind") == REVOKED_CONTROL:
                    await _refuse(
                        socket.websocket,
                        "host_revoked",
                        "This host was removed by its owner; enrol it again.",
                        CLOSE_UNAUTHORIZED,
                    )
                    return
                if control.get("connection_id") != socket.connection_id:
                    await _close(socket.websocket, CLOSE_SUPERSEDED)
                    return
                continue
            frame = message.data.decode()
            _track(socket, frame)
            try:
                await socket.send(frame)
            except (WebSocketDisconnect, RuntimeError):
                return

    async def _send_local(self, host_id: uuid.UUID, frame: str) -> bool:
        """Send to the host's socket if this replica holds it (the inference fast path)."""
        socket = self._by_host.get(host_id)
        if socket is None:
            return False
        _track(socket, frame)
        try:
            await socket.send(frame)
        except (WebSocketDisconnect, RuntimeError):
            return False
        return True

    async def _authenticate(self, websocket: WebSocket) -> uuid.UUID:
        header = websocket.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            raise _Refused(
                "not_authenticated",
                "Send 'Authorization: Bearer <host credential>' (run `peergpu agent enroll`).",
                CLOSE_UNAUTHORIZED,
            )
        try:
            async with self.context.sessionmaker() as session:
                host = await hosts.authenticate_host(session=session, credential=credential)
        except AuthenticationFailed as exc:
            raise _Refused(exc.code, exc.message, CLOSE_UNAUTHORIZED) from exc
        return host.id

    async def _receive_hello(self, websocket: WebSocket) -> Hello:
        try:
            raw = await asyncio.wait_for(websocket.receive_text(), HELLO_TIMEOUT_SECONDS)
        except (TimeoutError, WebSocketDisconnect, RuntimeError) as exc:
            raise _Refused(
                "no_hello", "Expected a hello message first.", CLOSE_PROTOCOL_ERROR
            ) from exc
        try:
            message = parse_agent_message(raw)
        except ValidationError as exc:
            offered = _offered_versions(raw)
            if offered and negotiate_version(offered) is None:
                raise _Refused(
                    "unsupported_protocol_version",
                    f"This server speaks protocol versions {sorted(SUPPORTED_VERSIONS)}; "
                    f"the agent offered {offered}. Upgrade the agent (or the server).",
                    CLOSE_UNSUPPORTED_VERSION,
                ) from exc
            raise _Refused("malformed_hello", _short(exc), CLOSE_PROTOCOL_ERROR) from exc
        if not isinstance(message, Hello):
            raise _Refused("no_hello", "Expected a hello message first.", CLOSE_PROTOCOL_ERROR)
        return message


def _track(socket: _Socket, frame: str) -> None:
    started = started_stream(frame)
    if started is not None:
        socket.streams[started[0]] = started[1]


class _Refused(Exception):
    def __init__(self, code: str, message: str, close_code: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


async def _refuse(websocket: WebSocket, code: str, message: str, close_code: int) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_text(ErrorMessage(code=code, message=message).model_dump_json())
    await _close(websocket, close_code)


async def _close(websocket: WebSocket, code: int) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await websocket.close(code=code)


async def _first_completed(*coroutines: object) -> None:
    tasks = [asyncio.ensure_future(c) for c in coroutines]  # type: ignore[call-overload]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _offered_versions(raw: str) -> list[int]:
    try:
        data = json.loads(raw)
        return [int(v) for v in data.get("protocol_versions", [])]
    except (ValueError, TypeError, AttributeError):
        return []


def _short(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "Invalid message."
    where = ".".join(str(p) for p in errors[0]["loc"])
    return f"Invalid message: {where}: {errors[0]['msg']}"
