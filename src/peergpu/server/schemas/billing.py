"""Billing bodies: balances, transactions, receipts, earnings, estimates, settings, admin.

Amounts are integer micro-dollars (``*_micros``; 1 USD = 1,000,000); each comes with a
``*_usd`` string for people (``"$12.50"``).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, EmailStr, Field, model_validator

MAX_MICROS = 10**12


class BalancePublic(BaseModel):
    wallet: str
    available_micros: int
    held_micros: int
    available_usd: str
    held_usd: str
    monthly_cap_micros: int | None
    monthly_cap_left_micros: int | None
    auto_topup_below_micros: int | None
    auto_topup_amount_micros: int | None
    card_saved: bool


class TransactionPublic(BaseModel):
    id: uuid.UUID
    at: datetime
    kind: str
    memo: str
    job_id: uuid.UUID | None
    #: Change to the wallet's available credit and to its held credit.
    available_change_micros: int
    held_change_micros: int
    available_change_usd: str


class TransactionsPublic(BaseModel):
    data: list[TransactionPublic]
    count: int


class BillingSettingsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: uuid.UUID | None = None
    monthly_cap_micros: int | None = Field(default=None, ge=0, le=MAX_MICROS)
    auto_topup_below_micros: int | None = Field(default=None, ge=0, le=MAX_MICROS)
    auto_topup_amount_micros: int | None = Field(default=None, ge=500_000, le=MAX_MICROS)

    @model_validator(mode="after")
    def _auto_topup_pair(self) -> BillingSettingsUpdate:
        if (self.auto_topup_below_micros is None) != (self.auto_topup_amount_micros is None):
            raise ValueError(
                "set auto_topup_below_micros and auto_topup_amount_micros together (or neither)"
            )
        return self


class ChargePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    host_id: uuid.UUID
    price_per_gpu_hour_micros: int
    gpu_count: int
    hold_micros: int
    settled_at: datetime | None
    outcome: str | None
    billed_seconds: int
    charged_micros: int
    reason: str


class ReceiptPublic(BaseModel):
    job_id: uuid.UUID
    wallet: str
    state: str
    charges: list[ChargePublic]
    held_micros: int
    charged_micros: int
    refunded_micros: int
    total_micros: int
    total_usd: str
    settled: bool


class EarningDay(BaseModel):
    day: date
    jobs: int
    gpu_seconds: int
    earned_micros: int
    earned_usd: str


class EarningsPublic(BaseModel):
    payable_micros: int
    payable_usd: str
    paid_out_micros: int
    days: list[EarningDay]


class JobEstimate(BaseModel):
    wallet: str
    eligible_hosts: int
    free_hosts: int
    price_per_gpu_hour_micros: int | None
    cost_per_hour_micros: int | None
    run_seconds: int
    hold_micros: int | None
    hold_usd: str | None
    available_micros: int
    monthly_cap_left_micros: int | None
    enough_credit: bool
    message: str


class GrantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr | None = None
    user_id: uuid.UUID | None = None
    org_id: uuid.UUID | None = None
    amount_micros: int = Field(ge=1, le=MAX_MICROS)
    memo: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _one_target(self) -> GrantCreate:
        if sum(x is not None for x in (self.email, self.user_id, self.org_id)) != 1:
            raise ValueError("name exactly one of email, user_id or org_id")
        return self


class RefundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: uuid.UUID
    memo: str = Field(default="", max_length=500)
    platform_pays: bool = Field(
        default=False,
        description="the platform pays the refund and the host keeps its earnings "
        "(default: the charge is reversed, the host's share included)",
    )


class PostedPublic(BaseModel):
    """A transaction an admin asked for; ``created`` is False when it was already there."""

    transaction_ids: list[uuid.UUID]
    amount_micros: int
    amount_usd: str
    wallet: str


class LedgerCheckPublic(BaseModel):
    ok: bool
    transactions: int
    accounts: int
    total_micros: int
    unbalanced_transactions: list[str]
    unknown_accounts: list[str]
    stale_balances: list[dict[str, object]]
    holds_mismatched: list[dict[str, object]]
    negative_accounts: list[dict[str, object]]
