"""What a backend is: one loaded model behind one worker thread.

The HTTP layer knows only these contracts, so a new model family (another sentence-transformers
model, a llama.cpp binding) is one subclass. A backend is constructed cheaply, ``load``-ed once
before serving (seconds: it reads weights), and ``close``-d at shutdown. Requests to one backend
run one at a time, in arrival order: a CPU model gains nothing from running two requests at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal

ModelKind = Literal["chat", "embeddings"]
Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class Backend(ABC):
    #: the id clients send as ``model``
    model_id: str
    kind: ModelKind

    @abstractmethod
    def load(self) -> None:
        """Read the weights and start the worker thread; blocking, call once before serving."""

    @abstractmethod
    def close(self) -> None:
        """Stop the worker thread after the request it is running (queued ones are dropped)."""

    @abstractmethod
    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every request submitted so far has left the worker; False on timeout."""


@dataclass(frozen=True)
class Embeddings:
    #: one unit-length vector per input, in input order
    vectors: list[list[float]]
    #: tokens the model read, special tokens included
    prompt_tokens: int


class EmbeddingsBackend(Backend):
    kind: ModelKind = "embeddings"
    dimensions: int
    #: the most tokens one input may have; longer inputs are refused, not truncated
    max_input_tokens: int

    @abstractmethod
    async def embed(self, texts: list[str]) -> Embeddings:
        """Embed texts in one batch. Raises InvalidRequest for an input that is too long."""


@dataclass(frozen=True)
class ChatTurn:
    role: Role
    content: str


@dataclass(frozen=True)
class ChatParams:
    messages: list[ChatTurn]
    #: None: the backend's default, shortened to what fits in the context window
    max_tokens: int | None = None
    #: 0 means greedy decoding
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: token id -> bias added to its logit (-100 bans it, +100 forces it), as OpenAI's
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Started:
    """The model accepted the request and is generating."""

    prompt_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


ChatEvent = Started | TextDelta | Finished


@dataclass(frozen=True)
class GenerationStats:
    """How the last generation ended: for operators, and for tests of cancellation."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | Literal["cancelled", "error"]
    seconds: float


class ChatBackend(Backend):
    kind: ModelKind = "chat"
    #: prompt plus completion tokens the model can attend to
    context_window: int
    #: the largest ``max_tokens`` a request may ask
    max_completion_tokens: int
    #: ``max_tokens`` when a request gives none (less when the prompt leaves less room)
    default_max_tokens: int

    @abstractmethod
    def stream(self, params: ChatParams) -> AsyncGenerator[ChatEvent, None]:
        """Generate: one ``Started``, text deltas, then exactly one ``Finished``.

        Nothing runs until the first ``__anext__``; a request the model cannot serve (prompt
        too long, bad token id) raises InvalidRequest there, instead of ``Started``. Closing the
        iterator early (``aclose``, or cancelling the task awaiting it) stops generation
        within one token, and a request still waiting for the worker never starts.
        """
