"""``peergpu demo`` as a new user runs it: the sample job goes queued -> running -> succeeded on
a simulated host with its logs streaming and an artifact; stopping the demo stops its agents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import free_port

pytestmark = pytest.mark.timeout(300)


def _agents_of(data_dir: Path) -> list[str]:
    """The demo's agent and engine processes still running."""
    found = subprocess.run(
        ["pgrep", "-f", f"(state|cache)-dir {data_dir}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.split()


def test_demo_runs_a_sample_job_with_live_logs_and_an_artifact(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERGPU_")}
    env["COLUMNS"] = "200"
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peergpu",
                "demo",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while "client.embeddings.create" not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        output = log.read_text()
        order = ["state queued", "state assigned on demo-4090", "state running", "epoch 20/20"]
        positions = [output.index(marker) for marker in [*order, "state succeeded"]]
        assert positions == sorted(positions), output
        # The demo runs on the ledger: the job was paid from the renter's demo credit.
        assert "Demo accounts start with $100 of credit" in output
        assert "s on 1 GPU at $0.39/GPU-hour, billed by the second" in output, output
        # The printed API key works, and the demo hosts are on the marketplace.
        key = output.split("api key: ")[1].split()[0]
        market = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/marketplace/hosts",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ).json()
        assert sorted(h["name"] for h in market["data"]) == ["demo-4090", "demo-a100", "demo-h100"]
        assert len(_agents_of(data_dir)) == 4  # three agents and the engine
        # The inference gateway served the built-in engine's real models through a demo host.
        assert "embeddings 3 x 384 from all-minilm-l6-v2" in output, output
        similar = float(output.split("similarity(cat, kitten) = ")[1].split(",")[0])
        unrelated = float(output.split("similarity(cat, stocks) = ")[1].split()[0])
        assert similar > unrelated + 0.3, output
        assert "Paris" in output.split("streamed:")[1], output
        models = httpx.get(
            f"http://127.0.0.1:{port}/v1/models",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ).json()
        assert {m["id"] for m in models["data"]} == {"all-minilm-l6-v2", "smollm2-135m-instruct"}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    deadline = time.monotonic() + 15
    while _agents_of(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _agents_of(data_dir) == [], "the demo's agents outlived it"
