"""``peergpu hosts enroll-token`` -> the printed command enrols a machine -> ``hosts list
--mine``; the marketplace listing with a real agent online."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tests.client.conftest import Account, Cli, needs_jobs_api, register, running_agent
from tests.integration.harness import ThreadedServer, wait_for


def test_enroll_token_prints_a_command_that_enrols_the_host(
    logged_in: Cli, server: ThreadedServer, tmp_path: Path
) -> None:
    cli = logged_in
    assert json.loads(cli("hosts", "list", "--mine", "--json").stdout)["items"] == []
    out = cli(
        "hosts", "enroll-token", "--name", "rig-1", "--region", "eu-west",
        "--tag", "nvlink", "--tag", "fast", "--price", "1.25",
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    match = re.search(r"peergpu agent enroll --server \S+ --token \S+", out.stdout)
    assert match, out.stdout
    command = shlex.split(match.group(0))
    assert command[3:5] == ["--server", server.url]

    enrolled = cli(*command[1:], "--state-dir", str(tmp_path / "agent"))
    assert enrolled.exit_code == 0, enrolled.output
    assert (tmp_path / "agent" / "credentials.json").exists()

    mine = json.loads(cli("hosts", "list", "--mine", "--json").stdout)
    [host] = mine["items"]
    assert (host["name"], host["region"], host["tags"]) == ("rig-1", "eu-west", ["nvlink", "fast"])
    assert host["status"] == "offline"
    assert "rig-1" in cli("hosts", "list", "--mine").stdout
    filtered = cli("hosts", "list", "--mine", "--region", "us", "--json")
    assert json.loads(filtered.stdout)["items"] == []
    assert (
        json.loads(cli("hosts", "list", "--mine", "--tag", "fast", "--json").stdout)["total"] == 1
    )

    reused = cli(*command[1:], "--state-dir", str(tmp_path / "again"))
    assert reused.exit_code != 0  # the token works once


def test_enroll_token_json_and_errors(
    logged_in: Cli, server: ThreadedServer, account: Account
) -> None:
    token = json.loads(logged_in("hosts", "enroll-token", "--json").stdout)
    assert token["token"] and token["command"].endswith(token["token"])
    bad_price = logged_in("hosts", "enroll-token", "--price", "free")
    assert bad_price.exit_code == 2 and "--price" in bad_price.stderr
    dollar_sign = logged_in("hosts", "enroll-token", "--price", "$1.25", "--json")
    assert dollar_sign.exit_code == 0, dollar_sign.output
    too_high = logged_in("hosts", "enroll-token", "--price", "5000")
    assert too_high.exit_code == 6 and "validation_error" in too_high.stderr

    renter = register(server, roles=["renter"])
    logged_in.login(server, renter)
    refused = logged_in("hosts", "enroll-token")
    assert refused.exit_code == 6 and "host role" in refused.stderr


@needs_jobs_api
def test_marketplace_listing_with_a_live_agent(
    logged_in: Cli, server: ThreadedServer, tmp_path: Path
) -> None:
    cli = logged_in
    token = json.loads(
        cli("hosts", "enroll-token", "--name", "market", "--price", "0.75", "--json").stdout
    )["token"]
    with running_agent(server, token, tmp_path, simulate="RTX4090x2") as agent:
        wait_for(
            lambda: json.loads(cli("hosts", "list", "--json").stdout)["items"],
            what="the host on the marketplace",
            context=agent.log,
        )
        [host] = json.loads(cli("hosts", "list", "--gpu-model", "4090", "--json").stdout)["items"]
        assert (host["name"], host["free_gpus"]) == ("market", 2)
        assert host["price_per_gpu_hour_micros"] == 750_000
        table = cli("hosts", "list").stdout
        assert "market" in table and "2x" in table and "$0.75" in table
        for filters in (["--gpu-model", "H100"], ["--max-price", "0.5"], ["--min-gpus", "3"]):
            found = json.loads(cli("hosts", "list", *filters, "--json").stdout)
            assert found["items"] == [], filters
    wait_for(
        lambda: not json.loads(cli("hosts", "list", "--json").stdout)["items"],
        what="the host to leave the online listing",
    )
    everything = json.loads(cli("hosts", "list", "--all", "--json").stdout)
    assert [h["name"] for h in everything["items"]] == ["market"]
