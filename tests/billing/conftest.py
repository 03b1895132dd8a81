"""Fixtures for the Stripe side of billing: a fake Stripe on loopback, and an app that uses it.

``stripe_client`` is the ``client`` fixture's twin with Stripe configured (keys, webhook secret,
API base pointing at ``fake_stripe``); both backends run, as everywhere. ``billing`` bundles the
steps the tests repeat: paying a checkout, delivering a signed event, reading balances.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from peergpu.config import ServerSettings
from peergpu.server.app import create_app
from peergpu.server.context import ServerContext
from peergpu.server.services.billing import accounts, ledger
from tests.billing.stripe_fake import FakeStripe, StripeObject
from tests.factories import ApiUser

WEBHOOK_PATH = "/api/v1/billing/stripe/webhook"


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
def stripe_settings(settings: ServerSettings, fake_stripe: FakeStripe) -> ServerSettings:
    return settings.model_copy(
        update={
            "stripe_secret_key": SecretStr(fake_stripe.api_key),
            "stripe_webhook_secret": SecretStr(fake_stripe.webhook_secret),
            "stripe_api_base": fake_stripe.base_url,
            "stripe_connect_base": fake_stripe.base_url,
            # Balances in these tests start at zero: every dollar comes from a card.
            "signup_credit_micros": 0,
        }
    )


@pytest.fixture
async def stripe_app(stripe_settings: ServerSettings) -> AsyncIterator[FastAPI]:
    application = create_app(stripe_settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def stripe_client(stripe_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=stripe_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
def stripe_context(stripe_app: FastAPI) -> ServerContext:
    context: ServerContext = stripe_app.state.context
    return context


@dataclass
class Billing:
    """The steps billing tests repeat, through the HTTP API and the fake Stripe."""

    client: httpx.AsyncClient
    fake: FakeStripe
    context: ServerContext

    async def deliver(self, payload: bytes, signature: str | None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        return await self.client.post(WEBHOOK_PATH, content=payload, headers=headers)

    async def send_event(self, type: str, obj: StripeObject, **kwargs: Any) -> dict[str, Any]:
        """Deliver a correctly signed event; its (200) acknowledgement."""
        response = await self.deliver(*self.fake.event(type, obj, **kwargs))
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def checkout(
        self, user: ApiUser, amount_micros: int, org_id: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"amount_micros": amount_micros}
        if org_id is not None:
            body["org_id"] = org_id
        response = await self.client.post(
            "/api/v1/billing/checkout", json=body, headers=user.headers
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def buy_credit(self, user: ApiUser, amount_micros: int) -> StripeObject:
        """Checkout, pay on 'Stripe', deliver the completed event: the paid session."""
        created = await self.checkout(user, amount_micros)
        paid = self.fake.pay_checkout(created["id"])
        ack = await self.send_event("checkout.session.completed", paid)
        assert ack["outcome"].startswith("credited"), ack
        return paid

    async def onboard(self, host: ApiUser) -> str:
        """Onboard a host to Connect and let Stripe enable payouts; the account id."""
        response = await self.client.post("/api/v1/host/payout-account", headers=host.headers)
        assert response.status_code == 200, response.text
        account_id = str(response.json()["stripe_account_id"])
        account = self.fake.update(account_id, details_submitted=True, payouts_enabled=True)
        ack = await self.send_event("account.updated", account, account=account_id)
        assert ack["outcome"] == "payouts enabled", ack
        return account_id

    async def balance(self, code: str) -> int:
        async with self.context.sessionmaker() as session:
            return (await ledger.balances(session, [code]))[code]

    async def available(self, user: ApiUser) -> int:
        return await self.balance(accounts.available(wallet_of(user)))

    async def payable(self, user: ApiUser) -> int:
        return await self.balance(accounts.host_payable(uuid.UUID(user.id)))

    async def give_payable(self, user: ApiUser, amount_micros: int) -> None:
        """Earnings for a host, straight from promotions (no job, so no hold to match)."""
        async with self.context.sessionmaker() as session:
            await ledger.post(
                session,
                ledger.transfer(
                    f"test-earnings:{uuid.uuid4()}",
                    "grant",
                    source=accounts.PROMOTIONS,
                    target=accounts.host_payable(uuid.UUID(user.id)),
                    amount=amount_micros,
                ),
            )
            await session.commit()


def wallet_of(user: ApiUser) -> str:
    return accounts.user_wallet(uuid.UUID(user.id))


@pytest.fixture
def billing(
    stripe_client: httpx.AsyncClient, fake_stripe: FakeStripe, stripe_context: ServerContext
) -> Billing:
    return Billing(client=stripe_client, fake=fake_stripe, context=stripe_context)
