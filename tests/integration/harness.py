"""Real servers and real agents for end-to-end tests.

``ThreadedServer`` runs uvicorn with our app in a background thread with its own event loop:
agents reach it over real sockets, and the test reaches the running app's bus and database by
scheduling coroutines on that loop (``call``). ``AgentProcess`` runs ``peergpu agent`` as a
separate process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

from peergpu.config import ServerSettings
from peergpu.server.agents.channels import job_events_stream, job_logs_stream
from peergpu.server.app import create_app
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.job_models import JobModel
from peergpu.server.db.models import UserModel
from tests.factories import PASSWORD

T = TypeVar("T")

FINAL_AGENT_STATES = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThreadedServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30) -> ThreadedServer:
        app = create_app(self.settings)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.settings.port,
            log_level="warning",
            lifespan="on",
            ws_ping_interval=None,
        )
        self._server = uvicorn.Server(config)
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.call_soon(ready.set)
            loop.run_until_complete(self._server.serve())  # type: ignore[union-attr]
            loop.close()

        self._thread = threading.Thread(target=serve, name="test-server", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.app = app
        return self

    @property
    def context(self) -> ServerContext:
        context: ServerContext = self.app.state.context
        return context

    def call(self, make: Callable[[ServerContext], Awaitable[T]], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop (its engine and bus live there)."""
        assert self._loop is not None

        async def run() -> T:
            return await make(self.context)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self, timeout: float = 30) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


class AgentProcess:
    def __init__(
        self,
        *,
        state_dir: Path,
        simulate: str = "H100x2,RTX4090",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.simulate = simulate
        self.log_path = state_dir / "agent.log"
        # Jobs run as an unprivileged user when the tests run as root; pytest's temp dirs are
        # 0700, so work dirs live in a traversable folder of their own.
        self.work_dir = Path(tempfile.mkdtemp(prefix="peergpu-e2e-work-"))
        self.work_dir.chmod(0o711)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PEERGPU_")},
            "PEERGPU_AGENT_BACKOFF_INITIAL_SECONDS": "0.2",
            "PEERGPU_AGENT_BACKOFF_MAX_SECONDS": "1",
            "PEERGPU_AGENT_WORK_DIR": str(self.work_dir),
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def enroll(self, server_url: str, token: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "peergpu",
                "agent",
                "enroll",
                "--server",
                server_url,
                "--token",
                token,
                "--state-dir",
                str(self.state_dir),
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self, *, heartbeat: float = 0.5) -> AgentProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peergpu",
                "agent",
                "run",
                "--state-dir",
                str(self.state_dir),
                "--simulate",
                self.simulate,
                "--heartbeat",
                str(heartbeat),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        try:
            return self._stop()
        finally:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _stop(self) -> int | None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode if self.process else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def host_id(self) -> uuid.UUID:
        """The host this agent was enrolled as (from its credential file)."""
        data = json.loads((self.state_dir / "credentials.json").read_text())
        return uuid.UUID(data["host_id"])


def wait_for(
    predicate: Callable[[], Any],
    *,
    timeout: float = 20,
    what: str = "condition",
    context: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy (for cross-process waits only)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{context()}" if context else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(0.05)


async def assigned_job(
    context: ServerContext, job_id: uuid.UUID, host_id: uuid.UUID, command: list[str], nonce: str
) -> None:
    """A job row assigned to ``host_id``, as the scheduler would leave it, for tests that
    dispatch manifests by hand (the server believes only a job's current host)."""
    async with context.sessionmaker() as session:
        owner = UserModel(email=f"renter-{uuid.uuid4().hex[:12]}@example.com", password_hash="x")
        session.add(owner)
        await session.flush()
        now = utcnow()
        session.add(
            JobModel(
                id=job_id,
                owner_id=owner.id,
                state="assigned",
                command=command,
                max_duration_seconds=60,
                host_id=host_id,
                attempt=1,
                manifest_nonce=nonce,
                assigned_at=now,
                ack_deadline=now + timedelta(seconds=60),
                queue_expires_at=now + timedelta(hours=1),
            )
        )
        await session.commit()


def e2e_settings(settings: ServerSettings, **overrides: Any) -> ServerSettings:
    """``settings`` for a ``ThreadedServer`` on a free port, with fast agent heartbeats.

    A host is marked offline after 5 s of silence (10 beats), not 1.5 s: on the loaded 2-core
    test machine a healthy agent's beat can be that late, and a false "offline" loses its job.
    A killed agent is caught at once anyway, by its socket closing."""
    port = free_port()
    return settings.model_copy(
        update={
            "port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "agent_heartbeat_seconds": 0.5,
            "agent_missed_heartbeats": 10,
            **overrides,
        }
    )


def login(server: ThreadedServer, roles: list[str], stem: str = "e2e") -> dict[str, str]:
    """Register a new user with ``roles`` and return its bearer header."""
    email = f"{stem}-{uuid.uuid4().hex[:12]}@example.com"
    with httpx.Client(base_url=server.url, timeout=10) as http:
        body = {"email": email, "password": PASSWORD, "roles": roles}
        registered = http.post("/api/v1/auth/register", json=body)
        assert registered.status_code == 201, registered.text
        tokens = http.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    return {"Authorization": f"Bearer {tokens.json()['access_token']}"}


def enroll_agent(
    server: ThreadedServer,
    owner: dict[str, str],
    state_dir: Path,
    *,
    simulate: str = "H100x2,RTX4090",
    extra_env: dict[str, str] | None = None,
    **token_body: Any,
) -> AgentProcess:
    """Create an enrolment token as ``owner``, enrol an agent process with it, start it and
    wait until its host is online."""
    token = httpx.post(
        f"{server.url}/api/v1/hosts/enrollment-tokens", json=token_body, headers=owner, timeout=10
    )
    assert token.status_code == 201, token.text
    process = AgentProcess(state_dir=state_dir, simulate=simulate, extra_env=extra_env)
    enrolled = process.enroll(server.url, token.json()["token"])
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    process.start()
    host_id = str(process.host_id)

    def online() -> bool:
        hosts = httpx.get(f"{server.url}/api/v1/hosts", headers=owner, timeout=10).json()
        return any(h["id"] == host_id and h["status"] == "online" for h in hosts["data"])

    wait_for(online, what=f"host {host_id} online", context=process.log)
    return process


def bus_stream(server: ThreadedServer, name: str) -> list[dict[str, Any]]:
    """Every entry of a bus stream (``jobevents:<id>``, ``joblogs:<id>``), decoded."""
    entries = server.call(lambda ctx: ctx.bus.read(name, count=100_000))
    return [json.loads(entry.data) for entry in entries]


def final_status(
    server: ThreadedServer, job_id: uuid.UUID, agent: AgentProcess, timeout: float = 30
) -> dict[str, Any]:
    """The job's final ``job_status`` as the agent reported it."""

    def final() -> dict[str, Any] | None:
        for event in bus_stream(server, job_events_stream(job_id)):
            if event["type"] == "job_status" and event["state"] in FINAL_AGENT_STATES:
                return event
        return None

    return dict(wait_for(final, timeout=timeout, what=f"job {job_id} to end", context=agent.log))


def log_lines(server: ThreadedServer, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The job's log lines from the bus trail, by seq (at least once: repeats dropped)."""
    seen: dict[int, dict[str, Any]] = {}
    for batch in bus_stream(server, job_logs_stream(job_id)):
        for line in batch["lines"]:
            seen.setdefault(line["seq"], line)
    return [seen[seq] for seq in sorted(seen)]
