"""The gateway's per-key budgets on the real limiters (in-process, and Redis): tokens counted
after an answer are owed on the replica and charged with the caller's next admission, or by
the flush, so another replica sees them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from peergpu.config import ServerSettings
from peergpu.server.context import ServerContext
from peergpu.server.db.models import UserModel
from peergpu.server.gateway import limits
from peergpu.server.gateway.errors import OpenAIError
from peergpu.server.ratelimit import Hit
from peergpu.server.security.principal import Principal


@pytest.fixture
async def context(settings: ServerSettings) -> AsyncIterator[ServerContext]:
    budgets = {"gateway_requests_per_minute": 3, "gateway_tokens_per_minute": 100}
    ctx = ServerContext.build(settings.model_copy(update=budgets))
    try:
        yield ctx
    finally:
        await ctx.close()


def _caller() -> Principal:
    user = UserModel(id=uuid.uuid4(), email="budget@example.com")
    return Principal.for_session(user)


async def _tokens_left(context: ServerContext, caller: Principal) -> int:
    """What is left of the caller's token budget, spending none (a hit of more than the limit
    is refused, and a refused hit spends nothing)."""
    key = "gateway:tokens:{" + str(caller.user_id) + "}"
    [result] = await context.rate_limiter.hit_chain([Hit(key, 100, 101)], window_seconds=60)
    assert not result.allowed
    return result.remaining


async def test_owed_tokens_are_charged_with_the_next_admission(context: ServerContext) -> None:
    caller, debts = _caller(), limits.TokenDebts()
    first = await limits.admit(context, caller, tokens=10, debts=debts)
    assert first["x-ratelimit-remaining-tokens"] == "90"
    limits.owe_tokens(debts, caller, 50)
    second = await limits.admit(context, caller, tokens=10, debts=debts)
    assert second["x-ratelimit-remaining-tokens"] == "30"  # 100 - 10 - 50 owed - 10
    assert second["x-ratelimit-remaining-requests"] == "1"
    assert len(debts) == 0
    limits.owe_tokens(debts, caller, 25)
    # Refused for tokens (10 > 5 left), but the 25 owed were used: they are charged anyway.
    with pytest.raises(OpenAIError) as refused:
        await limits.admit(context, caller, tokens=10, debts=debts)
    assert refused.value.status == 429 and refused.value.type == "tokens"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "5"
    assert len(debts) == 0
    assert await _tokens_left(context, caller) == 5


async def test_a_request_refused_for_requests_still_pays_what_is_owed(
    context: ServerContext,
) -> None:
    caller, debts = _caller(), limits.TokenDebts()
    for _ in range(3):
        await limits.admit(context, caller, debts=debts)
    limits.owe_tokens(debts, caller, 40)
    with pytest.raises(OpenAIError) as refused:
        await limits.admit(context, caller, tokens=5, debts=debts)
    assert refused.value.type == "requests"
    assert await _tokens_left(context, caller) == 60  # the 40 owed, not the refused 5


async def test_another_replica_sees_owed_tokens_once_they_are_flushed(
    context: ServerContext,
) -> None:
    caller = _caller()
    here, there = limits.TokenDebts(), limits.TokenDebts()
    limits.owe_tokens(here, caller, 60)
    limits.owe_tokens(here, _caller(), 7)  # someone else's, flushed in the same pass
    seen = await limits.admit(context, caller, tokens=1, debts=there)
    assert seen["x-ratelimit-remaining-tokens"] == "99"  # not charged yet
    await limits.flush_debts(context, here)
    assert len(here) == 0
    seen = await limits.admit(context, caller, tokens=1, debts=there)
    assert seen["x-ratelimit-remaining-tokens"] == "38"


async def test_the_flusher_charges_debts_every_interval(context: ServerContext) -> None:
    caller, debts = _caller(), limits.TokenDebts()
    flusher = asyncio.create_task(limits.run_debt_flusher(context, debts, every=0.02))
    try:
        limits.owe_tokens(debts, caller, 30)
        limits.owe_tokens(debts, caller, 0)  # nothing: no entry
        for _ in range(200):
            if await _tokens_left(context, caller) == 70:
                break
            await asyncio.sleep(0.01)
        assert len(debts) == 0
        assert await _tokens_left(context, caller) == 70
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
