"""The agent's link across reconnects: an artifact report is not lost when the socket drops
around it. It is resent, before the job's statuses, on every new connection until the job's
final status is acknowledged (the server handles one socket's messages in order)."""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

from websockets.asyncio.client import ClientConnection

from peergpu.agent.link import Link
from peergpu.protocol.messages import ArtifactReport, FileSpec, JobStatus, StatusAck


class Socket:
    """Records what the agent sends; acknowledges nothing by itself."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, payload: str) -> None:
        self.sent.append(json.loads(payload))

    async def close(self) -> None:
        pass

    def kinds(self) -> list[tuple[str, str | None]]:
        return [(m["type"], m.get("state")) for m in self.sent]


def _report(job_id: uuid.UUID) -> ArtifactReport:
    spec = FileSpec(path="result.txt", size=3, sha256="a" * 64)
    return ArtifactReport(job_id=job_id, files=[spec], skipped=[])


async def _connect(link: Link) -> Socket:
    socket = Socket()
    await link.attach(cast(ClientConnection, socket))
    return socket


async def test_an_artifact_report_made_while_offline_goes_out_before_the_final_status() -> None:
    link, job_id = Link(max_unacked_log_bytes=1024), uuid.uuid4()
    await link.send_artifacts(_report(job_id))  # not connected: kept
    await link.send_status(JobStatus(job_id=job_id, state="succeeded", exit_code=0))
    socket = await _connect(link)
    assert socket.kinds() == [("artifact_report", None), ("job_status", "succeeded")]
    assert socket.sent[0]["files"][0]["path"] == "result.txt"


async def test_the_report_is_resent_until_the_final_status_is_acknowledged() -> None:
    link, job_id = Link(max_unacked_log_bytes=1024), uuid.uuid4()
    first = await _connect(link)
    await link.send_status(JobStatus(job_id=job_id, state="running"))
    await link.send_artifacts(_report(job_id))
    link.on_status_ack(StatusAck(job_id=job_id, state="running"))  # not final: kept
    await link.send_status(JobStatus(job_id=job_id, state="failed", exit_code=3))
    assert first.kinds() == [
        ("job_status", "running"),
        ("artifact_report", None),
        ("job_status", "failed"),
    ]
    link.detach()  # the socket dropped before the server answered
    second = await _connect(link)
    assert second.kinds() == [("artifact_report", None), ("job_status", "failed")]
    assert not await link.wait_drained(job_id, timeout=0.05)
    link.on_status_ack(StatusAck(job_id=job_id, state="failed"))
    assert await link.wait_drained(job_id, timeout=1)
    link.detach()
    third = await _connect(link)
    assert third.kinds() == []
