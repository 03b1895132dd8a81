"""Errors in OpenAI's shape, for everything under ``/v1``.

OpenAI's clients (the official ``openai`` package included) read
``{"error": {"message", "type", "param", "code"}}`` and map the HTTP status to an exception
class (400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404
NotFoundError, 429 RateLimitError, 5xx InternalServerError). The gateway is a sub-application
with its own handlers, so the rest of the API keeps PeerGPU's own error shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from peergpu import errors

logger = logging.getLogger(__name__)

#: PeerGPU's domain errors as (status, OpenAI type, OpenAI code).
_BY_ERROR: dict[type[errors.PeerGPUError], tuple[int, str, str | None]] = {
    errors.AuthenticationFailed: (401, "invalid_request_error", "invalid_api_key"),
    errors.PermissionDenied: (403, "invalid_request_error", "insufficient_permissions"),
    errors.NotFound: (404, "invalid_request_error", "not_found"),
    errors.InvalidInput: (400, "invalid_request_error", None),
    errors.Conflict: (409, "invalid_request_error", None),
    errors.PaymentRequired: (402, "insufficient_quota", "insufficient_quota"),
    errors.PayloadTooLarge: (413, "invalid_request_error", "request_too_large"),
    errors.RateLimited: (429, "requests", "rate_limit_exceeded"),
    errors.ServiceUnavailable: (503, "server_error", "service_unavailable"),
}


class OpenAIError(Exception):
    """An error the gateway answers in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_response(error: OpenAIError) -> JSONResponse:
    body = {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def install_openai_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai)  # type: ignore[arg-type]
    app.add_exception_handler(errors.PeerGPUError, _domain)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(DataError, _bad_data)  # type: ignore[arg-type]
    app.add_exception_handler(DBAPIError, _database)
    app.add_exception_handler(PoolTimeoutError, _database)
    app.add_exception_handler(ConnectionError, _database)
    app.add_exception_handler(TimeoutError, _database)
    app.add_exception_handler(Exception, _unexpected)


async def _openai(_request: Request, exc: OpenAIError) -> JSONResponse:
    return error_response(exc)


async def _domain(_request: Request, exc: errors.PeerGPUError) -> JSONResponse:
    status, kind, code = next(
        (mapped for cls, mapped in _BY_ERROR.items() if isinstance(exc, cls)),
        (500, "server_error", None),
    )
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return error_response(
        OpenAIError(status, exc.message, type=kind, code=code or exc.code, headers=headers)
    )


async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "Invalid request."))
    if param:
        message = f"Invalid value for '{param}': {message}"
    return error_response(OpenAIError(400, message, param=param, code="invalid_value"))


async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
    message = "Unknown request URL." if exc.status_code == 404 else str(exc.detail)
    return error_response(OpenAIError(exc.status_code, message, code=code))


async def _bad_data(_request: Request, exc: DataError) -> JSONResponse:
    """The database refused a value from the request (a NUL byte in a model id...)."""
    logger.info("gateway: value refused by the database: %s", exc.orig)
    return error_response(
        OpenAIError(400, "A value in the request is not valid.", code="invalid_value")
    )


async def _database(_request: Request, exc: Exception) -> JSONResponse:
    logger.warning("gateway: database unavailable: %s", exc)
    return error_response(
        OpenAIError(
            503,
            "The service is temporarily unavailable; retry shortly.",
            type="server_error",
            code="service_unavailable",
            headers={"Retry-After": "2"},
        )
    )


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("gateway: unexpected error", exc_info=exc)
    return error_response(
        OpenAIError(500, "The server had an error; retry later.", type="server_error")
    )
