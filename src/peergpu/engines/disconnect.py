"""Noticing that the HTTP client went away while the engine works for it.

Starlette stops a streaming response when the client disconnects, but before the response
starts (a request waiting for the worker, a non-streaming completion) nobody reads the
connection: ``until_disconnected`` does, so abandoned work is cancelled instead of finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone.

    Only after the request body was read: the watcher consumes the connection's messages.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone
    finally:
        unfinished = [pending for pending in (task, watcher) if not pending.done()]
        for pending in unfinished:
            pending.cancel()
        # Wait for the cancelled work to unwind: a generator's ``finally`` cancels the model.
        await asyncio.gather(*unfinished, return_exceptions=True)
