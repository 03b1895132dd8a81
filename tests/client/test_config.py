"""Where the CLI keeps credentials, and which server and credential a command uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peergpu.client import config as cfg
from tests.client.conftest import file_mode


def test_config_dir_precedence(tmp_path: Path) -> None:
    home = Path.home()
    assert cfg.config_dir({}) == home / ".config" / "peergpu"
    assert cfg.config_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "peergpu"
    both = {"XDG_CONFIG_HOME": str(tmp_path), "PEERGPU_CONFIG_DIR": str(tmp_path / "pg")}
    assert cfg.config_dir(both) == tmp_path / "pg"
    assert cfg.credentials_path(both) == tmp_path / "pg" / "credentials.json"


def test_saved_credentials_are_private_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "new" / "credentials.json"
    stored = cfg.StoredCredentials(
        server_url="http://example.test", email="a@example.com", refresh_token="r", access_token="a"
    )
    cfg.save_credentials(stored, path)
    assert file_mode(path) == 0o600
    assert file_mode(path.parent) == 0o700
    assert cfg.load_credentials(path) == stored
    assert "api_key" not in json.loads(path.read_text())  # unset fields are left out
    rotated = stored.with_tokens("a2", "r2")
    cfg.save_credentials(rotated, path)
    assert cfg.load_credentials(path) == rotated
    assert [p.name for p in path.parent.iterdir()] == ["credentials.json"]  # no temp files
    assert cfg.delete_credentials(path) is True
    assert cfg.load_credentials(path) is None
    assert cfg.delete_credentials(path) is False


def test_a_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{not json")
    with pytest.raises(cfg.ConfigError, match="credentials.json"):
        cfg.load_credentials(path)
    path.write_text("[1, 2]")
    with pytest.raises(cfg.ConfigError, match="not a PeerGPU credentials file"):
        cfg.load_credentials(path)


def test_resolve_prefers_flags_then_environment_then_file(tmp_path: Path) -> None:
    env = {"PEERGPU_CONFIG_DIR": str(tmp_path)}
    nothing = cfg.resolve(env=env)
    assert nothing.server_url == cfg.DEFAULT_SERVER and not nothing.has_credentials

    stored = cfg.StoredCredentials(
        server_url="https://gpu.example/", access_token="acc", refresh_token="ref"
    )
    cfg.save_credentials(stored, tmp_path / "credentials.json")
    from_file = cfg.resolve(env=env)
    assert from_file.server_url == "https://gpu.example"
    assert (from_file.access_token, from_file.refresh_token) == ("acc", "ref")
    assert from_file.uses_stored_tokens

    keyed = cfg.resolve(env={**env, "PEERGPU_API_KEY": "pgk_env"})
    assert keyed.api_key == "pgk_env" and keyed.access_token is None
    assert cfg.resolve(api_key="pgk_flag", env={**env, "PEERGPU_API_KEY": "x"}).api_key == (
        "pgk_flag"
    )
    # the same server spelled with the API prefix still gets the stored tokens
    same = cfg.resolve(server="https://gpu.example/api/v1", env=env)
    assert same.access_token == "acc"


def test_stored_credentials_never_go_to_another_server(tmp_path: Path) -> None:
    env = {"PEERGPU_CONFIG_DIR": str(tmp_path)}
    stored = cfg.StoredCredentials(server_url="https://gpu.example", api_key="pgk_secret")
    cfg.save_credentials(stored, tmp_path / "credentials.json")
    other = cfg.resolve(env={**env, "PEERGPU_SERVER": "https://evil.example"})
    assert other.server_url == "https://evil.example"
    assert not other.has_credentials and other.stored is None
    assert cfg.resolve(server="http://gpu.example", env=env).api_key is None  # scheme matters


def test_a_server_url_must_be_http(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        cfg.resolve(server="gpu.example", env={"PEERGPU_CONFIG_DIR": str(tmp_path)})
