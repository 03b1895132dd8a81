"""Jobs end to end: a real server (scheduler included) and real agent processes, on both
backends. A renter uploads a bundle and submits; the cheapest host runs it with live logs and
an artifact; a host killed mid-job gets its job re-queued to another host; a cancel stops a
running job and frees its GPU."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from peergpu.config import ServerSettings
from tests.integration import harness
from tests.integration.harness import AgentProcess, ThreadedServer, wait_for

pytestmark = pytest.mark.timeout(180)

FINAL = {"succeeded", "failed", "cancelled", "expired"}


@pytest.fixture
def e2e_settings(settings: ServerSettings) -> ServerSettings:
    return harness.e2e_settings(
        settings,
        scheduler_sweep_seconds=0.5,
        host_lost_grace_seconds=1.0,
        manifest_ack_timeout_seconds=10.0,
    )


@pytest.fixture
def server(e2e_settings: ServerSettings) -> Iterator[ThreadedServer]:
    running = ThreadedServer(e2e_settings).start()
    yield running
    running.stop()


class Hosts:
    """Enrols and runs agent processes for one host owner."""

    def __init__(self, server: ThreadedServer, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.owner = harness.login(server, ["host"])
        self.agents: dict[str, AgentProcess] = {}

    def add(self, name: str, simulate: str, price: str) -> str:
        agent = harness.enroll_agent(
            self.server,
            self.owner,
            self.tmp_path / name,
            simulate=simulate,
            name=name,
            price_per_gpu_hour=price,
        )
        self.agents[name] = agent
        return str(agent.host_id)

    def list(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.server.url}/api/v1/hosts", headers=self.owner, timeout=10)
        return list(response.json()["data"])

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{a.log()[-3000:]}" for n, a in self.agents.items())

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()


@pytest.fixture
def hosts(server: ThreadedServer, tmp_path: Path) -> Iterator[Hosts]:
    fleet = Hosts(server, tmp_path)
    yield fleet
    fleet.stop()


class Renter:
    def __init__(self, server: ThreadedServer) -> None:
        self.http = httpx.Client(
            base_url=server.url, headers=harness.login(server, ["renter"]), timeout=10
        )

    def submit(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/api/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, job_id: str, states: set[str], context: Any, timeout: float = 60) -> dict:
        return dict(
            wait_for(
                lambda: (job := self.job(job_id))["state"] in states and job,
                timeout=timeout,
                what=f"job {job_id} in {sorted(states)}",
                context=context,
            )
        )

    def events(self, job_id: str) -> list[tuple[str | None, str, str]]:
        data = self.http.get(f"/api/v1/jobs/{job_id}/events").json()["data"]
        return [(e["from_state"], e["to_state"], e["reason"]) for e in data]

    def lines(self, job_id: str) -> tuple[list[dict[str, Any]], bool]:
        lines: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = self.http.get(f"/api/v1/jobs/{job_id}/logs", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            lines += body["lines"]
            if not body["lines"]:
                return lines, bool(body["complete"])
            after = body["next_cursor"]


@pytest.fixture
def renter(server: ThreadedServer) -> Iterator[Renter]:
    client = Renter(server)
    yield client
    client.http.close()


def _bundle() -> bytes:
    main = (
        "import os, pathlib, sys\n"
        "for i in range(50):\n"
        "    print(f'step {i}', flush=True)\n"
        "print('warming up', file=sys.stderr)\n"
        "data = pathlib.Path('data/input.txt').read_text()\n"
        "out = pathlib.Path(os.environ['PEERGPU_OUTPUT_DIR'])\n"
        "(out / 'result.txt').write_text(data.upper())\n"
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("main.py", main)
        archive.writestr("data/input.txt", "hello gpus")
    return buffer.getvalue()


def test_a_bundle_job_runs_on_the_cheapest_host_with_logs_and_an_artifact(
    server: ThreadedServer, hosts: Hosts, renter: Renter
) -> None:
    pricey = hosts.add("pricey", "H100x2", "2.50")
    cheap = hosts.add("cheap", "RTX4090", "0.40")
    upload = renter.http.post(
        "/api/v1/bundles", content=_bundle(), headers={"Content-Type": "application/zip"}
    )
    assert upload.status_code == 201, upload.text
    job = renter.submit(
        name="e2e", bundle_sha256=upload.json()["sha256"], command=["python3", "main.py"]
    )
    assert job["state"] == "queued"
    done = renter.wait(job["id"], FINAL, hosts.logs)
    assert done["state"] == "succeeded", (done, hosts.logs())
    assert (done["host_id"], done["exit_code"], done["attempt"]) == (cheap, 0, 1)
    assert done["price_per_gpu_hour_micros"] == 400_000
    assert done["started_at"] and done["finished_at"] and done["duration_seconds"] is not None
    assert [e[1] for e in renter.events(job["id"])] == [
        "queued",
        "assigned",
        "running",
        "succeeded",
    ]

    lines, complete = renter.lines(job["id"])
    assert complete
    assert [ln["line"] for ln in lines if ln["stream"] == "stdout"] == [
        f"step {i}" for i in range(50)
    ]
    assert [ln["line"] for ln in lines if ln["stream"] == "stderr"] == ["warming up"]
    assert len({ln["cursor"] for ln in lines}) == len(lines)

    [artifact] = renter.http.get(f"/api/v1/jobs/{job['id']}/artifacts").json()["data"]
    assert artifact["path"] == "result.txt"
    assert artifact["sha256"] == hashlib.sha256(b"HELLO GPUS").hexdigest()
    download = httpx.get(artifact["download_url"], timeout=10)  # signed: no auth header
    assert download.status_code == 200 and download.content == b"HELLO GPUS"
    del pricey


def test_a_job_on_a_killed_host_is_requeued_to_another_host(
    server: ThreadedServer, hosts: Hosts, renter: Renter
) -> None:
    # Both hosts are online before the job starts (an agent takes seconds to enrol and start,
    # which a short job could outlast); the scheduler picks the cheaper one.
    first = hosts.add("first", "RTX4090", "0.40")
    second = hosts.add("second", "RTX4090", "0.90")
    job = renter.submit(
        command=[
            "python3",
            "-c",
            "import time\nfor i in range(20):\n print(i, flush=True)\n time.sleep(0.25)",
        ],
        max_retries=1,
    )
    running = renter.wait(job["id"], {"running"}, hosts.logs)
    assert running["host_id"] == first
    hosts.agents["first"].kill()
    done = renter.wait(job["id"], FINAL, hosts.logs, timeout=90)
    assert done["state"] == "succeeded", (done, hosts.logs())
    assert (done["host_id"], done["attempt"]) == (second, 2)
    transitions = [(e[1], e[2]) for e in renter.events(job["id"])]
    assert ("lost", "host_lost") in transitions and ("queued", "requeued") in transitions
    lines, complete = renter.lines(job["id"])
    assert complete
    last_attempt = [ln["line"] for ln in lines if ln["attempt"] == 2]
    assert last_attempt == [str(i) for i in range(20)]


def test_cancelling_a_running_job_stops_it_and_frees_the_gpu(
    server: ThreadedServer, hosts: Hosts, renter: Renter
) -> None:
    host = hosts.add("solo", "RTX4090", "0.40")
    job = renter.submit(command=["python3", "-c", "import time\nwhile True: time.sleep(0.1)"])
    renter.wait(job["id"], {"running"}, hosts.logs)
    cancelled = renter.http.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"

    def gpu_free() -> bool:
        market = renter.http.get("/api/v1/marketplace/hosts").json()["data"]
        return any(h["id"] == host and h["free_gpus"] == 1 for h in market)

    wait_for(gpu_free, what="the GPU freed after the host confirmed", context=hosts.logs)
    final = renter.job(job["id"])
    assert final["state"] == "cancelled" and final["failure_reason"] == "cancelled"
    # The next job can use the GPU straight away.
    started = time.monotonic()
    second = renter.submit(command=["echo", "next"])
    assert renter.wait(second["id"], FINAL, hosts.logs)["state"] == "succeeded"
    assert time.monotonic() - started < 30
