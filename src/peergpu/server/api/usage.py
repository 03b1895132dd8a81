"""Inference usage: a wallet's requests through the OpenAI-compatible gateway and their
totals by API key, model or day. An organization key sees its organization's wallet."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from peergpu.errors import InvalidInput
from peergpu.server.api.billing import OrgQuery
from peergpu.server.api.deps import Reader, SessionDep
from peergpu.server.api.responses import AUTHENTICATED, errors
from peergpu.server.db.base import utcnow
from peergpu.server.schemas.usage import (
    UsageGroupPublic,
    UsagePublic,
    UsagesPublic,
    UsageSummaryPublic,
    UsageTotalsPublic,
)
from peergpu.server.services.billing import usage_reports, wallets
from peergpu.server.services.billing.ledger import format_usd
from peergpu.server.services.billing.usage_reports import GroupBy, UsageQuery

router = APIRouter(tags=["usage"], responses=AUTHENTICATED)

#: The summary's window when ``since`` is not given.
DEFAULT_WINDOW = timedelta(days=30)

KeyQuery = Annotated[uuid.UUID | None, Query(description="only this API key's requests")]
ModelQuery = Annotated[
    str | None, Query(min_length=1, max_length=128, description="only this model's requests")
]
SinceQuery = Annotated[
    datetime | None, Query(description="from this time (UTC when no offset is given)")
]
UntilQuery = Annotated[datetime | None, Query(description="before this time")]


@router.get("/usage", responses=errors(404))
async def list_usage(
    principal: Reader,
    session: SessionDep,
    org_id: OrgQuery = None,
    api_key_id: KeyQuery = None,
    model: ModelQuery = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> UsagesPublic:
    """The wallet's inference requests, newest first: tokens, the host's prices, the cost
    and whether it has been charged yet (usually within seconds)."""
    wallet = await wallets.resolve(session=session, principal=principal, org_id=org_id)
    query = UsageQuery(
        wallet=wallet,
        api_key_id=api_key_id,
        model=model,
        since=_utc(since, "since"),
        until=_utc(until, "until"),
    )
    _check_window(query)
    rows, count = await usage_reports.list_usage(
        session=session, query=query, limit=limit, offset=offset
    )
    return UsagesPublic(
        data=[
            UsagePublic(
                id=row.id,
                created_at=row.created_at,
                api_key_id=row.api_key_id,
                user_id=row.user_id,
                host_id=row.host_id,
                model=row.model,
                endpoint=row.endpoint,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                input_price_per_million_micros=row.input_price_per_million_micros,
                output_price_per_million_micros=row.output_price_per_million_micros,
                cost_micros=row.cost_micros,
                cost_usd=format_usd(row.cost_micros),
                latency_ms=row.latency_ms,
                first_token_ms=row.first_token_ms,
                outcome=row.outcome,
                billed_at=row.billed_at,
            )
            for row in rows
        ],
        count=count,
    )


@router.get("/usage/summary", responses=errors(404))
async def usage_summary(
    principal: Reader,
    session: SessionDep,
    group_by: GroupBy = GroupBy.model,
    org_id: OrgQuery = None,
    api_key_id: KeyQuery = None,
    model: ModelQuery = None,
    since: Annotated[
        datetime | None, Query(description="from this time; default: 30 days ago")
    ] = None,
    until: UntilQuery = None,
) -> UsageSummaryPublic:
    """Requests, prompt and completion tokens and cost in a window, per API key, model or
    UTC day, with the window's total."""
    wallet = await wallets.resolve(session=session, principal=principal, org_id=org_id)
    start = _utc(since, "since") or utcnow() - DEFAULT_WINDOW
    query = UsageQuery(
        wallet=wallet, api_key_id=api_key_id, model=model, since=start, until=_utc(until, "until")
    )
    _check_window(query)
    groups = await usage_reports.summarize(session=session, query=query, group_by=group_by)
    requests = sum(g.requests for g in groups)
    prompt = sum(g.prompt_tokens for g in groups)
    completion = sum(g.completion_tokens for g in groups)
    cost = sum(g.cost for g in groups)
    return UsageSummaryPublic(
        wallet=wallet,
        group_by=group_by.value,
        since=start,
        until=query.until,
        groups=[
            UsageGroupPublic(
                key=g.key,
                name=g.name,
                requests=g.requests,
                prompt_tokens=g.prompt_tokens,
                completion_tokens=g.completion_tokens,
                cost_micros=g.cost,
                cost_usd=format_usd(g.cost),
            )
            for g in groups
        ],
        total=UsageTotalsPublic(
            requests=requests,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_micros=cost,
            cost_usd=format_usd(cost),
        ),
    )


def _utc(moment: datetime | None, name: str) -> datetime | None:
    """A time without an offset is read as UTC; one that leaves the calendar is refused."""
    if moment is None:
        return None
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"'{name}' is out of range.", details={"field": name}) from exc


def _check_window(query: UsageQuery) -> None:
    if query.since is not None and query.until is not None and query.since >= query.until:
        raise InvalidInput(
            "'since' must be before 'until'.",
            details={"since": query.since.isoformat(), "until": query.until.isoformat()},
        )
