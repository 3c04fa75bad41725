"""The lock service's HTTP API (v1), as ``docs/api.md`` describes it.

JSON in camelCase, times in RFC 3339 UTC, durations in Go form. The handlers are thin: they
turn HTTP into calls on the :class:`~enhanced_locking.factory.LockService` router and answers
back into the documented shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from enhanced_locking.api.disconnect import AnswerUnlessGone, ClientGone, answer_unless_gone
from enhanced_locking.api.errors import error_answers, install_error_handlers, json_error
from enhanced_locking.api.queue_routes import install_queue_routes
from enhanced_locking.api.sse import install_event_stream
from enhanced_locking.factory import LockService
from enhanced_locking.types import AcquireResult, Lock, LockingError, LockRequest

__all__ = ["create_app"]

log = logging.getLogger(__name__)

Key = Annotated[str, Query(min_length=1, max_length=4096, description="The lock key.")]
Repo = Annotated[str, Query(min_length=1, max_length=512, description="owner/name")]
PullNum = Annotated[int, Query(ge=0, le=2**31 - 1, description="Pull request number.")]


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", by_alias=True)


def _locks(locks: list[Lock]) -> list[Any]:
    return [_dump(lock) for lock in locks]


def create_app(service: LockService, *, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI app over ``service``; with ``manage_lifecycle`` it starts and closes it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await service.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await service.close()

    app = FastAPI(
        title="Enhanced Locking",
        version="v1",
        summary="Atlantis's lock service: queues, priorities, timeouts and gradual migration.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_queue_routes(app, service)
    install_event_stream(app, service.events)
    router = service.router

    @app.post("/v1/locks", response_model=AcquireResult, response_model_by_alias=True,
              responses={409: {"model": AcquireResult}})
    async def acquire(request: LockRequest, http: Request) -> JSONResponse:
        """Acquire one lock: 200 acquired, 409 not acquired (reason and holder), 422 invalid.

        With ``wait`` the request waits in the key's queue; if the client disconnects while
        waiting, its place in the queue is given up (nothing is granted to it afterwards).
        """
        try:
            result = await answer_unless_gone(http, router.acquire(request),
                                              watch=bool(request.wait))
        except ClientGone as gone:
            await _give_back(gone.answer, request)
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        if not result.fresh:
            return JSONResponse(_dump(result), status_code=200 if result.acquired else 409)
        return AnswerUnlessGone(_dump(result), status_code=200,
                                on_gone=lambda: _give_back(result, request))

    async def _give_back(answer: AcquireResult | None, request: LockRequest) -> None:
        """A grant nobody will read is released, never left held by a caller that is gone."""
        if answer is None or not answer.fresh or answer.lock is None:
            return
        owner = (request.project.repo_full_name, request.pull.num)
        try:
            await asyncio.shield(router.release(answer.lock.key, owner=owner))
        except LockingError as error:  # freed or taken meanwhile, or the store failed
            log.warning("could not give back %s (its client left before the answer): %s",
                        answer.lock.key, error)
            return
        log.info("gave back %s: its client left before the answer", answer.lock.key)

    @app.get("/v1/locks")
    async def list_locks(repo: Repo | None = None, pull: PullNum | None = None) -> Any:
        """Every held lock, optionally of one repository and/or pull request."""
        return {"locks": _locks(await router.list(repo=repo, pull=pull))}

    @app.get("/v1/locks/by-key", responses=error_answers({404: "No lock is held on the key."}))
    async def get_lock(key: Key) -> Any:
        """The lock held on a key: 200 with the lock, 404 when the key is free."""
        lock = await router.get(key)
        if lock is None:
            return json_error(404, f"no lock is held on {key}", lockKey=key)
        return {"lock": _dump(lock)}

    @app.delete("/v1/locks/by-key", responses=error_answers({
        404: "No lock is held on the key.",
        409: "With pull: the lock is held by another pull; with repo: by a project of another "
             "repository whose key is the same (the body names the holder).",
    }))
    async def release_lock(
        key: Key, pull: PullNum | None = None,
        repo: Annotated[str | None, Query(
            min_length=1, max_length=512,
            description="Only a lock of this repository (two projects of different "
                        "repositories can join to one key).")] = None,
    ) -> Any:
        """Release a lock; with ``pull`` only if that pull holds it, with ``repo`` only if it is
        that repository's (else 409)."""
        # A caller that knows its repository should say it: the key alone can name another
        # repository's project (``gl/grp`` + ``sub/proj`` and ``gl/grp/sub`` + ``proj``).
        owner = None
        if pull is not None or repo is not None:
            holder = await router.get(key)
            if holder is None:
                return json_error(404, f"no lock is held on {key}", lockKey=key)
            if repo is not None and holder.project.repo_full_name != repo:
                return json_error(
                    409, f"lock {key} is held for {holder.project.repo_full_name}, not {repo}: "
                    "two projects join to the same key; nothing was released",
                    lockKey=key, reason="collision", holder=_dump(holder))
            if pull is not None:
                owner = (holder.project.repo_full_name, pull)
        lock = await router.release(key, owner=owner)
        if lock is None:
            return json_error(404, f"no lock is held on {key}", lockKey=key)
        return {"released": True, "lock": _dump(lock)}

    @app.delete("/v1/locks/by-pull")
    async def release_pull(repo: Repo, pull: PullNum) -> Any:
        """Release every lock of a pull request (Atlantis does this when a PR closes)."""
        return {"released": _locks(await router.release_by_pull(repo, pull))}

    @app.get("/v1/config")
    async def config() -> Any:
        """Effective configuration (secrets masked), its generation and hash, and routing."""
        snapshot = service.provider.current
        migration = snapshot.migration
        return {
            "generation": snapshot.generation,
            "hash": snapshot.hash,
            "layers": list(snapshot.layers),
            "config": snapshot.config.masked(),
            "featureFlags": service.provider.feature_flags(),
            "routing": {
                "enabled": snapshot.config.enabled,
                "weight": migration.weight,
                "mode": migration.mode,
                "fallback": migration.fallback,
            },
        }

    @app.get("/v1/migration")
    async def migration_state() -> Any:
        """This replica's migration machinery: the weight move (phase, from, pending and
        excluded replicas), shadow counters, fallback journal, open lock conflicts."""
        return service.migration.status()

    @app.get("/healthz")
    async def healthz() -> Any:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "A backend in use does not answer."}})
    async def readyz() -> JSONResponse:
        """Readiness: every backend in use answers."""
        backends = await service.ready()
        ready = all(state == "ok" for state in backends.values())
        return JSONResponse({"ready": ready, "backends": backends},
                            status_code=200 if ready else 503)

    @app.get("/metrics", responses=error_answers({404: "Metrics are off."}))
    async def metrics() -> Response:
        """Prometheus metrics (404 when the metrics flag is off)."""
        if not service.provider.current.config.metrics:
            return json_error(404, "metrics are off (enhanced-locking-metrics=false)")
        await service.refresh_gauges()
        return Response(service.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
