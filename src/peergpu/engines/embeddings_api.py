"""``/v1/embeddings`` on OpenAI's terms: which inputs are accepted, and the two encodings."""

from __future__ import annotations

import base64
import struct

from peergpu.engines.base import Embeddings, EmbeddingsBackend
from peergpu.engines.errors import InvalidRequest
from peergpu.engines.schemas import EmbeddingCreate, EmbeddingData, EmbeddingList, EmbeddingUsage

MAX_INPUTS = 2048


def embedding_inputs(body: EmbeddingCreate, backend: EmbeddingsBackend) -> list[str]:
    """The texts to embed; InvalidRequest for token arrays, empty input, other dimensions."""
    if body.dimensions is not None and body.dimensions != backend.dimensions:
        raise InvalidRequest(
            f"{backend.model_id} produces {backend.dimensions} dimensions; it cannot shorten "
            "its vectors.",
            param="dimensions",
        )
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidRequest("input must not be empty.", param="input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest(f"At most {MAX_INPUTS} inputs per request.", param="input")
    for text in texts:
        if isinstance(text, int | list):
            raise InvalidRequest(
                "Token arrays are not supported by this engine; send text.", param="input"
            )
        if not isinstance(text, str) or not text:
            raise InvalidRequest("Each input must be a non-empty string.", param="input")
    return texts


def embedding_list(result: Embeddings, *, model: str, encoding_format: str) -> EmbeddingList:
    """OpenAI's answer; base64 is raw little-endian float32 (the openai client's default)."""
    return EmbeddingList(
        data=[
            EmbeddingData(
                index=index,
                embedding=_base64(vector) if encoding_format == "base64" else vector,
            )
            for index, vector in enumerate(result.vectors)
        ],
        model=model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
