"""Inference billing: per-token usage of the gateway, charged through the ledger.

The gateway's side is two calls:

- :func:`ensure_can_spend` before a request is relayed: refuses a wallet whose available
  credit is used up (402 ``insufficient_credit``). A positive answer is cached for a couple of
  seconds, so the hot path costs no query; a wallet may therefore overspend by what a few
  seconds of requests cost (its available balance then goes a little negative; the next
  check refuses it).
- ``context.usage.record(UsageRecord(...))`` when the request has ended (see
  :mod:`.usage_writer`: buffered, group-committed, one row per request id; the record and its
  price in :mod:`.usage_record`).

Billing is a sweep, :func:`bill_usage`, run by :func:`run_usage_billing` on every replica:
it takes unbilled rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas share the work
and never bill a row twice), groups them by (wallet, host owner) and posts one ledger
transaction per group: the wallet's available credit pays the group's cost, the platform keeps
its fee (``platform_fee_bps``, the jobs' rule: :func:`.postings.split_fee`) and the host
owner's payable account gets the rest. The rows are stamped billed in the same database
transaction. A transaction's key is derived from its rows' ids, so posting the same batch
again is a no-op. Rows that cost nothing are marked billed without a posting.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.errors import ServiceUnavailable
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.usage_models import InferenceUsageModel
from peergpu.server.services.billing import accounts, ledger, postings
from peergpu.server.services.billing.usage_record import UsageRecord, token_cost
from peergpu.server.services.billing.usage_writer import UsageRecorder, is_unavailable

__all__ = [
    "UsageRecord",
    "UsageRecorder",
    "bill_usage",
    "ensure_can_spend",
    "run_usage_billing",
    "token_cost",
]

logger = logging.getLogger(__name__)

BATCH = 2000
#: A billing pass starts at most this often, so that a busy wallet is charged once per pass
#: rather than once per write of the usage writer.
MIN_PASS_SECONDS = 0.5
_MEMO_MODELS = 3
_DETAIL_MODELS = 50


async def ensure_can_spend(
    context: ServerContext, *, user_id: uuid.UUID, organization_id: uuid.UUID | None
) -> None:
    """Refuse a request whose wallet (the organization's when set, else the user's) has no
    available credit left: :class:`~.ledger.InsufficientFunds` (402 ``insufficient_credit``).
    A wallet found with credit is not asked again for ``credit_ttl`` seconds (2). While the
    usage writer cannot keep up (the database is down), :class:`ServiceUnavailable` (503)."""
    recorder = context.usage
    if recorder.overloaded:
        raise ServiceUnavailable(
            "Usage cannot be recorded right now; retry shortly.", code="usage_backlog"
        )
    wallet = accounts.wallet_of(owner_id=user_id, org_id=organization_id)
    if recorder.credit_cache.has_credit(wallet):
        return
    code = accounts.available(wallet)
    async with context.sessionmaker() as session:
        available = (await ledger.balances(session, [code]))[code]
    if available <= 0:
        raise ledger.InsufficientFunds(
            f"No credit left ({ledger.format_usd(available)} available). Top up with "
            "`peergpu billing topup` or ask an admin for credit.",
            details={"wallet": wallet, "available_micros": available},
        )
    recorder.credit_cache.remember(wallet)


async def bill_usage(context: ServerContext, *, limit: int = BATCH) -> int:
    """Bill up to ``limit`` of the oldest unbilled rows in one database transaction; returns
    how many rows were billed (0: nothing to do, or another sweep took them first)."""
    now = utcnow()
    async with context.sessionmaker() as session:
        rows = (
            await session.execute(
                select(
                    InferenceUsageModel.id,
                    InferenceUsageModel.wallet,
                    InferenceUsageModel.host_owner_id,
                    InferenceUsageModel.model,
                    InferenceUsageModel.prompt_tokens,
                    InferenceUsageModel.completion_tokens,
                    InferenceUsageModel.cost_micros,
                )
                .where(InferenceUsageModel.billed_at.is_(None))
                .order_by(InferenceUsageModel.created_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        if not rows:
            return 0
        groups: dict[tuple[str, uuid.UUID], _Group] = defaultdict(_Group)
        for row in rows:
            groups[(row.wallet, row.host_owner_id)].add(row)
        if not await _mark_billed(session, groups, now=now):
            await session.rollback()  # SQLite: a concurrent sweep billed some of these first
            return 0
        fee_bps = context.settings.platform_fee_bps
        await ledger.post_many(
            session,
            [
                group.posting(wallet=wallet, host_owner_id=owner, fee_bps=fee_bps)
                for (wallet, owner), group in groups.items()
                if group.cost
            ],
        )
        await session.commit()
    # The next pre-check of these wallets asks the ledger again: they may be spent out.
    context.usage.credit_cache.forget({wallet for wallet, _ in groups})
    return len(rows)


async def run_usage_billing(context: ServerContext) -> None:
    """The usage billing loop of one replica: bills after the usage writer has written
    (at most every :data:`MIN_PASS_SECONDS`) and at least every ``billing_settle_seconds``
    (rows written by other replicas, rows a failed pass left). Runs until cancelled."""
    interval = context.settings.billing_settle_seconds
    while True:
        try:
            await context.usage.wait_flushed(timeout=interval)
            while await bill_usage(context) >= BATCH:
                pass
            await asyncio.sleep(MIN_PASS_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                logger.warning("usage billing: the database is unavailable (%s); retrying", exc)
            else:
                logger.exception("usage billing pass failed; retrying")
            await asyncio.sleep(min(interval, 2.0))


@dataclass
class _Group:
    """The unbilled rows of one (wallet, host owner): one ledger transaction."""

    ids: list[uuid.UUID] = field(default_factory=list)
    cost: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    models: Counter[str] = field(default_factory=Counter)

    def add(self, row: Any) -> None:
        self.ids.append(row.id)
        self.cost += int(row.cost_micros)
        self.prompt_tokens += int(row.prompt_tokens)
        self.completion_tokens += int(row.completion_tokens)
        self.models[row.model] += 1

    @property
    def key(self) -> str:
        """The same rows always make the same key: a replayed batch posts nothing."""
        digest = hashlib.sha256(b"".join(i.bytes for i in sorted(self.ids))).hexdigest()
        return f"inference:{digest[:48]}"

    def posting(self, *, wallet: str, host_owner_id: uuid.UUID, fee_bps: int) -> ledger.Posting:
        fee, host_share = postings.split_fee(self.cost, fee_bps)
        available = accounts.available(wallet)
        entries = [
            (available, -self.cost),
            (accounts.PLATFORM_FEES, fee),
            (accounts.host_payable(host_owner_id), host_share),
        ]
        requests = len(self.ids)
        ranked = self.models.most_common()
        memo = "; ".join(f"{n} x {model}" for model, n in ranked[:_MEMO_MODELS])
        if len(ranked) > _MEMO_MODELS:
            memo += f"; {len(ranked) - _MEMO_MODELS} more models"
        return ledger.Posting(
            key=self.key,
            kind="inference",
            entries=tuple((code, amount) for code, amount in entries if amount),
            memo=f"Inference: {requests} request{'s' if requests != 1 else ''} ({memo}).",
            details={
                "requests": requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "host_owner_id": str(host_owner_id),
                "models": dict(ranked[:_DETAIL_MODELS]),
            },
            # The requests already happened: the wallet pays even if that overdraws it.
            may_go_negative=frozenset({available}),
        )


async def _mark_billed(
    session: AsyncSession, groups: dict[tuple[str, uuid.UUID], _Group], *, now: datetime
) -> bool:
    """Stamp every row of ``groups`` billed with its group's key, in one statement; False if
    some row was billed meanwhile (only possible on SQLite, where nothing is locked)."""
    ids = [row_id for group in groups.values() for row_id in group.ids]
    keyed = [(pair, group.key) for pair, group in groups.items() if group.cost]
    key = (
        case(
            *(
                (
                    and_(
                        InferenceUsageModel.wallet == wallet,
                        InferenceUsageModel.host_owner_id == owner,
                    ),
                    group_key,
                )
                for (wallet, owner), group_key in keyed
            ),
            else_=None,
        )
        if keyed
        else None
    )
    marked = await session.execute(
        update(InferenceUsageModel)
        .where(InferenceUsageModel.id.in_(ids), InferenceUsageModel.billed_at.is_(None))
        .values(billed_at=now, billed_transaction_key=key)
        .execution_options(synchronize_session=False)
    )
    count: int = marked.rowcount  # type: ignore[attr-defined]
    return count == len(ids)
