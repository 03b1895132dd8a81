"""Per-key rate limits for the gateway, with OpenAI's ``x-ratelimit-*`` headers.

Two budgets per API key (or per user, for a session token), each a one-minute window on the
shared rate limiter (Redis in production, in-process in the embedded mode): requests, and
tokens (a request is charged its prompt estimate plus its ``max_tokens`` up front; without a
``max_tokens``, the completion's tokens once it is done). Every
answer carries ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*``
(``"1s"``, ``"6m0s"``); a refused request is a 429 with ``Retry-After``.

Tokens counted after an answer are not a limiter call of their own: :class:`TokenDebts` keeps
them on this replica and the caller's next admission charges them in the same round trip
(before its own budgets, and whether or not it is admitted: they were used). A flush every
second charges what is still owed, so other replicas see it within a second.
"""

from __future__ import annotations

import asyncio
import logging
import math

from peergpu.server.context import ServerContext
from peergpu.server.gateway.errors import OpenAIError
from peergpu.server.ratelimit.base import Hit, RateLimitResult
from peergpu.server.security.principal import Principal

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
FLUSH_SECONDS = 1.0
_KINDS = ("requests", "tokens")
#: The "limit" of a charge that must land whatever the budget says (tokens already used).
_UNBOUNDED = 2**53


class TokenDebts:
    """Tokens counted after answers, owed to their callers' token budgets on this replica."""

    def __init__(self) -> None:
        self._owed: dict[str, int] = {}

    def add(self, who: str, tokens: int) -> None:
        if tokens > 0:
            self._owed[who] = self._owed.get(who, 0) + tokens

    def take(self, who: str) -> int:
        return self._owed.pop(who, 0)

    def take_all(self) -> dict[str, int]:
        owed, self._owed = self._owed, {}
        return owed

    def __len__(self) -> int:
        return len(self._owed)


async def admit(
    context: ServerContext,
    principal: Principal,
    *,
    tokens: int = 0,
    debts: TokenDebts | None = None,
) -> dict[str, str]:
    """Spend one request (and ``tokens``) of the caller's budgets; the headers to send. Raises
    a 429 :class:`OpenAIError` (with the same headers and ``Retry-After``) when either budget
    is spent. A request refused for requests spends no tokens; one refused for tokens has
    spent its request (the request budget is checked first). What the caller owes from
    earlier answers (``debts``) is charged first, admitted or not. All of it is one round trip
    to the limiter (:meth:`~peergpu.server.ratelimit.RateLimiter.hit_chain`)."""
    settings = context.settings
    who = _who(principal)
    owed = debts.take(who) if debts is not None else 0
    hits = [Hit(f"gateway:tokens:{who}", _UNBOUNDED, owed)] if owed else []
    hits.append(Hit(f"gateway:requests:{who}", settings.gateway_requests_per_minute))
    if tokens > 0:
        hits.append(Hit(f"gateway:tokens:{who}", settings.gateway_tokens_per_minute, tokens))
    try:
        results = await context.rate_limiter.hit_chain(hits, window_seconds=WINDOW_SECONDS)
    except BaseException:
        if debts is not None:
            debts.add(who, owed)  # not charged: the next admission or flush tries again
        raise
    headers: dict[str, str] = {}
    for kind, result in zip(_KINDS, results[1:] if owed else results, strict=False):
        headers |= _headers(kind, result)
        if not result.allowed:
            raise _refused(kind, result, headers)
    return headers


def owe_tokens(debts: TokenDebts, principal: Principal, tokens: int) -> None:
    """Tokens counted after the answer (a completion with no ``max_tokens`` had none charged
    up front): charged with the caller's next admission on this replica, or the next flush."""
    debts.add(_who(principal), tokens)


async def flush_debts(context: ServerContext, debts: TokenDebts) -> None:
    """Charge everything owed now, one limiter call per caller (their keys share a slot)."""
    owed = debts.take_all()

    async def charge(who: str, tokens: int) -> None:
        hit = Hit(f"gateway:tokens:{who}", _UNBOUNDED, tokens)
        await context.rate_limiter.hit_chain([hit], window_seconds=WINDOW_SECONDS)

    results = await asyncio.gather(
        *(charge(who, tokens) for who, tokens in owed.items()), return_exceptions=True
    )
    failed = sum(isinstance(result, Exception) for result in results)
    if failed:  # the limiter fails open by itself; this is anything else it raised
        logger.warning("gateway: could not charge tokens to %d rate-limit budgets", failed)


async def run_debt_flusher(
    context: ServerContext, debts: TokenDebts, *, every: float = FLUSH_SECONDS
) -> None:
    """Flush ``debts`` every ``every`` seconds until cancelled."""
    while True:
        await asyncio.sleep(every)
        if len(debts):
            await flush_debts(context, debts)


def _who(principal: Principal) -> str:
    # In braces: a Redis Cluster hash tag, so one caller's budgets share a slot (one script).
    return "{" + str(principal.api_key_id or principal.user_id) + "}"


def reset_text(seconds: float) -> str:
    """OpenAI's duration format: ``"1s"``, ``"250ms"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def _headers(kind: str, result: RateLimitResult) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(result.limit),
        f"x-ratelimit-remaining-{kind}": str(max(result.remaining, 0)),
        f"x-ratelimit-reset-{kind}": reset_text(result.reset_after),
    }


def _refused(kind: str, result: RateLimitResult, headers: dict[str, str]) -> OpenAIError:
    wait = max(1, math.ceil(result.retry_after))
    return OpenAIError(
        429,
        f"Rate limit reached for {kind} per minute: limit {result.limit}. Try again in "
        f"{reset_text(result.retry_after)}.",
        type=kind,
        code="rate_limit_exceeded",
        headers={**headers, "Retry-After": str(wait)},
    )
