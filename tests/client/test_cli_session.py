"""``peergpu login | logout | whoami`` against a real server, and the exit codes scripts see."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from peergpu.client import PeerGPU
from peergpu.client import config as cfg
from tests.client.conftest import Account, Cli, dead_server_url, file_mode
from tests.client.test_sdk import expired_access_token, refresh_works
from tests.integration.harness import ThreadedServer


def test_login_stores_a_private_file_and_whoami_works(
    cli: Cli, server: ThreadedServer, account: Account, config_dir: Path
) -> None:
    result = cli.login(server, account)
    assert f"logged in to {server.url} as {account.email}" in result.stdout
    path = config_dir / "credentials.json"
    assert file_mode(path) == 0o600 and file_mode(config_dir) == 0o700
    stored = json.loads(path.read_text())
    assert stored["server_url"] == server.url and stored["email"] == account.email
    assert stored["access_token"] and stored["refresh_token"] and "api_key" not in stored

    who = cli("whoami")
    assert who.exit_code == 0 and account.email in who.stdout and "host" in who.stdout
    who_json = cli("whoami", "--json")
    body = json.loads(who_json.stdout)
    assert body["server"] == server.url and body["user"]["id"] == account.id
    assert who_json.stderr == ""


def test_login_prompts_for_email_and_hidden_password(
    cli: Cli, server: ThreadedServer, account: Account
) -> None:
    result = cli("login", "--server", server.url, input=f"{account.email}\n{account.password}\n")
    assert result.exit_code == 0, result.output
    assert account.password not in result.output  # the prompt does not echo it
    assert cli("whoami").exit_code == 0


def test_a_bad_password_exits_3(cli: Cli, server: ThreadedServer, account: Account) -> None:
    result = cli(
        "login", "--server", server.url, "--email", account.email, "--password-stdin",
        input="not the password\n",
    )  # fmt: skip
    assert result.exit_code == 3
    assert "login failed" in result.stderr and "invalid_credentials" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    assert not (cli.config_dir / "credentials.json").exists()


def test_not_logged_in_exits_3(cli: Cli, server: ThreadedServer) -> None:
    result = cli("whoami", "--server", server.url)
    assert result.exit_code == 3
    assert "not logged in" in result.stderr and "peergpu login" in result.stderr


def test_an_unreachable_server_exits_5(cli: Cli) -> None:
    result = cli(
        "login", "--server", dead_server_url(), "--email", "a@example.com", "--password-stdin",
        input="whatever password\n",
    )  # fmt: skip
    assert result.exit_code == 5
    assert "could not reach" in result.stderr
    who = cli("whoami", env={"PEERGPU_SERVER": dead_server_url(), "PEERGPU_API_KEY": "pgk_x"})
    assert who.exit_code == 5


def test_bad_usage_exits_2(cli: Cli) -> None:
    assert cli("login", "--server", "ftp://nope").exit_code == 2
    assert cli("whoami", "--no-such-flag").exit_code == 2
    (cli.config_dir).mkdir(parents=True)
    (cli.config_dir / "credentials.json").write_text("{broken")
    damaged = cli("whoami")
    assert damaged.exit_code == 2 and "peergpu logout" in damaged.stderr


def test_logout_ends_the_session_and_forgets_it(
    cli: Cli, server: ThreadedServer, account: Account
) -> None:
    cli.login(server, account)
    stored = cfg.load_credentials(cli.config_dir / "credentials.json")
    assert stored is not None and stored.refresh_token
    refresh_token = stored.refresh_token
    out = cli("logout")
    assert out.exit_code == 0 and "logged out" in out.stdout
    assert not (cli.config_dir / "credentials.json").exists()
    assert not refresh_works(server, refresh_token)
    again = cli("logout", "--json")
    assert json.loads(again.stdout) == {"logged_out": False, "session_ended": False}
    assert cli("whoami").exit_code == 3


def test_expired_tokens_are_refreshed_and_the_new_pair_saved(
    cli: Cli, server: ThreadedServer, account: Account
) -> None:
    cli.login(server, account)
    path = cli.config_dir / "credentials.json"
    stored = cfg.load_credentials(path)
    assert stored is not None and stored.refresh_token
    cfg.save_credentials(
        stored.with_tokens(expired_access_token(server, account.id), stored.refresh_token), path
    )
    assert cli("whoami").exit_code == 0
    rotated = cfg.load_credentials(path)
    assert rotated is not None
    assert rotated.refresh_token != stored.refresh_token
    assert rotated.access_token != stored.access_token
    assert file_mode(path) == 0o600
    assert cli("whoami").exit_code == 0  # the saved pair works
    # the spent refresh token is refused (and, being a replay, ends that login everywhere)
    assert not refresh_works(server, stored.refresh_token)
    cfg.save_credentials(rotated.with_tokens("expired", rotated.refresh_token or ""), path)
    revoked = cli("whoami")
    assert revoked.exit_code == 3 and "peergpu login" in revoked.stderr


def test_api_key_login_and_environment_overrides(
    cli: Cli, server: ThreadedServer, account: Account
) -> None:
    cli.login(server, account)
    stored = cfg.load_credentials(cli.config_dir / "credentials.json")
    assert stored is not None
    key = httpx.post(
        f"{server.url}/api/v1/keys",
        json={"name": "cli"},
        headers={"Authorization": f"Bearer {stored.access_token}"},
        timeout=10,
    ).json()["key"]
    cli("logout")
    with_key = cli("login", "--server", server.url, "--api-key", key, "--json")
    assert with_key.exit_code == 0, with_key.output
    assert json.loads(with_key.stdout)["user"]["email"] == account.email
    saved = json.loads((cli.config_dir / "credentials.json").read_text())
    assert saved["api_key"] == key and "refresh_token" not in saved
    assert cli("whoami").exit_code == 0
    cli("logout")
    # no file at all: the environment is enough
    env = {"PEERGPU_SERVER": server.url, "PEERGPU_API_KEY": key}
    assert account.email in cli("whoami", env=env).stdout
    bad = cli("whoami", env={**env, "PEERGPU_API_KEY": key[:-4] + "0000"})
    assert bad.exit_code == 3


def test_commands_sharing_a_login_never_spend_a_refresh_token_twice(
    cli: Cli, server: ThreadedServer, account: Account
) -> None:
    """Two commands start from the same stored pair with an expired access token; the first
    refreshes, the second adopts the saved pair instead of replaying the spent refresh token
    (which the server would take as theft, logging everyone out)."""
    cli.login(server, account)
    path = cli.config_dir / "credentials.json"
    stored = cfg.load_credentials(path)
    assert stored is not None and stored.refresh_token
    snapshot = stored.with_tokens(expired_access_token(server, account.id), stored.refresh_token)
    cfg.save_credentials(snapshot, path)

    def command() -> PeerGPU:
        return PeerGPU(
            server.url,
            access_token=snapshot.access_token,
            refresh_token=snapshot.refresh_token,
            token_store=cfg.CredentialsFile(path, snapshot),
        )

    first, second = command(), command()
    with first, second:
        assert first.me().id == account.id
        assert second.me().id == account.id
        assert second.refresh_token == first.refresh_token != snapshot.refresh_token
    assert cli("whoami").exit_code == 0  # the login is still alive
    assert (path.parent / "credentials.json.lock").exists()


def test_exit_codes_are_documented_in_help(cli: Cli) -> None:
    for args in ([], ["jobs"], ["hosts"]):
        result = cli(*args, "--help")
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        assert "Exit codes: 0 success" in text and "5 server unreachable" in text, args
