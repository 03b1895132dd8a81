from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from peergpu.config import ServerSettings


def test_defaults_are_embedded(tmp_path: Path) -> None:
    settings = ServerSettings(data_dir=tmp_path)
    assert settings.effective_database_url == f"sqlite+aiosqlite:///{tmp_path / 'peergpu.db'}"
    assert settings.is_sqlite and settings.redis_url == ""


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_database_urls_are_normalized(given: str, expected: str) -> None:
    assert ServerSettings(database_url=given).database_url == expected


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERGPU_PORT", "9001")
    monkeypatch.setenv("PEERGPU_CORS_ORIGINS", "https://a.example, https://b.example")
    settings = ServerSettings()
    assert settings.port == 9001
    assert settings.cors_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize("secret", ["", "changeme", "short-secret"])
def test_production_refuses_weak_or_default_secrets(secret: str) -> None:
    with pytest.raises(ValidationError, match="PEERGPU_SECRET_KEY"):
        ServerSettings(mode="production", secret_key=secret)


def test_production_accepts_a_strong_secret() -> None:
    settings = ServerSettings(mode="production", secret_key="s" * 48)
    assert settings.resolved_secret_key() == "s" * 48


def test_dev_mode_generates_and_keeps_a_secret(tmp_path: Path) -> None:
    first = ServerSettings(data_dir=tmp_path).resolved_secret_key()
    again = ServerSettings(data_dir=tmp_path).resolved_secret_key()
    assert first == again and len(first) >= 32
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
