"""The built-in CPU inference engine: real small models behind OpenAI's HTTP API.

Hosts serve models through a local OpenAI-compatible engine that the host agent forwards to
by URL (vLLM, a llama.cpp server, Ollama); this one needs no GPU and ships its models in
Python packages, for the demo, the tests and CPU-only hosts. ``peergpu engine serve`` runs it.

Importing this package needs no optional library; loading a model needs the ``engines`` extra
(torch, transformers, sentence-transformers and the model packages), and says so otherwise.
"""

from peergpu.engines.app import create_engine_app
from peergpu.engines.base import (
    Backend,
    ChatBackend,
    ChatParams,
    ChatTurn,
    EmbeddingsBackend,
    GenerationStats,
)
from peergpu.engines.chat import SmolLM2Chat, TransformersChat
from peergpu.engines.embeddings import MiniLMEmbeddings, SentenceTransformerEmbeddings
from peergpu.engines.errors import EnginesNotInstalled
from peergpu.engines.registry import BUILTIN_MODELS, create_builtin, required_modules

__all__ = [
    "BUILTIN_MODELS",
    "Backend",
    "ChatBackend",
    "ChatParams",
    "ChatTurn",
    "EmbeddingsBackend",
    "EnginesNotInstalled",
    "GenerationStats",
    "MiniLMEmbeddings",
    "SentenceTransformerEmbeddings",
    "SmolLM2Chat",
    "TransformersChat",
    "create_builtin",
    "create_engine_app",
    "required_modules",
]
