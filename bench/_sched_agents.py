"""The agents process of ``bench/scheduler.py``: many fake agents on one asyncio loop.

Each agent holds one WebSocket to ``/api/v1/agent/ws`` (opened with the options the real agent
uses, ``agent.connection``), says ``hello`` with one GPU, heartbeats at the interval the server
asks for, and answers every ``manifest`` at once with ``manifest_ack`` (accepted), ``job_status``
running and ``job_status`` succeeded, so the GPU is free again for the next job. It does not
verify manifest signatures: that work is the agent's, not the server's, and would only make this
process (not the server) slower.

Every manifest's arrival is recorded as ``(time.time() on arrival, job id, issued_at)``.

Run by ``bench/scheduler.py`` as ``python bench/_sched_agents.py URL CREDENTIALS.json``; it is
driven by JSON lines on stdin and answers each with one JSON line on stdout:

* ``{"cmd": "status"}`` -> counters (connected, manifests, in flight, errors, closed);
* ``{"cmd": "dump", "path": P}`` -> writes the receipts so far to ``P`` as JSON;
* ``{"cmd": "stop"}`` -> closes every socket and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

#: How many agents open their socket at the same time while connecting.
CONNECT_CONCURRENCY = 50


@dataclass
class Counters:
    connected: int = 0
    welcomed: int = 0
    manifests: int = 0
    finished: int = 0
    errors: int = 0
    closed: int = 0
    failed_connects: int = 0
    receipts: list[tuple[float, str, float]] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "welcomed": self.welcomed,
            "manifests": self.manifests,
            "inflight": self.manifests - self.finished,
            "errors": self.errors,
            "closed": self.closed,
            "failed_connects": self.failed_connects,
            "error_samples": self.error_samples[:5],
        }


class Agent:
    def __init__(self, url: str, spec: dict[str, Any], counters: Counters) -> None:
        self.url = url
        self.spec = spec
        self.counters = counters
        self.ws: ClientConnection | None = None

    async def open(self) -> None:
        headers = {"Authorization": f"Bearer {self.spec['credential']}"}
        # The real agent's options (peergpu.agent.connection), compression left at its default.
        self.ws = await connect(
            self.url,
            additional_headers=headers,
            open_timeout=60,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=5,
            max_size=16 * 1024 * 1024,
            compression=None,  # as the real agent (peergpu.agent.connection) connects
        )
        self.counters.connected += 1
        hello = {
            "type": "hello",
            "protocol_versions": [1],
            "agent_version": "bench",
            "hostname": self.spec["name"],
            "os": "Linux",
            "gpu_probe": "bench",
            "runners": ["process"],
            "gpus": [
                {
                    "index": gpu["index"],
                    "uuid": gpu["uuid"],
                    "model": self.spec["model"],
                    "memory_total_mib": self.spec["memory_mib"],
                    "driver_version": "550.54",
                    "cuda_version": "12.4",
                }
                for gpu in self.spec["gpus"]
            ],
            "running_jobs": [],
        }
        await self.ws.send(json.dumps(hello))
        welcome = json.loads(await self.ws.recv())
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"expected welcome, got {welcome}")
        self.counters.welcomed += 1
        self.heartbeat_interval = float(welcome["heartbeat_interval"])

    async def run(self) -> None:
        assert self.ws is not None
        ws = self.ws
        beat = asyncio.create_task(self._heartbeats(ws))
        counters = self.counters
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    raw = raw.decode()
                if raw.startswith('{"type":"manifest"'):
                    received = time.time()
                    manifest = json.loads(json.loads(raw)["manifest"]["payload"])
                    job_id = manifest["job_id"]
                    counters.manifests += 1
                    counters.receipts.append((received, job_id, manifest["issued_at"]))
                    nonce = manifest["nonce"]
                    await ws.send(
                        f'{{"type":"manifest_ack","job_id":"{job_id}","nonce":"{nonce}",'
                        '"accepted":true}'
                    )
                    await ws.send(f'{{"type":"job_status","job_id":"{job_id}","state":"running"}}')
                    await ws.send(
                        f'{{"type":"job_status","job_id":"{job_id}","state":"succeeded",'
                        '"exit_code":0,"duration_seconds":0.0}'
                    )
                    counters.finished += 1
                elif raw.startswith('{"type":"error"'):
                    counters.errors += 1
                    if len(counters.error_samples) < 20:
                        counters.error_samples.append(raw[:300])
                # status_ack, cancel, log_ack: nothing to do.
        except ConnectionClosed:
            pass
        finally:
            beat.cancel()
            counters.closed += 1

    async def _heartbeats(self, ws: ClientConnection) -> None:
        interval = self.heartbeat_interval
        # Spread the agents' heartbeats evenly over the interval, as independent hosts would be.
        await asyncio.sleep(random.uniform(0, interval))
        sample = json.dumps(
            {
                "type": "heartbeat",
                "gpus": [
                    {
                        "index": gpu["index"],
                        "utilization_percent": 0.0,
                        "memory_used_mib": 0,
                        "temperature_c": 40.0,
                        "power_watts": 60.0,
                    }
                    for gpu in self.spec["gpus"]
                ],
                "running_jobs": [],
            }
        )
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send(sample)
                await asyncio.sleep(interval)


async def _main(url: str, credentials_path: str) -> None:
    specs: list[dict[str, Any]] = json.loads(open(credentials_path).read())
    counters = Counters()
    agents = [Agent(url, spec, counters) for spec in specs]
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    runners: list[asyncio.Task[None]] = []

    async def open_one(agent: Agent) -> None:
        async with gate:
            try:
                await agent.open()
            except Exception as exc:  # noqa: BLE001 - counted and reported, the rest go on
                counters.failed_connects += 1
                if len(counters.error_samples) < 20:
                    counters.error_samples.append(f"connect: {exc!r}"[:300])
                return
        runners.append(asyncio.create_task(agent.run()))

    connecting = asyncio.gather(*(open_one(a) for a in agents))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        cmd = command["cmd"]
        if cmd == "status":
            reply: dict[str, Any] = counters.status()
        elif cmd == "dump":
            with open(command["path"], "w") as out:
                json.dump(counters.receipts, out)
            reply = {"ok": True, "count": len(counters.receipts)}
        elif cmd == "stop":
            break
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    connecting.cancel()
    closing = [agent.ws.close() for agent in agents if agent.ws is not None]
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10)
    for task in runners:
        task.cancel()
    await asyncio.gather(*runners, connecting, return_exceptions=True)
    sys.stdout.write(json.dumps({"ok": True}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
