"""A minimal HTTP/1.1 keep-alive client for the benchmarks' load (``bench/gateway.py``, and
``bench/scheduler.py``'s submits).

The benchmark's own client shares the machine's two cores with the server, the agent and the
engine, so it must cost as little per request as possible: one asyncio stream per connection,
the request's bytes built once, and only what is needed of the answer parsed (the status line,
``Content-Length`` or chunked framing). A general client (httpx) costs several times more per
request and would take CPU from what is being measured.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


class HttpError(Exception):
    """An answer that is not the 200 a benchmark request expects."""


@dataclass(frozen=True)
class Target:
    """One endpoint with a fixed request: ``POST path`` of ``body`` with ``headers``."""

    port: int
    path: str
    body: bytes
    authorization: str = ""

    def request_bytes(self, body: bytes | None = None) -> bytes:
        body = self.body if body is None else body
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if self.authorization:
            lines.append(f"Authorization: Bearer {self.authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class StreamResult:
    """A server-sent-events answer: its ``data:`` events and when they arrived."""

    events: int = 0
    first_event_at: float = 0.0
    last_event_at: float = 0.0
    done: bool = False  # ``data: [DONE]`` arrived
    tail: bytes = field(default=b"", repr=False)  # the last events, for error messages


class Connection:
    """One keep-alive connection to ``target``; reopened when the server closes it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._request = target.request_bytes()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None

    async def call(self) -> bytes:
        """Send the request, return the body of its 200 answer (HttpError otherwise)."""
        reader = await self._send()
        status, length, chunked, keep = await _head(reader)
        body = await _body(reader, length, chunked)
        if not keep:
            await self.close()
        if status != 200:
            raise HttpError(f"HTTP {status}: {body[:500]!r}")
        return body

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """Send the target's request with another body; (status, body) of any answer."""
        reader = await self._send(self.target.request_bytes(body))
        status, length, chunked, keep = await _head(reader)
        answer = await _body(reader, length, chunked)
        if not keep:
            await self.close()
        return status, answer

    async def stream(self) -> StreamResult:
        """Send the request and read its event stream to the end, counting ``data:`` events
        as they arrive (not parsed: the count and the timing are what is measured)."""
        reader = await self._send()
        status, length, chunked, keep = await _head(reader)
        if status != 200 or not chunked:
            body = await _body(reader, length, chunked)
            raise HttpError(f"HTTP {status}: {body[:500]!r}")
        result = StreamResult()
        carry = b""
        while True:
            piece = await _chunk(reader)
            if piece is None:
                break
            carry += piece
            cut = carry.rfind(b"\n\n")
            if cut < 0:
                continue
            complete, carry = carry[: cut + 2], carry[cut + 2 :]
            count = complete.count(b"\n\n")
            now = time.perf_counter()
            if result.events == 0:
                result.first_event_at = now
            result.events += count
            result.last_event_at = now
            result.tail = complete[-300:]
            if complete.endswith(b"data: [DONE]\n\n"):
                result.done = True
        if not keep:
            await self.close()
        return result

    async def _send(self, request: bytes | None = None) -> asyncio.StreamReader:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                "127.0.0.1", self.target.port
            )
        assert self._reader is not None
        self._writer.write(self._request if request is None else request)
        return self._reader


async def _head(reader: asyncio.StreamReader) -> tuple[int, int, bool, bool]:
    """(status, content length or -1, chunked, keep-alive) of the answer's head."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked, keep = -1, False, True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep = b"close" not in value.lower()
    return status, length, chunked, keep


async def _body(reader: asyncio.StreamReader, length: int, chunked: bool) -> bytes:
    if not chunked:
        return await reader.readexactly(length) if length > 0 else b""
    parts = []
    while (piece := await _chunk(reader)) is not None:
        parts.append(piece)
    return b"".join(parts)


async def _chunk(reader: asyncio.StreamReader) -> bytes | None:
    """The next piece of a chunked body; None after the last (empty) chunk."""
    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
    if size == 0:
        await reader.readuntil(b"\r\n")  # no trailers: the blank line
        return None
    data = await reader.readexactly(size + 2)
    return data[:-2]


# ---------------------------------------------------------------- load patterns


async def sequential(targets: list[Target], rounds: int) -> list[list[float]]:
    """``rounds`` requests to each target, one at a time and interleaved (a, b, a, b...) so
    that anything else the machine does falls on both alike; each target's latencies in
    seconds."""
    connections = [Connection(t) for t in targets]
    latencies: list[list[float]] = [[] for _ in targets]
    try:
        for _ in range(rounds):
            for index, connection in enumerate(connections):
                started = time.perf_counter()
                await connection.call()
                latencies[index].append(time.perf_counter() - started)
    finally:
        for connection in connections:
            await connection.close()
    return latencies


@dataclass
class Throughput:
    requests: int  # answered inside the window
    errors: int
    seconds: float
    latencies: list[float]
    total: int  # answered, warm-up included
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


async def closed_loop(target: Target, clients: int, warmup: float, duration: float) -> Throughput:
    """``clients`` connections, each sending its next request as soon as the last is
    answered, for ``warmup`` + ``duration`` seconds; the figures count what finished inside
    the last ``duration`` seconds."""
    started = time.perf_counter()
    window_start, window_end = started + warmup, started + warmup + duration
    latencies: list[float] = []
    errors: list[str] = []
    answered = 0

    async def client() -> None:
        nonlocal answered
        connection = Connection(target)
        try:
            while (sent := time.perf_counter()) < window_end:
                try:
                    await connection.call()
                except HttpError as exc:
                    errors.append(str(exc))
                    continue
                finished = time.perf_counter()
                answered += 1
                if window_start <= finished < window_end:
                    latencies.append(finished - sent)
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    first_error = errors[0] if errors else ""
    return Throughput(len(latencies), len(errors), duration, latencies, answered, first_error)


async def streams(target: Target, count: int) -> list[tuple[float, StreamResult]]:
    """``count`` streamed answers, one after another: (when each was sent, what arrived)."""
    connection = Connection(target)
    results = []
    try:
        for _ in range(count):
            sent = time.perf_counter()
            results.append((sent, await connection.stream()))
    finally:
        await connection.close()
    return results
