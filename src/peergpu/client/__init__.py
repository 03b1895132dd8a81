"""The PeerGPU Python SDK: a typed client over the REST API (httpx).

    from peergpu.client import PeerGPU, zip_directory

See :class:`PeerGPU` for the operations and :mod:`peergpu.client.errors` for what they raise.
The ``peergpu`` CLI is built on this package.
"""

from __future__ import annotations

from peergpu.client.bundles import zip_directory
from peergpu.client.client import PeerGPU
from peergpu.client.errors import (
    BundleError,
    ClientError,
    DownloadError,
    PeerGPUError,
    PeerGPUUnavailable,
    UnsafePath,
)
from peergpu.client.models import (
    FINAL_STATES,
    Artifact,
    Balance,
    BundleInfo,
    Charge,
    Checkout,
    EarningDay,
    Earnings,
    EnrollmentToken,
    Host,
    Job,
    JobEstimate,
    JobEvent,
    JobUpdate,
    LedgerCheck,
    LogLine,
    LogPage,
    MarketHost,
    OnboardingLink,
    Page,
    Payout,
    PayoutAccount,
    Posted,
    Receipt,
    TokenPair,
    Transaction,
    User,
)

__all__ = [
    "FINAL_STATES",
    "Artifact",
    "Balance",
    "BundleError",
    "BundleInfo",
    "Charge",
    "Checkout",
    "ClientError",
    "DownloadError",
    "EarningDay",
    "Earnings",
    "EnrollmentToken",
    "Host",
    "Job",
    "JobEstimate",
    "JobEvent",
    "JobUpdate",
    "LedgerCheck",
    "LogLine",
    "LogPage",
    "MarketHost",
    "OnboardingLink",
    "Page",
    "Payout",
    "PayoutAccount",
    "PeerGPU",
    "PeerGPUError",
    "PeerGPUUnavailable",
    "Posted",
    "Receipt",
    "TokenPair",
    "Transaction",
    "UnsafePath",
    "User",
    "zip_directory",
]
