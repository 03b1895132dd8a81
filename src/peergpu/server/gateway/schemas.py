"""OpenAI's response bodies the gateway sends (request bodies arrive with the endpoints that
take them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


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
