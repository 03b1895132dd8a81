"""One thread per model: the only thread that touches the model and its tokenizer.

PyTorch on a small CPU runs fastest with one request at a time using every core, and
Hugging Face tokenizers are not safe to share between threads; a single worker gives both.
Requests queue in arrival order.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def default_threads(models: int = 1) -> int:
    """Up to two threads per model, never more threads than cores across ``models`` models.

    Small models gain little past two threads, and oversubscribing is far worse than idling:
    on a busy 2-core machine SmolLM2 made 3-13 tokens/s with 2 threads, 15 with 1.
    """
    return max(1, min(2, (os.cpu_count() or 1) // max(1, models)))


def torch_threads(threads: int) -> Callable[[], None]:
    """A worker initializer: OpenMP's thread count is per thread, so set it where torch runs."""

    def initialize() -> None:
        import torch

        torch.set_num_threads(threads)

    return initialize


class InferenceWorker:
    def __init__(self, name: str, *, initializer: Callable[[], None] | None = None) -> None:
        """``initializer`` runs once on the worker thread (per-thread library settings)."""
        self.name = name
        self._initializer = initializer
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"engine-{self.name}",
                initializer=self._initializer,
            )

    def run_sync(self, function: Callable[[], T]) -> T:
        """Run on the worker and wait (loading, tests); not from the event loop."""
        return self._require().submit(function).result()

    async def run(self, function: Callable[[], T]) -> T:
        """Run on the worker without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._require(), function)

    def submit(self, function: Callable[[], Any]) -> None:
        """Queue work whose outcome travels another way (a stream's channel)."""
        self._require().submit(function)

    def wait_idle(self, timeout: float | None = None) -> bool:
        if self._executor is None:
            return True
        marker = self._executor.submit(lambda: None)
        try:
            marker.result(timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _require(self) -> ThreadPoolExecutor:
        if self._executor is None:
            raise RuntimeError(f"the {self.name} worker is not started: call load() first")
        return self._executor
