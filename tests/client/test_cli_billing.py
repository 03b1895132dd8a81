"""``peergpu billing``, ``peergpu host`` and the billing parts of ``peergpu jobs`` (``submit
--dry-run``, ``--max-cost``, ``receipt``) against a real server on both backends: --json
shapes, the tables people read, the dollar-amount parser and the exit codes (2 usage, 5 card
payments not set up, 7 not enough credit or payable). Stripe is the loopback fake from
tests/billing where a command needs it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import typer

from peergpu.cli.output import parse_amount_micros
from peergpu.config import ServerSettings
from tests.billing.stripe_fake import FakeStripe
from tests.client.billing_support import (
    SIGNUP,
    add_host,
    create_org,
    enable_payouts,
    give_payable,
    run_and_settle,
    schedule,
    spend_everything,
    stripe_server,
)
from tests.client.conftest import Account, Cli, needs_jobs_api, register
from tests.integration.harness import ThreadedServer

pytestmark = [needs_jobs_api, pytest.mark.timeout(90)]


def run_json(cli: Cli, *args: str) -> Any:
    """``peergpu GROUP COMMAND --json ARGS...`` (options go before a job's command)."""
    result = cli(*args[:2], "--json", *args[2:])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_error_line(result: Any) -> str:
    """A failure is one red line on stderr and nothing on stdout."""
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.output
    return str(result.stderr)


# -- the amount parser (no server) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("25", 25_000_000),
        ("12.50", 12_500_000),
        ("$5", 5_000_000),
        (" 7 ", 7_000_000),
        ("1,000", 1_000_000_000),
        ("$1,000.25", 1_000_250_000),
        (".5", 500_000),
        ("0.000001", 1),
        ("3.", 3_000_000),
    ],
)
def test_dollar_amounts_parse_exactly(text: str, micros: int) -> None:
    assert parse_amount_micros(text, "AMOUNT") == micros


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("-5", "cannot be negative"),
        ("$-5", "cannot be negative"),
        ("0", "more than zero"),
        ("$0.00", "more than zero"),
        ("1.0000001", "at most 6 decimals"),
        ("ten", "expected dollars"),
        ("1e3", "expected dollars"),
        ("nan", "expected dollars"),
        ("Infinity", "expected dollars"),
        ("1,00", "expected dollars"),
        ("5 USD", "expected dollars"),
        ("$", "expected dollars"),
        ("", "expected dollars"),
    ],
)
def test_bad_dollar_amounts_are_usage_errors(
    text: str, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit) as refused:
        parse_amount_micros(text, "AMOUNT")
    assert refused.value.exit_code == 2
    assert complaint in capsys.readouterr().err


def test_zero_where_it_makes_sense() -> None:
    assert parse_amount_micros("0", "--monthly-cap", allow_zero=True) == 0


# -- balance, transactions, settings ------------------------------------------------------


def test_balance_and_transactions(logged_in: Cli, server: ThreadedServer, account: Account) -> None:
    cli = logged_in
    balance = run_json(cli, "billing", "balance")
    assert balance["available_micros"] == SIGNUP and balance["held_micros"] == 0
    assert balance["wallet"] == f"user:{account.id}" and balance["card_saved"] is False
    human = cli("billing", "balance")
    assert human.exit_code == 0
    assert "$1,000.00" in human.stdout and "monthly cap" in human.stdout

    page = run_json(cli, "billing", "transactions")
    assert page["total"] == 1 and [t["kind"] for t in page["items"]] == ["grant"]
    assert page["items"][0]["available_change_micros"] == SIGNUP
    table = cli("billing", "transactions")
    assert "grant" in table.stdout and "+$1,000.00" in table.stdout
    assert run_json(cli, "billing", "transactions", "--kind", "topup")["items"] == []
    assert cli("billing", "transactions", "--kind", "topup").stdout.strip() == "no transactions"

    org = create_org(server, account)
    org_balance = run_json(cli, "billing", "balance", "--org", org)
    assert org_balance["wallet"] == f"org:{org}" and org_balance["available_micros"] == 0
    unknown = cli("billing", "balance", "--org", str(uuid.uuid4()))
    assert unknown.exit_code == 4 and "not_found" in one_error_line(unknown)


