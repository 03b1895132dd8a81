"""A job's logs: a page at a time, or followed live over Server-Sent Events or a WebSocket.

Every log line carries a ``cursor`` (``"<attempt>-<seq>"``); pass the last one seen as
``after`` (or, for SSE, let the browser send it back as ``Last-Event-ID``) to go on from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from json.encoder import encode_basestring
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.websockets import WebSocketState

from peergpu.errors import AuthenticationFailed, NotFound, PeerGPUError, PermissionDenied
from peergpu.protocol.messages import CLOSE_UNAUTHORIZED
from peergpu.server.api.deps import ContextDep, Reader, SessionDep
from peergpu.server.api.responses import errors
from peergpu.server.api.ws_auth import websocket_principal
from peergpu.server.context import ServerContext
from peergpu.server.db.job_models import JobModel
from peergpu.server.schemas.jobs import JobPublic
from peergpu.server.services import job_logs, jobs
from peergpu.server.services.job_logs import End, Idle, Lines, LogLine, StateChange

logger = logging.getLogger(__name__)

router = APIRouter(tags=["jobs"], responses=errors(401, 403, 422))

CLOSE_NORMAL = 1000
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_INVALID = 4422
CLOSE_UNAVAILABLE = 1011
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Cursor = Annotated[str | None, Query(max_length=32, description="a line's cursor, '1-41'")]


class LogLinePublic(BaseModel):
    cursor: str = Field(description="'<attempt>-<seq>'; pass it as `after` to go on from here")
    attempt: int
    seq: int
    stream: str = Field(description="stdout, stderr or system")
    line: str
    ts: float = Field(description="when the host read the line (Unix time)")


class LogPagePublic(BaseModel):
    lines: list[LogLinePublic]
    next_cursor: str = Field(description="pass as `after` for the next page")
    complete: bool = Field(description="the job has ended and every line was returned")


@router.get(
    "/jobs/{job_id}/logs",
    response_model=LogPagePublic,
    responses={
        **errors(404),
        200: {
            "description": "A page of lines, or with follow=true an event stream",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
async def read_job_logs(
    job_id: uuid.UUID,
    principal: Reader,
    session: SessionDep,
    context: ContextDep,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
    follow: Annotated[bool, Query(description="stream as Server-Sent Events")] = False,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
) -> LogPagePublic | StreamingResponse:
    """The job's log lines after the cursor `after`, oldest first.

    With `follow=true`, a `text/event-stream`: `event: log` (with `id: <cursor>`) for each
    line, `event: state` with the job on every state change, `event: end` once the job has
    ended and every line was sent; a `: keepalive` comment every 15 s of silence. A
    reconnecting client's `Last-Event-ID` takes precedence over `after`."""
    job = await jobs.get_job(session=session, principal=principal, job_id=job_id)
    if follow:
        start = last_event_id or after
        job_logs.parse_cursor(start)  # a bad cursor is a 422 now, not a broken stream later
        await session.close()  # hold no database connection while streaming
        return StreamingResponse(
            _event_stream(context, job, start), media_type="text/event-stream", headers=SSE_HEADERS
        )
    page = await job_logs.read_page(
        context=context, session=session, job=job, after=after, limit=limit
    )
    return LogPagePublic(
        lines=[LogLinePublic(cursor=line.cursor, **line._asdict()) for line in page.lines],
        next_cursor=page.next_cursor,
        complete=page.complete,
    )


@router.websocket("/jobs/{job_id}/ws")
async def job_logs_socket(websocket: WebSocket, job_id: str) -> None:
    """Follow a job over a WebSocket (auth: the Authorization header or ``?access_token=``;
    optional ``?after=<cursor>``). Sends ``{"type": "log", ...line}``, ``{"type": "state",
    "job": ...}`` and ``{"type": "end", "job": ...}``, then closes with 1000; 4401 for a bad
    credential, 4403 without the read scope, 4404 for a job you cannot see.

    With ``?batch=true`` consecutive lines come together as ``{"type": "logs", "lines":
    [...]}`` (up to a batch of the agent's, or 1000 lines): one frame each instead of one per
    line, which is what a fast log needs (a frame costs the server about 20 us)."""
    context: ServerContext = websocket.app.state.context
    await websocket.accept()
    try:
        async with context.sessionmaker() as session:
            principal = await websocket_principal(websocket, context=context, session=session)
            job = await jobs.get_job(session=session, principal=principal, job_id=_uuid(job_id))
        after = websocket.query_params.get("after")
        job_logs.parse_cursor(after)
    except PeerGPUError as exc:
        await _refuse(websocket, exc)
        return
    batch = websocket.query_params.get("batch", "").lower() in ("1", "true")
    await _first_completed(
        _send_follow(websocket, context, job, after, batch=batch), _disconnected(websocket)
    )


