"""HTTP bodies for card top-ups, Stripe webhooks and host payouts.

Amounts are integer micro-dollars (``*_micros``; 1 USD = 1,000,000); each comes with a
``*_usd`` display string such as ``"$25.00"``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Far above any real top-up or payout, far below what a 64-bit column holds.
MAX_MICROS = 10**13


class CheckoutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_micros: int = Field(
        gt=0,
        le=MAX_MICROS,
        description="credit to buy, in micro-dollars; whole cents, within the server's limits",
        examples=[25_000_000],
    )
    org_id: uuid.UUID | None = Field(
        default=None, description="top up this organization's wallet (admins and owners only)"
    )


class CheckoutCreated(BaseModel):
    id: str = Field(description="the Stripe Checkout Session id (cs_...)")
    url: str = Field(description="send the buyer here to pay")
    wallet: str = Field(description="the wallet credited once paid: user:<id> or org:<id>")
    amount_micros: int
    amount_usd: str


class WebhookAck(BaseModel):
    received: bool = True
    duplicate: bool = Field(description="the event was applied before; nothing changed")
    outcome: str = Field(description="what the event did, for Stripe's delivery log")


class PayoutAccountPublic(BaseModel):
    onboarded: bool = Field(description="Stripe has the host's details")
    stripe_account_id: str | None
    details_submitted: bool
    payouts_enabled: bool
    payable_micros: int = Field(description="earnings not paid out yet")
    payable_usd: str
    payout_min_micros: int
    payout_min_usd: str


class OnboardingLinkPublic(BaseModel):
    url: str = Field(description="Stripe's onboarding page; the link works once, briefly")
    stripe_account_id: str
    expires_at: datetime | None


class PayoutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_micros: int | None = Field(
        default=None,
        gt=0,
        le=MAX_MICROS,
        description="how much to pay out (whole cents); default: everything payable",
    )


class PayoutPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    amount_micros: int
    amount_usd: str
    state: Literal["pending", "paid", "failed", "reversed"] = Field(
        description="pending: booked, Stripe's answer awaited (retried automatically)"
    )
    stripe_transfer_id: str | None
    reversed_micros: int
    message: str
    created_at: datetime
    updated_at: datetime


class PayoutsPublic(BaseModel):
    data: list[PayoutPublic]
    count: int = Field(description="all of your payouts (for paging)")
