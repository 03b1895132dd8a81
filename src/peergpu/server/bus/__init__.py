"""The message bus: pub/sub for wake-ups and bounded streams for ordered logs.

``create_bus`` picks the implementation from settings: ``RedisBus`` when ``redis_url`` is set
(required once there is more than one server process), else ``InProcessBus``.
"""

from __future__ import annotations

from peergpu.config import ServerSettings
from peergpu.server.bus.base import Bus, Message, StreamEntry, Subscription
from peergpu.server.bus.memory import InProcessBus
from peergpu.server.bus.redis import RedisBus

__all__ = [
    "Bus",
    "InProcessBus",
    "Message",
    "RedisBus",
    "StreamEntry",
    "Subscription",
    "create_bus",
]


def create_bus(settings: ServerSettings) -> Bus:
    """``RedisBus`` on ``settings.redis_url`` (keys prefixed ``redis_prefix``), else in-process.

    Creating either bus does no I/O; call ``ping`` to check that Redis is reachable.
    """
    if settings.redis_url:
        return RedisBus(
            settings.redis_url,
            prefix=settings.redis_prefix,
            max_connections=settings.redis_max_connections,
        )
    return InProcessBus()
