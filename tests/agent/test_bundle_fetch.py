"""Bundle downloads against a real local HTTP server: verification, limits, failures, the cache."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from peergpu.agent.bundle_fetch import BundleCache, BundleFetchError, fetch_bundle

GOOD = os.urandom(300_000)  # spans several network reads and a partial write buffer
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()

Respond = Callable[[BaseHTTPRequestHandler], None]


class BundleServer:
    """A tiny HTTP/1.1 server in a thread; ``routes`` maps a path to what it answers, ``hits``
    counts requests per path (query strings ignored)."""

    def __init__(self) -> None:
        self.routes: dict[str, Respond] = {}
        self.hits: Counter[str] = Counter()
        self.release = threading.Event()  # lets stalled responses finish
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.split("?", 1)[0]
                server.hits[path] += 1
                respond = server.routes.get(path)
                if respond is None:
                    self.send_error(404)
                    return
                try:
                    respond(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should (too large, cancelled...)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> BundleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve(self, path: str, body: bytes) -> str:
        self.routes[path] = send_body(body)
        return f"{self.url}{path}?X-Signature=secret-signature"


def send_body(body: bytes, *, length: int | None = None, status: int = 200) -> Respond:
    """Answer with ``body``; ``length`` overrides the declared Content-Length."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()
        if length is not None and length != len(body):
            handler.close_connection = True

    return respond


def send_undeclared(total: int) -> Respond:
    """``total`` bytes with no Content-Length (the end is marked by closing the connection)."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        chunk = b"z" * 65536
        for _ in range(total // len(chunk)):
            handler.wfile.write(chunk)
        handler.close_connection = True

    return respond


def send_then_stall(server: BundleServer, body: bytes, sent: threading.Event) -> Respond:
    """Declare ``body``, send half of it, then wait until the test ends."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        sent.set()
        server.release.wait(30)
        handler.close_connection = True

    return respond


@pytest.fixture
def server() -> Iterator[BundleServer]:
    with BundleServer() as running:
        yield running


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def fetch(
    url: str, dest: Path, sha: str = GOOD_SHA, *, max_bytes: int = 10**7, timeout: float = 30.0
) -> int:
    return await fetch_bundle(url, sha, dest, max_bytes=max_bytes, timeout=timeout)


async def refused(
    url: str, dest: Path, reason: str, *, max_bytes: int = 10**7, timeout: float = 30.0
) -> BundleFetchError:
    with pytest.raises(BundleFetchError) as caught:
        await fetch(url, dest, max_bytes=max_bytes, timeout=timeout)
    assert caught.value.reason == reason, caught.value.message
    assert "secret-signature" not in caught.value.message  # the URL's credential stays out
    return caught.value


# ---------------------------------------------------------------- fetch_bundle


async def test_good_download_lands_whole_and_private(server: BundleServer, tmp_path: Path) -> None:
    dest = tmp_path / "bundle.zip"
    size = await fetch(server.serve("/b.zip", GOOD), dest, sha=GOOD_SHA.upper())
    assert size == len(GOOD)
    assert dest.read_bytes() == GOOD
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert leftovers(tmp_path) == ["bundle.zip"]


async def test_checksum_mismatch_is_refused_and_nothing_kept(
    server: BundleServer, tmp_path: Path
) -> None:
    error = await refused(
        server.serve("/b.zip", GOOD[:-1] + b"!"), tmp_path / "b.zip", "bundle_checksum_mismatch"
    )
    assert GOOD_SHA in error.message
    assert leftovers(tmp_path) == []


async def test_body_larger_than_the_limit_is_cut_off(server: BundleServer, tmp_path: Path) -> None:
    server.routes["/huge"] = send_undeclared(64 * 1024 * 1024)
    await refused(f"{server.url}/huge", tmp_path / "b.zip", "bundle_too_large", max_bytes=200_000)
    assert leftovers(tmp_path) == []


