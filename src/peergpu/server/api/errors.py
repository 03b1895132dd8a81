"""Maps every error to the one JSON error body, in one place.

Domain errors map by class; FastAPI's validation errors list the offending fields; a lost
database or bus is a 503 (retry later); anything unexpected is logged with its traceback and
answered with a generic 500 body that reveals nothing internal.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from peergpu import errors

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[errors.PeerGPUError], int] = {
    errors.InvalidInput: 422,
    errors.AuthenticationFailed: 401,
    errors.PermissionDenied: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.PaymentRequired: 402,
    errors.PayloadTooLarge: 413,
    errors.RateLimited: 429,
    errors.ServiceUnavailable: 503,
}

_CODE_BY_STATUS = {
    400: "bad_request",
    401: "authentication_failed",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return JSONResponse(body, status_code=status, headers=headers)


def status_for(error: errors.PeerGPUError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.PeerGPUError, _domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(PoolTimeoutError, _database_down)
    app.add_exception_handler(DBAPIError, _database_error)  # type: ignore[arg-type]
    # Drivers raise these raw while connecting (asyncpg: refused, reset, timed out).
    app.add_exception_handler(ConnectionError, _database_down)
    app.add_exception_handler(TimeoutError, _database_down)
    app.add_exception_handler(Exception, _unexpected)


async def _domain_error(_request: Request, exc: errors.PeerGPUError) -> JSONResponse:
    headers: dict[str, str] = {}
    status = status_for(exc)
    if isinstance(exc, errors.RateLimited):
        headers["Retry-After"] = str(max(1, round(exc.retry_after + 0.5)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(status, exc.code, exc.message, exc.details, headers or None)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = [
        {
            "loc": ".".join(str(part) for part in err.get("loc", ())),
            "message": err.get("msg", "invalid"),
            "type": err.get("type", "invalid"),
        }
        for err in exc.errors()
    ]
    summary = "; ".join(f"{f['loc']}: {f['message']}" for f in fields[:5])
    return error_response(
        422, "validation_error", f"Invalid request: {summary}", {"fields": fields}
    )


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _CODE_BY_STATUS.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable: %s", exc)
    return error_response(
        503,
        "service_unavailable",
        "The database is unavailable; retry shortly.",
        headers={"Retry-After": "5"},
    )


async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
    if exc.connection_invalidated:
        return await _database_down(request, exc)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        500,
        "internal_error",
        "Something went wrong on our side; it has been logged.",
        {"request_id": request.headers.get("x-request-id", "")},
    )
