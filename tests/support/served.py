"""A :class:`~enhanced_locking.factory.LockService` in this process, served over HTTP on a
loopback port (a replica whose store a test switches at runtime through its provider, as a
LockPolicy does), or an app called in process (:func:`in_process`), with an audit trail kept in
memory (:func:`memory_trail`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import uvicorn
from fastapi import FastAPI
from tests.support.service import LOOPBACK, free_port

from enhanced_locking.api import create_app
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.backends.audit_store import MemoryAuditStore, Retention
from enhanced_locking.factory import LockService

__all__ = ["in_process", "memory_trail", "served"]

ORIGIN = f"http://{LOOPBACK}"


def memory_trail() -> AuditTrail:
    """An audit trail kept in memory (a day, 1,000 entries), written nowhere else."""
    return AuditTrail(MemoryAuditStore(Retention(timedelta(days=1), 1000)), stdout=lambda: False)


@contextlib.asynccontextmanager
async def in_process(app: FastAPI, *,
                     raise_app_exceptions: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` started (its lifespan) and a client calling it in this process."""
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions),
            base_url=ORIGIN) as http:
        yield http


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
