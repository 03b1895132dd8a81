"""What the SDK returns: small pydantic models of the server's JSON bodies.

They are parsed leniently: a field the server adds later is kept (``model_dump`` returns it, so
``--json`` output loses nothing) but never required, and most fields have defaults so an older
or newer server still parses. Money in ``*_micros`` fields is integer micro-dollars.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Job states after which nothing changes any more.
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "expired"})
MICROS_PER_DOLLAR = 1_000_000

T = TypeVar("T")


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def to_json(self) -> dict[str, Any]:
        """The body as JSON-ready data, unknown fields included."""
        return self.model_dump(mode="json")


class Page(ApiModel, Generic[T]):
    """One page of a list: ``items`` and the ``total`` matching the query. The server's
    ``{"data": [...], "count": n}`` lists are read into the same two fields."""

    items: list[T] = Field(default_factory=list)
    total: int = 0

    @model_validator(mode="before")
    @classmethod
    def _from_data_count(cls, value: Any) -> Any:
        return list_body(value)


def list_body(value: Any) -> Any:
    """``{"data", "count"}`` -> ``{"items", "total"}`` (both shapes are accepted)."""
    if isinstance(value, dict) and "items" not in value and "data" in value:
        value = {**value, "items": value["data"]}
        value.pop("data")
        if "count" in value and "total" not in value:
            value["total"] = value.pop("count")
        value.setdefault("total", len(value["items"]))
    return value


class TokenPair(ApiModel):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int = 0


class User(ApiModel):
    id: str
    email: str
    display_name: str = ""
    roles: list[str] = Field(default_factory=list)
    is_active: bool = True
    created_at: datetime | None = None


class Job(ApiModel):
    id: str
    state: str
    name: str = ""
    owner_id: str | None = None
    org_id: str | None = None
    image: str | None = None
    bundle_sha256: str | None = None
    command: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    gpu_count: int = 1
    min_vram_mib: int = 0
    gpu_models: list[str] = Field(default_factory=list)
    max_price_per_gpu_hour_micros: int | None = None
    max_cost_micros: int | None = None
    tags: list[str] = Field(default_factory=list)
    max_duration_seconds: int | None = None
    priority: int = 0
    network: bool = False
    max_retries: int = 0
    attempt: int = 0
    host_id: str | None = None
    gpu_indices: list[int] | None = None
    price_per_gpu_hour_micros: int | None = None
    created_at: datetime | None = None
    assigned_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    failure_reason: str | None = None
    message: str | None = None
    duration_seconds: float | None = None
    queue_expires_at: datetime | None = None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


class JobEvent(ApiModel):
    """One recorded state transition of a job."""

    to_state: str
    at: datetime | None = None
    from_state: str | None = None
    reason: str = ""
    message: str = ""
    host_id: str | None = None


class LogLine(ApiModel):
    """One line of a job's output. ``cursor`` is opaque: pass it back as ``after``."""

    cursor: str = ""
    attempt: int = 0
    seq: int = 0
    stream: str = "stdout"
    line: str = ""
    ts: float = 0.0


class LogPage(ApiModel):
    """``complete`` is true once the job has finished and every line has been returned."""

    lines: list[LogLine] = Field(default_factory=list)
    next_cursor: str | None = None
    complete: bool = False


@dataclass(frozen=True, slots=True)
class JobUpdate:
    """A state change seen while following a job's logs; ``end`` marks the last event."""

    job: Job
    end: bool = False


class BundleInfo(ApiModel):
    """An uploaded bundle, addressed by the SHA-256 of its bytes."""

    sha256: str
    size: int = 0
    members: int = 0
    uncompressed_bytes: int = 0


class Artifact(ApiModel):
    """A file a job produced. ``download_url`` is signed (no auth header) and valid for a while."""

    path: str
    size: int
    sha256: str
    download_url: str
    created_at: datetime | None = None


class MarketGpu(ApiModel):
    index: int = 0
    model: str = ""
    memory_total_mib: int = 0


class MarketHost(ApiModel):
    """A host as renters see it on the marketplace."""

    id: str
    name: str = ""
    region: str = ""
    tags: list[str] = Field(default_factory=list)
    price_per_gpu_hour_micros: int | None = None
    status: str = ""
    uptime_30d: float = 0.0
    gpus: list[MarketGpu] = Field(default_factory=list)
    free_gpus: int = 0

    @property
    def price_per_gpu_hour(self) -> Decimal | None:
        micros = self.price_per_gpu_hour_micros
        return None if micros is None else Decimal(micros) / MICROS_PER_DOLLAR


class HostGpu(ApiModel):
    index: int = 0
    uuid: str = ""
    model: str = ""
    memory_total_mib: int = 0
    driver_version: str = ""
    utilization_percent: float | None = None
    memory_used_mib: int | None = None
    temperature_c: float | None = None


class Host(ApiModel):
    """One of your own hosts (the owner's view: prices in dollars, paused, verified...)."""

    id: str
    name: str = ""
    region: str = ""
    tags: list[str] = Field(default_factory=list)
    price_per_gpu_hour: Decimal | None = None
    availability: str = ""
    status: str = ""
    paused: bool = False
    verified: bool = False
    hostname: str = ""
    uptime_30d: float = 0.0
    last_seen_at: datetime | None = None
    created_at: datetime | None = None
    gpus: list[HostGpu] = Field(default_factory=list)

    @property
    def price_per_gpu_hour_micros(self) -> int | None:
        price = self.price_per_gpu_hour
        return None if price is None else int(price * MICROS_PER_DOLLAR)


