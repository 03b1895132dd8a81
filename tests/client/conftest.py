"""Fixtures for the SDK and CLI tests: a real server (uvicorn in a thread, on both backends),
registered accounts, and a CLI whose config folder is a temporary directory."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from peergpu.cli import app
from peergpu.config import ServerSettings
from tests.factories import PASSWORD, unique_email
from tests.integration.harness import AgentProcess, ThreadedServer, free_port


def jobs_api_available() -> bool:
    """Whether this tree has the jobs API yet (it is built alongside the client)."""
    return importlib.util.find_spec("peergpu.server.api.jobs") is not None


def logs_api_available() -> bool:
    return importlib.util.find_spec("peergpu.server.api.job_logs") is not None


needs_jobs_api = pytest.mark.skipif(
    not jobs_api_available(), reason="peergpu.server.api.jobs is not in this tree yet"
)
needs_logs_api = pytest.mark.skipif(
    not logs_api_available(), reason="peergpu.server.api.job_logs is not in this tree yet"
)


@dataclass(frozen=True)
class Account:
    email: str
    password: str
    id: str


@pytest.fixture
def server(settings: ServerSettings) -> Iterator[ThreadedServer]:
    port = free_port()
    running = ThreadedServer(
        settings.model_copy(update={"port": port, "public_url": f"http://127.0.0.1:{port}"})
    ).start()
    yield running
    running.stop()


def register(server: ThreadedServer, roles: Sequence[str] = ("renter", "host")) -> Account:
    email = unique_email("client")
    body = {"email": email, "password": PASSWORD, "roles": list(roles)}
    response = httpx.post(f"{server.url}/api/v1/auth/register", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return Account(email=email, password=PASSWORD, id=response.json()["id"])


@pytest.fixture
def account(server: ThreadedServer) -> Account:
    return register(server)


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the CLI's config at a fresh folder and clear overrides from the environment."""
    folder = tmp_path / "config"
    monkeypatch.setenv("PEERGPU_CONFIG_DIR", str(folder))
    for name in ("PEERGPU_SERVER", "PEERGPU_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return folder


class Cli:
    """Runs ``peergpu`` in-process; stdout and stderr are kept apart."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.runner = CliRunner()

    def __call__(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> Result:
        result = self.runner.invoke(app, list(args), input=input, env=env)
        # a command may fail, but never with a traceback
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    def login(self, server: ThreadedServer, account: Account) -> Result:
        result = self(
            "login",
            "--server",
            server.url,
            "--email",
            account.email,
            "--password-stdin",
            input=account.password + "\n",
        )
        assert result.exit_code == 0, result.output
        return result


@pytest.fixture
def cli(config_dir: Path) -> Cli:
    return Cli(config_dir)


@pytest.fixture
def logged_in(cli: Cli, server: ThreadedServer, account: Account) -> Cli:
    cli.login(server, account)
    return cli


@contextmanager
def running_agent(
    server: ThreadedServer, token: str, tmp_path: Path, *, simulate: str = "H100x2"
) -> Iterator[AgentProcess]:
    """A real agent process (simulated GPUs) enrolled with ``token`` and connected."""
    agent = AgentProcess(state_dir=tmp_path / "agent", simulate=simulate)
    enrolled = agent.enroll(server.url, token)
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    agent.start(heartbeat=0.5)
    try:
        yield agent
    finally:
        agent.stop()


def dead_server_url() -> str:
    """An address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def file_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777
