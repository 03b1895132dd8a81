"""Bus channel and stream names shared by the agent hub and the services that use it."""

from __future__ import annotations

import json
import uuid

#: Control messages on a host channel, handled by the hub and never forwarded to the agent.
SUPERSEDED_CONTROL = "_superseded"
REVOKED_CONTROL = "_revoked"
_CONTROL_PREFIX = b'{"_control": '


def control_message(kind: str, **fields: str) -> bytes:
    return _CONTROL_PREFIX + json.dumps({"kind": kind, **fields}).encode() + b"}"


def parse_control(data: bytes) -> dict[str, str] | None:
    """The control message in ``data``, or None for a message meant for the agent (agent
    messages are protocol models, whose JSON starts with their ``type``)."""
    if not data.startswith(_CONTROL_PREFIX):
        return None
    parsed: dict[str, dict[str, str]] = json.loads(data)
    return parsed["_control"]


def host_channel(host_id: uuid.UUID) -> str:
    """Pub/sub channel the replica holding a host's socket listens on."""
    return f"host:{host_id}"


def job_logs_stream(job_id: uuid.UUID) -> str:
    """Log batches of a job as they arrive (JSON ``LogBatch``); at least once, deduplicate by
    line ``seq``."""
    return f"joblogs:{job_id}"


#: Entries kept in each job's trail stream (the database holds the full record).
TRAIL_MAXLEN = 10_000


def job_events_stream(job_id: uuid.UUID) -> str:
    """What a host said about a job (manifest_ack, job_status, artifact_report), in order."""
    return f"jobevents:{job_id}"


#: Pub/sub channel that wakes every replica's scheduler loop (a job was queued, GPUs freed,
#: a host joined). The message body is irrelevant.
SCHEDULER_WAKE_CHANNEL = "scheduler:wake"
#: The wake-up as a ``(channel, data)`` pair, for ``Bus.publish_many``.
SCHEDULER_WAKE = (SCHEDULER_WAKE_CHANNEL, b"1")


def state_change(job_id: uuid.UUID, state: str) -> tuple[str, bytes]:
    """A committed state change as a ``(channel, data)`` pair on :func:`job_channel`, for
    ``Bus.publish_many``."""
    return job_channel(job_id), json.dumps({"kind": "state", "state": state}).encode()


def job_channel(job_id: uuid.UUID) -> str:
    """Pub/sub channel with a job's live changes: ``{"kind": "state", "state": ...}`` after a
    state change is committed, ``{"kind": "log", "attempt": n, "lines": [...]}`` after log
    lines are stored. A hint to followers, never the only copy: they re-read the database."""
    return f"job:{job_id}"
