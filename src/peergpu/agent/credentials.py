"""The host credential: obtained once with an enrolment token, kept with 0600 permissions."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx


class EnrollmentError(RuntimeError):
    """Enrolment failed; the message says why and what to do."""


class MissingCredentials(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Credentials:
    server_url: str
    host_id: uuid.UUID
    credential: str
    server_public_key: str
    key_id: str
    heartbeat_interval: float
    websocket_path: str

    @property
    def websocket_url(self) -> str:
        base = self.server_url.rstrip("/")
        scheme = "wss://" if base.startswith("https://") else "ws://"
        return scheme + base.split("://", 1)[1] + self.websocket_path


def save(path: Path, credentials: Credentials) -> None:
    """Write atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {**asdict(credentials), "host_id": str(credentials.host_id)}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def load(path: Path) -> Credentials:
    if not path.exists():
        raise MissingCredentials(
            f"No host credential at {path}. Enrol this machine first: "
            "peergpu agent enroll --server URL --token TOKEN"
        )
    data = json.loads(path.read_text())
    return Credentials(**{**data, "host_id": uuid.UUID(data["host_id"])})


async def enroll(
    *, server_url: str, token: str, hostname: str, transport: httpx.AsyncBaseTransport | None = None
) -> Credentials:
    """Exchange a one-time enrolment token for this host's credential."""
    server_url = server_url.rstrip("/")
    try:
        async with httpx.AsyncClient(base_url=server_url, timeout=30, transport=transport) as http:
            response = await http.post(
                "/api/v1/agent/enroll", json={"token": token, "hostname": hostname}
            )
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"Could not reach {server_url}: {exc}") from exc
    if response.status_code != 200:
        raise EnrollmentError(_error_message(response))
    body = response.json()
    return Credentials(
        server_url=server_url,
        host_id=uuid.UUID(body["host_id"]),
        credential=body["credential"],
        server_public_key=body["server_public_key"],
        key_id=body["key_id"],
        heartbeat_interval=float(body["heartbeat_interval"]),
        websocket_path=body["websocket_path"],
    )


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['message']} ({error['code']}, HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        return f"The server answered HTTP {response.status_code}: {response.text[:200]}"