def test_settings_show_set_and_clear(logged_in: Cli) -> None:
    cli = logged_in
    shown = cli("billing", "settings")
    assert shown.exit_code == 0 and "none" in shown.stdout and "off" in shown.stdout
    capped = run_json(cli, "billing", "settings", "--monthly-cap", "$50")
    assert capped["monthly_cap_micros"] == 50_000_000
    assert capped["monthly_cap_left_micros"] == 50_000_000
    topped = cli(
        "billing", "settings", "--auto-topup-below", "10", "--auto-topup-amount", "25.50"
    )  # fmt: skip
    assert topped.exit_code == 0, topped.output
    assert "add $25.50 when below $10.00" in topped.stdout and "$50.00 a month" in topped.stdout
    assert "settings saved" in topped.stderr
    cleared = run_json(cli, "billing", "settings", "--monthly-cap", "none", "--no-auto-topup")
    assert cleared["monthly_cap_micros"] is None
    assert cleared["auto_topup_below_micros"] is None
    assert cleared["auto_topup_amount_micros"] is None
    zero_cap = run_json(cli, "billing", "settings", "--monthly-cap", "0")
    assert zero_cap["monthly_cap_micros"] == 0

    for args, complaint in [
        (["--auto-topup-below", "5"], "together"),
        (["--auto-topup-amount", "5"], "together"),
        (["--no-auto-topup", "--auto-topup-amount", "5"], "cannot be combined"),
        (["--monthly-cap", "-5"], "negative"),
        (["--monthly-cap", "lots"], "expected dollars"),
        (["--auto-topup-below", "5", "--auto-topup-amount", "0"], "more than zero"),
    ]:
        refused = cli("billing", "settings", *args)
        assert refused.exit_code == 2, (args, refused.output)
        assert complaint in one_error_line(refused), args
    too_small = cli("billing", "settings", "--auto-topup-below", "5", "--auto-topup-amount", ".1")
    assert too_small.exit_code == 6 and "validation_error" in one_error_line(too_small)


# -- jobs: dry run, cost cap, receipt -------------------------------------------------------


def test_dry_run_prices_a_job_and_submits_nothing(
    logged_in: Cli, server: ThreadedServer, account: Account
) -> None:
    cli = logged_in
    add_host(server, register(server, roles=["host"]))
    args = ("jobs", "submit", "--dry-run", "--gpus", "1", "--max-duration", "1800")
    estimate = run_json(cli, *args, "--", "python", "train.py")
    assert estimate["price_per_gpu_hour_micros"] == 3_600_000
    assert (estimate["eligible_hosts"], estimate["free_hosts"]) == (1, 1)
    assert estimate["hold_micros"] == 1_800_000 and estimate["enough_credit"] is True
    human = cli(*args, "python", "train.py")
    assert human.exit_code == 0, human.output
    for shown in ("$3.6 per GPU-hour", "$1.80", "at most 30m00s", "$1,000.00", "enough"):
        assert shown in human.stdout, shown
    assert "1 can run it, 1 free now" in human.stdout
    capped = run_json(cli, "jobs", "submit", "--dry-run", "--max-cost", "0.02", "true")
    assert (capped["run_seconds"], capped["hold_micros"]) == (20, 20_000)
    assert run_json(cli, "jobs", "list")["total"] == 0  # nothing was queued

    follow = cli("jobs", "submit", "--dry-run", "--follow", "true")
    assert follow.exit_code == 2 and "--follow" in one_error_line(follow)
    invalid = cli("jobs", "submit", "--dry-run", "--gpus", "99", "true")
    assert invalid.exit_code == 6 and "validation_error" in one_error_line(invalid)

    spend_everything(server, account)
    broke = cli(*args, "true")
    assert broke.exit_code == 7
    assert "not enough" in broke.stdout and "not enough credit" in broke.stderr
    broke_json = cli(*args, "--json", "true")
    assert broke_json.exit_code == 7 and json.loads(broke_json.stdout)["enough_credit"] is False
    refused = cli("jobs", "submit", "--image", "alpine", "true")
    assert refused.exit_code == 7
    line = one_error_line(refused)
    assert "insufficient_credit" in line and "peergpu billing topup" in line


def test_max_cost_then_receipt_transactions_and_earnings(
    logged_in: Cli, server: ThreadedServer
) -> None:
    cli = logged_in
    owner = register(server, roles=["host"])
    host_id = add_host(server, owner)
    job = run_json(cli, "jobs", "submit", "--max-cost", "$0.50", "--max-duration", "100", "true")
    assert job["max_cost_micros"] == 500_000
    assert "max cost" in cli("jobs", "status", job["id"]).stdout
    schedule(server, job["id"])
    held = cli("jobs", "receipt", job["id"])
    assert held.exit_code == 0 and "running" in held.stdout and "$0.10" in held.stdout

    run_and_settle(server, job["id"], seconds=42)
    receipt = run_json(cli, "jobs", "receipt", job["id"])
    assert receipt["settled"] is True and receipt["total_micros"] == 42_000
    assert receipt["charges"][0]["host_id"] == str(host_id)
    human = cli("jobs", "receipt", job["id"])
    assert "$0.042" in human.stdout and str(host_id) in human.stdout and "42.0s" in human.stdout
    lines = run_json(cli, "billing", "transactions", "--job", job["id"])
    assert [t["kind"] for t in lines["items"]] == ["settle", "hold"]
    limited = cli("billing", "transactions", "--limit", "1")
    assert "1 of 3 transactions" in limited.stderr

    unknown = cli("jobs", "receipt", str(uuid.uuid4()))
    assert unknown.exit_code == 4 and "not_found" in one_error_line(unknown)
    bad_cost = cli("jobs", "submit", "--max-cost", "0", "true")
    assert bad_cost.exit_code == 2 and "--max-cost" in one_error_line(bad_cost)

    cli.login(server, owner)
    earned = run_json(cli, "host", "earnings", "--days", "7")
    assert earned["payable_micros"] == 37_800 and earned["days"][0]["jobs"] == 1
    table = cli("host", "earnings")
    assert "$0.0378" in table.stdout and "42.0s" in table.stdout


# -- payments: Stripe not configured, then the fake ----------------------------------------------


def test_payment_commands_say_card_payments_are_not_set_up(logged_in: Cli) -> None:
    cli = logged_in
    for args in (
        ["billing", "topup", "25"],
        ["host", "onboard"],
        ["host", "payout"],
        ["host", "payout", "20", "--json"],
    ):
        result = cli(*args)
        assert result.exit_code == 5, (args, result.output)
        line = one_error_line(result)
        assert "Card payments are not set up" in line and "payments_not_configured" in line
    bad = cli("billing", "topup", "ten")
    assert bad.exit_code == 2 and "AMOUNT 'ten'" in one_error_line(bad)

    account = run_json(cli, "host", "account")
    assert account["payouts_enabled"] is False and account["stripe_account_id"] is None
    assert "not set up" in cli("host", "account").stdout
    assert run_json(cli, "host", "payouts") == {"items": [], "total": 0}
    assert cli("host", "payouts").stdout.strip() == "no payouts yet"
    assert "no earnings" in cli("host", "earnings").stdout


@pytest.fixture
def stripe(settings: ServerSettings) -> Iterator[tuple[ThreadedServer, FakeStripe]]:
    with stripe_server(settings) as running:
        yield running


def test_topup_onboarding_and_payouts_with_stripe(
    cli: Cli, stripe: tuple[ThreadedServer, FakeStripe], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, fake = stripe
    owner = register(server)
    cli.login(server, owner)
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)

    topup = cli("billing", "topup", "$25")
    assert topup.exit_code == 0, topup.output
    url = topup.stdout.strip()
    assert url.startswith("https://checkout.stripe.com/") and "pay $25.00" in topup.stderr
    assert opened == []  # only with --open
    created = run_json(cli, "billing", "topup", "12.50", "--open")
    assert created["amount_micros"] == 12_500_000 and opened == [created["url"]]
    cents = cli("billing", "topup", "5.001")
    assert cents.exit_code == 6 and "invalid_amount" in one_error_line(cents)

    link = run_json(cli, "host", "onboard")
    assert link["url"].startswith("https://connect.stripe.com/")
    assert "onboarding not finished" in cli("host", "account").stdout
    enable_payouts(server, fake, link["stripe_account_id"])
    give_payable(server, owner, 30_000_000)
    assert "payouts enabled" in cli("host", "account").stdout

    too_much = cli("host", "payout", "5000")
    assert too_much.exit_code == 7 and "insufficient_payable" in one_error_line(too_much)
    paid = run_json(cli, "host", "payout", "20")
    assert (paid["state"], paid["amount_micros"]) == ("paid", 20_000_000)
    rest = cli("host", "payout")
    assert rest.exit_code == 0 and "$10.00" in rest.stdout and "paid" in rest.stdout
    page = run_json(cli, "host", "payouts")
    assert page["total"] == 2 and page["items"][1]["id"] == paid["id"]
    table = cli("host", "payouts")
    assert paid["id"] in table.stdout and paid["stripe_transfer_id"] in table.stdout
    assert run_json(cli, "host", "earnings")["paid_out_micros"] == 30_000_000
