"""Agent <-> server messages (JSON over one WebSocket), version 1.

Every message is a JSON object with a ``type``. The agent opens with ``hello`` listing the
protocol versions it speaks; the server answers ``welcome`` with the one it chose, or an
``error`` with code ``unsupported_protocol_version`` and closes the socket with
``CLOSE_UNSUPPORTED_VERSION``. Unknown fields are ignored (a newer minor peer may add some);
unknown message types are answered with an ``error`` and otherwise ignored.

Agent -> server: hello, heartbeat, manifest_ack, log_batch, job_status, upload_request,
artifact_report, infer_chunk, infer_end, error.   Server -> agent: welcome, manifest, cancel,
log_ack, status_ack, upload_grant, infer_start, infer_cancel, error. Log batches and job
statuses are resent after a reconnect until acknowledged, so the server must treat repeats as
no-ops (log lines carry a ``seq``). Inference streams are not resent: a stream whose socket
drops fails, and the server may retry it on another host.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from peergpu.protocol.manifest import SignedManifest

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: frozenset[int] = frozenset({1})

#: WebSocket close codes (4000-4999 are application codes).
CLOSE_UNAUTHORIZED = 4401
CLOSE_UNSUPPORTED_VERSION = 4426
CLOSE_SUPERSEDED = 4409  # the same host connected again elsewhere; this socket is stale
CLOSE_PROTOCOL_ERROR = 4400


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# ---------------------------------------------------------------- shared parts


class GpuSpec(_Message):
    index: int = Field(ge=0)
    uuid: str = Field(max_length=128)
    model: str = Field(max_length=128)
    memory_total_mib: int = Field(ge=0)
    driver_version: str = Field(default="", max_length=64)
    cuda_version: str | None = Field(default=None, max_length=16)
    compute_capability: str | None = Field(default=None, max_length=16)


class GpuSampleSpec(_Message):
    index: int = Field(ge=0)
    utilization_percent: float = Field(ge=0, le=100)
    memory_used_mib: int = Field(ge=0)
    temperature_c: float | None = None
    power_watts: float | None = None


class LogLineSpec(_Message):
    seq: int = Field(ge=0)
    stream: Literal["stdout", "stderr", "system"]
    line: str
    ts: float


class FileSpec(_Message):
    path: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


#: What a served model's name may look like (Hugging Face ids, Ollama tags: ``org/name:tag``).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"


class ServedModelSpec(_Message):
    """A model the host serves through the inference gateway, from its agent's settings. The
    engine's address stays on the host; the server only routes by name."""

    name: str = Field(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)
    kind: Literal["chat", "embeddings"]
    max_concurrency: int = Field(default=4, ge=1, le=1024)
    input_price_per_million_micros: int = Field(default=0, ge=0, le=10**12)
    output_price_per_million_micros: int = Field(default=0, ge=0, le=10**12)


#: An inference stream's id: 32 lowercase hex digits (a uuid4), unguessable.
STREAM_ID_PATTERN = r"^[0-9a-f]{32}$"
InferEndpoint = Literal["chat.completions", "embeddings"]


class InferUsage(_Message):
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)


# ---------------------------------------------------------------- agent -> server


class Hello(_Message):
    type: Literal["hello"] = "hello"
    protocol_versions: list[int] = Field(min_length=1)
    agent_version: str = Field(max_length=64)
    hostname: str = Field(default="", max_length=255)
    os: str = Field(default="", max_length=255)
    gpu_probe: str = Field(default="", max_length=32)
    runners: list[str] = Field(default_factory=list)
    gpus: list[GpuSpec] = Field(default_factory=list, max_length=64)
    running_jobs: list[uuid.UUID] = Field(default_factory=list)
    #: Models served through the inference gateway (absent from older agents: none).
    models: list[ServedModelSpec] = Field(default_factory=list, max_length=64)


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    gpus: list[GpuSampleSpec] = Field(default_factory=list, max_length=64)
    running_jobs: list[uuid.UUID] = Field(default_factory=list)
    load_average: float | None = None


class ManifestAck(_Message):
    """The agent's answer to a manifest: accepted (it will run), or refused with a reason code
    (``unsigned``, ``bad_signature``, ``wrong_host``, ``expired``, ``replayed``, ``malformed``,
    ``unsupported_runner``)."""

    type: Literal["manifest_ack"] = "manifest_ack"
    job_id: uuid.UUID | None
    nonce: str | None = None
    accepted: bool
    reason: str | None = None
    message: str = ""


class LogBatch(_Message):
    type: Literal["log_batch"] = "log_batch"
    job_id: uuid.UUID
    lines: list[LogLineSpec] = Field(min_length=1)


class JobStatus(_Message):
    """A job's state on the host. ``running`` once started; a final state carries the outcome."""

    type: Literal["job_status"] = "job_status"
    job_id: uuid.UUID
    state: Literal["running", "succeeded", "failed", "cancelled"]
    exit_code: int | None = None
    duration_seconds: float | None = None
    failure_reason: str | None = None
    message: str = ""
    peak_memory_bytes: int | None = None
    cpu_seconds: float | None = None
    last_log_seq: int | None = Field(default=None, description="seq of the job's last log line")


