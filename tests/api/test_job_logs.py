"""The logs endpoints: pages, Server-Sent Events and the WebSocket, on both backends.

httpx's ASGI transport buffers a whole response and speaks no WebSocket, so streams are
driven here over raw ASGI, one message at a time, in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.server.context import ServerContext
from peergpu.server.db.job_models import JobModel
from peergpu.server.services import job_logs
from tests.factories import ApiUser, assert_error, bearer, make_user
from tests.unit.test_job_logs_service import finish, make_job, specs

API = "/api/v1"
TIMEOUT = 10.0


@dataclass
class Setup:
    context: ServerContext
    session: AsyncSession
    owner: ApiUser
    job: JobModel

    async def store(self, seqs: range) -> None:
        await job_logs.store_batch(self.context, self.session, self.job, specs(seqs))

    async def finish(self) -> None:
        await finish(self.context, self.session, self.job)


@pytest.fixture
async def setup(app: FastAPI, client: httpx.AsyncClient) -> AsyncIterator[Setup]:
    context: ServerContext = app.state.context
    owner = await make_user(client)
    async with context.sessionmaker() as session:
        job = await make_job(context, session, owner_id=uuid.UUID(owner.id))
        yield Setup(context, session, owner, job)


def logs_url(job: JobModel) -> str:
    return f"{API}/jobs/{job.id}/logs"


# ---------------------------------------------------------------- pages


async def test_pages(client: httpx.AsyncClient, setup: Setup) -> None:
    await setup.store(range(12))
    url, headers = logs_url(setup.job), setup.owner.headers
    first = await client.get(url, params={"limit": 5}, headers=headers)
    assert first.status_code == 200, first.text
    body = first.json()
    assert [line["cursor"] for line in body["lines"]] == [f"1-{s}" for s in range(5)]
    assert body["lines"][0] == {
        "cursor": "1-0",
        "attempt": 1,
        "seq": 0,
        "stream": "stdout",
        "line": "line 0",
        "ts": body["lines"][0]["ts"],
    }
    assert (body["next_cursor"], body["complete"]) == ("1-4", False)
    rest = (await client.get(url, params={"after": "1-4"}, headers=headers)).json()
    assert [line["seq"] for line in rest["lines"]] == list(range(5, 12))
    assert (rest["next_cursor"], rest["complete"]) == ("1-11", False)

    await setup.finish()
    await job_logs.archive(setup.context, setup.session, setup.job.id)
    await setup.store(range(12, 14))  # late, after the archive
    done = (await client.get(url, params={"after": "1-9"}, headers=headers)).json()
    assert [line["seq"] for line in done["lines"]] == [10, 11, 12, 13]
    assert (done["next_cursor"], done["complete"]) == ("1-13", True)


async def test_page_errors_and_visibility(client: httpx.AsyncClient, setup: Setup) -> None:
    url, headers = logs_url(setup.job), setup.owner.headers
    stranger = await make_user(client)
    assert_error(await client.get(url, headers=stranger.headers), 404, "not_found")
    assert_error(await client.get(url), 401, "not_authenticated")
    missing = f"{API}/jobs/{uuid.uuid4()}/logs"
    assert_error(await client.get(missing, headers=headers), 404, "not_found")
    bad = await client.get(url, params={"after": "latest"}, headers=headers)
    assert_error(bad, 422, "invalid_cursor")
    for limit in (0, 5001):
        too = await client.get(url, params={"limit": limit}, headers=headers)
        assert_error(too, 422, "validation_error")
    sse = await client.get(url, params={"follow": True, "after": "x"}, headers=headers)
    assert_error(sse, 422, "invalid_cursor")
    empty = (await client.get(url, headers=headers)).json()
    assert empty == {"lines": [], "next_cursor": "", "complete": False}


# ---------------------------------------------------------------- Server-Sent Events


class EventStream:
    """One GET over raw ASGI, its body read as Server-Sent Events as it arrives."""

    def __init__(self, app: FastAPI, path: str, headers: dict[str, str]) -> None:
        self._app = app
        self._scope = _scope("http", path, headers)
        self._sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._gone = asyncio.Event()
        self._buffer = ""
        self.status = 0
        self.headers: dict[str, str] = {}

    async def __aenter__(self) -> EventStream:
        self._task = asyncio.ensure_future(self._app(self._scope, self._receive, self._sent.put))
        start = await asyncio.wait_for(self._sent.get(), TIMEOUT)
        self.status = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start["headers"]}
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._gone.set()
        await asyncio.wait_for(self._task, TIMEOUT)

    async def next_event(self) -> dict[str, str]:
        """The next event or comment: ``{"event": ..., "id": ..., "data": ...}`` or
        ``{"comment": ...}``; ``{}`` once the stream has ended."""
        while "\n\n" not in self._buffer:
            message = await asyncio.wait_for(self._sent.get(), TIMEOUT)
            self._buffer += message.get("body", b"").decode()
            if not message.get("more_body", False) and "\n\n" not in self._buffer:
                return {}
        block, self._buffer = self._buffer.split("\n\n", 1)
        event: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            event[name or "comment"] = value
        return event

    async def events(self, count: int) -> list[dict[str, str]]:
        return [await self.next_event() for _ in range(count)]

    async def _receive(self) -> dict[str, Any]:
        if not hasattr(self, "_requested"):
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}


async def test_sse_backlog_then_live_then_end(app: FastAPI, setup: Setup) -> None:
    await setup.store(range(5))
    path = f"{logs_url(setup.job)}?follow=true&after=1-0"
    async with EventStream(app, path, setup.owner.headers) as stream:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        state = await stream.next_event()
        assert state["event"] == "state"
        assert json.loads(state["data"])["state"] == "running"
        backlog = await stream.events(4)
        await setup.store(range(3, 9))  # overlapping the backlog
        live = await stream.events(4)
        await setup.finish()
        final_state, end, closed = await stream.events(3)
    logs = backlog + live
    assert {e["event"] for e in logs} == {"log"}
    assert [e["id"] for e in logs] == [f"1-{s}" for s in range(1, 9)]
    assert [json.loads(e["data"])["seq"] for e in logs] == list(range(1, 9))
    assert json.loads(final_state["data"])["state"] == "succeeded"
    assert end["event"] == "end"
    job = json.loads(end["data"])
    assert (job["id"], job["state"], job["exit_code"]) == (str(setup.job.id), "succeeded", 0)
    assert closed == {}


async def test_sse_resumes_from_last_event_id(app: FastAPI, setup: Setup) -> None:
    await setup.store(range(6))
    await setup.finish()
    headers = {**setup.owner.headers, "Last-Event-ID": "1-3"}
    async with EventStream(app, f"{logs_url(setup.job)}?follow=true&after=1-0", headers) as stream:
        events = await stream.events(5)
    assert [e.get("event") for e in events] == ["state", "log", "log", "end", None]
    assert [e["id"] for e in events if e.get("event") == "log"] == ["1-4", "1-5"]


async def test_sse_is_private(app: FastAPI, client: httpx.AsyncClient, setup: Setup) -> None:
    stranger = await make_user(client)
    async with EventStream(app, f"{logs_url(setup.job)}?follow=1", stranger.headers) as stream:
        assert stream.status == 404


# ---------------------------------------------------------------- WebSocket


class FakeSocket:
    """One WebSocket connection to the app over raw ASGI."""

    def __init__(self, app: FastAPI, path: str, headers: dict[str, str] | None = None) -> None:
        self._app = app
        self._scope = _scope("websocket", path, headers or {})
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.close_code: int | None = None

    async def __aenter__(self) -> FakeSocket:
        self._to_app.put_nowait({"type": "websocket.connect"})
        self._task = asyncio.ensure_future(
            self._app(self._scope, self._to_app.get, self._from_app.put)
        )
        accepted = await asyncio.wait_for(self._from_app.get(), TIMEOUT)
        assert accepted["type"] == "websocket.accept", accepted
        return self

    async def __aexit__(
        self, _type: type[BaseException] | None, _exc: object, _tb: TracebackType | None
    ) -> None:
        self._to_app.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(self._task, TIMEOUT)

    async def receive(self) -> dict[str, Any] | None:
        """The next JSON message, or None once the server closed (``close_code`` is set)."""
        message = await asyncio.wait_for(self._from_app.get(), TIMEOUT)
        if message["type"] == "websocket.close":
            self.close_code = message["code"]
            return None
        assert message["type"] == "websocket.send", message
        return dict(json.loads(message["text"]))

    async def receive_many(self, count: int) -> list[dict[str, Any] | None]:
        return [await self.receive() for _ in range(count)]


async def test_websocket_backlog_then_live_then_end(app: FastAPI, setup: Setup) -> None:
    await setup.store(range(3))
    path = f"{API}/jobs/{setup.job.id}/ws?access_token={setup.owner.access_token}"
    async with FakeSocket(app, path) as socket:
        state = await socket.receive()
        assert state is not None and state["type"] == "state"
        assert state["job"]["state"] == "running"
        backlog = await socket.receive_many(3)
        await setup.store(range(2, 6))
        live = await socket.receive_many(3)
        await setup.finish()
        final_state, end, closed = await socket.receive_many(3)
    logs = [message for message in backlog + live if message is not None]
    assert [m["type"] for m in logs] == ["log"] * 6
    assert [m["cursor"] for m in logs] == [f"1-{s}" for s in range(6)]
    assert logs[0] == {
        "type": "log",
        "cursor": "1-0",
        "attempt": 1,
        "seq": 0,
        "stream": "stdout",
        "line": "line 0",
        "ts": logs[0]["ts"],
    }
    assert final_state is not None and final_state["job"]["state"] == "succeeded"
    assert end is not None and end["type"] == "end" and end["job"]["exit_code"] == 0
    assert closed is None and socket.close_code == 1000


async def test_websocket_with_api_key_and_cursor(
    app: FastAPI, client: httpx.AsyncClient, setup: Setup
) -> None:
    created = await client.post(
        f"{API}/keys", json={"name": "ci", "scopes": ["read"]}, headers=setup.owner.headers
    )
    assert created.status_code == 201, created.text
    await setup.store(range(4))
    await setup.finish()
    path = f"{API}/jobs/{setup.job.id}/ws?after=1-1"
    async with FakeSocket(app, path, bearer(created.json()["key"])) as socket:
        messages = await socket.receive_many(5)
    assert [m["type"] if m else None for m in messages] == ["state", "log", "log", "end", None]
    assert socket.close_code == 1000


@pytest.mark.parametrize(
    ("who", "code"),
    [
        ("nobody", 4401),
        ("bad-token", 4401),
        ("stranger", 4404),
        ("unknown-job", 4404),
        ("not-a-uuid", 4404),
        ("inference-key", 4403),
        ("bad-cursor", 4422),
    ],
)
async def test_websocket_refusals(
    app: FastAPI, client: httpx.AsyncClient, setup: Setup, who: str, code: int
) -> None:
    job_path = f"{API}/jobs/{setup.job.id}/ws"
    headers = setup.owner.headers
    path = job_path
    if who == "nobody":
        headers = {}
    elif who == "bad-token":
        path = f"{job_path}?access_token=not-a-token"
        headers = {}
    elif who == "stranger":
        headers = (await make_user(client)).headers
    elif who == "unknown-job":
        path = f"{API}/jobs/{uuid.uuid4()}/ws"
    elif who == "not-a-uuid":
        path = f"{API}/jobs/latest/ws"
    elif who == "inference-key":
        created = await client.post(
            f"{API}/keys", json={"name": "gw", "scopes": ["inference"]}, headers=headers
        )
        headers = bearer(created.json()["key"])
    elif who == "bad-cursor":
        path = f"{job_path}?after=first"
    async with FakeSocket(app, path, headers) as socket:
        error = await socket.receive()
        assert error is not None and error["type"] == "error"
        assert await socket.receive() is None
    assert socket.close_code == code


def _scope(kind: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    raw_path, _, query = path.partition("?")
    return {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http" if kind == "http" else "ws",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "path": raw_path,
        "raw_path": raw_path.encode(),
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "subprotocols": [],
    }
