"""OpenAI's request and response bodies, as far as the gateway reads them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PeerGPUModelInfo(BaseModel):
    """PeerGPU's own facts about a model (OpenAI's clients ignore unknown fields)."""

    kind: Literal["chat", "embeddings"] | str
    hosts: int = Field(description="online hosts serving it now")
    input_price_per_million_micros: int = Field(description="the cheapest host's price")
    output_price_per_million_micros: int


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "peergpu"
    peergpu: PeerGPUModelInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# ---------------------------------------------------------------- requests
# Only what the gateway itself needs is checked here; every other field goes to the engine
# as sent (engines differ in what they accept, and answer 400 in OpenAI's shape themselves).


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, max_length=64)
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=1, description="one choice per request")

    @property
    def completion_limit(self) -> int | None:
        limits = [v for v in (self.max_tokens, self.max_completion_tokens) if v is not None]
        return min(limits) if limits else None


class EmbeddingRequest(_Request):
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, texts, or token ids"
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value
