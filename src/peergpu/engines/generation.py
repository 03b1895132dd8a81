"""One chat generation on the worker thread, with transformers' ``generate``.

``generate`` owns sampling and the KV cache; three small hooks give the engine what it needs:
a streamer that turns each new token into text as it is produced, a stopping criterion that
ends generation when the request is cancelled (the client went away) or a stop sequence
appeared, and a logits processor for ``logit_bias``. They are duck-typed, so this module
never subclasses (or imports at load time) anything from transformers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peergpu.engines.base import (
    ChatEvent,
    ChatParams,
    Finished,
    FinishReason,
    GenerationStats,
    TextDelta,
)
from peergpu.engines.packaged import require
from peergpu.engines.text import IncrementalDecoder, StopMatcher


@dataclass
class Generation:
    """What a running generation needs besides the model: where text goes, when to stop."""

    params: ChatParams
    emit: Callable[[ChatEvent], None]
    cancelled: threading.Event


def run_generation(
    *,
    model: Any,
    tokenizer: Any,
    inputs: Any,
    max_new_tokens: int,
    generation: Generation,
    eos_ids: set[int],
) -> GenerationStats:
    """Generate until an end token, a stop sequence, ``max_new_tokens`` or cancellation.

    Emits text deltas and, unless cancelled, one ``Finished``; returns how it ended.
    """
    torch = require("torch")
    transformers = require("transformers")
    started = time.monotonic()
    params = generation.params
    prompt_tokens = int(inputs["input_ids"].shape[1])
    streamer = _TextStreamer(tokenizer, params.stop, generation.emit)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "streamer": streamer,
        "stopping_criteria": transformers.StoppingCriteriaList(
            [_StopWhen(torch, lambda: generation.cancelled.is_set() or streamer.stopped)]
        ),
    }
    pad = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=None)
    )
    if pad is not None:
        options["pad_token_id"] = pad
    if params.temperature > 0:
        # OpenAI's sampling has no top-k; transformers defaults to 50 unless told otherwise.
        options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.seed is not None:
            # The global generator: reproducible because this worker runs one generation at once.
            torch.manual_seed(params.seed)
    else:
        options["do_sample"] = False
    if params.logit_bias:
        options["logits_processor"] = transformers.LogitsProcessorList(
            [_LogitBias(torch, params.logit_bias)]
        )
    with torch.inference_mode():
        model.generate(**inputs, **options)
    streamer.finish()
    finish: FinishReason | None = None
    if not generation.cancelled.is_set():  # else nobody is listening
        finish = "stop" if streamer.stopped or streamer.last_token in eos_ids else "length"
        generation.emit(Finished(finish, prompt_tokens, streamer.tokens))
    return GenerationStats(
        prompt_tokens=prompt_tokens,
        completion_tokens=streamer.tokens,
        finish_reason=finish or "cancelled",
        seconds=time.monotonic() - started,
    )


class _TextStreamer:
    """transformers' streamer protocol: ``put`` gets the prompt once, then each new token."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], emit: Callable[[ChatEvent], None]):
        self._decoder = IncrementalDecoder(
            lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))
        )
        self._matcher = StopMatcher(stops)
        self._emit = emit
        self._prompt_seen = False
        self.tokens = 0
        self.last_token: int | None = None

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens += 1
            self.last_token = int(token)
            self._send(self._matcher.feed(self._decoder.push(int(token))))

    def end(self) -> None:
        """Called by ``generate``; the tail is sent by ``finish`` so it is sent exactly once."""

    def finish(self) -> None:
        self._send(self._matcher.feed(self._decoder.flush()) + self._matcher.flush())

    def _send(self, text: str) -> None:
        if text:
            self._emit(TextDelta(text))


class _StopWhen:
    """A stopping criterion: checked after every token, so a cancel costs at most one more."""

    def __init__(self, torch: Any, should_stop: Callable[[], bool]) -> None:
        self._torch = torch
        self._should_stop = should_stop

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return self._torch.full((input_ids.shape[0],), self._should_stop(), dtype=self._torch.bool)


class _LogitBias:
    def __init__(self, torch: Any, bias: dict[int, float]) -> None:
        self._ids = torch.tensor(list(bias), dtype=torch.long)
        self._values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        biased = scores.clone()
        biased[:, self._ids] += self._values.to(scores.dtype)
        return biased
