"""Stripe upkeep, in its own loop so that a slow or unreachable Stripe holds up nothing else.

Every ``UPKEEP_SECONDS`` each replica:

- starts automatic top-ups for wallets under their threshold (``topups.auto_topup_if_low``
  claims each wallet's attempt with a conditional UPDATE, so replicas never charge twice) and
  re-sends those whose outcome was unknown, with the same idempotency key;
- re-sends payouts whose Transfer had no answer (same idempotency key);
- pays out hosts whose payable balance reached ``payout_auto_threshold_micros``.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import or_, select

from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import BillingProfileModel
from peergpu.server.services.billing import accounts, ledger, payouts, topups

logger = logging.getLogger(__name__)

UPKEEP_SECONDS = 15.0


async def run_payments_upkeep(context: ServerContext) -> None:
    """The upkeep loop of one replica (only when Stripe is configured); runs until cancelled."""
    while True:
        try:
            await upkeep_once(context)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("payments upkeep failed; retrying")
        await asyncio.sleep(UPKEEP_SECONDS)


async def upkeep_once(context: ServerContext) -> None:
    low = await _wallets_due_a_top_up(context)
    if low:
        await topups.auto_topup_if_low(context=context, wallets=low)
    await payouts.retry_pending_payouts(context=context)
    await payouts.pay_out_above_threshold(context=context)


async def _wallets_due_a_top_up(context: ServerContext) -> list[str]:
    """Wallets with automatic top-up whose credit is under the threshold, or whose last
    attempt is still open (``auto_topup_if_low`` decides what to do with each)."""
    async with context.sessionmaker() as session:
        profiles = (
            await session.execute(
                select(
                    BillingProfileModel.wallet,
                    BillingProfileModel.auto_topup_below_micros,
                    BillingProfileModel.auto_topup_pending_id,
                ).where(
                    BillingProfileModel.auto_topup_below_micros.is_not(None),
                    BillingProfileModel.payment_method_id.is_not(None),
                    or_(
                        BillingProfileModel.auto_topup_pending_id.is_(None),
                        BillingProfileModel.auto_topup_pending_id.startswith(topups.ATTEMPT_PREFIX),
                        # A declined card's pause, or an intent whose webhook never came:
                        # after GIVE_UP_AFTER the mark no longer blocks a new attempt.
                        BillingProfileModel.auto_topup_pending_at < utcnow() - topups.GIVE_UP_AFTER,
                    ),
                )
            )
        ).all()
        if not profiles:
            return []
        balance = await ledger.balances(session, [accounts.available(w) for w, _, _ in profiles])
    return [
        wallet
        for wallet, below, pending in profiles
        if pending is not None or balance[accounts.available(wallet)] < (below or 0)
    ]
