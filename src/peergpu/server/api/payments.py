"""Card top-ups (Stripe Checkout), Stripe's webhook, and host payouts (Stripe Connect)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import JSONResponse

from peergpu.server.api.deps import ContextDep, Reader, SessionDep, Writer
from peergpu.server.api.errors import error_response
from peergpu.server.api.responses import AUTHENTICATED, errors
from peergpu.server.db.billing_models import PayoutModel
from peergpu.server.schemas.payments import (
    CheckoutCreate,
    CheckoutCreated,
    OnboardingLinkPublic,
    PayoutAccountPublic,
    PayoutCreate,
    PayoutPublic,
    PayoutsPublic,
    WebhookAck,
)
from peergpu.server.services.billing import payouts, topups, webhooks
from peergpu.server.services.billing.ledger import format_usd

router = APIRouter(tags=["payments"])


@router.post(
    "/billing/checkout",
    status_code=status.HTTP_201_CREATED,
    responses={**AUTHENTICATED, **errors(404, 409, 503)},
)
async def create_checkout(
    body: CheckoutCreate,
    principal: Writer,
    session: SessionDep,
    context: ContextDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=100,
            description="the same key and amount return the same checkout (for 24 hours)",
        ),
    ] = None,
) -> CheckoutCreated:
    """Buy credit by card: returns a Stripe Checkout URL. The wallet is credited when Stripe
    confirms the payment (by webhook), not by this call."""
    checkout = await topups.create_checkout(
        session=session,
        settings=context.settings,
        principal=principal,
        amount_micros=body.amount_micros,
        org_id=body.org_id,
        idempotency_key=idempotency_key,
    )
    return CheckoutCreated(
        id=checkout.id,
        url=checkout.url,
        wallet=checkout.wallet,
        amount_micros=checkout.amount_micros,
        amount_usd=format_usd(checkout.amount_micros),
    )


@router.post(
    "/billing/stripe/webhook",
    response_model=WebhookAck,
    responses=errors(400, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def stripe_webhook(
    request: Request,
    context: ContextDep,
    stripe_signature: Annotated[
        str | None, Header(alias="Stripe-Signature", description="Stripe's HMAC signature")
    ] = None,
) -> JSONResponse:
    """Stripe's events (payments, refunds, disputes, connected accounts, transfers). Needs no
    credentials but a valid signature; each event is applied once, replays answer
    ``duplicate``."""
    payload = await request.body()
    try:
        result = await webhooks.handle(context=context, payload=payload, signature=stripe_signature)
    except webhooks.WebhookRejected as exc:
        return error_response(status.HTTP_400_BAD_REQUEST, exc.code, exc.message, exc.details)
    ack = WebhookAck(duplicate=result.duplicate, outcome=result.outcome)
    return JSONResponse(ack.model_dump())


@router.post("/host/payout-account", responses={**AUTHENTICATED, **errors(409, 503)})
async def start_payout_onboarding(
    principal: Writer, session: SessionDep, context: ContextDep
) -> OnboardingLinkPublic:
    """Open (or continue) Stripe Connect onboarding: returns the link to send the host to."""
    link = await payouts.start_onboarding(
        session=session, settings=context.settings, principal=principal
    )
    return OnboardingLinkPublic(
        url=link.url, stripe_account_id=link.stripe_account_id, expires_at=link.expires_at
    )


@router.get("/host/payout-account", responses=AUTHENTICATED)
async def read_payout_account(
    principal: Reader, session: SessionDep, context: ContextDep
) -> PayoutAccountPublic:
    """The caller's payout account (refreshed from Stripe) and what is payable now."""
    account = await payouts.payout_account_status(
        session=session, settings=context.settings, principal=principal
    )
    return PayoutAccountPublic(
        onboarded=account.onboarded,
        stripe_account_id=account.stripe_account_id,
        details_submitted=account.details_submitted,
        payouts_enabled=account.payouts_enabled,
        payable_micros=account.payable_micros,
        payable_usd=format_usd(account.payable_micros),
        payout_min_micros=account.payout_min_micros,
        payout_min_usd=format_usd(account.payout_min_micros),
    )


@router.post(
    "/host/payouts",
    status_code=status.HTTP_201_CREATED,
    responses={**AUTHENTICATED, **errors(402, 409, 503)},
)
async def create_payout(
    body: PayoutCreate, principal: Writer, session: SessionDep, context: ContextDep
) -> PayoutPublic:
    """Pay host earnings out to the connected Stripe account. The answer is ``paid``, or
    ``pending`` when Stripe did not answer (it is retried); a refusal is a 409 and the amount
    stays payable."""
    payout = await payouts.request_payout(
        session=session,
        settings=context.settings,
        principal=principal,
        amount_micros=body.amount_micros,
    )
    return _payout(payout)


@router.get("/host/payouts", responses=AUTHENTICATED)
async def list_payouts(
    principal: Reader,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> PayoutsPublic:
    """The caller's payouts, newest first."""
    rows, total = await payouts.list_payouts(
        session=session, principal=principal, limit=limit, offset=offset
    )
    return PayoutsPublic(data=[_payout(p) for p in rows], count=total)


def _payout(payout: PayoutModel) -> PayoutPublic:
    return PayoutPublic(
        id=payout.id,
        amount_micros=payout.amount_micros,
        amount_usd=format_usd(payout.amount_micros),
        state=payout.state,
        stripe_transfer_id=payout.stripe_transfer_id,
        reversed_micros=payout.reversed_micros,
        message=payout.message,
        created_at=payout.created_at,
        updated_at=payout.updated_at,
    )
