"""Billing operations of :class:`~peergpu.client.PeerGPU`, kept in a mixin so the client
module stays readable: wallets, transactions, receipts, card top-ups, host earnings and
payouts, and the admins' grants, refunds and ledger check.

Amounts are integer micro-dollars (1 USD = 1,000,000); the server refuses fractions of a
cent where real money moves (top-ups, payouts). Operations that need Stripe (``checkout``,
``start_payout_onboarding``, ``request_payout``) raise :class:`PeerGPUError` 503
``payments_not_configured`` on a server without Stripe keys; a wallet without enough credit,
or a payout above what is payable, is a 402.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import Any, Final, Literal

from peergpu.client.http import HttpSession
from peergpu.client.models import (
    Balance,
    Checkout,
    Earnings,
    LedgerCheck,
    OnboardingLink,
    Page,
    Payout,
    PayoutAccount,
    Posted,
    Receipt,
    Transaction,
)


class Unset(Enum):
    """The type of :data:`UNSET`."""

    UNSET = "unset"


#: "leave this setting as it is" (``None`` clears a setting instead)
UNSET: Final = Unset.UNSET

Id = str | uuid.UUID
Setting = int | None | Literal[Unset.UNSET]


class BillingMixin:
    """The billing methods; :class:`~peergpu.client.PeerGPU` provides ``_http``."""

    _http: HttpSession

    # -- wallets ----------------------------------------------------------------------------

    def balance(self, *, org_id: Id | None = None) -> Balance:
        """Your wallet (or an organization's you belong to): available and held credit, the
        monthly cap and the automatic top-up."""
        return Balance.model_validate(self._get_json("/billing/balance", {"org_id": _id(org_id)}))

    def update_billing_settings(
        self,
        *,
        org_id: Id | None = None,
        monthly_cap_micros: Setting = UNSET,
        auto_topup_below_micros: Setting = UNSET,
        auto_topup_amount_micros: Setting = UNSET,
    ) -> Balance:
        """Change the wallet's settings and return the wallet. A setting left :data:`UNSET`
        keeps its value; ``None`` clears it (no cap, no automatic top-up). The two top-up
        settings go together (both numbers, or both ``None``; a 422 otherwise). An
        organization's settings need its admin role (403). Safe to repeat."""
        changes = {
            "monthly_cap_micros": monthly_cap_micros,
            "auto_topup_below_micros": auto_topup_below_micros,
            "auto_topup_amount_micros": auto_topup_amount_micros,
        }
        body: dict[str, Any] = {k: v for k, v in changes.items() if v is not UNSET}
        if org_id is not None:
            body["org_id"] = str(org_id)
        response = self._http.request("PUT", "/billing/settings", json_body=body, idempotent=True)
        return Balance.model_validate(response.json())

    def transactions(
        self,
        *,
        org_id: Id | None = None,
        kind: str | None = None,
        job_id: Id | None = None,
        since: datetime | str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[Transaction]:
        """The wallet's transactions, newest first: ``grant``, ``topup``, ``hold``, ``settle``,
        ``release``, ``refund``, ... (``kind``), only one job's (``job_id``), only those at or
        after ``since``."""
        params = {
            "org_id": _id(org_id),
            "kind": kind,
            "job_id": _id(job_id),
            "since": since.isoformat() if isinstance(since, datetime) else since,
            "limit": limit,
            "offset": offset,
        }
        return Page[Transaction].model_validate(self._get_json("/billing/transactions", params))

    def receipt(self, job_id: Id) -> Receipt:
        """What a job cost: each attempt's hold, billed seconds and charge, and refunds."""
        return Receipt.model_validate(self._get_json(f"/jobs/{job_id}/receipt"))

    def checkout(
        self, amount_micros: int, *, org_id: Id | None = None, idempotency_key: str | None = None
    ) -> Checkout:
        """Start a card top-up: returns a Stripe Checkout page to pay on (``url``). The wallet
        is credited once Stripe confirms the payment, not by this call. Whole cents, within
        the server's limits (422 ``invalid_amount`` otherwise).

        Idempotent like :meth:`submit_job`: the same ``idempotency_key`` (a fresh one when not
        given) and amount return the same checkout, so retries never open a second one."""
        body: dict[str, Any] = {"amount_micros": amount_micros}
        if org_id is not None:
            body["org_id"] = str(org_id)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = self._http.request(
            "POST", "/billing/checkout", json_body=body, headers=headers, idempotent=True
        )
        return Checkout.model_validate(response.json())

    # -- host owners ------------------------------------------------------------------------

    def earnings(self, *, days: int = 30) -> Earnings:
        """Your hosts' earnings for the last ``days`` days (after the platform fee), what is
        payable now and what was paid out."""
        return Earnings.model_validate(self._get_json("/host/earnings", {"days": days}))

    def payout_account(self) -> PayoutAccount:
        """Your payout account's state (refreshed from Stripe when it is configured) and what
        is payable now. Needs the host role."""
        return PayoutAccount.model_validate(self._get_json("/host/payout-account"))

    def start_payout_onboarding(self) -> OnboardingLink:
        """Open (or continue) Stripe onboarding for payouts: the link to fill in your details.
        Calling it again continues the same Stripe account with a fresh link."""
        response = self._http.request("POST", "/host/payout-account", idempotent=True)
        return OnboardingLink.model_validate(response.json())

    def request_payout(self, amount_micros: int | None = None) -> Payout:
        """Pay earnings out to your Stripe account: ``amount_micros`` (whole cents) or,
        when ``None``, everything payable. More than is payable is a 402, less than the
        server's minimum a 409. The answer is ``paid``, or ``pending`` when Stripe did not
        answer in time (the server retries it).

        Not retried after a dropped connection (the API takes no idempotency key): look at
        :meth:`payouts` before asking again."""
        body = {} if amount_micros is None else {"amount_micros": amount_micros}
        response = self._http.request("POST", "/host/payouts", json_body=body)
        return Payout.model_validate(response.json())

    def payouts(self, *, limit: int = 50, offset: int = 0) -> Page[Payout]:
        """Your payouts, newest first."""
        params = {"limit": limit, "offset": offset}
        return Page[Payout].model_validate(self._get_json("/host/payouts", params))

    # -- admins -----------------------------------------------------------------------------

    def admin_grant(
        self,
        amount_micros: int,
        *,
        email: str | None = None,
        user_id: Id | None = None,
        org_id: Id | None = None,
        memo: str = "",
        idempotency_key: str | None = None,
    ) -> Posted:
        """Give promotional credit to one user (by ``email`` or ``user_id``) or organization
        (admins only). Idempotent: a retry with the same ``idempotency_key`` (a fresh one when
        not given) is booked once."""
        body: dict[str, Any] = {
            "amount_micros": amount_micros,
            "memo": memo,
            "email": email,
            "user_id": _id(user_id),
            "org_id": _id(org_id),
        }
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = self._http.request(
            "POST",
            "/admin/billing/grants",
            json_body={k: v for k, v in body.items() if v is not None},
            headers=headers,
            idempotent=True,
        )
        return Posted.model_validate(response.json())

    def admin_refund(self, job_id: Id, *, memo: str = "", platform_pays: bool = False) -> Posted:
        """Refund what a job was charged (admins only): reversed, the host's share included, or
        with ``platform_pays`` paid by the platform while the host keeps its earnings. A job
        with nothing left to refund is a 409. Not retried after a dropped connection: check
        the job's :meth:`receipt`."""
        body = {"job_id": str(job_id), "memo": memo, "platform_pays": platform_pays}
        response = self._http.request("POST", "/admin/billing/refunds", json_body=body)
        return Posted.model_validate(response.json())

    def ledger_check(self) -> LedgerCheck:
        """Re-derive every balance from the ledger and report disagreements (admins only)."""
        return LedgerCheck.model_validate(self._get_json("/admin/billing/ledger-check"))

    # -- helpers ----------------------------------------------------------------------------

    def _get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._http.request("GET", path, params=params).json()


def _id(value: Id | None) -> str | None:
    return None if value is None else str(value)
