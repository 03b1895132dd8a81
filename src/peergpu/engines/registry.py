"""The built-in models, by the id clients send."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from peergpu.engines.base import Backend
from peergpu.engines.chat import SmolLM2Chat
from peergpu.engines.embeddings import MiniLMEmbeddings

BUILTIN_MODELS: dict[str, type[MiniLMEmbeddings] | type[SmolLM2Chat]] = {
    MiniLMEmbeddings.MODEL_ID: MiniLMEmbeddings,
    SmolLM2Chat.MODEL_ID: SmolLM2Chat,
}


def required_modules(model_ids: Iterable[str]) -> list[str]:
    """The optional libraries and model packages these models need, to check before loading."""
    return list(
        dict.fromkeys(module for model in model_ids for module in BUILTIN_MODELS[model].REQUIRES)
    )


def create_builtin(
    model_id: str, *, cache_dir: Path | None = None, threads: int | None = None
) -> Backend:
    """An unloaded backend for a built-in model id (KeyError for any other id)."""
    backend = BUILTIN_MODELS[model_id]
    if backend is SmolLM2Chat:
        return SmolLM2Chat(cache_dir=cache_dir, threads=threads)
    return MiniLMEmbeddings(threads=threads)
