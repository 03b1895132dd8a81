from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from peergpu import __version__
from peergpu.errors import ServiceUnavailable
from peergpu.server.api.deps import ContextDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok", "version": __version__}


@router.get("/readyz", summary="Readiness: the database, the bus and object storage answer")
async def readyz(context: ContextDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        async with context.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        await context.bus.ping()
        checks["bus"] = "ok"
    except ServiceUnavailable as exc:
        checks["bus"] = f"error: {exc.message}"
    try:
        await context.storage.check()
        checks["storage"] = "ok"
    except ServiceUnavailable as exc:
        checks["storage"] = f"error: {exc.message}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )
