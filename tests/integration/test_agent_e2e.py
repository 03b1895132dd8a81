"""A real server and real agent processes over a real WebSocket, on both backends.

Enrol -> online with simulated GPUs -> offline when killed -> back after a server restart;
signed manifests run real commands with logs in order; bad manifests are refused.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from peergpu.config import ServerSettings
from peergpu.protocol.manifest import JobManifest, ManifestLimits, SignedManifest, sign_manifest
from peergpu.server.agents import dispatch
from peergpu.server.agents.channels import job_events_stream
from tests.integration import harness
from tests.integration.harness import (
    AgentProcess,
    ThreadedServer,
    assigned_job,
    bus_stream,
    final_status,
    log_lines,
    wait_for,
)


@pytest.fixture
def e2e_settings(settings: ServerSettings) -> ServerSettings:
    return harness.e2e_settings(settings)


@pytest.fixture
def server(e2e_settings: ServerSettings) -> Iterator[ThreadedServer]:
    running = ThreadedServer(e2e_settings).start()
    yield running
    running.stop()


@pytest.fixture
def owner(server: ThreadedServer) -> dict[str, str]:
    return harness.login(server, ["host"], "host")


def _enrollment_token(server: ThreadedServer, owner: dict[str, str], **body: Any) -> str:
    response = httpx.post(
        f"{server.url}/api/v1/hosts/enrollment-tokens", json=body, headers=owner, timeout=10
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def _hosts(server: ThreadedServer, owner: dict[str, str]) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/v1/hosts", headers=owner, timeout=10)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


@pytest.fixture
def agent(server: ThreadedServer, owner: dict[str, str], tmp_path: Path) -> Iterator[AgentProcess]:
    process = harness.enroll_agent(
        server, owner, tmp_path / "agent", name="rig-1", price_per_gpu_hour="1.25"
    )
    yield process
    process.stop()


def _send(server: ThreadedServer, host_id: uuid.UUID, manifest: SignedManifest) -> None:
    server.call(lambda ctx: dispatch.send_manifest(context=ctx, host_id=host_id, manifest=manifest))


def _run(
    server: ThreadedServer, host_id: uuid.UUID, command: list[str], **kwargs: Any
) -> uuid.UUID:
    """Dispatch a manifest by hand for a job row assigned to the host (as the scheduler would:
    the server believes only a job's current host, and stops jobs a host should not run)."""
    job_id = uuid.uuid4()
    nonce = uuid.uuid4().hex
    server.call(lambda ctx: assigned_job(ctx, job_id, host_id, command, nonce))
    manifest = dispatch.build_manifest(
        context=server.context,
        job_id=job_id,
        host_id=host_id,
        command=command,
        nonce=nonce,
        **kwargs,
    )
    _send(server, host_id, manifest)
    return job_id


def _ack(server: ThreadedServer, job_id: uuid.UUID, agent: AgentProcess) -> dict[str, Any]:
    def ack() -> dict[str, Any] | None:
        events = [
            e for e in bus_stream(server, job_events_stream(job_id)) if e["type"] == "manifest_ack"
        ]
        return events[0] if events else None

    return dict(wait_for(ack, what=f"an ack for {job_id}", context=agent.log))


def test_enrolled_agent_appears_online_with_its_gpus(
    server: ThreadedServer, owner: dict[str, str], agent: AgentProcess
) -> None:
    [host] = _hosts(server, owner)
    assert host["name"] == "rig-1"
    assert host["price_per_gpu_hour"] == "1.25"
    assert host["availability"] == "online" and host["gpu_probe"] == "simulated"
    assert [g["model"] for g in host["gpus"]] == [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA GeForce RTX 4090",
    ]
    assert host["gpus"][0]["memory_total_mib"] > 80_000
    # heartbeats carry samples
    wait_for(
        lambda: all(g["sampled_at"] for g in _hosts(server, owner)[0]["gpus"]),
        what="GPU samples from heartbeats",
    )
    credentials = agent.state_dir / "credentials.json"
    assert credentials.stat().st_mode & 0o777 == 0o600


def test_enrollment_token_works_once(
    server: ThreadedServer, owner: dict[str, str], tmp_path: Path
) -> None:
    token = _enrollment_token(server, owner)
    first = AgentProcess(state_dir=tmp_path / "a").enroll(server.url, token)
    assert first.returncode == 0, first.stderr
    second = AgentProcess(state_dir=tmp_path / "b").enroll(server.url, token)
    assert second.returncode != 0
    assert "invalid, expired or already used" in second.stderr + second.stdout


def test_killed_agent_goes_offline_and_returns_after_a_server_restart(
    server: ThreadedServer, owner: dict[str, str], agent: AgentProcess, e2e_settings: ServerSettings
) -> None:
    agent.kill()
    wait_for(lambda: _hosts(server, owner)[0]["status"] == "offline", what="offline after kill")

    agent.start()
    wait_for(
        lambda: _hosts(server, owner)[0]["status"] == "online",
        what="back online",
        context=agent.log,
    )
    server.stop()
    restarted = ThreadedServer(e2e_settings).start()
    try:
        wait_for(
            lambda: _hosts(restarted, owner)[0]["status"] == "online",
            what="online after the server restart",
            context=agent.log,
        )
        assert _hosts(restarted, owner)[0]["uptime_30d"] > 0
    finally:
        restarted.stop()


def test_signed_manifest_runs_a_real_command_with_ordered_logs(
    server: ThreadedServer, agent: AgentProcess
) -> None:
    host_id = agent.host_id
    script = (
        "import sys\nfor i in range(300):\n    print(f'line {i}', flush=True)\n"
        "print('oops', file=sys.stderr)\n"
        "import os, pathlib\n"
        "pathlib.Path(os.environ['PEERGPU_OUTPUT_DIR'], 'result.txt').write_text('42')\n"
    )
    job_id = _run(server, host_id, ["python3", "-c", script], env={"GREETING": "hi"})
    assert _ack(server, job_id, agent)["accepted"] is True
    status = final_status(server, job_id, agent)
    assert status["state"] == "succeeded", json.dumps(status)
    assert status["exit_code"] == 0
    lines = log_lines(server, job_id)
    stdout = [ln["line"] for ln in lines if ln["stream"] == "stdout"]
    assert stdout == [f"line {i}" for i in range(300)]
    assert [ln["line"] for ln in lines if ln["stream"] == "stderr"] == ["oops"]
    assert [ln["seq"] for ln in lines] == list(range(len(lines)))
    assert status["last_log_seq"] == len(lines) - 1
    [report] = [
        e for e in bus_stream(server, job_events_stream(job_id)) if e["type"] == "artifact_report"
    ]
    assert report["files"] == [
        {"path": "result.txt", "size": 2, "sha256": hashlib.sha256(b"42").hexdigest()}
    ]
    stored = server.call(lambda ctx: ctx.storage.head(f"jobs/{job_id}/outputs/result.txt"))
    assert stored is not None and stored.size == 2


def test_failures_are_reported_with_reasons(server: ThreadedServer, agent: AgentProcess) -> None:
    host_id = agent.host_id
    exit_code = _run(server, host_id, ["sh", "-c", "echo bye; exit 3"])
    loop = _run(
        server,
        host_id,
        ["python3", "-c", "while True: pass"],
        limits=ManifestLimits(wall_clock_seconds=1),
    )
    hog = _run(
        server,
        host_id,
        ["python3", "-c", "x = bytearray(1 << 30)"],
        limits=ManifestLimits(memory_bytes=256 * 1024 * 1024),
    )
    failed = final_status(server, exit_code, agent)
    assert (failed["state"], failed["exit_code"]) == ("failed", 3)
    timed_out = final_status(server, loop, agent)
    assert timed_out["state"] == "failed" and timed_out["failure_reason"] == "timeout"
    assert timed_out["duration_seconds"] < 5
    hogged = final_status(server, hog, agent)
    assert hogged["state"] == "failed" and hogged["failure_reason"] == "memory_limit", hogged


def test_bad_manifests_are_refused_and_reported(
    server: ThreadedServer, agent: AgentProcess
) -> None:
    host_id = agent.host_id
    key = server.context.signing_key
    now = time.time()

    def manifest(**overrides: Any) -> JobManifest:
        fields: dict[str, Any] = {
            "job_id": uuid.uuid4(),
            "host_id": host_id,
            "issued_at": now,
            "expires_at": now + 300,
            "nonce": uuid.uuid4().hex,
            "command": ["echo", "pwned"],
        }
        return JobManifest(**(fields | overrides))

    good = sign_manifest(key, manifest())
    tampered_payload = good.payload.replace('"echo"', '"rm"')
    tampered = SignedManifest(
        payload=tampered_payload, signature=good.signature, key_id=good.key_id
    )
    unsigned = SignedManifest(payload=manifest().model_dump_json())
    expired = sign_manifest(key, manifest(issued_at=now - 900, expires_at=now - 600))
    foreign = sign_manifest(key, manifest(host_id=uuid.uuid4()))
    cases = {
        "bad_signature": tampered,
        "unsigned": unsigned,
        "expired": expired,
        "wrong_host": foreign,
    }
    for reason, signed in cases.items():
        _send(server, host_id, signed)
        job_id = JobManifest.model_validate_json(signed.payload).job_id
        ack = _ack(server, job_id, agent)
        assert (ack["accepted"], ack["reason"]) == (False, reason), ack

    # A replay: the same signed manifest delivered twice runs once.
    replay_id = uuid.uuid4()
    once = dispatch.build_manifest(
        context=server.context, job_id=replay_id, host_id=host_id, command=["echo", "once"]
    )
    _send(server, host_id, once)
    _send(server, host_id, once)
    acks = wait_for(
        lambda: (
            [
                e
                for e in bus_stream(server, job_events_stream(replay_id))
                if e["type"] == "manifest_ack"
            ][1:]
            and [
                e
                for e in bus_stream(server, job_events_stream(replay_id))
                if e["type"] == "manifest_ack"
            ]
        ),
        what="two acks",
        context=agent.log,
    )
    assert [(a["accepted"], a["reason"]) for a in acks] == [(True, None), (False, "replayed")]
    final_status(server, replay_id, agent)
    assert [ln["line"] for ln in log_lines(server, replay_id)] == ["once"]
    # The same job again under a fresh nonce is refused too: a job id runs once per host.
    again = dispatch.build_manifest(
        context=server.context, job_id=replay_id, host_id=host_id, command=["echo", "twice"]
    )
    _send(server, host_id, again)
    wait_for(
        lambda: (
            len(
                [
                    e
                    for e in bus_stream(server, job_events_stream(replay_id))
                    if e["type"] == "manifest_ack"
                ]
            )
            == 3
        ),
        what="a third ack",
        context=agent.log,
    )
    third = [
        e for e in bus_stream(server, job_events_stream(replay_id)) if e["type"] == "manifest_ack"
    ]
    assert (third[2]["accepted"], third[2]["reason"]) == (False, "replayed")
