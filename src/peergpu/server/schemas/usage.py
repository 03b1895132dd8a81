"""Inference usage bodies: a wallet's requests through the gateway, and their totals.

Amounts are integer micro-dollars (``*_micros``) with a ``*_usd`` string for people; prices
are micro-dollars per million tokens, as the serving host declared them at the time.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field


class UsagePublic(BaseModel):
    """One request relayed by the gateway (``/v1/chat/completions``, ``/v1/embeddings``)."""

    id: uuid.UUID = Field(description="the request's id")
    created_at: datetime
    api_key_id: uuid.UUID | None = Field(description="None for a request with a session token")
    user_id: uuid.UUID
    host_id: uuid.UUID
    model: str
    endpoint: str = Field(description="chat.completions or embeddings")
    prompt_tokens: int
    completion_tokens: int
    input_price_per_million_micros: int
    output_price_per_million_micros: int
    cost_micros: int
    cost_usd: str
    latency_ms: int
    first_token_ms: int | None
    outcome: str = Field(description="ok, cancelled or error")
    billed_at: datetime | None = Field(description="when the wallet was charged; None until then")


class UsagesPublic(BaseModel):
    data: list[UsagePublic]
    count: int


class UsageTotalsPublic(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    cost_usd: str


class UsageGroupPublic(UsageTotalsPublic):
    key: str | None = Field(
        description="the API key's id (None: session tokens), the model, or the UTC day "
        "(YYYY-MM-DD)"
    )
    name: str | None = Field(description="the API key's name when grouped by key")


class UsageSummaryPublic(BaseModel):
    wallet: str
    group_by: str
    since: datetime
    until: datetime | None = Field(description="None: up to now")
    groups: list[UsageGroupPublic]
    total: UsageTotalsPublic
