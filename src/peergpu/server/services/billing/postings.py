"""Every kind of money movement as a ledger posting, and the arithmetic behind them.

Pure functions: they build :class:`~.ledger.Posting` objects and never touch the database, so
the services and the property tests share one definition of each movement. Each posting's
idempotency key names the real-world event it records (a Stripe object, a job attempt, a
payout), so recording the same event twice is a no-op.

Rounding: a usage charge rounds *up* to the micro-dollar (``ceil``); the platform fee rounds
half up; the host gets the charge minus the fee, so the three always add up exactly.
"""

from __future__ import annotations

import uuid

from peergpu.server.services.billing import accounts
from peergpu.server.services.billing.ledger import Posting, transfer

MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000
SECONDS_PER_HOUR = 3600


def usage_cost(*, price_per_gpu_hour_micros: int, gpu_count: int, seconds: int) -> int:
    """What ``gpu_count`` GPUs at the price cost for ``seconds`` seconds, rounded up."""
    units = price_per_gpu_hour_micros * gpu_count * seconds
    return -(-units // SECONDS_PER_HOUR)


def split_fee(charge_micros: int, fee_bps: int) -> tuple[int, int]:
    """``(platform fee, host share)`` of a charge; the fee rounds half up."""
    fee = (charge_micros * fee_bps + 5_000) // 10_000
    return fee, charge_micros - fee


def grant(
    *, wallet: str, amount: int, key: str, memo: str = "", actor_id: uuid.UUID | None = None
) -> Posting:
    """Promotional or demo credit (an admin's grant, sign-up credit)."""
    return transfer(
        key,
        "grant",
        source=accounts.PROMOTIONS,
        target=accounts.available(wallet),
        amount=amount,
        memo=memo,
        actor_id=actor_id,
    )


def topup(*, wallet: str, amount: int, key: str, details: dict[str, object]) -> Posting:
    """Money received through Stripe (Checkout, or an automatic top-up)."""
    return transfer(
        key,
        "topup",
        source=accounts.STRIPE_CLEARING,
        target=accounts.available(wallet),
        amount=amount,
        memo="Credit bought by card.",
        details=details,
    )


def hold(*, wallet: str, job_id: uuid.UUID, attempt: int, amount: int) -> Posting:
    """Credit set aside when a job attempt is assigned."""
    return transfer(
        f"hold:{job_id}:{attempt}",
        "hold",
        source=accounts.available(wallet),
        target=accounts.held(wallet),
        amount=amount,
        job_id=job_id,
        memo=f"Hold for job {job_id} (attempt {attempt}).",
    )


def settle(
    *,
    wallet: str,
    job_id: uuid.UUID,
    attempt: int,
    hold_micros: int,
    charged_micros: int,
    fee_micros: int,
    host_owner_id: uuid.UUID,
    memo: str,
    details: dict[str, object],
) -> Posting:
    """End of an attempt: the hold is emptied, the charge split between the platform's fee and
    the host, and the rest of the hold goes back to the renter's available credit."""
    if not 0 <= charged_micros <= hold_micros:
        raise ValueError(f"charge {charged_micros} outside the hold {hold_micros}")
    if not 0 <= fee_micros <= charged_micros:
        raise ValueError(f"fee {fee_micros} outside the charge {charged_micros}")
    entries = [
        (accounts.held(wallet), -hold_micros),
        (accounts.available(wallet), hold_micros - charged_micros),
        (accounts.PLATFORM_FEES, fee_micros),
        (accounts.host_payable(host_owner_id), charged_micros - fee_micros),
    ]
    kept = tuple((code, amount) for code, amount in entries if amount)
    return Posting(
        key=f"settle:{job_id}:{attempt}",
        kind="settle" if charged_micros else "release",
        # A zero hold (a free host) still records that the attempt was settled.
        entries=kept or ((accounts.held(wallet), 0), (accounts.available(wallet), 0)),
        job_id=job_id,
        memo=memo,
        details=details,
    )


def refund_job(
    *,
    wallet: str,
    job_id: uuid.UUID,
    settle_transaction_id: uuid.UUID,
    charged_micros: int,
    fee_micros: int,
    host_owner_id: uuid.UUID,
    actor_id: uuid.UUID | None,
    memo: str,
) -> Posting:
    """An admin's refund of a settled charge: the reverse of its charge. The host's share comes
    back out of host payable even if that was paid out already (the host then owes it)."""
    host_share = charged_micros - fee_micros
    payable = accounts.host_payable(host_owner_id)
    entries = [
        (accounts.available(wallet), charged_micros),
        (accounts.PLATFORM_FEES, -fee_micros),
        (payable, -host_share),
    ]
    return Posting(
        key=f"refund:{settle_transaction_id}",
        kind="refund",
        entries=tuple((code, amount) for code, amount in entries if amount),
        job_id=job_id,
        reverses_id=settle_transaction_id,
        actor_id=actor_id,
        memo=memo,
        may_go_negative=frozenset({payable}),
    )


def refund_job_by_platform(
    *,
    wallet: str,
    job_id: uuid.UUID,
    settle_transaction_id: uuid.UUID,
    charged_micros: int,
    actor_id: uuid.UUID | None,
    memo: str,
) -> Posting:
    """A refund the platform pays itself (its own error, goodwill): the renter gets the charge
    back from ``platform:refunds`` and the host keeps what it earned."""
    return transfer(
        f"refund:{settle_transaction_id}",
        "refund",
        source=accounts.PLATFORM_REFUNDS,
        target=accounts.available(wallet),
        amount=charged_micros,
        job_id=job_id,
        actor_id=actor_id,
        memo=memo,
        details={"paid_by": "platform"},
    )


def payout(*, user_id: uuid.UUID, amount: int, payout_id: uuid.UUID) -> Posting:
    """Host payable leaves for the host's connected account (booked before the Transfer)."""
    return transfer(
        f"payout:{payout_id}",
        "payout",
        source=accounts.host_payable(user_id),
        target=accounts.STRIPE_CLEARING,
        amount=amount,
        memo="Payout to the connected Stripe account.",
        details={"payout_id": str(payout_id)},
    )


def payout_failed(*, user_id: uuid.UUID, amount: int, payout_id: uuid.UUID) -> Posting:
    """The Transfer was refused: the payout's amount is payable again."""
    return transfer(
        f"payout:{payout_id}:failed",
        "payout_failed",
        source=accounts.STRIPE_CLEARING,
        target=accounts.host_payable(user_id),
        amount=amount,
        memo="The payout's transfer failed; the amount is payable again.",
        details={"payout_id": str(payout_id)},
    )


def payout_reversed(
    *, user_id: uuid.UUID, amount: int, transfer_id: str, reversed_total: int
) -> Posting:
    """A Transfer (partly) reversed on Stripe: that much is payable to the host again. Keyed
    by the running total reversed, so each reversal step is applied once."""
    return transfer(
        f"stripe:{transfer_id}:reversed:{reversed_total}",
        "payout_reversed",
        source=accounts.STRIPE_CLEARING,
        target=accounts.host_payable(user_id),
        amount=amount,
        memo=f"Transfer {transfer_id} reversed.",
    )


def card_money_returned(*, wallet: str, amount: int, key: str, kind: str, memo: str) -> Posting:
    """A card refund or dispute takes bought credit back; the wallet may go negative (the
    renter then owes it, and jobs wait until it is paid)."""
    available = accounts.available(wallet)
    return transfer(
        key,
        kind,
        source=available,
        target=accounts.STRIPE_CLEARING,
        amount=amount,
        memo=memo,
        may_go_negative=frozenset({available}),
    )


def dispute_won(*, wallet: str, amount: int, dispute_id: str) -> Posting:
    """A dispute closed in our favour: the disputed credit comes back."""
    return transfer(
        f"stripe:{dispute_id}:won",
        "dispute_won",
        source=accounts.STRIPE_CLEARING,
        target=accounts.available(wallet),
        amount=amount,
        memo=f"Dispute {dispute_id} won.",
    )
