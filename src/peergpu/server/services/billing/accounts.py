"""Ledger account codes: who owns an account and what it is for, readable in the code itself.

    user:<uuid>:available     a renter's (or an org's: org:<uuid>:...) spendable credit
    user:<uuid>:held          credit set aside for running jobs
    user:<uuid>:host_payable  what the platform owes a host owner
    platform:fees             the platform's fee income
    platform:stripe_clearing  money in and out through Stripe (negative: received from outside)
    platform:promotions       promotional and demo credit given away (negative by design)
    platform:refunds          refunds the platform paid itself, the host keeping its earnings

A *wallet* (``user:<uuid>`` or ``org:<uuid>``) is whoever pays for a job: the job's
organization when it was submitted in one, else its owner.
"""

from __future__ import annotations

import uuid
from enum import StrEnum


class AccountKind(StrEnum):
    available = "available"
    held = "held"
    host_payable = "host_payable"
    fees = "fees"
    stripe_clearing = "stripe_clearing"
    promotions = "promotions"
    refunds = "refunds"


PLATFORM = "platform"
PLATFORM_FEES = f"{PLATFORM}:{AccountKind.fees}"
STRIPE_CLEARING = f"{PLATFORM}:{AccountKind.stripe_clearing}"
PROMOTIONS = f"{PLATFORM}:{AccountKind.promotions}"
PLATFORM_REFUNDS = f"{PLATFORM}:{AccountKind.refunds}"

#: Platform accounts that mirror the outside world and so go negative by design.
_NEGATIVE_BY_DESIGN = frozenset({STRIPE_CLEARING, PROMOTIONS, PLATFORM_REFUNDS})
_PLATFORM_KINDS = (
    AccountKind.fees,
    AccountKind.stripe_clearing,
    AccountKind.promotions,
    AccountKind.refunds,
)


def wallet_of(*, owner_id: uuid.UUID, org_id: uuid.UUID | None) -> str:
    return f"org:{org_id}" if org_id is not None else f"user:{owner_id}"


def user_wallet(user_id: uuid.UUID) -> str:
    return f"user:{user_id}"


def org_wallet(org_id: uuid.UUID) -> str:
    return f"org:{org_id}"


def available(wallet: str) -> str:
    return f"{wallet}:{AccountKind.available}"


def held(wallet: str) -> str:
    return f"{wallet}:{AccountKind.held}"


def host_payable(user_id: uuid.UUID) -> str:
    return f"user:{user_id}:{AccountKind.host_payable}"


def describe(code: str) -> tuple[str, str, bool]:
    """``(kind, owner, allow_negative)`` of an account code; ``ValueError`` for a bad one."""
    owner, _, kind = code.rpartition(":")
    if kind not in AccountKind.__members__:
        raise ValueError(f"unknown ledger account kind in {code!r}")
    if owner == PLATFORM:
        if kind not in _PLATFORM_KINDS:
            raise ValueError(f"not a platform account: {code!r}")
        return kind, owner, code in _NEGATIVE_BY_DESIGN
    prefix, _, ident = owner.partition(":")
    if prefix not in ("user", "org"):
        raise ValueError(f"ledger account owner must be user:, org: or platform: {code!r}")
    uuid.UUID(ident)  # raises ValueError when malformed
    if kind in _PLATFORM_KINDS:
        raise ValueError(f"only the platform holds {kind} accounts: {code!r}")
    if kind == AccountKind.host_payable and prefix != "user":
        raise ValueError(f"host earnings belong to a user: {code!r}")
    return kind, owner, False
