"""The `peergpu` command line, run in-process against a SQLite data dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from peergpu.cli import app
from peergpu.server.db.migrate import head_revision

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "PEERGPU_DATA_DIR": str(tmp_path),
        "PEERGPU_DATABASE_URL": "",
        "PEERGPU_ARGON2_TIME_COST": "1",
        "PEERGPU_ARGON2_MEMORY_COST_KIB": "64",
    }


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("server", "demo", "db", "admin"):
        assert command in result.output


def test_db_upgrade_downgrade_current(env: dict[str, str]) -> None:
    up = runner.invoke(app, ["db", "upgrade"], env=env)
    assert up.exit_code == 0, up.output
    head = head_revision()
    assert f"database at revision {head}" in up.output
    current = runner.invoke(app, ["db", "current"], env=env)
    assert f"current: {head}  head: {head}" in current.output
    down = runner.invoke(app, ["db", "downgrade", "base"], env=env)
    assert down.exit_code == 0 and "revision None" in down.output


def test_admin_create_user(env: dict[str, str]) -> None:
    args = ["admin", "create-user", "--email", "Root@Example.com", "--role", "admin"]
    created = runner.invoke(app, [*args, "--password", "a long password"], env=env)
    assert created.exit_code == 0, created.output
    assert "created user" in created.output
    again = runner.invoke(app, [*args, "--password", "a long password"], env=env)
    assert again.exit_code == 1 and "already exists" in again.output
    bad_email = runner.invoke(
        app, ["admin", "create-user", "--email", "nope", "--password", "a long password"], env=env
    )
    assert bad_email.exit_code == 1 and "not a valid e-mail" in bad_email.output
    short = runner.invoke(
        app, ["admin", "create-user", "--email", "a@example.com", "--password", "short"], env=env
    )
    assert short.exit_code == 1 and "10 characters" in short.output


def test_bad_configuration_is_a_clear_message(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["db", "current"], env={**env, "PEERGPU_PORT": "not-a-port"})
    assert result.exit_code == 1
    assert "PEERGPU_PORT" in result.output
    prod = runner.invoke(app, ["db", "current"], env={**env, "PEERGPU_MODE": "production"})
    assert prod.exit_code == 1 and "PEERGPU_SECRET_KEY" in prod.output
