"""Money tables: the double-entry ledger, job charges, Stripe records and host payouts.

Every amount is an integer number of micro-dollars (1 USD = 1,000,000). The ledger is the
source of truth: a transaction is a set of entries that sums to zero, posted once per
idempotency key; an account's ``balance_micros`` is a cache of the sum of its entries, kept in
the same transaction and re-derivable (``peergpu admin ledger-check``).

Money records never cascade away with a user, a job or a host: they carry plain ids, not
foreign keys to those tables, so deleting an account leaves its books intact.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from peergpu.server.db.base import Base, CreatedAtMixin, IdMixin, utcnow


class LedgerAccountModel(CreatedAtMixin, Base):
    """One account; its code names it (``user:<id>:available``, ``platform:fees``...)."""

    __tablename__ = "ledger_accounts"

    code: Mapped[str] = mapped_column(String(80), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    #: ``user:<uuid>``, ``org:<uuid>`` or ``platform``.
    owner: Mapped[str] = mapped_column(String(48), index=True)
    balance_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    #: External and clearing accounts go negative by design; a renter's or host's never does
    #: unless a rule (a dispute, a reversed payout) makes it.
    allow_negative: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class LedgerTransactionModel(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "ledger_transactions"

    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    memo: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[uuid.UUID | None] = mapped_column(default=None, index=True)
    #: The transaction this one reverses (refunds, released holds are not reversals).
    reverses_id: Mapped[uuid.UUID | None] = mapped_column(default=None, unique=True)
    #: Who asked for it (an admin's grant or refund); None for the platform itself.
    actor_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    details: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)


class LedgerEntryModel(IdMixin, Base):
    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_entries_account_at", "account_code", "at"),)

    transaction_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ledger_transactions.id"), index=True
    )
    #: No foreign key to ``ledger_accounts``: its KEY SHARE locks on the hottest rows
    #: (``platform:fees``, busy wallets) cost more than they protect. ``post_many`` creates
    #: every account it posts to in the same transaction, and ``ledger.check`` verifies.
    account_code: Mapped[str] = mapped_column(String(80))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    #: The transaction's time, copied so an account's history pages on one index.
    at: Mapped[datetime] = mapped_column(default=utcnow)


class JobChargeModel(CreatedAtMixin, Base):
    """The money side of one attempt at a job: the hold placed when it was assigned, and how
    it was settled once the attempt ended."""

    __tablename__ = "job_charges"
    __table_args__ = (Index("ix_job_charges_open", "settled_at", "job_id"),)

    job_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Who pays: ``user:<uuid>`` or ``org:<uuid>``.
    wallet: Mapped[str] = mapped_column(String(48), index=True)
    host_id: Mapped[uuid.UUID]
    host_owner_id: Mapped[uuid.UUID] = mapped_column(index=True)
    price_per_gpu_hour_micros: Mapped[int] = mapped_column(BigInteger)
    gpu_count: Mapped[int] = mapped_column(Integer)
    hold_micros: Mapped[int] = mapped_column(BigInteger)
    settled_at: Mapped[datetime | None] = mapped_column(default=None)
    #: ``charged`` (the renter paid), ``released`` (nothing to pay), ``refunded``.
    outcome: Mapped[str | None] = mapped_column(String(16), default=None)
    billed_seconds: Mapped[int] = mapped_column(Integer, default=0)
    charged_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    fee_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    settle_transaction_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    reason: Mapped[str] = mapped_column(String(200), default="")


class BillingProfileModel(Base):
    """A wallet's settings: its Stripe customer, saved card, auto top-up and spending cap."""

    __tablename__ = "billing_profiles"

    wallet: Mapped[str] = mapped_column(String(48), primary_key=True)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(64), default=None)
    payment_method_id: Mapped[str | None] = mapped_column(String(64), default=None)
    auto_topup_below_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    auto_topup_amount_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    monthly_cap_micros: Mapped[int | None] = mapped_column(BigInteger, default=None)
    #: An automatic top-up is in flight (its PaymentIntent id); no second one starts meanwhile.
    auto_topup_pending_id: Mapped[str | None] = mapped_column(String(255), default=None)
    auto_topup_pending_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class CheckoutSessionModel(CreatedAtMixin, Base):
    """A Stripe Checkout Session we created: the webhook credits what we recorded here."""

    __tablename__ = "checkout_sessions"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    wallet: Mapped[str] = mapped_column(String(48), index=True)
    user_id: Mapped[uuid.UUID]
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="open")
    url: Mapped[str] = mapped_column(Text, default="")
    #: Known once paid: refunds and disputes name the payment, not the session.
    payment_intent_id: Mapped[str | None] = mapped_column(String(255), default=None, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)


class StripeEventModel(Base):
    """Every Stripe event applied, by id: a replayed webhook finds its row and changes nothing."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    outcome: Mapped[str] = mapped_column(String(200), default="")


class PayoutAccountModel(Base):
    """A host owner's Stripe Connect Express account."""

    __tablename__ = "payout_accounts"

    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    stripe_account_id: Mapped[str] = mapped_column(String(64), unique=True)
    details_submitted: Mapped[bool] = mapped_column(default=False)
    payouts_enabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PayoutModel(IdMixin, CreatedAtMixin, Base):
    """One payout of host payable to the host's connected account, by a Stripe Transfer."""

    __tablename__ = "payouts"

    user_id: Mapped[uuid.UUID] = mapped_column(index=True)
    stripe_account_id: Mapped[str] = mapped_column(String(64))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    #: ``pending`` (booked, transfer not confirmed), ``paid``, ``failed``, ``reversed``.
    state: Mapped[str] = mapped_column(String(16), default="pending")
    stripe_transfer_id: Mapped[str | None] = mapped_column(String(64), default=None, unique=True)
    reversed_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    message: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
