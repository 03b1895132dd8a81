"""The built-in engine with its real models, loaded once per test session.

Loading takes seconds (imports, weights; the first run also converts SmolLM2's GGUF into
pytest's cache folder, about 20 s more). Tests are skipped when the ``engines`` extra is not
installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from peergpu.engines import (
    BUILTIN_MODELS,
    MiniLMEmbeddings,
    SmolLM2Chat,
    create_engine_app,
    required_modules,
)
from peergpu.engines.packaged import missing_modules
from peergpu.engines.worker import default_threads
from tests.engines.serving import ThreadedApp

EMBEDDINGS_MODEL = MiniLMEmbeddings.MODEL_ID
CHAT_MODEL = SmolLM2Chat.MODEL_ID
#: as ``peergpu engine serve`` serving both models would use
THREADS = default_threads(models=2)


@pytest.fixture(scope="session")
def engines_installed() -> None:
    missing = missing_modules(required_modules(BUILTIN_MODELS))
    if missing:
        message = f"the engines extra is not installed (missing {', '.join(missing)})"
        if os.environ.get("CI") == "true":  # dev.py installs it: CI must not skip silently
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def embeddings_backend(engines_installed: None) -> Iterator[MiniLMEmbeddings]:
    backend = MiniLMEmbeddings(threads=THREADS)
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def chat_backend(
    engines_installed: None,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SmolLM2Chat]:
    backend = SmolLM2Chat(cache_dir=_persistent_cache(request, tmp_path_factory), threads=THREADS)
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def engine(
    embeddings_backend: MiniLMEmbeddings, chat_backend: SmolLM2Chat
) -> Iterator[ThreadedApp]:
    server = ThreadedApp(create_engine_app([embeddings_backend, chat_backend])).start()
    yield server
    server.stop()


@pytest.fixture
def engine_url(engine: ThreadedApp) -> str:
    return engine.url


@pytest.fixture
def client(engine: ThreadedApp) -> OpenAI:
    return OpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(engine: ThreadedApp) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.url, timeout=60) as http_client:
        yield http_client


def _persistent_cache(request: pytest.FixtureRequest, factory: pytest.TempPathFactory) -> Path:
    """pytest's own cache folder keeps the converted model between runs."""
    cache = request.config.cache
    return cache.mkdir("peergpu-engines") if cache is not None else factory.mktemp("engines")
