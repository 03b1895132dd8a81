"""Incremental decoding and stop sequences, without a model."""

from __future__ import annotations

from peergpu.engines.text import IncrementalDecoder, StopMatcher

#: a byte-level toy vocabulary: token id -> bytes, so a character can span two tokens
VOCABULARY = {1: b"Hel", 2: b"lo", 3: b" w", 4: b"orld", 5: "é".encode()[:1], 6: "é".encode()[1:]}


def decode(ids: list[int]) -> str:
    return b"".join(VOCABULARY[i] for i in ids).decode("utf-8", errors="replace")


def stream(ids: list[int], stops: list[str] = []) -> tuple[list[str], bool]:  # noqa: B006
    decoder, matcher = IncrementalDecoder(decode), StopMatcher(stops)
    pieces = [matcher.feed(decoder.push(token)) for token in ids]
    pieces.append(matcher.feed(decoder.flush()) + matcher.flush())
    return [piece for piece in pieces if piece], matcher.stopped


def test_text_arrives_token_by_token() -> None:
    assert stream([1, 2, 3, 4]) == (["Hel", "lo", " w", "orld"], False)


def test_half_a_character_is_held_until_complete() -> None:
    assert stream([1, 5, 6, 2]) == (["Hel", "é", "lo"], False)


def test_a_dangling_half_character_is_flushed_at_the_end() -> None:
    assert "".join(stream([1, 5])[0]) == "Hel\ufffd"


def test_the_stop_sequence_and_what_follows_are_never_sent() -> None:
    assert stream([1, 2, 3, 4], stops=["o w"]) == (["Hel", "l"], True)


def test_text_that_may_start_a_stop_sequence_waits_for_the_next_token() -> None:
    pieces, stopped = stream([1, 2, 3, 4], stops=["lo!"])
    assert pieces == ["He", "l", "lo w", "orld"]  # each "l" might have begun "lo!"
    assert not stopped


def test_the_earliest_of_several_stop_sequences_wins() -> None:
    assert "".join(stream([1, 2, 3, 4], stops=["world", "lo"])[0]) == "Hel"


def test_empty_stop_sequences_are_ignored() -> None:
    assert stream([1, 2], stops=[""]) == (["Hel", "lo"], False)