async def test_declared_length_over_the_limit_is_refused_before_reading(
    server: BundleServer, tmp_path: Path
) -> None:
    server.routes["/big"] = send_body(GOOD)
    error = await refused(
        f"{server.url}/big", tmp_path / "b.zip", "bundle_too_large", max_bytes=1000
    )
    assert (
        error.message == "The bundle is 293 KiB; this host accepts bundles of at most 1000 bytes."
    )
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("status", [403, 404, 500])
async def test_error_statuses_fail_the_download(
    server: BundleServer, tmp_path: Path, status: int
) -> None:
    server.routes["/b.zip"] = send_body(b"no", status=status)
    url = f"{server.url}/b.zip?X-Signature=secret-signature"
    error = await refused(url, tmp_path / "b.zip", "bundle_download_failed")
    assert f"HTTP {status}" in error.message
    assert ("expired" in error.message) == (status == 403)
    assert leftovers(tmp_path) == []


async def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        error = await refused(
            f"http://127.0.0.1:{port}/b.zip", tmp_path / "b.zip", "bundle_download_failed"
        )
    assert "ConnectError" in error.message


async def test_truncated_transfer_leaves_no_partial_file(
    server: BundleServer, tmp_path: Path
) -> None:
    server.routes["/cut"] = send_body(GOOD[:1000], length=len(GOOD))
    await refused(f"{server.url}/cut", tmp_path / "b.zip", "bundle_download_failed")
    assert leftovers(tmp_path) == []


async def test_slow_download_times_out_and_leaves_no_partial_file(
    server: BundleServer, tmp_path: Path
) -> None:
    sent = threading.Event()
    server.routes["/slow"] = send_then_stall(server, GOOD, sent)
    error = await refused(
        f"{server.url}/slow", tmp_path / "b.zip", "bundle_download_failed", timeout=0.5
    )
    assert "longer than 0.5 s" in error.message
    assert sent.is_set()
    assert leftovers(tmp_path) == []


async def test_cancelled_download_leaves_no_partial_file(
    server: BundleServer, tmp_path: Path
) -> None:
    sent = threading.Event()
    server.routes["/slow"] = send_then_stall(server, GOOD, sent)
    task = asyncio.create_task(fetch(f"{server.url}/slow", tmp_path / "b.zip"))
    await asyncio.to_thread(sent.wait, 10)
    while not any(".part-" in name for name in leftovers(tmp_path)):
        await asyncio.sleep(0.01)  # the partial file exists: the download is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(tmp_path) == []


async def test_concurrent_downloads_to_one_file_do_not_corrupt_it(
    server: BundleServer, tmp_path: Path
) -> None:
    url = server.serve("/b.zip", GOOD)
    dest = tmp_path / "b.zip"
    sizes = await asyncio.gather(*(fetch(url, dest) for _ in range(5)))
    assert sizes == [len(GOOD)] * 5
    assert server.hits["/b.zip"] == 5
    assert dest.read_bytes() == GOOD
    assert leftovers(tmp_path) == ["b.zip"]


async def test_a_failed_download_keeps_the_previous_file(
    server: BundleServer, tmp_path: Path
) -> None:
    dest = tmp_path / "b.zip"
    dest.write_bytes(b"previous")
    await refused(server.serve("/b.zip", b"wrong"), dest, "bundle_checksum_mismatch")
    assert dest.read_bytes() == b"previous"


# ---------------------------------------------------------------- the cache


def blob(n: int) -> tuple[bytes, str]:
    data = bytes([n]) * 100_000
    return data, hashlib.sha256(data).hexdigest()


async def test_cache_hit_does_not_download_again(server: BundleServer, tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / ".bundles")
    url = server.serve("/b.zip", GOOD)
    async with cache.checkout(url, GOOD_SHA) as first:
        assert first.downloaded and first.size == len(GOOD)
        assert first.path == tmp_path / ".bundles" / f"{GOOD_SHA}.zip"
    async with cache.checkout(url, GOOD_SHA) as second:
        assert not second.downloaded and second.path.read_bytes() == GOOD
    assert server.hits["/b.zip"] == 1
    assert stat.S_IMODE((tmp_path / ".bundles").stat().st_mode) == 0o700


