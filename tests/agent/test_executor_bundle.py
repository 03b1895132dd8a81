"""The executor with a bundle: fetched, verified and unpacked into the work dir before the job
runs, as the job's user; refused bundles fail the job with their reason and run nothing."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection

from peergpu.agent.bundle_fetch import BundleCache
from peergpu.agent.executor import JobExecutor
from peergpu.agent.link import Link
from peergpu.agent.runners import ProcessRunner, Runner
from peergpu.protocol.manifest import JobManifest, ManifestVerifier, new_nonce, sign_manifest
from peergpu.protocol.messages import LogAck, StatusAck

FINAL = {"succeeded", "failed", "cancelled"}
BUNDLES = "https://storage.test/bundles"

MAIN_PY = b"""\
import os, pathlib
print("hello from the bundle")
print("data:", pathlib.Path("data/input.txt").read_text().strip())
pathlib.Path("scratch.txt").write_text("the work dir is writable")
pathlib.Path("data/new.txt").write_text("so are its folders")
print("owner is job user:", os.stat("main.py").st_uid == os.getuid())
print("listing:", sorted(os.listdir(".")))
"""


def make_bundle(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


class Storage:
    """Object storage behind httpx's MockTransport: ``put`` a bundle, get its URL and sha256.
    A request for a path in ``stalled`` waits until ``release`` is set."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        self.stalled: set[str] = set()
        self.release = asyncio.Event()
        self.requested = asyncio.Event()

    def put(self, data: bytes) -> tuple[str, str]:
        sha = hashlib.sha256(data).hexdigest()
        self.objects[f"/bundles/{sha}.zip"] = data
        return f"{BUNDLES}/{sha}.zip?signature=s3cret", sha

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.hits[path] += 1
        self.requested.set()
        if path in self.stalled:
            await self.release.wait()
        if path not in self.objects:
            return httpx.Response(404)
        return httpx.Response(200, content=self.objects[path])


