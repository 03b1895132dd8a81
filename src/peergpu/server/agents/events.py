"""What the server does with each message an agent sends about its jobs.

Job state, logs and artifacts go to the database through ``services.job_reports`` (only the
job's current host is believed); manifest answers and job statuses go through the replica's
``AgentInbox``, which group-commits them with everyone else's. Every job message is also
appended to the job's bus streams (``jobevents:<id>``, ``joblogs:<id>``, bounded), a live trail
for operators and tests. Log batches are acknowledged once stored durably, so the agent can
drop them from its resend buffer.
"""

from __future__ import annotations

import logging
import uuid

from peergpu.errors import ServiceUnavailable
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
    UploadRequest,
)
from peergpu.server.agents.channels import TRAIL_MAXLEN, job_events_stream, job_logs_stream
from peergpu.server.agents.inbox import AgentInbox
from peergpu.server.context import ServerContext
from peergpu.server.services import job_reports

logger = logging.getLogger(__name__)


class AgentEvents:
    def __init__(self, context: ServerContext, inbox: AgentInbox) -> None:
        self.context = context
        self.inbox = inbox

    async def handle(self, host_id: uuid.UUID, message: AgentMessage) -> list[ServerMessage]:
        """Apply one message; return the replies to send back on the same socket."""
        context = self.context
        if isinstance(message, LogBatch):
            # Stored (committed) before the ack; lines of a job this host does not run are
            # acknowledged and dropped.
            await job_reports.on_logs(context, host_id, message)
            await self._trail(job_logs_stream(message.job_id), message)
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
            await self.inbox.report(host_id, message)
            return []
        if isinstance(message, JobStatus):
            await self.inbox.report(host_id, message)
            return [StatusAck(job_id=message.job_id, state=message.state)]
        if isinstance(message, ArtifactReport):
            await job_reports.on_artifacts(context, host_id, message)
            await self._trail(job_events_stream(message.job_id), message)
            return []
        if isinstance(message, UploadRequest):
            return [await job_reports.grant_uploads(context, host_id, message)]
        if isinstance(message, ErrorMessage):
            logger.warning("host %s reported %s: %s", host_id, message.code, message.message)
            return []
        return [ErrorMessage(code="unexpected_message", message=f"Unexpected {message.type}.")]

    async def _trail(self, stream: str, message: AgentMessage) -> None:
        try:
            await self.context.bus.append(
                stream, message.model_dump_json().encode(), maxlen=TRAIL_MAXLEN
            )
        except ServiceUnavailable as exc:  # the trail is a convenience; the database has it
            logger.debug("bus unavailable, %s not appended: %s", stream, exc)