# ---------------------------------------------------------------- helpers


async def _event_stream(
    context: ServerContext, job: JobModel, after: str | None
) -> AsyncIterator[str]:
    follow = job_logs.follow(context=context, job=job, after=after)
    async with contextlib.aclosing(follow) as events:
        async for event in events:
            if isinstance(event, Lines):
                yield "".join(
                    f"event: log\nid: {line.cursor}\ndata: {_line_json(line)}\n\n"
                    for line in event.lines
                )
            elif isinstance(event, StateChange):
                yield f"event: state\ndata: {json.dumps(_job_json(event.job))}\n\n"
            elif isinstance(event, End):
                yield f"event: end\ndata: {json.dumps(_job_json(event.job))}\n\n"
                return
            elif isinstance(event, Idle):
                yield ": keepalive\n\n"


async def _send_follow(
    websocket: WebSocket, context: ServerContext, job: JobModel, after: str | None, *, batch: bool
) -> None:
    follow = job_logs.follow(context=context, job=job, after=after)
    try:
        async with contextlib.aclosing(follow) as events:
            async for event in events:
                if isinstance(event, Lines) and batch:
                    lines = ",".join(_line_json(line) for line in event.lines)
                    await websocket.send_text(f'{{"type":"logs","lines":[{lines}]}}')
                elif isinstance(event, Lines):
                    for line in event.lines:
                        await websocket.send_text(_line_json(line, message_type="log"))
                elif isinstance(event, StateChange):
                    await websocket.send_text(
                        json.dumps({"type": "state", "job": _job_json(event.job)})
                    )
                elif isinstance(event, End):
                    await websocket.send_text(
                        json.dumps({"type": "end", "job": _job_json(event.job)})
                    )
                    await _close(websocket, CLOSE_NORMAL)
                    return
    except (WebSocketDisconnect, RuntimeError, OSError):
        return  # the client went away
    except Exception:
        logger.exception("job %s: following logs failed", job.id)
        await _close(websocket, CLOSE_UNAVAILABLE)


async def _disconnected(websocket: WebSocket) -> None:
    """Return once the client has gone (whatever it sends meanwhile is ignored)."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass


async def _refuse(websocket: WebSocket, error: PeerGPUError) -> None:
    if isinstance(error, AuthenticationFailed):
        code = CLOSE_UNAUTHORIZED
    elif isinstance(error, PermissionDenied):
        code = CLOSE_FORBIDDEN
    elif isinstance(error, NotFound):
        code = CLOSE_NOT_FOUND
    else:
        code = CLOSE_INVALID
    body = {"type": "error", "code": error.code, "message": error.message}
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_text(json.dumps(body))
    await _close(websocket, code)


async def _close(websocket: WebSocket, code: int) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.close(code=code)


async def _first_completed(*coroutines: Coroutine[Any, Any, None]) -> None:
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound("No such job.", details={"id": value[:64]}) from None


def _line_json(line: LogLine, *, message_type: str | None = None) -> str:
    """The line as the contract's LogLine JSON (with ``"type"`` first for the WebSocket),
    formatted by hand: it runs for every line sent, and ``json.dumps`` costs 3x more."""
    head = f'"type":"{message_type}",' if message_type else ""
    return (
        f'{{{head}"cursor":"{line.attempt}-{line.seq}","attempt":{line.attempt},'
        f'"seq":{line.seq},"stream":{encode_basestring(line.stream)},'
        f'"line":{encode_basestring(line.line)},"ts":{line.ts!r}}}'
    )


def _job_json(job: JobModel) -> dict[str, Any]:
    return JobPublic.model_validate(job).model_dump(mode="json")
