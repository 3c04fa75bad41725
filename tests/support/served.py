"""A :class:`~enhanced_locking.factory.LockService` in this process, served over HTTP on a
loopback port (a replica whose store a test switches at runtime through its provider, as a
LockPolicy does)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from tests.support.service import LOOPBACK, free_port

from enhanced_locking.api import create_app
from enhanced_locking.factory import LockService

__all__ = ["served"]


@contextlib.asynccontextmanager
async def served(service: LockService) -> AsyncIterator[str]:
    """``service``'s HTTP API on a loopback port of this process (its URL)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, manage_lifecycle=False),
                                           host=LOOPBACK, port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the server did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        await task
