"""Inference usage: one row per request relayed by the OpenAI-compatible gateway.

A row is written once (its id is the request's id, so recording it again changes nothing),
priced when it is written (the host's prices at the time, ``cost_micros`` rounded up), and
billed later by a sweep that posts one ledger transaction per (wallet, host owner) batch and
stamps the rows with that transaction's key. Like the other money records it carries plain
ids, not foreign keys, so deleting a user, a key or a host leaves the history intact.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from peergpu.server.db.base import Base, utcnow


class InferenceUsageModel(Base):
    __tablename__ = "inference_usage"
    __table_args__ = (
        # The billing sweep reads the oldest unbilled rows; billed rows (nearly all of them)
        # stay out of this index.
        Index(
            "ix_inference_usage_unbilled",
            "created_at",
            postgresql_where=text("billed_at IS NULL"),
            sqlite_where=text("billed_at IS NULL"),
        ),
        Index("ix_inference_usage_wallet_created", "wallet", "created_at"),
        Index("ix_inference_usage_key_created", "api_key_id", "created_at"),
    )

    #: The request's id: recording the same request twice writes one row.
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The API key that made the request (None for a session token).
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    user_id: Mapped[uuid.UUID]
    organization_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    #: Who pays: ``org:<uuid>`` when the key belongs to an organization, else ``user:<uuid>``.
    wallet: Mapped[str] = mapped_column(String(48))
    host_id: Mapped[uuid.UUID]
    host_owner_id: Mapped[uuid.UUID]
    model: Mapped[str] = mapped_column(String(128))
    #: ``chat.completions`` or ``embeddings``.
    endpoint: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    #: The host's declared prices when the request ran, micro-dollars per million tokens.
    input_price_per_million_micros: Mapped[int] = mapped_column(BigInteger)
    output_price_per_million_micros: Mapped[int] = mapped_column(BigInteger)
    #: ``ceil((prompt x input price + completion x output price) / 1,000,000)``.
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    latency_ms: Mapped[int] = mapped_column(Integer)
    first_token_ms: Mapped[int | None] = mapped_column(Integer, default=None)
    #: ``ok``, ``cancelled`` or ``error``.
    outcome: Mapped[str] = mapped_column(String(16))
    #: The ledger transaction that billed the row's batch (None when its batch cost nothing).
    billed_transaction_key: Mapped[str | None] = mapped_column(String(200), default=None)
    billed_at: Mapped[datetime | None] = mapped_column(default=None)
