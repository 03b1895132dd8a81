"""Following a job's logs live: ``GET /jobs/{id}/logs?follow=true`` as server-sent events,
reopened after a dropped or idle connection with ``Last-Event-ID`` (the last line's cursor), so
no line is lost or repeated. The server sends a keep-alive comment every 15 s, so a read that
stays silent for ``idle_timeout`` means a dead connection, not a quiet job."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx

from peergpu.client.errors import PeerGPUUnavailable
from peergpu.client.http import HttpSession
from peergpu.client.models import Job, JobUpdate, LogLine
from peergpu.client.sse import parse_events


class LogFollower:
    """Follows ``GET /jobs/{id}/logs?follow=true`` across dropped connections."""

    def __init__(
        self,
        http: HttpSession,
        job_id: str,
        *,
        after: str | None = None,
        idle_timeout: float = 60.0,
        max_reconnects: int = 8,
    ) -> None:
        self.http = http
        self.job_id = job_id
        self.idle_timeout = idle_timeout
        self.max_reconnects = max_reconnects
        self.last_id = after
        self.connected = False  # the current attempt got a response
        self.received = False  # ... and at least one event

    def events(self) -> Iterator[LogLine | JobUpdate]:
        failures = 0
        while True:
            self.connected = self.received = False
            problem: Exception | None = None
            try:
                for event in self._connect():
                    self.received = True
                    yield event
                    if isinstance(event, JobUpdate) and event.end:
                        return
            except (PeerGPUUnavailable, httpx.TransportError) as exc:
                problem = exc
            # A connection that delivered something, or an idle one that timed out after
            # connecting, is not a failure: reopen it. Only repeated failures to get anywhere
            # (server down, a stream that closes at once) count towards giving up.
            if self.received or (self.connected and isinstance(problem, httpx.ReadTimeout)):
                failures = 0
                continue
            failures += 1
            if failures > self.max_reconnects:
                reason = problem or "the stream kept closing before the job ended"
                raise PeerGPUUnavailable(
                    f"lost the log stream of job {self.job_id}: {reason}"
                ) from problem
            time.sleep(min(5.0, 0.25 * 2 ** (failures - 1)))

    def _connect(self) -> Iterator[LogLine | JobUpdate]:
        http = self.http
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        params = {"follow": True, "after": self.last_id}
        base = http.timeout
        idle = httpx.Timeout(
            connect=base.connect,
            read=self.idle_timeout,
            write=base.write,
            pool=base.pool,
        )
        with http.stream(
            "GET", f"/jobs/{self.job_id}/logs", params=params, headers=headers, timeout=idle
        ) as response:
            self.connected = True
            for sse in parse_events(response.iter_lines()):
                if sse.event == "log":
                    line = LogLine.model_validate_json(sse.data)
                    self.last_id = sse.id or line.cursor or self.last_id
                    yield line
                elif sse.event in ("state", "end"):
                    yield JobUpdate(Job.model_validate_json(sse.data), end=sse.event == "end")
