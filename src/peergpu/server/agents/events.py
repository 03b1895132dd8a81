"""What the server does with each message an agent sends about its jobs.

For now every job message lands on the job's bus streams (logs and events), which is what the
job service and the renter's log endpoints read; log batches are acknowledged once appended so
the agent can drop them from its resend buffer.
"""

from __future__ import annotations

import logging
import uuid

from peergpu.protocol.messages import (
    AgentMessage,
    ArtifactReport,
    ErrorMessage,
    JobStatus,
    LogAck,
    LogBatch,
    ManifestAck,
    ServerMessage,
    StatusAck,
    UploadGrant,
    UploadRequest,
    UploadTarget,
)
from peergpu.server.agents.channels import job_events_stream, job_logs_stream
from peergpu.server.context import ServerContext
from peergpu.server.storage.base import is_valid_key

UPLOAD_URL_SECONDS = 3600

logger = logging.getLogger(__name__)


class AgentEvents:
    def __init__(self, context: ServerContext) -> None:
        self.context = context

    async def handle(self, host_id: uuid.UUID, message: AgentMessage) -> list[ServerMessage]:
        """Apply one message; return the replies to send back on the same socket."""
        bus = self.context.bus
        if isinstance(message, LogBatch):
            await bus.append(job_logs_stream(message.job_id), message.model_dump_json().encode())
            return [LogAck(job_id=message.job_id, seq=message.lines[-1].seq)]
        if isinstance(message, ManifestAck):
            if not message.accepted:
                logger.warning(
                    "host %s refused manifest for job %s: %s (%s)",
                    host_id,
                    message.job_id,
                    message.reason,
                    message.message,
                )
            if message.job_id is not None:
                await self._record(message.job_id, message)
            return []
        if isinstance(message, JobStatus):
            await self._record(message.job_id, message)
            return [StatusAck(job_id=message.job_id, state=message.state)]
        if isinstance(message, ArtifactReport):
            await self._record(message.job_id, message)
            return []
        if isinstance(message, UploadRequest):
            return [self._grant_uploads(message)]
        if isinstance(message, ErrorMessage):
            logger.warning("host %s reported %s: %s", host_id, message.code, message.message)
            return []
        return [ErrorMessage(code="unexpected_message", message=f"Unexpected {message.type}.")]

    async def _record(self, job_id: uuid.UUID, message: AgentMessage) -> None:
        await self.context.bus.append(job_events_stream(job_id), message.model_dump_json().encode())

    def _grant_uploads(self, request: UploadRequest) -> UploadGrant:
        """One pre-signed PUT per output file, bound to its declared size and sha256."""
        uploads: list[UploadTarget] = []
        refused: dict[str, str] = {}
        store = self.context.storage
        for spec in request.files:
            key = f"jobs/{request.job_id}/outputs/{spec.path}"
            if not is_valid_key(key):
                refused[spec.path] = "the file name is not allowed in object storage"
                continue
            url = store.presign_put(
                key, expires_in=UPLOAD_URL_SECONDS, max_bytes=spec.size, sha256=spec.sha256
            )
            uploads.append(UploadTarget(path=spec.path, url=url))
        return UploadGrant(job_id=request.job_id, uploads=uploads, refused=refused)
