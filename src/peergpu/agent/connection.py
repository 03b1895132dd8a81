"""``peergpu agent run``: one outbound WebSocket, kept up for as long as the agent runs.

Each connection: send ``hello`` (GPUs, jobs still running), wait for ``welcome``, hand the socket
to the link (which resends anything unacknowledged), then heartbeat and serve messages until
the socket drops. Then reconnect with exponential backoff and full jitter (reset after a
successful welcome). A refused credential or an unsupported protocol version stops the agent
with a clear message instead of retrying forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import random
import socket
from collections.abc import Callable

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from peergpu import __version__
from peergpu.agent.credentials import Credentials
from peergpu.agent.executor import JobExecutor
from peergpu.agent.gpus import GpuProbe
from peergpu.agent.inference import InferenceServer
from peergpu.agent.link import Link
from peergpu.protocol.messages import (
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION,
    SUPPORTED_VERSIONS,
    Cancel,
    ErrorMessage,
    GpuSampleSpec,
    GpuSpec,
    Heartbeat,
    Hello,
    InferCancel,
    InferStart,
    LogAck,
    ManifestDelivery,
    StatusAck,
    UploadGrant,
    Welcome,
    parse_server_message,
)

logger = logging.getLogger(__name__)

WELCOME_TIMEOUT_SECONDS = 15.0
_FATAL_CODES = {
    "unsupported_protocol_version",
    "invalid_host_credential",
    "host_revoked",
    "not_authenticated",
}


class FatalAgentError(RuntimeError):
    """Retrying cannot help (revoked credential, incompatible server): the agent stops."""


class Backoff:
    """Exponential backoff with full jitter: the n-th wait is uniform in [0, min(max, b*2^n)]."""

    def __init__(self, initial: float, maximum: float, rng: Callable[[], float] = random.random):
        self.initial, self.maximum, self._rng, self.attempt = initial, maximum, rng, 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt += 1
        return float(ceiling * self._rng())

    def reset(self) -> None:
        self.attempt = 0


class AgentConnection:
    def __init__(
        self,
        *,
        credentials: Credentials,
        probe: GpuProbe,
        link: Link,
        executor: JobExecutor,
        runners: list[str],
        backoff: Backoff,
        heartbeat_override: float | None = None,
        protocol_versions: list[int] | None = None,
        inference: InferenceServer | None = None,
    ) -> None:
        self.credentials = credentials
        self.probe = probe
        self.link = link
        self.executor = executor
        self.runners = runners
        self.backoff = backoff
        self.heartbeat_override = heartbeat_override
        self.protocol_versions = protocol_versions or sorted(SUPPORTED_VERSIONS)
        self.inference = inference
        self.gpus = [GpuSpec.model_validate(g, from_attributes=True) for g in probe.detect()]
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; raise FatalAgentError if retrying is futile."""
        while not stop.is_set():
            try:
                await self._session(stop)
            except FatalAgentError:
                raise
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                logger.warning("connection to %s lost: %s", self.credentials.server_url, exc)
            finally:
                self.connected.clear()
                self.link.detach()
                if self.inference is not None:
                    self.inference.abort_all()
            if stop.is_set():
                return
            delay = self.backoff.next_delay()
            logger.info("reconnecting in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _session(self, stop: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.credentials.credential}"}
        try:
            ws_cm = connect(
                self.credentials.websocket_url,
                additional_headers=headers,
                open_timeout=15,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=5,
                max_size=16 * 1024 * 1024,
                # No permessage-deflate: it cost the agent and the server more CPU per frame
                # than anything else on the inference path (bench/gateway.py), and most of
                # what goes over this socket is small.
                compression=None,
            )
            ws = await ws_cm
        except InvalidStatus as exc:
            raise ConnectionError(f"the server refused the WebSocket: {exc}") from exc
        try:
            welcome = await self._handshake(ws)
            self.backoff.reset()
            interval = self.heartbeat_override or welcome.heartbeat_interval
            logger.info(
                "connected to %s as host %s (protocol %d)",
                self.credentials.server_url,
                welcome.host_id,
                welcome.protocol_version,
            )
            await self.link.attach(ws)
            self.connected.set()
            tasks = [
                asyncio.create_task(self._heartbeats(interval)),
                asyncio.create_task(self._receive(ws)),
                asyncio.create_task(stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await ws.close()

    async def _handshake(self, ws: ClientConnection) -> Welcome:
        hello = Hello(
            protocol_versions=self.protocol_versions,
            agent_version=__version__,
            hostname=socket.gethostname(),
            os=f"{platform.system()} {platform.release()}",
            gpu_probe=self.probe.name,
            runners=self.runners,
            gpus=self.gpus,
            running_jobs=self.executor.running_jobs,
            models=self.inference.declared if self.inference is not None else [],
        )
        await ws.send(hello.model_dump_json())
        try:
            raw = await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT_SECONDS)
        except ConnectionClosed as exc:
            _raise_if_fatal_close(exc)
            raise
        message = parse_server_message(raw)
        if isinstance(message, ErrorMessage):
            if message.code in _FATAL_CODES:
                raise FatalAgentError(f"the server refused this agent: {message.message}")
            raise ConnectionError(f"the server refused the connection: {message.message}")
        if not isinstance(message, Welcome):
            raise ConnectionError(f"expected welcome, got {message.type}")
        return message

    async def _heartbeats(self, interval: float) -> None:
        while True:
            samples = [
                GpuSampleSpec.model_validate(s, from_attributes=True) for s in self.probe.sample()
            ]
            beat = Heartbeat(
                gpus=samples, running_jobs=self.executor.running_jobs, load_average=_load()
            )
            await self.link.send(beat.model_dump_json())
            await asyncio.sleep(interval)

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                try:
                    message = parse_server_message(raw)
                except ValidationError as exc:
                    logger.warning("ignoring a malformed message from the server: %s", exc)
                    continue
                await self._dispatch(message)
        except ConnectionClosed as exc:
            _raise_if_fatal_close(exc)
            raise

    async def _dispatch(self, message: object) -> None:
        if isinstance(message, ManifestDelivery):
            await self.executor.on_manifest(message.manifest)
        elif isinstance(message, Cancel):
            await self.executor.cancel(message.job_id)
        elif isinstance(message, LogAck):
            await self.link.on_log_ack(message)
        elif isinstance(message, StatusAck):
            self.link.on_status_ack(message)
        elif isinstance(message, UploadGrant):
            self.link.on_upload_grant(message)
        elif isinstance(message, InferStart):
            if self.inference is None:
                logger.warning("the server sent an inference request; this host serves no models")
            else:
                await self.inference.on_start(message)
        elif isinstance(message, InferCancel):
            if self.inference is not None:
                self.inference.on_cancel(message)
        elif isinstance(message, ErrorMessage):
            logger.warning("server says %s: %s", message.code, message.message)


def _raise_if_fatal_close(exc: ConnectionClosed) -> None:
    code = exc.rcvd.code if exc.rcvd else None
    reason = exc.rcvd.reason if exc.rcvd else ""
    if code == CLOSE_UNAUTHORIZED:
        raise FatalAgentError(
            "the server no longer accepts this host's credential; enrol again"
            + (f" ({reason})" if reason else "")
        ) from exc
    if code == CLOSE_UNSUPPORTED_VERSION:
        raise FatalAgentError("the server does not speak this agent's protocol version") from exc


def _load() -> float | None:
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None
