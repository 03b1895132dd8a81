"""Marks hosts offline that stopped heartbeating (a dead link, or a replica that died holding
their sockets). Runs in every replica; the conditional updates make that safe."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from peergpu.server.context import ServerContext
from peergpu.server.services import presence

logger = logging.getLogger(__name__)


async def run_presence_sweeper(context: ServerContext) -> None:
    settings = context.settings
    interval = settings.agent_heartbeat_seconds
    silent_for = timedelta(seconds=interval * settings.agent_missed_heartbeats)
    while True:
        await asyncio.sleep(interval)
        try:
            async with context.sessionmaker() as session:
                gone = await presence.sweep_silent_hosts(session=session, silent_for=silent_for)
            for host_id in gone:
                logger.warning(
                    "host %s missed %d heartbeats: offline",
                    host_id,
                    settings.agent_missed_heartbeats,
                )
        except Exception:  # noqa: BLE001 - the sweeper must outlive a database hiccup
            logger.exception("presence sweep failed; retrying next interval")
