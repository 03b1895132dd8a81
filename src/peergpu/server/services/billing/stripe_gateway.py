"""The one door to Stripe: a thin, typed wrapper over the official SDK's async calls.

Everything that talks to Stripe goes through :class:`StripeGateway`, which

- builds one ``stripe.StripeClient`` per use from settings (``stripe_api_base`` /
  ``stripe_connect_base`` point it at a fake in tests), on ``httpx`` with a bounded timeout and a
  few network retries (the SDK retries connection errors, 409s and 5xx with backoff, reusing the
  request's ``Idempotency-Key``);
- returns small dataclasses instead of SDK objects, so the services never depend on them;
- translates the SDK's exceptions into our domain errors, here and nowhere else::

      stripe.IdempotencyError           -> IdempotencyKeyReused (409): same key, other params
      stripe.CardError                  -> StripeRefused (409, code card_declined)
      stripe.InvalidRequestError,
      stripe.PermissionError            -> StripeRefused (409): Stripe said no, definitively
      stripe.AuthenticationError        -> StripeUnavailable (503, payments_misconfigured)
      anything else (network, 5xx, 429) -> StripeUnavailable (503): the outcome is unknown

``StripeRefused`` means the request was *not* carried out; ``StripeUnavailable`` means it may or
may not have been, so a caller that must know re-sends it with the same idempotency key.

Callers never hold a database transaction open across a gateway call: commit, call, then
record the result in a new transaction.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import stripe
from stripe._base_address import BaseAddresses

from peergpu.config import ServerSettings
from peergpu.errors import Conflict, ServiceUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds one HTTP request to Stripe may take before it counts as a network failure.
TIMEOUT_SECONDS = 30.0
#: Extra attempts the SDK makes on network errors, 409s and 5xx (same Idempotency-Key).
NETWORK_RETRIES = 2


class StripeRefused(Conflict):
    """Stripe refused the request: nothing was done, and re-sending it will not help."""

    code = "stripe_refused"


class StripeUnavailable(ServiceUnavailable):
    """Stripe could not be reached or failed: the request may or may not have taken effect."""

    code = "stripe_unavailable"


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"


def require_stripe(settings: ServerSettings) -> None:
    """Refuse card payments and payouts on a server without Stripe keys."""
    if not settings.stripe_enabled:
        raise ServiceUnavailable(
            "Card payments are not set up on this server; ask an administrator for credit.",
            code="payments_not_configured",
        )


@dataclass(frozen=True)
class CheckoutInfo:
    id: str
    url: str
    amount_total_cents: int


@dataclass(frozen=True)
class PaymentIntentInfo:
    id: str
    status: str


@dataclass(frozen=True)
class AccountInfo:
    id: str
    details_submitted: bool
    payouts_enabled: bool


@dataclass(frozen=True)
class AccountLinkInfo:
    url: str
    expires_at: datetime | None


@asynccontextmanager
async def open_gateway(settings: ServerSettings) -> AsyncIterator[StripeGateway]:
    """A gateway for the duration of the block; its HTTP connections close afterwards."""
    require_stripe(settings)
    gateway = StripeGateway(settings)
    try:
        yield gateway
    finally:
        await gateway.close()


class StripeGateway:
    """Typed calls to the Stripe endpoints PeerGPU uses (see the module docstring)."""

    def __init__(self, settings: ServerSettings) -> None:
        bases: BaseAddresses = {}
        if settings.stripe_api_base:
            bases["api"] = settings.stripe_api_base.rstrip("/")
        if settings.stripe_connect_base:
            bases["connect"] = settings.stripe_connect_base.rstrip("/")
        self._http = stripe.HTTPXClient(timeout=TIMEOUT_SECONDS)
        self._client = stripe.StripeClient(
            settings.stripe_secret_key.get_secret_value(),
            base_addresses=bases,
            http_client=self._http,
            max_network_retries=NETWORK_RETRIES,
        )

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def create_customer(self, *, wallet: str, email: str, idempotency_key: str) -> str:
        """A Customer for a wallet; the key makes concurrent first top-ups share one."""
        customer = await _call(
            "create a customer",
            self._client.v1.customers.create_async(
                params={"email": email, "metadata": {"wallet": wallet}},
                options={"idempotency_key": idempotency_key},
            ),
        )
        return str(customer.id)

    async def create_checkout_session(
        self,
        *,
        customer: str,
        wallet: str,
        user_id: str,
        amount_cents: int,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> CheckoutInfo:
        """A one-item payment-mode Checkout Session that saves the card for later top-ups."""
        session = await _call(
            "create a checkout session",
            self._client.v1.checkout.sessions.create_async(
                params={
                    "mode": "payment",
                    "customer": customer,
                    "client_reference_id": wallet,
                    "line_items": [
                        {
                            "quantity": 1,
                            "price_data": {
                                "currency": "usd",
                                "unit_amount": amount_cents,
                                "product_data": {"name": "PeerGPU credit"},
                            },
                        }
                    ],
                    "metadata": {"wallet": wallet, "user_id": user_id},
                    "payment_intent_data": {
                        "metadata": {"wallet": wallet},
                        "setup_future_usage": "off_session",
                    },
                    "success_url": success_url,
                    "cancel_url": cancel_url,
                },
                options={"idempotency_key": idempotency_key},
            ),
        )
        return CheckoutInfo(
            id=str(session.id),
            url=str(session.url or ""),
            amount_total_cents=int(session.amount_total or 0),
        )

    async def create_payment_intent(
        self,
        *,
        customer: str,
        payment_method: str,
        amount_cents: int,
        metadata: dict[str, str],
        idempotency_key: str,
    ) -> PaymentIntentInfo:
        """Charge a saved card now, without the customer present (an automatic top-up)."""
        intent = await _call(
            "create a payment intent",
            self._client.v1.payment_intents.create_async(
                params={
                    "amount": amount_cents,
                    "currency": "usd",
                    "customer": customer,
                    "payment_method": payment_method,
                    "off_session": True,
                    "confirm": True,
                    "description": "PeerGPU automatic top-up",
                    "metadata": metadata,
                },
                options={"idempotency_key": idempotency_key},
            ),
        )
        return PaymentIntentInfo(id=str(intent.id), status=str(intent.status))

    async def create_express_account(
        self, *, email: str, user_id: str, idempotency_key: str
    ) -> AccountInfo:
        account = await _call(
            "create a connected account",
            self._client.v1.accounts.create_async(
                params={
                    "type": "express",
                    "email": email,
                    "capabilities": {"transfers": {"requested": True}},
                    "metadata": {"user_id": user_id},
                },
                options={"idempotency_key": idempotency_key},
            ),
        )
        return _account(account)

    async def retrieve_account(self, account_id: str) -> AccountInfo:
        account = await _call(
            "read a connected account", self._client.v1.accounts.retrieve_async(account_id)
        )
        return _account(account)

    async def create_account_link(
        self, *, account_id: str, refresh_url: str, return_url: str
    ) -> AccountLinkInfo:
        """A one-time onboarding link (it expires within minutes; ask for a new one then)."""
        link = await _call(
            "create an onboarding link",
            self._client.v1.account_links.create_async(
                params={
                    "account": account_id,
                    "type": "account_onboarding",
                    "refresh_url": refresh_url,
                    "return_url": return_url,
                }
            ),
        )
        expires = getattr(link, "expires_at", None)
        return AccountLinkInfo(
            url=str(link.url),
            expires_at=datetime.fromtimestamp(int(expires), UTC) if expires else None,
        )

    async def create_transfer(
        self,
        *,
        amount_cents: int,
        destination: str,
        metadata: dict[str, str],
        idempotency_key: str,
    ) -> str:
        """Move money to a connected account; the same key always yields the same transfer."""
        created = await _call(
            "create a transfer",
            self._client.v1.transfers.create_async(
                params={
                    "amount": amount_cents,
                    "currency": "usd",
                    "destination": destination,
                    "metadata": metadata,
                },
                options={"idempotency_key": idempotency_key},
            ),
        )
        return str(created.id)


def _account(account: Any) -> AccountInfo:
    return AccountInfo(
        id=str(account.id),
        details_submitted=bool(getattr(account, "details_submitted", False)),
        payouts_enabled=bool(getattr(account, "payouts_enabled", False)),
    )


async def _call(what: str, call: Awaitable[T]) -> T:
    """Await one SDK call and translate its failure (see the module docstring)."""
    try:
        return await call
    except stripe.IdempotencyError as exc:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used for a different request.",
            details=_details(exc),
        ) from exc
    except stripe.CardError as exc:
        raise StripeRefused(
            _message(exc, "The card was declined."), code="card_declined", details=_details(exc)
        ) from exc
    except (stripe.InvalidRequestError, stripe.PermissionError) as exc:
        raise StripeRefused(
            _message(exc, f"Stripe refused to {what}."), details=_details(exc)
        ) from exc
    except stripe.AuthenticationError as exc:
        logger.error("Stripe refused our API key while trying to %s", what)
        raise StripeUnavailable(
            "Card payments are misconfigured on this server; an administrator must fix it.",
            code="payments_misconfigured",
        ) from exc
    except stripe.StripeError as exc:
        logger.warning("Stripe failed to %s: %s", what, type(exc).__name__)
        raise StripeUnavailable(
            f"Stripe could not {what} right now; try again shortly.", details=_details(exc)
        ) from exc


def _message(exc: stripe.StripeError, fallback: str) -> str:
    return str(exc.user_message or "").strip() or fallback


def _details(exc: stripe.StripeError) -> dict[str, Any]:
    details: dict[str, Any] = {"stripe_error": type(exc).__name__}
    if exc.code:
        details["stripe_code"] = exc.code
    if exc.http_status:
        details["stripe_status"] = exc.http_status
    param = getattr(exc, "param", None)
    if param:
        details["stripe_param"] = param
    return details
