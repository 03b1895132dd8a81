"""A real server and a real agent process run jobs from bundles in the server's object store:
the agent downloads the bundle through a pre-signed URL, checks its sha256, caches it, unpacks
it into the job's work dir and runs it; a bundle that tries to escape its folder never runs.

What the agent reports is read from the job's bus streams (``jobevents:<id>``,
``joblogs:<id>``), where the server appends every job message it receives.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from peergpu.config import ServerSettings
from peergpu.server.agents import dispatch
from peergpu.server.agents.channels import job_events_stream, job_logs_stream
from tests.factories import PASSWORD, unique_email
from tests.integration.harness import (
    AgentProcess,
    ThreadedServer,
    assigned_job,
    free_port,
    wait_for,
)

FINAL = {"succeeded", "failed", "cancelled"}

MAIN_PY = b"""\
import os, pathlib
print("hello from the bundle")
print("config:", pathlib.Path("config/settings.txt").read_text().strip())
pathlib.Path(os.environ["PEERGPU_OUTPUT_DIR"], "answer.txt").write_text("42")
"""


@pytest.fixture
def server(settings: ServerSettings) -> Iterator[ThreadedServer]:
    port = free_port()
    e2e = settings.model_copy(
        update={
            "port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "agent_heartbeat_seconds": 0.5,
        }
    )
    running = ThreadedServer(e2e).start()
    yield running
    running.stop()


@pytest.fixture
def agent(server: ThreadedServer, tmp_path: Path) -> Iterator[AgentProcess]:
    owner = _host_owner(server)
    process = AgentProcess(state_dir=tmp_path / "agent")
    token = httpx.post(
        f"{server.url}/api/v1/hosts/enrollment-tokens", json={}, headers=owner, timeout=10
    )
    assert token.status_code == 201, token.text
    enrolled = process.enroll(server.url, token.json()["token"])
    assert enrolled.returncode == 0, enrolled.stderr + enrolled.stdout
    process.start()

    def online() -> bool:
        hosts = httpx.get(f"{server.url}/api/v1/hosts", headers=owner, timeout=10).json()
        return any(host["status"] == "online" for host in hosts["data"])

    wait_for(online, what="the agent to come online", context=process.log)
    yield process
    process.stop()


def test_job_runs_from_a_downloaded_bundle_and_reuses_the_cache(
    server: ThreadedServer, agent: AgentProcess
) -> None:
    bundle = _zip({"main.py": MAIN_PY, "config/settings.txt": b"lr=0.1\n"})
    url, sha = _store_bundle(server, bundle)

    first = _dispatch(server, agent, url, sha)
    status = _final_status(server, first, agent)
    assert status["state"] == "succeeded", json.dumps(status)
    assert _lines(server, first, "stdout") == ["hello from the bundle", "config: lr=0.1"]
    [unpacked] = _lines(server, first, "system")
    assert unpacked.startswith(f"Bundle {sha[:12]}: downloaded ") and "2 entries" in unpacked
    stored = server.call(lambda ctx: ctx.storage.head(f"jobs/{first}/outputs/answer.txt"))
    assert stored is not None and stored.size == 2

    second = _dispatch(server, agent, url, sha)
    assert _final_status(server, second, agent)["state"] == "succeeded"
    assert "found in the cache" in _lines(server, second, "system")[0]
    cache = agent.work_dir / ".bundles"
    assert [p.name for p in cache.iterdir()] == [f"{sha}.zip"]


def test_bundle_escaping_its_folder_is_refused_and_nothing_runs(
    server: ThreadedServer, agent: AgentProcess
) -> None:
    marker = agent.work_dir / "escaped"
    bundle = _zip({"main.py": b"print('never')\n", "../escaped": b"pwned"})
    url, sha = _store_bundle(server, bundle)

    job_id = _dispatch(server, agent, url, sha)
    status = _final_status(server, job_id, agent)
    assert (status["state"], status["failure_reason"]) == ("failed", "path_traversal"), status
    assert _lines(server, job_id, "stdout") == []
    assert "bundle was refused (path_traversal)" in _lines(server, job_id, "system")[0]
    assert not marker.exists()

    wrong = hashlib.sha256(b"not this bundle").hexdigest()
    mismatch = _dispatch(server, agent, url, wrong)
    status = _final_status(server, mismatch, agent)
    assert status["failure_reason"] == "bundle_checksum_mismatch", status


# ---------------------------------------------------------------- helpers


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _store_bundle(server: ThreadedServer, data: bytes) -> tuple[str, str]:
    """Put a bundle in the server's object store; its pre-signed GET URL and sha256."""
    sha = hashlib.sha256(data).hexdigest()
    key = f"bundles/{sha}.zip"
    server.call(lambda ctx: ctx.storage.put(key, data))
    return server.context.storage.presign_get(key, expires_in=600), sha


def _dispatch(server: ThreadedServer, agent: AgentProcess, url: str, sha: str) -> uuid.UUID:
    host_id = uuid.UUID(json.loads((agent.state_dir / "credentials.json").read_text())["host_id"])
    job_id = uuid.uuid4()
    nonce = uuid.uuid4().hex
    command = ["python3", "main.py"]
    server.call(lambda ctx: assigned_job(ctx, job_id, host_id, command, nonce))
    manifest = dispatch.build_manifest(
        context=server.context,
        job_id=job_id,
        host_id=host_id,
        command=command,
        bundle_url=url,
        bundle_sha256=sha,
        nonce=nonce,
    )
    server.call(lambda ctx: dispatch.send_manifest(context=ctx, host_id=host_id, manifest=manifest))
    return job_id


def _host_owner(server: ThreadedServer) -> dict[str, str]:
    email = unique_email("host")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        body = {"email": email, "password": PASSWORD, "roles": ["host"]}
        assert http.post("/api/v1/auth/register", json=body).status_code == 201
        login = http.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


def _stream(server: ThreadedServer, name: str) -> list[dict[str, Any]]:
    entries = server.call(lambda ctx: ctx.bus.read(name, count=100_000))
    return [json.loads(entry.data) for entry in entries]


def _final_status(server: ThreadedServer, job_id: uuid.UUID, agent: AgentProcess) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        for event in _stream(server, job_events_stream(job_id)):
            if event["type"] == "job_status" and event["state"] in FINAL:
                return event
        return None

    return dict(wait_for(final, timeout=30, what=f"job {job_id} to end", context=agent.log))


def _lines(server: ThreadedServer, job_id: uuid.UUID, stream: str) -> list[str]:
    seen: dict[int, dict[str, Any]] = {}
    for batch in _stream(server, job_logs_stream(job_id)):
        for line in batch["lines"]:
            seen.setdefault(line["seq"], line)  # at least once: duplicates carry the same seq
    return [seen[seq]["line"] for seq in sorted(seen) if seen[seq]["stream"] == stream]
