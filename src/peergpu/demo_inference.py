"""The demo's inference gateway: the built-in engine (real MiniLM embeddings and SmolLM2 chat on
CPU) runs as a process of its own, one demo host serves its models through its agent, and the
demo shows an embeddings call and a streamed chat through ``/v1`` with the demo API key.

Without the ``engines`` extra the demo runs without models and says how to add them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console

from peergpu.engines.packaged import missing_modules
from peergpu.engines.registry import BUILTIN_MODELS, required_modules

EMBEDDINGS_MODEL = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"
#: The demo host that serves them, and its prices (micro-dollars per million tokens).
SERVING_HOST = "demo-4090"
_PRICES = {
    EMBEDDINGS_MODEL: ("embeddings", 20_000, 0),
    CHAT_MODEL: ("chat", 100_000, 200_000),
}
ENGINE_READY_TIMEOUT_SECONDS = 180.0


def engines_missing() -> list[str]:
    """The optional modules the demo's engine needs and this install lacks."""
    return missing_modules(required_modules(BUILTIN_MODELS))


def start_engine(
    data_dir: Path, port: int, preexec_fn: Callable[[], None] | None
) -> subprocess.Popen[bytes]:
    log = (data_dir / "engine.log").open("ab")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peergpu",
                "engine",
                "serve",
                "--port",
                str(port),
                "--cache-dir",
                str(data_dir / "engines"),
                "--log-level",
                "warning",
            ],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
    finally:
        log.close()


def serve_model_args(engine_url: str) -> list[str]:
    """``peergpu agent run`` options that serve the engine's models."""
    args: list[str] = []
    for name, (kind, price_in, price_out) in _PRICES.items():
        args += [
            "--serve-model",
            f"name={name},kind={kind},url={engine_url},max_concurrency=4,"
            f"input_price={price_in},output_price={price_out}",
        ]
    return args


def show_inference(
    url: str, api_key: str, engine_url: str, console: Console, stop: threading.Event
) -> None:
    """Wait for the engine, then call both models through the gateway and print the answers."""
    console.rule("[bold]inference gateway (OpenAI-compatible /v1)")
    console.print(f"loading {EMBEDDINGS_MODEL} and {CHAT_MODEL} on the CPU...")
    if not _wait(lambda: _healthy(engine_url), ENGINE_READY_TIMEOUT_SECONDS, stop):
        console.print("[yellow]the demo's engine did not start; see engine.log in the data dir[/]")
        return
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=f"{url}/v1", headers=headers, timeout=60) as http:
        if not _wait(lambda: _served(http), 60, stop):
            console.print("[yellow]no demo host serves the models; see the agents' logs[/]")
            return
        texts = ["A cat sleeps on the sofa.", "A kitten naps on the couch.", "Stock prices fell."]
        answer = http.post("/embeddings", json={"model": EMBEDDINGS_MODEL, "input": texts})
        answer.raise_for_status()
        vectors = [item["embedding"] for item in answer.json()["data"]]
        console.print(
            f"[green]embeddings[/] {len(vectors)} x {len(vectors[0])} from {EMBEDDINGS_MODEL}: "
            f"similarity(cat, kitten) = {_cosine(vectors[0], vectors[1]):.2f}, "
            f"similarity(cat, stocks) = {_cosine(vectors[0], vectors[2]):.2f}"
        )
        question = "What is the capital of France? Answer in one sentence."
        console.print(f"[green]chat[/] {CHAT_MODEL}, streamed: [bold]{question}[/]")
        body = {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 48,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        usage = None
        with http.stream("POST", "/chat/completions", json=body) as stream:
            stream.raise_for_status()
            for line in stream.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    console.print(
                        choice["delta"].get("content") or "", end="", markup=False, highlight=False
                    )
        console.print()
        if usage:
            console.print(
                f"[dim]{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion "
                "tokens, billed per token (peergpu usage)[/]"
            )
    console.print(
        "Use it from Python:\n"
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{url}/v1", api_key="{api_key}")\n'
        f'  client.embeddings.create(model="{EMBEDDINGS_MODEL}", input="hello")'
    )


def _healthy(engine_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(engine_url.removesuffix("/v1") + "/health", timeout=2).is_success
    return False


def _served(http: httpx.Client) -> bool:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        names = {m["id"] for m in http.get("/models").json()["data"]}
        return {EMBEDDINGS_MODEL, CHAT_MODEL} <= names
    return False


def _wait(ready: Callable[[], bool], timeout: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline or stop.wait(0.5):
            return False
    return True


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
