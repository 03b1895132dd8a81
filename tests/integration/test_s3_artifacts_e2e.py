"""Artifacts end to end through S3: a real server configured by ``PEERGPU_S3_*`` to use an
S3-compatible server on loopback (moto, checking pre-signed URLs as AWS does; see
``tests/storage/testing_s3.py``), a real agent process, and a renter on the public API.

The agent PUTs a job's output files straight to S3 through the URLs the server grants (bound
to each file's length and SHA-256), the server checks what landed with a HEAD, and the renter
downloads through S3 pre-signed GETs. The server never sees the bytes. Storage does not depend
on the database, so this runs on SQLite only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from peergpu.config import ServerSettings
from peergpu.server.storage.s3 import S3ObjectStore
from tests.integration import harness
from tests.integration.harness import AgentProcess, ThreadedServer, free_port, wait_for
from tests.storage.testing_s3 import S3Server

pytestmark = pytest.mark.timeout(120)

FINAL = {"succeeded", "failed", "cancelled", "expired"}
PREFIX = "peergpu/"
# Deterministic bytes so the test knows their digest: 300 KB of a repeating pattern.
JOB = (
    "import os, pathlib\n"
    "out = pathlib.Path(os.environ['PEERGPU_OUTPUT_DIR'])\n"
    "(out / 'result.txt').write_text('42')\n"
    "(out / 'model').mkdir()\n"
    "(out / 'model' / 'weights.bin').write_bytes(bytes(range(256)) * 1200)\n"
)
EXPECTED = {"result.txt": b"42", "model/weights.bin": bytes(range(256)) * 1200}


@pytest.fixture
def backend() -> str:
    return "sqlite+memory"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "s3-server.log").start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    name = f"e2e-{os.urandom(8).hex()}"
    s3_server.client.create_bucket(Bucket=name)
    yield name
    s3_server.reset()


@pytest.fixture
def server(
    settings: ServerSettings, s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ThreadedServer]:
    # What `peergpu server` reads from its environment (the agent's environment drops them).
    for name, value in s3_server.settings_env(bucket, prefix=PREFIX).items():
        monkeypatch.setenv(name, value)
    from_env = ServerSettings(data_dir=settings.data_dir)
    port = free_port()
    s3 = {name: getattr(from_env, name) for name in ServerSettings.model_fields if "s3_" in name}
    running = ThreadedServer(
        settings.model_copy(
            update={
                **s3,
                "port": port,
                "public_url": f"http://127.0.0.1:{port}",
                "agent_heartbeat_seconds": 0.5,
                "scheduler_sweep_seconds": 0.5,
            }
        )
    ).start()
    yield running
    running.stop()


@pytest.fixture
def agent(server: ThreadedServer, tmp_path: Path) -> Iterator[AgentProcess]:
    owner = harness.login(server, ["host"], "s3e2e")
    process = harness.enroll_agent(
        server,
        owner,
        tmp_path / "agent",
        simulate="RTX4090",
        name="rig",
        price_per_gpu_hour="0.50",
    )
    yield process
    process.stop()


def test_job_outputs_land_in_s3_and_download_from_it(
    server: ThreadedServer, agent: AgentProcess, s3_server: S3Server, bucket: str
) -> None:
    assert isinstance(server.context.storage, S3ObjectStore)
    with httpx.Client(
        base_url=server.url, headers=harness.login(server, ["renter"]), timeout=10
    ) as renter:
        submitted = renter.post("/api/v1/jobs", json={"command": ["python3", "-c", JOB]})
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]

        def finished() -> dict[str, Any] | None:
            job = renter.get(f"/api/v1/jobs/{job_id}").json()
            return job if job["state"] in FINAL else None

        done = wait_for(finished, timeout=60, what="the job to end", context=agent.log)
        assert done["state"] == "succeeded", (done, agent.log()[-3000:])

        def artifacts() -> list[dict[str, Any]]:
            listed = renter.get(f"/api/v1/jobs/{job_id}/artifacts").json()["data"]
            return list(listed) if len(listed) == len(EXPECTED) else []

        listed = wait_for(artifacts, what="both artifacts recorded", context=agent.log)

    digests = {path: hashlib.sha256(body).hexdigest() for path, body in EXPECTED.items()}
    assert {a["path"]: (a["size"], a["sha256"]) for a in listed} == {
        path: (len(EXPECTED[path]), digests[path]) for path in EXPECTED
    }
    # In the bucket, under the prefix, with S3's own record of the SHA-256.
    outputs = f"{PREFIX}jobs/{job_id}/outputs/"
    stored = s3_server.objects(bucket)  # the job's log chunks are there too
    assert [key for key in stored if key.startswith(outputs)] == [
        outputs + path for path in sorted(EXPECTED)
    ]
    assert all(key.startswith(PREFIX) for key in stored)
    for path in EXPECTED:
        info = server.call(lambda ctx, p=path: ctx.storage.head(f"jobs/{job_id}/outputs/{p}"))
        assert info is not None and info.sha256 == digests[path], path

    # Downloads come straight from S3, offered under the file's own name.
    for artifact in listed:
        assert artifact["download_url"].startswith(f"{s3_server.url}/{bucket}/{PREFIX}jobs/")
        download = httpx.get(artifact["download_url"], timeout=10)
        assert download.status_code == 200, download.text
        assert download.content == EXPECTED[artifact["path"]]
        name = artifact["path"].rsplit("/", 1)[-1]
        assert download.headers["content-disposition"].startswith(f'attachment; filename="{name}"')