class EnrollmentToken(ApiModel):
    """A one-time host enrolment token and the command to run on the machine."""

    token: str
    command: str = ""
    expires_at: datetime | None = None


# -- billing ---------------------------------------------------------------------------------
# Amounts are integer micro-dollars (``*_micros``); the server adds ``*_usd`` strings for people.


class Balance(ApiModel):
    """A wallet (``user:<id>`` or ``org:<id>``): credit available, credit held by running jobs,
    and its settings. ``None`` caps and top-ups are not set."""

    wallet: str
    available_micros: int = 0
    held_micros: int = 0
    available_usd: str = ""
    held_usd: str = ""
    monthly_cap_micros: int | None = None
    monthly_cap_left_micros: int | None = None
    auto_topup_below_micros: int | None = None
    auto_topup_amount_micros: int | None = None
    card_saved: bool = False


class Transaction(ApiModel):
    """One ledger transaction as it touched the wallet: the change to available and to held
    credit (a hold moves credit from one to the other)."""

    id: str
    at: datetime | None = None
    kind: str = ""
    memo: str = ""
    job_id: str | None = None
    available_change_micros: int = 0
    held_change_micros: int = 0
    available_change_usd: str = ""


class Charge(ApiModel):
    """One attempt of a job on a host: what was held, then what was billed once it ended."""

    attempt: int = 0
    host_id: str | None = None
    price_per_gpu_hour_micros: int = 0
    gpu_count: int = 0
    hold_micros: int = 0
    settled_at: datetime | None = None
    outcome: str | None = None
    billed_seconds: int = 0
    charged_micros: int = 0
    reason: str = ""


class Receipt(ApiModel):
    """What a job cost: ``total_micros`` is charged minus refunded; ``settled`` once no
    attempt holds credit any more."""

    job_id: str
    wallet: str = ""
    state: str = ""
    charges: list[Charge] = Field(default_factory=list)
    held_micros: int = 0
    charged_micros: int = 0
    refunded_micros: int = 0
    total_micros: int = 0
    total_usd: str = ""
    settled: bool = False


class JobEstimate(ApiModel):
    """What a job would cost if submitted now, at the cheapest eligible host. ``hold_micros``
    is what the scheduler sets aside when it starts (``None`` when no host can run the job,
    or its cost cap buys no time); ``enough_credit`` says whether the wallet covers it."""

    wallet: str = ""
    eligible_hosts: int = 0
    free_hosts: int = 0
    price_per_gpu_hour_micros: int | None = None
    cost_per_hour_micros: int | None = None
    run_seconds: int = 0
    hold_micros: int | None = None
    hold_usd: str | None = None
    available_micros: int = 0
    monthly_cap_left_micros: int | None = None
    enough_credit: bool = False
    message: str = ""


class EarningDay(ApiModel):
    day: date
    jobs: int = 0
    gpu_seconds: int = 0
    earned_micros: int = 0
    earned_usd: str = ""


class Earnings(ApiModel):
    """A host owner's earnings (after the platform fee): per day, payable now, paid out."""

    payable_micros: int = 0
    payable_usd: str = ""
    paid_out_micros: int = 0
    days: list[EarningDay] = Field(default_factory=list)


class Checkout(ApiModel):
    """A card top-up waiting for payment: send the buyer to ``url``. The wallet is credited
    when the payment goes through, not before."""

    id: str
    url: str
    wallet: str = ""
    amount_micros: int = 0
    amount_usd: str = ""


class PayoutAccount(ApiModel):
    """A host owner's Stripe account for payouts, and what is payable now."""

    onboarded: bool = False
    stripe_account_id: str | None = None
    details_submitted: bool = False
    payouts_enabled: bool = False
    payable_micros: int = 0
    payable_usd: str = ""
    payout_min_micros: int = 0
    payout_min_usd: str = ""


class OnboardingLink(ApiModel):
    """Stripe's onboarding page for a host owner; the link works once, briefly."""

    url: str
    stripe_account_id: str = ""
    expires_at: datetime | None = None


class Payout(ApiModel):
    """Earnings paid to the host owner's Stripe account: ``pending`` (Stripe's answer
    awaited; retried by the server), ``paid``, ``failed`` or ``reversed``."""

    id: str
    amount_micros: int = 0
    amount_usd: str = ""
    state: str = ""
    stripe_transfer_id: str | None = None
    reversed_micros: int = 0
    message: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None


class Posted(ApiModel):
    """Ledger transactions an admin asked for (a grant, a refund). ``transaction_ids`` is
    empty when a retried grant was already booked."""

    transaction_ids: list[str] = Field(default_factory=list)
    amount_micros: int = 0
    amount_usd: str = ""
    wallet: str = ""


class LedgerCheck(ApiModel):
    """Every balance re-derived from the ledger's entries; ``ok`` when nothing disagrees."""

    ok: bool
    transactions: int = 0
    accounts: int = 0
    total_micros: int = 0
    unbalanced_transactions: list[str] = Field(default_factory=list)
    unknown_accounts: list[str] = Field(default_factory=list)
    stale_balances: list[dict[str, Any]] = Field(default_factory=list)
    holds_mismatched: list[dict[str, Any]] = Field(default_factory=list)
    negative_accounts: list[dict[str, Any]] = Field(default_factory=list)


def dollars_to_micros(dollars: Decimal | str | float | int) -> int:
    """``"2.49"`` -> ``2_490_000``; through ``Decimal`` so ``0.1`` stays exact."""
    return int(Decimal(str(dollars)) * MICROS_PER_DOLLAR)
