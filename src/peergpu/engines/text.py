"""Turning generated token ids into streamed text: incremental decoding and stop sequences.

Pure Python (no torch), so the rules are unit-tested on their own. Both work on the worker
thread, one instance per generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

_INCOMPLETE = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to


class IncrementalDecoder:
    """Text for each new token, without re-decoding the whole completion every time.

    A token can be half a character (an emoji split over two byte tokens) or change how the
    previous one decodes (a leading space), so each step decodes a short window of recent ids
    and releases only text that can no longer change.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are released and settled
        self._read = 0  # ids before it have had their text released

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        released = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(released) or text.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(released) :]

    def flush(self) -> str:
        """Whatever is still held back when generation ends (a dangling partial character)."""
        released = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(released) :] if len(text) > len(released) else ""


class StopMatcher:
    """OpenAI's ``stop``: the completion ends before the first stop sequence, which is not sent.

    Text that could be the start of a stop sequence is held back until the next text decides
    it, so a stream never sends half a stop sequence.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held back) that is safe to send now."""
        if self.stopped:
            return ""
        buffer = self._pending + text
        found = [index for index in (buffer.find(stop) for stop in self._stops) if index >= 0]
        if found:
            self.stopped = True
            self._pending = ""
            return buffer[: min(found)]
        hold = self._held_suffix(buffer)
        self._pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """Release held text at the end: no stop sequence followed it."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending

    def _held_suffix(self, buffer: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
