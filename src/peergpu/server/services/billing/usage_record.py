"""One finished gateway request as the gateway reports it, and what it costs.

Pure: no I/O. A :class:`UsageRecord` refuses values its table cannot hold when it is built
(a ``ValueError`` is a bug in the caller), so one bad record never fails a batch write.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from peergpu.server.db.base import utcnow
from peergpu.server.services.billing import accounts

ENDPOINTS = frozenset({"chat.completions", "embeddings"})
OUTCOMES = frozenset({"ok", "cancelled", "error"})
_MAX_INT32 = 2**31 - 1
_MAX_PRICE = 10**12  # $1,000,000 per million tokens: anything above is a bug upstream


def token_cost(
    *,
    prompt_tokens: int,
    completion_tokens: int,
    input_price_per_million_micros: int,
    output_price_per_million_micros: int,
) -> int:
    """What a request costs in micro-dollars: one ceiling over the exact sum,
    ``ceil((prompt x input price + completion x output price) / 1,000,000)``, integers only."""
    units = (
        prompt_tokens * input_price_per_million_micros
        + completion_tokens * output_price_per_million_micros
    )
    return -(-units // 1_000_000)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What the gateway knows about one finished request; ``request_id`` makes its row's
    id (recording it again is a no-op). ``created_at`` defaults to now (UTC)."""

    request_id: uuid.UUID
    api_key_id: uuid.UUID | None
    user_id: uuid.UUID
    organization_id: uuid.UUID | None
    host_id: uuid.UUID
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    input_price_per_million_micros: int
    output_price_per_million_micros: int
    latency_ms: int
    first_token_ms: int | None
    outcome: str
    created_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        """Refuse values the table cannot hold: a ``ValueError`` here is a bug in the caller."""
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {self.endpoint!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}")
        if not 0 < len(self.model) <= 128 or "\x00" in self.model or not _encodes(self.model):
            raise ValueError(f"model name not storable: {self.model!r}")
        counts = (self.prompt_tokens, self.completion_tokens, self.latency_ms)
        if any(not 0 <= n <= _MAX_INT32 for n in (*counts, self.first_token_ms or 0)):
            raise ValueError(f"token counts and times must be 0..2^31-1: {self!r}")
        prices = (self.input_price_per_million_micros, self.output_price_per_million_micros)
        if any(not 0 <= price <= _MAX_PRICE for price in prices):
            raise ValueError(f"prices must be 0..{_MAX_PRICE} micro-dollars: {self!r}")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware")

    @property
    def wallet(self) -> str:
        return accounts.wallet_of(owner_id=self.user_id, org_id=self.organization_id)

    @property
    def cost_micros(self) -> int:
        return token_cost(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            input_price_per_million_micros=self.input_price_per_million_micros,
            output_price_per_million_micros=self.output_price_per_million_micros,
        )


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: no database would take it
        return False
    return True
