"""Read side of inference usage: a wallet's requests, and totals by key, model or day.

Every query is scoped to one wallet (``user:<id>`` or ``org:<id>``, resolved by the caller
through :func:`.wallets.resolve`) and reads ``inference_usage`` on its (wallet, created_at)
index. Windows are ``since <= created_at < until``; days are UTC days.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.db.billing_models import LedgerEntryModel, LedgerTransactionModel
from peergpu.server.db.models import ApiKeyModel
from peergpu.server.db.usage_models import InferenceUsageModel
from peergpu.server.services.billing import accounts


class GroupBy(StrEnum):
    key = "key"
    model = "model"
    day = "day"


@dataclass(frozen=True)
class UsageQuery:
    wallet: str
    api_key_id: uuid.UUID | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        usage = InferenceUsageModel
        found: list[ColumnElement[bool]] = [usage.wallet == self.wallet]
        if self.api_key_id is not None:
            found.append(usage.api_key_id == self.api_key_id)
        if self.model is not None:
            found.append(usage.model == self.model)
        if self.since is not None:
            found.append(usage.created_at >= self.since)
        if self.until is not None:
            found.append(usage.created_at < self.until)
        return found


@dataclass(frozen=True)
class UsageGroup:
    """Totals of one key (its id; None for requests made with a session token), one model,
    or one UTC day (``YYYY-MM-DD``). ``name`` is the key's name when grouped by key."""

    key: str | None
    name: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int


async def list_usage(
    *, session: AsyncSession, query: UsageQuery, limit: int = 50, offset: int = 0
) -> tuple[list[InferenceUsageModel], int]:
    """The wallet's requests matching ``query``, newest first, and how many match."""
    conditions = query.conditions()
    total = await session.scalar(
        select(func.count()).select_from(InferenceUsageModel).where(*conditions)
    )
    rows = await session.scalars(
        select(InferenceUsageModel)
        .where(*conditions)
        .order_by(InferenceUsageModel.created_at.desc(), InferenceUsageModel.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows), int(total or 0)


async def summarize(
    *, session: AsyncSession, query: UsageQuery, group_by: GroupBy
) -> list[UsageGroup]:
    """Requests, tokens and cost per group: by key and by model the costliest first, by day
    the latest first."""
    usage = InferenceUsageModel
    column = _group_column(session, group_by)
    rows = (
        await session.execute(
            select(
                column.label("group_value"),
                func.count().label("requests"),
                func.coalesce(func.sum(usage.prompt_tokens), 0).label("prompt_tokens"),
                func.coalesce(func.sum(usage.completion_tokens), 0).label("completion_tokens"),
                func.coalesce(func.sum(usage.cost_micros), 0).label("cost"),
            )
            .where(*query.conditions())
            .group_by(column)
        )
    ).all()
    names = await _key_names(session, rows) if group_by is GroupBy.key else {}
    groups = [
        UsageGroup(
            key=None if row.group_value is None else str(row.group_value),
            name=names.get(str(row.group_value)),
            requests=int(row.requests),
            prompt_tokens=int(row.prompt_tokens),
            completion_tokens=int(row.completion_tokens),
            cost=int(row.cost),
        )
        for row in rows
    ]
    if group_by is GroupBy.day:
        return sorted(groups, key=lambda g: g.key or "", reverse=True)
    return sorted(groups, key=lambda g: (-g.cost, -g.requests, g.key or ""))


async def inference_earnings(
    *, session: AsyncSession, user_id: uuid.UUID, since: datetime
) -> dict[date, int]:
    """A host owner's inference earnings (after the platform fee) per UTC day since
    ``since``: what usage billing credited to their payable account, read from the ledger."""
    day = _utc_day(session, LedgerEntryModel.at)
    rows = await session.execute(
        select(day, func.sum(LedgerEntryModel.amount_micros))
        .join(LedgerTransactionModel, LedgerTransactionModel.id == LedgerEntryModel.transaction_id)
        .where(
            LedgerEntryModel.account_code == accounts.host_payable(user_id),
            LedgerEntryModel.at >= since,
            LedgerTransactionModel.kind == "inference",
        )
        .group_by(day)
    )
    return {date.fromisoformat(str(found)): int(total or 0) for found, total in rows}


def _group_column(session: AsyncSession, group_by: GroupBy) -> Any:
    usage = InferenceUsageModel
    if group_by is GroupBy.key:
        return usage.api_key_id
    if group_by is GroupBy.model:
        return usage.model
    return _utc_day(session, usage.created_at)


def _utc_day(session: AsyncSession, column: Any) -> Any:
    """``YYYY-MM-DD`` of a timestamp column, in UTC, on either database."""
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)  # SQLite keeps UTC text


async def _key_names(session: AsyncSession, rows: Any) -> dict[str, str]:
    ids = [row.group_value for row in rows if row.group_value is not None]
    if not ids:
        return {}
    found = await session.execute(
        select(ApiKeyModel.id, ApiKeyModel.name).where(ApiKeyModel.id.in_(ids))
    )
    return {str(key_id): name for key_id, name in found}
