"""The client's own behaviour on the wire, against an injected httpx transport: server-sent
events parsing, reconnecting a dropped log stream, and refusing artifacts that would escape the
destination or fail their checksum. (A real server never sends a bad artifact path or a corrupt
file; a transport lets these tests play that hostile or broken server.)"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from peergpu.client import DownloadError, JobUpdate, LogLine, PeerGPU, UnsafePath
from peergpu.client.artifacts import PART_SUFFIX, safe_destination
from peergpu.client.sse import ServerSentEvent, parse_events

JOB = {"id": "j1", "state": "running"}


def test_sse_parsing_follows_the_spec() -> None:
    lines = [
        ": a comment",
        "event: log",
        "id: c1",
        'data: {"line": "a"}',
        "",
        "event:state",
        "data:first",
        "data: second",
        "",
        "data: no event name",
        "retry: 100",
        "",
        "event: empty",  # no data: not dispatched
        "",
    ]
    assert list(parse_events(lines)) == [
        ServerSentEvent("log", '{"line": "a"}', "c1"),
        ServerSentEvent("state", "first\nsecond", None),
        ServerSentEvent("message", "no event name", None),
    ]


class _DropsOnce(httpx.BaseTransport):
    """Streams two lines then breaks the connection; the reconnect must resume after line 2."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) == 1:
            return httpx.Response(200, stream=_Broken([_log(1), _log(2)]))
        body = _log(3) + f"event: end\ndata: {json.dumps({**JOB, 'state': 'succeeded'})}\n\n"
        return httpx.Response(200, content=body.encode())


class _Broken(httpx.SyncByteStream):
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def __iter__(self) -> Iterator[bytes]:
        for event in self.events:
            yield event.encode()
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


def _log(seq: int) -> str:
    line = {"cursor": f"c{seq}", "seq": seq, "stream": "stdout", "line": f"line {seq}"}
    return f"event: log\nid: c{seq}\ndata: {json.dumps(line)}\n\n"


def test_a_dropped_log_stream_resumes_with_last_event_id() -> None:
    transport = _DropsOnce()
    with PeerGPU("http://peergpu.test", api_key="pgk_x", transport=transport) as client:
        events = list(client.iter_logs("j1"))
    lines = [e.line for e in events if isinstance(e, LogLine)]
    assert lines == ["line 1", "line 2", "line 3"]
    end = events[-1]
    assert isinstance(end, JobUpdate) and end.end and end.job.state == "succeeded"
    first, second = transport.requests
    assert "last-event-id" not in first.headers
    assert second.headers["last-event-id"] == "c2"
    assert second.url.params["after"] == "c2" and second.url.params["follow"] == "true"


def test_a_stream_that_never_connects_gives_up() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    transport = httpx.MockTransport(refuse)
    client = PeerGPU("http://peergpu.test", api_key="k", transport=transport, retries=0)
    client.max_reconnects = 1
    from peergpu.client import PeerGPUUnavailable

    with pytest.raises(PeerGPUUnavailable, match="lost the log stream"):
        list(client.iter_logs("j1"))


@pytest.mark.parametrize(
    "path",
    ["../evil", "a/../../evil", "/etc/passwd", "C:/x", "a\\..\\b", "", ".", "a/\x00b", "./.."],
)
def test_unsafe_artifact_paths_are_refused(tmp_path: Path, path: str) -> None:
    with pytest.raises(UnsafePath):
        safe_destination(tmp_path, path)


def test_safe_artifact_paths(tmp_path: Path) -> None:
    assert safe_destination(tmp_path, "out/model.bin") == tmp_path.resolve() / "out" / "model.bin"
    assert safe_destination(tmp_path, "./a//b") == tmp_path.resolve() / "a" / "b"
    (tmp_path / "link").symlink_to("/tmp", target_is_directory=True)
    with pytest.raises(UnsafePath):
        safe_destination(tmp_path, "link/x")  # a link already in the destination


def _artifact_server(files: dict[str, bytes], listed: list[dict[str, Any]]) -> httpx.MockTransport:
    seen_auth: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts"):
            return httpx.Response(200, json={"data": listed, "count": len(listed)})
        seen_auth.append(request.headers.get("authorization"))
        return httpx.Response(200, content=files[request.url.path])

    transport = httpx.MockTransport(handle)
    transport.seen_auth = seen_auth  # type: ignore[attr-defined]
    return transport


def _listing(path: str, content: bytes, url: str, sha: str | None = None) -> dict[str, Any]:
    return {
        "path": path,
        "size": len(content),
        "sha256": sha or hashlib.sha256(content).hexdigest(),
        "download_url": url,
    }


def test_download_streams_verifies_and_sends_no_credentials(tmp_path: Path) -> None:
    files = {"/o/1": b"weights" * 1000, "/o/2": b"metrics"}
    listed = [
        _listing("model/weights.bin", files["/o/1"], "http://storage.test/o/1?signature=s"),
        _listing("metrics.json", files["/o/2"], "/o/2?signature=s"),
    ]
    transport = _artifact_server(files, listed)
    progress: list[tuple[int, int]] = []
    with PeerGPU("http://peergpu.test", api_key="pgk_secret", transport=transport) as client:
        saved = client.download_artifacts(
            "j1", tmp_path / "out", progress=lambda d, t: progress.append((d, t))
        )
    assert [p.read_bytes() for _, p in saved] == [files["/o/1"], files["/o/2"]]
    assert transport.seen_auth == [None, None]  # type: ignore[attr-defined]
    assert progress[-1] == (7007, 7007)


def test_download_refuses_a_path_escape_before_writing_anything(tmp_path: Path) -> None:
    files = {"/o/1": b"fine", "/o/2": b"evil"}
    listed = [
        _listing("ok.txt", files["/o/1"], "/o/1"),
        _listing("../../escaped.txt", files["/o/2"], "/o/2"),
    ]
    dest = tmp_path / "a" / "b"
    with PeerGPU(
        "http://peergpu.test", api_key="k", transport=_artifact_server(files, listed)
    ) as c:
        with pytest.raises(UnsafePath, match="escaped.txt"):
            c.download_artifacts("j1", dest)
    assert not (tmp_path / "escaped.txt").exists()
    assert not dest.exists()


def test_download_refuses_a_corrupt_file_and_leaves_nothing(tmp_path: Path) -> None:
    files = {"/o/1": b"corrupted bytes"}
    listed = [_listing("model.bin", files["/o/1"], "/o/1", sha="0" * 64)]
    with PeerGPU(
        "http://peergpu.test", api_key="k", transport=_artifact_server(files, listed)
    ) as c:
        with pytest.raises(DownloadError, match="SHA-256"):
            c.download_artifacts("j1", tmp_path)
    assert list(tmp_path.iterdir()) == []

    short = [{**_listing("model.bin", files["/o/1"], "/o/1"), "size": 100}]
    with PeerGPU("http://peergpu.test", api_key="k", transport=_artifact_server(files, short)) as c:
        with pytest.raises(DownloadError, match="expected 100"):
            c.download_artifacts("j1", tmp_path)
    assert not any(p.name.endswith(PART_SUFFIX) for p in tmp_path.iterdir())
