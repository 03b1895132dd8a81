"""Inference usage in the SDK: your wallet's requests through the OpenAI-compatible gateway,
and their totals by API key, model or day.

:class:`~peergpu.client.PeerGPU` has these methods through :class:`UsageMixin`::

    with PeerGPU(url, api_key="pgk_...") as gpu:
        page = gpu.usage(model="acme/chat", limit=20)
        summary = gpu.usage_summary(group_by="day")

Amounts are integer micro-dollars; prices are micro-dollars per million tokens.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from peergpu.client.http import HttpSession
from peergpu.client.models import ApiModel, Page

Id = str | uuid.UUID
GroupBy = Literal["key", "model", "day"]


class UsageLine(ApiModel):
    """One request: its tokens, the serving host's prices, its cost, and ``billed_at`` once
    the wallet was charged for it (usually within seconds)."""

    id: str
    created_at: datetime | None = None
    api_key_id: str | None = None
    user_id: str | None = None
    host_id: str | None = None
    model: str = ""
    endpoint: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_price_per_million_micros: int = 0
    output_price_per_million_micros: int = 0
    cost_micros: int = 0
    cost_usd: str = ""
    latency_ms: int = 0
    first_token_ms: int | None = None
    outcome: str = ""
    billed_at: datetime | None = None


class UsageTotals(ApiModel):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0
    cost_usd: str = ""


class UsageGroup(UsageTotals):
    """One API key (``key`` is its id, None for session tokens; ``name`` its name), model, or
    UTC day (``YYYY-MM-DD``)."""

    key: str | None = None
    name: str | None = None


class UsageSummary(ApiModel):
    wallet: str = ""
    group_by: str = ""
    since: datetime | None = None
    until: datetime | None = None
    groups: list[UsageGroup] = Field(default_factory=list)
    total: UsageTotals = Field(default_factory=UsageTotals)


class UsageMixin:
    """The usage methods; :class:`~peergpu.client.PeerGPU` provides ``_http``."""

    _http: HttpSession

    def usage(
        self,
        *,
        org_id: Id | None = None,
        api_key_id: Id | None = None,
        model: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[UsageLine]:
        """Your wallet's inference requests (an organization's with ``org_id``; an
        organization key sees its organization's), newest first; only one key's, one
        model's, or those in ``[since, until)``."""
        params = {
            **_filters(org_id, api_key_id, model, since, until),
            "limit": limit,
            "offset": offset,
        }
        body = self._http.request("GET", "/usage", params=params).json()
        return Page[UsageLine].model_validate(body)

    def usage_summary(
        self,
        *,
        group_by: GroupBy = "model",
        org_id: Id | None = None,
        api_key_id: Id | None = None,
        model: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
    ) -> UsageSummary:
        """Requests, tokens and cost per API key, model or UTC day, and in all, from
        ``since`` (the server's default: 30 days ago) to ``until`` (now)."""
        params = {**_filters(org_id, api_key_id, model, since, until), "group_by": group_by}
        body = self._http.request("GET", "/usage/summary", params=params).json()
        return UsageSummary.model_validate(body)


def _filters(
    org_id: Id | None,
    api_key_id: Id | None,
    model: str | None,
    since: datetime | str | None,
    until: datetime | str | None,
) -> dict[str, Any]:
    return {
        "org_id": None if org_id is None else str(org_id),
        "api_key_id": None if api_key_id is None else str(api_key_id),
        "model": model,
        "since": since.isoformat() if isinstance(since, datetime) else since,
        "until": until.isoformat() if isinstance(until, datetime) else until,
    }
