"""Per-key rate limits for the gateway, with OpenAI's ``x-ratelimit-*`` headers.

Two budgets per API key (or per user, for a session token), each a one-minute window on the
shared rate limiter (Redis in production, in-process in the embedded mode): requests, and
tokens (a request is charged its prompt estimate plus its ``max_tokens`` up front; without a
``max_tokens``, the completion's tokens once it is done). Every
answer carries ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*``
(``"1s"``, ``"6m0s"``); a refused request is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import math

from peergpu.server.context import ServerContext
from peergpu.server.gateway.errors import OpenAIError
from peergpu.server.ratelimit.base import Hit, RateLimitResult
from peergpu.server.security.principal import Principal

WINDOW_SECONDS = 60.0
_KINDS = ("requests", "tokens")


async def admit(context: ServerContext, principal: Principal, *, tokens: int = 0) -> dict[str, str]:
    """Spend one request (and ``tokens``) of the caller's budgets; the headers to send. Raises
    a 429 :class:`OpenAIError` (with the same headers and ``Retry-After``) when either budget
    is spent. A request refused for requests spends no tokens; one refused for tokens has
    spent its request (the request budget is checked first). Both budgets are one round trip
    to the limiter (:meth:`~peergpu.server.ratelimit.RateLimiter.hit_chain`)."""
    settings = context.settings
    who = _who(principal)
    hits = [Hit(f"gateway:requests:{who}", settings.gateway_requests_per_minute)]
    if tokens > 0:
        hits.append(Hit(f"gateway:tokens:{who}", settings.gateway_tokens_per_minute, tokens))
    results = await context.rate_limiter.hit_chain(hits, window_seconds=WINDOW_SECONDS)
    headers: dict[str, str] = {}
    for kind, result in zip(_KINDS, results, strict=False):
        headers |= _headers(kind, result)
        if not result.allowed:
            raise _refused(kind, result, headers)
    return headers


async def spend_tokens(context: ServerContext, principal: Principal, tokens: int) -> None:
    """Charge tokens counted after the answer (a completion with no ``max_tokens`` had none
    charged up front) to the caller's budget; later requests see them."""
    if tokens <= 0:
        return
    await context.rate_limiter.hit(
        f"gateway:tokens:{_who(principal)}",
        limit=context.settings.gateway_tokens_per_minute,
        window_seconds=WINDOW_SECONDS,
        cost=tokens,
    )


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
