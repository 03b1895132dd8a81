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

import pytest

from peergpu.config import ServerSettings
from peergpu.server.agents import dispatch
from tests.integration import harness
from tests.integration.harness import (
    AgentProcess,
    ThreadedServer,
    assigned_job,
    final_status,
    log_lines,
)

MAIN_PY = b"""\
import os, pathlib
print("hello from the bundle")
print("config:", pathlib.Path("config/settings.txt").read_text().strip())
pathlib.Path(os.environ["PEERGPU_OUTPUT_DIR"], "answer.txt").write_text("42")
"""


@pytest.fixture
def server(settings: ServerSettings) -> Iterator[ThreadedServer]:
    running = ThreadedServer(harness.e2e_settings(settings)).start()
    yield running
    running.stop()


@pytest.fixture
def agent(server: ThreadedServer, tmp_path: Path) -> Iterator[AgentProcess]:
    owner = harness.login(server, ["host"], "host")
    process = harness.enroll_agent(server, owner, tmp_path / "agent")
    yield process
    process.stop()


def test_job_runs_from_a_downloaded_bundle_and_reuses_the_cache(
    server: ThreadedServer, agent: AgentProcess
) -> None:
    bundle = _zip({"main.py": MAIN_PY, "config/settings.txt": b"lr=0.1\n"})
    url, sha = _store_bundle(server, bundle)

    first = _dispatch(server, agent, url, sha)
    status = final_status(server, first, agent)
    assert status["state"] == "succeeded", json.dumps(status)
    assert _lines(server, first, "stdout") == ["hello from the bundle", "config: lr=0.1"]
    [unpacked] = _lines(server, first, "system")
    assert unpacked.startswith(f"Bundle {sha[:12]}: downloaded ") and "2 entries" in unpacked
    stored = server.call(lambda ctx: ctx.storage.head(f"jobs/{first}/outputs/answer.txt"))
    assert stored is not None and stored.size == 2

    second = _dispatch(server, agent, url, sha)
    assert final_status(server, second, agent)["state"] == "succeeded"
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
    status = final_status(server, job_id, agent)
    assert (status["state"], status["failure_reason"]) == ("failed", "path_traversal"), status
    assert _lines(server, job_id, "stdout") == []
    assert "bundle was refused (path_traversal)" in _lines(server, job_id, "system")[0]
    assert not marker.exists()

    wrong = hashlib.sha256(b"not this bundle").hexdigest()
    mismatch = _dispatch(server, agent, url, wrong)
    status = final_status(server, mismatch, agent)
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
    host_id = agent.host_id
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


def _lines(server: ThreadedServer, job_id: uuid.UUID, stream: str) -> list[str]:
    return [ln["line"] for ln in log_lines(server, job_id) if ln["stream"] == stream]
