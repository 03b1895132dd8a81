"""The ledger's contract: balanced postings, replays change nothing, no overdraft, a clean check."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.services.billing import accounts, ledger
from peergpu.server.services.billing.ledger import InsufficientFunds, Posting, transfer


def _wallet() -> str:
    return accounts.user_wallet(uuid.uuid4())


async def test_a_top_up_moves_money_and_a_replay_changes_nothing(session: AsyncSession) -> None:
    wallet = _wallet()
    first = ledger.transfer(
        "topup:1",
        "topup",
        source=accounts.STRIPE_CLEARING,
        target=accounts.available(wallet),
        amount=25_000_000,
    )
    assert await ledger.post(session, first) is not None
    assert await ledger.post(session, first) is None
    await session.commit()
    got = await ledger.balances(session, [accounts.available(wallet), accounts.STRIPE_CLEARING])
    assert got == {accounts.available(wallet): 25_000_000, accounts.STRIPE_CLEARING: -25_000_000}
    report = await ledger.check(session)
    assert report.ok and report.transactions == 1 and report.total_micros == 0


async def test_an_overdraft_is_refused_and_leaves_nothing_behind(session: AsyncSession) -> None:
    wallet = _wallet()
    await ledger.post(
        session,
        transfer(
            "grant",
            "grant",
            source=accounts.PROMOTIONS,
            target=accounts.available(wallet),
            amount=1_000_000,
        ),
    )
    await session.commit()
    with pytest.raises(InsufficientFunds) as refused:
        await ledger.post(
            session,
            transfer(
                "hold",
                "hold",
                source=accounts.available(wallet),
                target=accounts.held(wallet),
                amount=1_000_001,
            ),
        )
    await session.rollback()
    assert refused.value.details["accounts"][0]["account"] == accounts.available(wallet)
    assert await ledger.balances(session, [accounts.held(wallet)]) == {accounts.held(wallet): 0}
    assert (await ledger.check(session)).ok


async def test_a_rule_may_drive_a_wallet_negative(session: AsyncSession) -> None:
    wallet = _wallet()
    dispute = Posting(
        key="dispute:1",
        kind="dispute",
        entries=((accounts.available(wallet), -5_000_000), (accounts.STRIPE_CLEARING, 5_000_000)),
        may_go_negative=frozenset({accounts.available(wallet)}),
    )
    await ledger.post(session, dispute)
    await session.commit()
    report = await ledger.check(session)
    assert report.ok
    assert report.negative_accounts == [
        {"account": accounts.available(wallet), "balance_micros": -5_000_000}
    ]


async def test_the_check_finds_a_stale_cache_and_repairs_it(session: AsyncSession) -> None:
    from sqlalchemy import update

    from peergpu.server.db.billing_models import LedgerAccountModel

    wallet = _wallet()
    await ledger.post(
        session,
        transfer(
            "g", "grant", source=accounts.PROMOTIONS, target=accounts.available(wallet), amount=7
        ),
    )
    await session.execute(
        update(LedgerAccountModel)
        .where(LedgerAccountModel.code == accounts.available(wallet))
        .values(balance_micros=8)
    )
    await session.commit()
    report = await ledger.check(session)
    assert not report.ok
    assert report.stale_balances == [
        {"account": accounts.available(wallet), "cached_micros": 8, "derived_micros": 7}
    ]
    await ledger.check(session, repair=True)
    await session.commit()
    assert (await ledger.check(session)).ok


def test_postings_that_do_not_balance_are_a_bug() -> None:
    with pytest.raises(ValueError, match="sum to zero"):
        Posting(key="k", kind="x", entries=((accounts.PLATFORM_FEES, 1),))


@pytest.mark.parametrize(
    "code",
    [
        "user:not-a-uuid:available",
        "platform:available",
        "org:6f1c1f5e-3d0b-4a43-9a53-1b2f3c4d5e6f:host_payable",
        "user:0b7e5c1a-8d2f-4e6b-9c3a-5d4e3f2a1b0c:fees",
        "nobody:x:held",
        "user:9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d:cash",
    ],
)
def test_bad_account_codes_are_refused(code: str) -> None:
    with pytest.raises(ValueError):
        accounts.describe(code)


def test_usd_formatting() -> None:
    assert ledger.format_usd(12_500_000) == "$12.50"
    assert ledger.format_usd(1_234_567) == "$1.234567"
    assert ledger.format_usd(-10_000) == "-$0.01"
    assert ledger.format_usd(0) == "$0.00"


async def test_the_check_finds_entries_naming_a_missing_account(session: AsyncSession) -> None:
    from sqlalchemy import delete, insert

    from peergpu.server.db.billing_models import LedgerEntryModel, LedgerTransactionModel

    tx = uuid.uuid4()
    ghost = accounts.available(_wallet())
    await session.execute(
        insert(LedgerTransactionModel).values(id=tx, idempotency_key="ghost", kind="grant")
    )
    await session.execute(
        insert(LedgerEntryModel),
        [
            {"transaction_id": tx, "account_code": ghost, "amount_micros": 5},
            {"transaction_id": tx, "account_code": accounts.PROMOTIONS, "amount_micros": -5},
        ],
    )
    await ledger.ensure_accounts(session, [accounts.PROMOTIONS])
    await session.commit()
    report = await ledger.check(session)
    assert ghost in report.unknown_accounts and not report.ok
    await session.execute(delete(LedgerEntryModel).where(LedgerEntryModel.transaction_id == tx))
    await session.execute(delete(LedgerTransactionModel).where(LedgerTransactionModel.id == tx))
    await session.commit()