class UploadRequest(_Message):
    type: Literal["upload_request"] = "upload_request"
    job_id: uuid.UUID
    files: list[FileSpec] = Field(min_length=1, max_length=1000)


class ArtifactReport(_Message):
    type: Literal["artifact_report"] = "artifact_report"
    job_id: uuid.UUID
    files: list[FileSpec] = Field(max_length=1000)
    skipped: list[str] = Field(default_factory=list, description="files not uploaded, and why")


class InferChunk(_Message):
    """Part of an inference answer. Streaming: each item of ``data`` is one server-sent
    event's data (a ``chat.completion.chunk`` JSON). Otherwise: one item, the whole JSON
    answer. ``reply_to`` echoes the ``infer_start``'s, so any replica can route it."""

    type: Literal["infer_chunk"] = "infer_chunk"
    stream_id: str = Field(pattern=STREAM_ID_PATTERN)
    reply_to: str = Field(max_length=64)
    seq: int = Field(ge=0)
    data: list[str] = Field(min_length=1)


class InferEnd(_Message):
    """The end of an inference stream. ``ok`` false carries the engine's (or the agent's)
    error: ``status`` is the HTTP status to answer, ``code`` e.g. ``host_busy``,
    ``model_not_found``, ``engine_unavailable``, ``engine_error``, ``timeout``,
    ``cancelled``. ``usage`` is what the engine counted, also for a partial answer."""

    type: Literal["infer_end"] = "infer_end"
    stream_id: str = Field(pattern=STREAM_ID_PATTERN)
    reply_to: str = Field(max_length=64)
    ok: bool
    status: int = Field(default=200, ge=100, le=599)
    code: str | None = Field(default=None, max_length=64)
    message: str = Field(default="", max_length=4000)
    error_type: str = Field(default="server_error", max_length=64)
    param: str | None = Field(default=None, max_length=128)
    usage: InferUsage | None = None


class ErrorMessage(_Message):
    type: Literal["error"] = "error"
    code: str
    message: str
    job_id: uuid.UUID | None = None


AgentMessage = Annotated[
    Hello
    | Heartbeat
    | ManifestAck
    | LogBatch
    | JobStatus
    | UploadRequest
    | ArtifactReport
    | InferChunk
    | InferEnd
    | ErrorMessage,
    Field(discriminator="type"),
]

# ---------------------------------------------------------------- server -> agent


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    protocol_version: int
    host_id: uuid.UUID
    heartbeat_interval: float
    server_time: float


class ManifestDelivery(_Message):
    type: Literal["manifest"] = "manifest"
    manifest: SignedManifest


class Cancel(_Message):
    type: Literal["cancel"] = "cancel"
    job_id: uuid.UUID
    reason: str = ""


class LogAck(_Message):
    """Every log line of ``job_id`` up to and including ``seq`` is stored; the agent may drop
    them from its resend buffer."""

    type: Literal["log_ack"] = "log_ack"
    job_id: uuid.UUID
    seq: int


class StatusAck(_Message):
    """The server stored this job status; the agent stops resending it."""

    type: Literal["status_ack"] = "status_ack"
    job_id: uuid.UUID
    state: str


class UploadTarget(_Message):
    path: str
    url: str


class UploadGrant(_Message):
    type: Literal["upload_grant"] = "upload_grant"
    job_id: uuid.UUID
    uploads: list[UploadTarget]
    refused: dict[str, str] = Field(default_factory=dict, description="path -> reason")


class InferStart(_Message):
    """Relay one OpenAI request to the host's engine for ``model``. ``body`` is the renter's
    request as the gateway validated it; the agent answers with ``infer_chunk`` frames and one
    ``infer_end`` by ``deadline`` (unix time)."""

    type: Literal["infer_start"] = "infer_start"
    stream_id: str = Field(pattern=STREAM_ID_PATTERN)
    reply_to: str = Field(max_length=64)
    endpoint: InferEndpoint
    model: str = Field(max_length=128)
    body: dict[str, Any]
    deadline: float


class InferCancel(_Message):
    """The renter went away (or the gateway gave up): stop generating, answer ``infer_end``."""

    type: Literal["infer_cancel"] = "infer_cancel"
    stream_id: str = Field(pattern=STREAM_ID_PATTERN)


ServerMessage = Annotated[
    Welcome
    | ManifestDelivery
    | Cancel
    | LogAck
    | StatusAck
    | UploadGrant
    | InferStart
    | InferCancel
    | ErrorMessage,
    Field(discriminator="type"),
]

_agent_adapter: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)
_server_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


def parse_agent_message(raw: str | bytes) -> AgentMessage:
    """Parse one agent frame; raises pydantic.ValidationError on anything malformed."""
    return _agent_adapter.validate_json(raw)


def parse_server_message(raw: str | bytes) -> ServerMessage:
    return _server_adapter.validate_json(raw)


def negotiate_version(offered: list[int]) -> int | None:
    """The highest version both sides speak, or None."""
    common = SUPPORTED_VERSIONS.intersection(offered)
    return max(common) if common else None
