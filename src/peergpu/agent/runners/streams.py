"""Reading a job's output: line splitting, bounded memory, backpressure.

:func:`pump_lines` reads one pipe and awaits the sink for every line before reading on. The
reader's buffer is bounded (asyncio pauses the pipe when it holds ``2 * limit`` bytes), so a slow
sink makes the job block on its full pipe instead of the agent buffering without end.
"""

from __future__ import annotations

import asyncio
import codecs
import collections

from peergpu.agent.runners.base import MAX_LINE_BYTES, OutputSink

#: How many trailing stderr lines are kept to explain a failure (MemoryError, EFBIG...).
TAIL_LINES = 20


class OutputTail:
    """The last few lines of a stream (each cut to 1 KiB), for classifying failures."""

    def __init__(self, max_lines: int = TAIL_LINES) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)

    def add(self, line: str) -> None:
        self._lines.append(line[:1024])

    def lines(self) -> list[str]:
        return list(self._lines)


async def open_pipe_reader(pipe: object) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """Wrap a readable pipe file object in a bounded StreamReader; closing the returned transport
    ends the stream (data already buffered is still delivered)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.connect_read_pipe(lambda: protocol, pipe)
    return reader, transport


async def pump_lines(
    reader: asyncio.StreamReader,
    stream: str,
    sink: OutputSink,
    tail: OutputTail | None = None,
) -> None:
    """Deliver every line of ``reader`` to ``sink`` until EOF.

    Lines are split on ``\\n`` and handed over without it; a line longer than
    :data:`MAX_LINE_BYTES` is handed over in pieces of at most that many bytes (cut on a UTF-8
    character boundary where possible). A final line without newline is delivered too.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    in_long_line = False
    while True:
        try:
            chunk = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as eof:
            if eof.partial:
                await _emit(sink, stream, tail, decoder.decode(eof.partial, final=True))
            return
        except asyncio.LimitOverrunError:
            piece = await reader.readexactly(MAX_LINE_BYTES)
            await _emit(sink, stream, tail, decoder.decode(piece, final=False))
            in_long_line = True
            continue
        if in_long_line and chunk == b"\n":
            # The long line ended exactly on a piece boundary: no empty extra piece.
            in_long_line = False
            leftover = decoder.decode(b"", final=True)
            if leftover:
                await _emit(sink, stream, tail, leftover)
            continue
        in_long_line = False
        await _emit(sink, stream, tail, decoder.decode(chunk[:-1], final=True))


async def _emit(sink: OutputSink, stream: str, tail: OutputTail | None, line: str) -> None:
    if tail is not None:
        tail.add(line)
    await sink(stream, line)
