"""Serve any ASGI app with uvicorn on a loopback port, in a background thread.

``tests.integration.harness.ThreadedServer`` builds PeerGPU's own server from settings; the
engine is a different app. A real server (not ``httpx.ASGITransport``, which buffers whole
bodies) is what streaming and client-disconnect tests need.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThreadedApp:
    def __init__(self, app: ASGIApp) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="test-engine", daemon=True)

    def start(self, timeout: float = 30) -> ThreadedApp:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the engine did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