async def test_concurrent_checkouts_download_once(server: BundleServer, tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / ".bundles")
    url = server.serve("/b.zip", GOOD)
    results: list[bool] = []

    async def job() -> None:
        async with cache.checkout(url, GOOD_SHA) as bundle:
            assert bundle.path.read_bytes() == GOOD
            results.append(bundle.downloaded)

    await asyncio.gather(*(job() for _ in range(6)))
    assert server.hits["/b.zip"] == 1
    assert sorted(results) == [False] * 5 + [True]
    assert leftovers(tmp_path / ".bundles") == [f"{GOOD_SHA}.zip"]


async def test_corrupted_cache_entry_is_downloaded_again(
    server: BundleServer, tmp_path: Path
) -> None:
    cache = BundleCache(tmp_path / ".bundles")
    url = server.serve("/b.zip", GOOD)
    async with cache.checkout(url, GOOD_SHA):
        pass
    cache.path_for(GOOD_SHA).write_bytes(b"bit rot")
    async with cache.checkout(url, GOOD_SHA) as again:
        assert again.downloaded and again.path.read_bytes() == GOOD
    assert server.hits["/b.zip"] == 2


async def test_failed_checkout_leaves_nothing_in_the_cache(
    server: BundleServer, tmp_path: Path
) -> None:
    cache = BundleCache(tmp_path / ".bundles")
    with pytest.raises(BundleFetchError) as caught:
        async with cache.checkout(server.serve("/b.zip", b"evil"), GOOD_SHA):
            pytest.fail("a bad bundle was handed out")
    assert caught.value.reason == "bundle_checksum_mismatch"
    assert leftovers(tmp_path / ".bundles") == []


async def test_cache_evicts_least_recently_used_but_never_a_bundle_in_use(
    server: BundleServer, tmp_path: Path
) -> None:
    cache = BundleCache(tmp_path / ".bundles", max_cache_bytes=250_000)  # room for two
    (a, sha_a), (b, sha_b), (c, sha_c) = blob(1), blob(2), blob(3)
    url_a, url_b, url_c = server.serve("/a", a), server.serve("/b", b), server.serve("/c", c)
    async with cache.checkout(url_a, sha_a):
        pass
    async with cache.checkout(url_b, sha_b):
        pass
    os.utime(cache.path_for(sha_b), (1, 1))  # b is now the least recently used
    async with cache.checkout(url_a, sha_a) as in_use:  # a hit: a becomes recent again
        async with cache.checkout(url_c, sha_c):
            pass
        assert in_use.path.exists()
    assert leftovers(cache.root) == sorted(f"{sha}.zip" for sha in (sha_a, sha_c))

    small = BundleCache(tmp_path / "small", max_cache_bytes=50_000)  # smaller than one bundle
    async with small.checkout(url_a, sha_a) as held:
        async with small.checkout(url_b, sha_b):
            assert held.path.exists()  # pinned while in use, however full the cache is
    assert leftovers(small.root) == []  # nothing fits: deleted once no job needs them


async def test_stale_partial_downloads_are_swept(server: BundleServer, tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / ".bundles", timeout=1)
    cache.root.mkdir(mode=0o700)
    stale = cache.root / f"{GOOD_SHA}.zip.part-0123456789abcdef"
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))
    fresh = cache.root / f"{GOOD_SHA}.zip.part-fedcba9876543210"
    fresh.write_bytes(b"another agent's download in progress")
    async with cache.checkout(server.serve("/b.zip", GOOD), GOOD_SHA):
        pass
    assert leftovers(cache.root) == sorted([f"{GOOD_SHA}.zip", fresh.name])


async def test_checkout_refuses_a_malformed_sha(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        async with BundleCache(tmp_path).checkout("http://x/y", "../../etc/passwd"):
            pass