class FakeServer:
    """The server's end of the agent's socket: records what the agent sends, acknowledges logs
    and statuses as the real server does."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.messages: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self._acks: set[asyncio.Task[None]] = set()

    async def send(self, payload: str) -> None:
        message = json.loads(payload)
        self.messages.append(message)
        self.changed.set()
        job_id = uuid.UUID(message["job_id"]) if message.get("job_id") else uuid.UUID(int=0)
        if message["type"] == "log_batch":
            ack = LogAck(job_id=job_id, seq=message["lines"][-1]["seq"])
            task = asyncio.create_task(self.link.on_log_ack(ack))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)
        elif message["type"] == "job_status":
            status_ack = StatusAck(job_id=job_id, state=message["state"])
            asyncio.get_running_loop().call_soon(self.link.on_status_ack, status_ack)

    async def close(self) -> None:
        pass

    def of(self, job_id: uuid.UUID, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind and m.get("job_id") == str(job_id)]

    def lines(self, job_id: uuid.UUID, stream: str) -> list[str]:
        batches = self.of(job_id, "log_batch")
        return [ln["line"] for b in batches for ln in b["lines"] if ln["stream"] == stream]

    async def final(self, job_id: uuid.UUID, timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                finals = [s for s in self.of(job_id, "job_status") if s["state"] in FINAL]
                if finals:
                    return finals[0]
                self.changed.clear()
                await self.changed.wait()


class Agent:
    """An executor wired to a fake server, a real runner and a mock object store."""

    def __init__(self, work_root: Path, runner: Runner, storage: Storage) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.host_id = uuid.uuid4()
        self.link = Link(max_unacked_log_bytes=1024 * 1024)
        self.server = FakeServer(self.link)
        self.work_root = work_root
        self.cache = BundleCache(
            work_root / ".bundles", transport=httpx.MockTransport(storage.handle)
        )
        self.executor = JobExecutor(
            link=self.link,
            verifier=ManifestVerifier(self.key.public_key(), host_id=self.host_id),
            runners={"process": runner},
            work_root=work_root,
            bundles=self.cache,
        )

    async def submit(self, command: list[str], **fields: Any) -> uuid.UUID:
        now = time.time()
        manifest = JobManifest(
            job_id=uuid.uuid4(),
            host_id=self.host_id,
            issued_at=now,
            expires_at=now + 300,
            nonce=new_nonce(),
            command=command,
            **fields,
        )
        await self.executor.on_manifest(sign_manifest(self.key, manifest))
        return manifest.job_id

    async def run(self, command: list[str], **fields: Any) -> tuple[uuid.UUID, dict[str, Any]]:
        job_id = await self.submit(command, **fields)
        return job_id, await self.server.final(job_id)


@pytest.fixture
def storage() -> Storage:
    return Storage()


@pytest.fixture
async def agent(job_root: Path, storage: Storage) -> AsyncIterator[Agent]:
    running = Agent(job_root, ProcessRunner(kill_grace_seconds=1.0), storage)
    await running.link.attach(cast(ClientConnection, running.server))
    yield running
    await running.executor.shutdown()


async def test_bundle_is_unpacked_and_runs_as_the_job_user(
    job_root: Path, storage: Storage, process_runner: ProcessRunner
) -> None:
    agent = Agent(job_root, process_runner, storage)
    await agent.link.attach(cast(ClientConnection, agent.server))
    url, sha = storage.put(make_bundle({"main.py": MAIN_PY, "data/input.txt": b"42\n"}))

    job_id, status = await agent.run(["python3", "main.py"], bundle_url=url, bundle_sha256=sha)

    assert status["state"] == "succeeded", status
    stdout = agent.server.lines(job_id, "stdout")
    assert stdout[:3] == ["hello from the bundle", "data: 42", "owner is job user: True"]
    listing = stdout[3]
    assert "'main.py'" in listing and "'data'" in listing and "'scratch.txt'" in listing
    [unpacked] = agent.server.lines(job_id, "system")
    assert unpacked.startswith(f"Bundle {sha[:12]}: downloaded ")
    assert "unpacked 2 entries" in unpacked
    assert status["last_log_seq"] == len(stdout)  # seq 0 is the system line
    await agent.executor.shutdown()


async def test_second_job_with_the_same_bundle_uses_the_cache(
    agent: Agent, storage: Storage
) -> None:
    url, sha = storage.put(make_bundle({"main.py": b"print('cached run')\n"}))
    first = await agent.run(["python3", "main.py"], bundle_url=url, bundle_sha256=sha)
    second = await agent.run(["python3", "main.py"], bundle_url=url, bundle_sha256=sha)
    assert [s["state"] for _, s in (first, second)] == ["succeeded", "succeeded"]
    assert storage.hits[f"/bundles/{sha}.zip"] == 1
    assert "found in the cache" in agent.server.lines(second[0], "system")[0]
    assert agent.server.lines(second[0], "stdout") == ["cached run"]


async def test_zip_slip_bundle_is_refused_and_nothing_runs(
    agent: Agent, storage: Storage, job_root: Path
) -> None:
    marker = job_root / "ran"
    url, sha = storage.put(make_bundle({"main.py": b"print('x')\n", "../evil.py": b"pwned"}))
    job_id, status = await agent.run(
        ["sh", "-c", f"touch {marker}; echo ran"], bundle_url=url, bundle_sha256=sha
    )
    assert (status["state"], status["failure_reason"]) == ("failed", "path_traversal")
    assert "'..'" in status["message"]
    [line] = agent.server.lines(job_id, "system")
    assert "bundle was refused (path_traversal)" in line
    assert agent.server.lines(job_id, "stdout") == []
    assert status["last_log_seq"] == 0
    assert not marker.exists() and not (job_root / "evil.py").exists()
    statuses = agent.server.of(job_id, "job_status")
    assert [s["state"] for s in statuses] == ["running", "failed"]  # exactly one final status


async def test_checksum_mismatch_fails_the_job(agent: Agent, storage: Storage) -> None:
    url, _ = storage.put(make_bundle({"main.py": b"print('x')\n"}))
    wrong = hashlib.sha256(b"another bundle").hexdigest()
    job_id, status = await agent.run(["python3", "main.py"], bundle_url=url, bundle_sha256=wrong)
    assert (status["state"], status["failure_reason"]) == ("failed", "bundle_checksum_mismatch")
    assert agent.server.lines(job_id, "stdout") == []
    assert "s3cret" not in json.dumps(agent.server.of(job_id, "log_batch") + [status])


async def test_missing_bundle_fails_the_job(agent: Agent) -> None:
    url = f"{BUNDLES}/{'0' * 64}.zip"
    _, status = await agent.run(["true"], bundle_url=url, bundle_sha256="0" * 64)
    assert (status["state"], status["failure_reason"]) == ("failed", "bundle_download_failed")
    assert "HTTP 404" in status["message"]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"bundle_url": f"{BUNDLES}/x.zip"}, "no bundle sha256"),
        ({"bundle_sha256": "a" * 64}, "no bundle URL"),
        ({"bundle_url": f"{BUNDLES}/x.zip", "bundle_sha256": "../../x"}, "not 64 hexadecimal"),
        ({"bundle_url": "file:///etc/passwd", "bundle_sha256": "a" * 64}, "not an http(s)"),
    ],
)
async def test_incomplete_bundle_fields_are_malformed(
    agent: Agent, storage: Storage, fields: dict[str, str], problem: str
) -> None:
    job_id = await agent.submit(["true"], **fields)
    [ack] = agent.server.of(job_id, "manifest_ack")
    assert (ack["accepted"], ack["reason"]) == (False, "malformed")
    assert problem in ack["message"]
    assert agent.server.of(job_id, "job_status") == [] and not storage.hits


async def test_cancel_while_downloading_runs_nothing(agent: Agent, storage: Storage) -> None:
    url, sha = storage.put(make_bundle({"main.py": b"print('x')\n"}))
    storage.stalled.add(f"/bundles/{sha}.zip")
    job_id = await agent.submit(["python3", "main.py"], bundle_url=url, bundle_sha256=sha)
    await storage.requested.wait()
    await agent.executor.cancel(job_id)
    status = await agent.server.final(job_id)
    assert (status["state"], status["failure_reason"]) == ("cancelled", "cancelled")
    assert agent.server.lines(job_id, "stdout") == []
    assert [p.name for p in agent.cache.root.iterdir()] == []  # no partial download left


async def test_stale_work_dir_is_replaced_by_the_bundle(
    agent: Agent, storage: Storage, job_root: Path
) -> None:
    url, sha = storage.put(make_bundle({"main.py": b"import os; print(sorted(os.listdir()))\n"}))
    now = time.time()
    manifest = JobManifest(
        job_id=uuid.uuid4(),
        host_id=agent.host_id,
        issued_at=now,
        expires_at=now + 300,
        nonce=new_nonce(),
        command=["python3", "main.py"],
        bundle_url=url,
        bundle_sha256=sha,
    )
    stale = job_root / str(manifest.job_id)
    stale.mkdir()
    (stale / "main.py").write_text("print('stale code')\n")
    (stale / "leftover.txt").write_text("from a run the agent did not finish")
    await agent.executor.on_manifest(sign_manifest(agent.key, manifest))
    status = await agent.server.final(manifest.job_id)
    assert status["state"] == "succeeded", status
    [listing] = agent.server.lines(manifest.job_id, "stdout")
    assert "'main.py'" in listing and "leftover.txt" not in listing
