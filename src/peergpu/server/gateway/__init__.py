"""The OpenAI-compatible inference gateway, mounted at ``/v1`` as its own application so that
its errors take OpenAI's shape (see :mod:`.errors`) and its OpenAPI document stands alone
(``/v1/openapi.json``)."""

from __future__ import annotations

from fastapi import FastAPI

from peergpu import __version__
from peergpu.server.gateway.errors import install_openai_error_handlers
from peergpu.server.gateway.routes import router


def create_gateway() -> FastAPI:
    """The ``/v1`` application; the server's lifespan sets ``state.context`` on it."""
    gateway = FastAPI(
        title="PeerGPU inference gateway (OpenAI-compatible)",
        version=__version__,
        docs_url="/docs",
        redoc_url=None,
    )
    install_openai_error_handlers(gateway)
    gateway.include_router(router)
    return gateway
