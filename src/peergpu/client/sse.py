"""A small parser for ``text/event-stream`` (the WHATWG "server-sent events" format).

Only what the PeerGPU server sends is needed (``event:``, ``id:``, ``data:``, comments), but the
parser follows the spec's rules so a proxy reformatting the stream does not confuse it: a blank
line dispatches an event, several ``data:`` lines are joined with newlines, one space after the
colon is dropped, lines starting with ``:`` are comments, an event with no data is not
dispatched, and unknown fields are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None = None


def parse_events(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Turn the stream's lines (without their line endings) into events."""
    event = ""
    data: list[str] = []
    event_id: str | None = None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), event_id)
            event, data, event_id = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            event_id = value
