"""``create_app(settings)``: the FastAPI application. No global state besides ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute

from peergpu import __version__
from peergpu.config import ServerSettings
from peergpu.errors import ServiceUnavailable
from peergpu.server.agents.hub import AgentHub
from peergpu.server.agents.sweeper import run_presence_sweeper
from peergpu.server.api import (
    api_keys,
    auth,
    billing,
    health,
    hosts,
    job_logs,
    jobs,
    marketplace,
    orgs,
    payments,
    storage,
    usage,
    users,
)
from peergpu.server.api.errors import install_error_handlers
from peergpu.server.api.middleware import BodySizeLimitMiddleware, SecurityHeadersMiddleware
from peergpu.server.context import ServerContext
from peergpu.server.db import migrate
from peergpu.server.gateway import create_gateway
from peergpu.server.gateway.relay import Relay
from peergpu.server.services.billing.inference import run_usage_billing
from peergpu.server.services.billing.settlement import run_settlement
from peergpu.server.services.billing.upkeep import run_payments_upkeep
from peergpu.server.services.scheduler import run_scheduler

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def operation_id(route: APIRoute) -> str:
    """Stable operation ids (``users-read_me``) so generated clients read well."""
    tag = route.tags[0] if route.tags else "default"
    return f"{tag}-{route.name}"


def create_app(settings: ServerSettings) -> FastAPI:
    gateway = create_gateway()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        context = ServerContext.build(settings)
        try:
            if settings.migrate_on_start:
                await migrate.upgrade(context.engine)
            app.state.context = context
            gateway.state.context = context
            try:
                await context.storage.check()
            except ServiceUnavailable as exc:  # serve anyway: /readyz reports it until fixed
                logger.error("object storage is not usable: %s", exc.message)
            app.state.hub = AgentHub(context)
            context.usage.start()
            gateway.state.relay = Relay(context, app.state.hub.streams)
            sweeper = asyncio.create_task(run_presence_sweeper(context), name="presence-sweeper")
            scheduler = (
                asyncio.create_task(run_scheduler(context), name="scheduler")
                if settings.scheduler_enabled
                else None
            )
            settler = (
                asyncio.create_task(run_settlement(context), name="settlement")
                if settings.scheduler_enabled
                else None
            )
            usage_biller = (
                asyncio.create_task(run_usage_billing(context), name="usage-billing")
                if settings.scheduler_enabled
                else None
            )
            upkeep = (
                asyncio.create_task(run_payments_upkeep(context), name="payments-upkeep")
                if settings.scheduler_enabled and settings.stripe_enabled
                else None
            )
            logger.info(
                "PeerGPU %s ready: database=%s bus=%s",
                __version__,
                context.engine.url.render_as_string(hide_password=True),
                type(context.bus).__name__,
            )
            try:
                yield
            finally:
                for task in (sweeper, scheduler, settler, usage_biller, upkeep):
                    if task is not None:
                        task.cancel()
                await app.state.hub.close_all()
                await gateway.state.relay.close()
                for task in (sweeper, scheduler, settler, usage_biller, upkeep):
                    if task is not None:
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                await context.usage.close()  # every buffered usage row, before the database
        finally:
            await context.close()

    app = FastAPI(
        title="PeerGPU",
        version=__version__,
        summary="A peer-to-peer GPU cloud: run jobs on rented GPUs, serve models, pay per second.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        # Uploads to signed URLs are bounded by their signed max_bytes, bundles by
        # bundle_max_bytes, both counted as they stream.
        exempt_prefixes=(f"{API_PREFIX}/storage/", f"{API_PREFIX}/bundles"),
    )
    app.add_middleware(SecurityHeadersMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )

    # First, so that /v1 requests (the hottest path) do not try every /api/v1 route first.
    app.mount("/v1", gateway)
    app.include_router(health.router)
    for router in (
        auth.router,
        users.router,
        orgs.router,
        api_keys.router,
        hosts.router,
        hosts.agent_router,
        jobs.router,
        job_logs.router,
        marketplace.router,
        storage.router,
        billing.router,
        payments.router,
        usage.router,
    ):
        app.include_router(router, prefix=API_PREFIX)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    return app
