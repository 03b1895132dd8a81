"""``peergpu usage`` against a real server on both backends: the requests table and its
--json, filters, the summary by model / key / day, and bad input as a usage error."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from peergpu.server.context import ServerContext
from peergpu.server.services.billing.inference import UsageRecord
from tests.client.billing_support import add_host
from tests.client.conftest import Account, Cli, register
from tests.integration.harness import ThreadedServer

pytestmark = pytest.mark.timeout(90)


def _record(server: ThreadedServer, account: Account, host: uuid.UUID, model: str) -> None:
    async def write(context: ServerContext) -> None:
        context.usage.record(
            UsageRecord(
                request_id=uuid.uuid4(),
                api_key_id=None,
                user_id=uuid.UUID(account.id),
                organization_id=None,
                host_id=host,
                model=model,
                endpoint="chat.completions",
                prompt_tokens=1500,
                completion_tokens=250,
                input_price_per_million_micros=1_000_000,
                output_price_per_million_micros=2_000_000,
                latency_ms=1234,
                first_token_ms=80,
                outcome="ok",
            )
        )
        await context.usage.flush()

    server.call(write)


def _json(cli: Cli, *args: str) -> Any:
    result = cli("usage", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_usage_lists_and_summarises(
    logged_in: Cli, server: ThreadedServer, account: Account
) -> None:
    cli = logged_in
    empty = cli("usage")
    assert empty.exit_code == 0 and "no inference requests" in empty.stdout
    host = add_host(server, register(server, roles=["host"]))
    for model in ("acme/chat", "acme/chat", "acme/tiny"):
        _record(server, account, host, model)

    page = _json(cli)
    assert page["total"] == 3
    assert {line["cost_micros"] for line in page["items"]} == {2000}
    assert _json(cli, "--model", "acme/tiny", "--since", "1h")["total"] == 1
    table = cli("usage", "--limit", "2")
    assert table.exit_code == 0, table.output
    assert "acme/chat" in table.stdout and "1,500" in table.stdout and "$0.002" in table.stdout
    assert "2 of 3 requests" in table.stderr

    summary = _json(cli, "--summary")
    assert [(g["key"], g["requests"]) for g in summary["groups"]] == [
        ("acme/chat", 2),
        ("acme/tiny", 1),
    ]
    assert summary["total"]["cost_micros"] == 6000
    by_key = cli("usage", "--by", "key")
    assert by_key.exit_code == 0, by_key.output
    assert "(session tokens)" in by_key.stdout and "$0.006" in by_key.stdout
    assert len(_json(cli, "--by", "day")["groups"]) == 1

    assert cli("usage", "--by", "week").exit_code == 2
    refused = cli("usage", "--since", "yesterday-ish")
    assert refused.exit_code == 6 and "since" in refused.stderr
