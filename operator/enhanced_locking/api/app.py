"""The lock service's HTTP API (v1), as ``docs/api.md`` describes it.

JSON in camelCase, times in RFC 3339 UTC, durations in Go form. The handlers are thin: they
turn HTTP into calls on the :class:`~enhanced_locking.factory.LockService` router and answers
back into the documented shapes. Each takes the caller (:mod:`.access`) and asks for the
right its call needs before anything changes; ``docs/08-access.md`` lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from enhanced_locking import types
from enhanced_locking.api.access import (
    AccessBuilder,
    Caller,
    CallerDep,
    SettingsCallerDep,
    build_access,
    check_routes,
    document_bearer,
    install_access,
    overrides_rules,
    public,
    rule_override,
)
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.api.audit_routes import install_audit_routes
from enhanced_locking.api.console import install_console
from enhanced_locking.api.direct import check_direct_routes, serve_directly
from enhanced_locking.api.disconnect import (
    AnswerUnlessGone,
    ClientGone,
    answer_unless_gone,
    gone_answer,
    left_before_it_began,
    not_withdrawn,
)
from enhanced_locking.api.docs_pages import install_docs_pages
from enhanced_locking.api.errors import (
    UNREADABLE,
    collision_json,
    document_common_answers,
    error_answers,
    install_error_handlers,
    json_error,
    unreadable_json,
)
from enhanced_locking.api.params import Key, OnlyRepo, PullNum, Repo
from enhanced_locking.api.queue_routes import (
    holder_of,
    install_queue_routes,
    not_owned,
    shown_to,
)
from enhanced_locking.api.responses import (
    GRANT_AGAIN,
    GRANT_UPGRADED,
    NEW_GRANT,
    JsonAnswer,
    lock_json,
    refusal,
    result_json,
)
from enhanced_locking.api.server import ALWAYS_SERVED, Backpressure, BodyLimit
from enhanced_locking.api.sse import install_event_stream
from enhanced_locking.api.webhooks import MAX_BODY, webhook_router
from enhanced_locking.backends.audit_store import build_audit_store
from enhanced_locking.factory import LockService
from enhanced_locking.locking.queueing import NotWithdrawn, withdrawals_noted
from enhanced_locking.types import (
    AcquireResult,
    Lock,
    LockingError,
    LockNotOwned,
    LockRequest,
    Priority,
    Verb,
)

__all__ = ["create_app"]

log = logging.getLogger(__name__)

def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", by_alias=True)


def _locks(locks: list[Lock]) -> list[Any]:
    return [_dump(lock) for lock in locks]


WHO = error_answers({401: "No or invalid credentials (see WWW-Authenticate).",
                     403: "The caller lacks the right the call needs (the body names the verb)."})


async def need_lock(caller: CallerDep, *, action: str, repo: str, pull: int, key: str | None,
                    priority: Priority) -> None:
    """An acquire's rights: ``lock`` on the repository, ``prioritize`` above normal."""
    await caller.need(Verb.LOCK, action=action, repo=repo, key=key, pull=pull)
    if priority.level > Priority.NORMAL.level:
        await caller.need(Verb.PRIORITIZE, action=action, repo=repo, key=key, pull=pull)


def create_app(
    service: LockService, *, manage_lifecycle: bool = True, audit: AuditTrail | None = None,
    access: AccessBuilder = build_access, exposed: bool = False, loopback_hosts: bool = False,
) -> FastAPI:
    """The FastAPI app over ``service``; with ``manage_lifecycle`` it starts and closes it.

    ``audit``: where the trail goes (default: the active store, see :mod:`.audit`);
    ``access``: builds the access control from a config snapshot; ``exposed``: it listens on
    a non-loopback address; ``loopback_hosts``: it listens on loopback alone, so with access
    control off it answers only requests that name a loopback host (no DNS rebinding).
    """
    counted = service.metrics
    if audit is None:
        audit = AuditTrail(build_audit_store(service.provider.current.config),
                           enabled=lambda: service.provider.current.config.audit,
                           stdout=lambda: service.provider.current.config.audit_stdout,
                           own_locks=lambda: service.provider.current.config.audit_own_locks,
                           lost=lambda reason, n: counted.audit_lost.labels(reason).inc(n))
    counted.audit_waiting.set_function(audit.waiting)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await service.start()
        try:
            yield
        finally:
            holder.close()
            await audit.close()
            if manage_lifecycle:
                await service.close()

    app = FastAPI(
        title="Enhanced Locking",
        version="v1",
        summary="Atlantis's lock service: queues, priorities, timeouts and gradual migration.",
        lifespan=lifespan,
        # No 307 from /v1/locks/ to /v1/locks: Starlette builds its absolute Location from the
        # Host header as http://, so behind a TLS-terminating proxy a client would follow it in
        # plain text with its token. The 404 names the path without the slash instead.
        redirect_slashes=False,
        # /docs and /redoc with their assets served here, not from a CDN (.docs_pages)
        docs_url=None, redoc_url=None,
    )
    install_docs_pages(app)
    install_error_handlers(app, busy=service.metrics.requests_pool_busy.inc)
    # What the middleware below answers, and the 422 of .errors, in the OpenAPI document.
    document_common_answers(app, always_served=ALWAYS_SERVED)
    app.add_middleware(Backpressure,
                       limit=lambda: service.provider.current.config.http_max_in_flight,
                       shed=service.metrics.requests_shed.inc)
    # Outside Backpressure (added last, run first): a body over the bound is refused unread,
    # before any route (or the direct handler) or its caller check reads it.
    app.add_middleware(BodyLimit, webhooks=MAX_BODY,
                       limit=lambda: service.provider.current.config.http_max_body)
    holder = install_access(app, service.provider, audit, access, exposed=exposed,
                            loopback_hosts=loopback_hosts, withheld=lambda: service.withheld)
    holder.current()  # a bad tokens file stops the start (ValueError), not the first call
    # VCS webhooks authenticate by the VCS's signature, not by the API's credentials.
    app.include_router(webhook_router(service, settings=lambda: service.provider.current.config))
    install_queue_routes(app, service)
    install_event_stream(app, service.events, lambda: service.provider.current.config)
    install_console(app, service)
    install_audit_routes(app)
    router = service.router

    @app.post("/v1/locks", response_model=AcquireResult, response_model_by_alias=True,
              responses={200: {"headers": {types.GRANT_HEADER: {
                  "description": "new: this call granted the lock (a lease starts now); "
                                 "again: its pull held it already (unchanged, lease and all); "
                                 "upgraded: its pull's shared hold made exclusive in place (a "
                                 "new fencing token, a lease starting now; not given back if "
                                 "the client leaves).",
                  "schema": {"type": "string", "enum": [types.NEW_GRANT, types.GRANT_AGAIN,
                                                        types.GRANT_UPGRADED]}}}},
                  409: {"model": AcquireResult}, **WHO})
    async def acquire(request: LockRequest, http: Request, caller: CallerDep) -> JSONResponse:
        """Acquire one lock: 200 acquired, 409 not acquired (reason and holder), 503 not
        acquired because a store did not answer (reason ``unavailable``), 422 invalid.

        With ``wait`` the request waits in the key's queue; if the client disconnects while
        waiting, its place in the queue is given up (nothing is granted to it afterwards).
        Needs ``lock`` on the repository, and ``prioritize`` for a priority above normal.
        """
        repo, key = request.project.repo_full_name, request.key
        await need_lock(caller, action="acquire", repo=repo, pull=request.pull.num, key=key,
                        priority=request.priority)
        tried: list[tuple[str, Exception | None]] | None = None

        async def given_up(failed: NotWithdrawn) -> None:
            # A wait with a requestId, withdrawn after the answer, that could not be.
            await caller.gave_back(action="release", repo=repo, pull=request.pull.num,
                                   tried=not_withdrawn([failed]))

        async with caller.audited(action="acquire", verb=Verb.LOCK, key=key, repo=repo,
                                  pull=request.pull.num) as note:
            try:
                with (rule_override(await overrides_rules(caller, repo=repo)),
                      withdrawals_noted(late=given_up) as unwithdrawn):
                    work = router.acquire(request)
                    result = await answer_unless_gone(http, work, watch=bool(request.wait))
            except ClientGone as gone:
                tried = [*await _give_back(gone.answer, request), *not_withdrawn(unwithdrawn)]
                note.done("client-gone", 499)
            else:
                status = 200
                if not result.acquired:
                    result, status = refusal(result)
                note.done("acquired" if result.acquired else str(result.reason), status)
                if not result.acquired:  # a refusal: shown as the caller may read it
                    result = await shown_to(caller, result, repo=repo)
        if tried is not None:
            # A grant that raced with the client's going, or a wait that could not be left:
            # what became of it follows the request's row, as for a grant found gone as its
            # answer went out.
            await caller.gave_back(action="release", repo=repo, pull=request.pull.num,
                                   tried=tried)
            return gone_answer()
        if not result.fresh:
            return JsonAnswer(result_json(result), status_code=status,
                              raw_header=(GRANT_UPGRADED if result.upgraded else GRANT_AGAIN)
                              if result.acquired else None)
        return AnswerUnlessGone(result_json(result), status_code=200, raw_header=NEW_GRANT,
                                on_gone=lambda: _give_back_granted(result, request, caller))

    async def _give_back(answer: AcquireResult | None,
                         request: LockRequest) -> list[tuple[str, LockingError | None]]:
        """A grant nobody will read is released, never left held by a caller that is gone.
        Returns the lock tried and why it could not be given back (None: it was)."""
        if answer is None or not answer.fresh or answer.lock is None:
            return []
        owner = (request.project.repo_full_name, request.pull.num)
        try:
            # Each side by what it can judge (Router.give_back): a newer hold of the same pull
            # is not this answer's to free.
            await asyncio.shield(router.give_back_answer(answer.lock, owner=owner))
        except LockingError as error:  # freed or taken meanwhile, or the store failed
            log.warning("could not give back %s (its client left before the answer): %s",
                        answer.lock.key, error)
            return [(answer.lock.key, error)]
        log.info("gave back %s: its client left before the answer", answer.lock.key)
        return [(answer.lock.key, None)]

    async def _give_back_granted(answer: AcquireResult, request: LockRequest,
                                 caller: Caller) -> None:
        """The client left as its grant's answer went out, after the grant's ``acquired`` row:
        the give-back writes a row of its own (action ``release``, see
        :meth:`~enhanced_locking.api.access.Caller.gave_back`)."""
        tried = await _give_back(answer, request)
        await caller.gave_back(action="release", repo=request.project.repo_full_name,
                               pull=request.pull.num, tried=tried)

    @app.get("/v1/locks", responses=WHO)
    async def list_locks(caller: CallerDep, repo: Repo | None = None,
                         pull: PullNum | None = None) -> Any:
        """Every held lock, optionally of one repository and/or pull request. When the
        enhanced store does not answer, legacy's locks with ``unavailable: ["enhanced"]``.
        Stored locks that cannot be read are not in ``locks``; ``unreadable`` lists them (with
        ``repo``, those whose key starts with it, and only to a caller who may read every
        repository: whose repository and pull they are cannot be read, and a key of
        ``acme/infra`` may as well be one of ``acme/infra/sub``'s)."""
        await caller.need(Verb.READ, action="list", repo=repo, pull=pull)
        locks, unreached = await router.list_reachable(repo=repo, pull=pull)
        unreadable = [unreadable_json(entry) for entry in service.unreadable()
                      if repo is None or entry.key.startswith(repo + "/")]
        if repo is not None and unreadable and not await caller.may(Verb.READ):
            unreadable = []
        return {"locks": _locks(locks), **({"unavailable": unreached} if unreached else {}),
                **({"unreadable": unreadable} if unreadable else {})}

    @app.get("/v1/locks/by-key",
             responses={**error_answers({404: "No lock is held on the key.",
                                         409: UNREADABLE}), **WHO})
    async def get_lock(key: Key, caller: CallerDep) -> Any:
        """The lock held on a key: 200 with the lock, 404 when the key is free, 409 when its
        stored lock cannot be read."""
        await caller.need(Verb.READ, action="get", key=key)
        lock = await router.get(key)
        if lock is None:
            return json_error(404, f"no lock is held on {key}", lockKey=key)
        return {"lock": _dump(lock)}

    @app.delete("/v1/locks/by-key", responses={**error_answers({
        404: "No lock is held on the key.",
        409: "With pull: the lock is held by another pull; with repo: by a project of another "
             "repository whose key is the same (the body names the holder). Or: " + UNREADABLE
             + " A release cannot tell whose it is: use force-unlock.",
    }), **WHO})
    async def release_lock(
        key: Key, http: Request, caller: CallerDep, pull: PullNum | None = None,
        repo: OnlyRepo = None,
    ) -> Any:
        """Release a lock; with ``pull`` only if that pull holds it, with ``repo`` only if it is
        that repository's (else 409).

        Needs ``lock`` with ``pull`` (the holder's own release); ``release-any`` without it.
        """
        if (gone := left_before_it_began(http)) is not None:
            return gone
        verb = Verb.LOCK if pull is not None else Verb.RELEASE_ANY
        action = "release" if pull is not None else "release-any"
        if pull is not None:
            # The holder as this process last wrote or read it, without reading the store: if
            # it is the pull's own and the caller may release it, it is released by its
            # fencing token, which frees nothing unless the store holds exactly that lock (so
            # a decision made on it is the one a fresh read would have made). Anything else
            # (another writer changed the key since, nothing known) takes the path below.
            seen = router.held_as_seen(key)
            if (seen is not None and seen.pull.num == pull
                    and (repo is None or seen.project.repo_full_name == repo)
                    and await caller.may(verb, repo=seen.project.repo_full_name)):
                released = await _release_exactly(seen)
                if released is not None:
                    await caller.record(action=action, verb=verb, key=key,
                                        repo=seen.project.repo_full_name,
                                        pull=released.pull.num, outcome="released", status=200)
                    return JsonAnswer(b'{"released":true,"lock":' + lock_json(released) + b"}")
        # A caller that knows its repository should say it: the key alone can name another
        # repository's project (``gl/grp`` + ``sub/proj`` and ``gl/grp/sub`` + ``proj``).
        holder = await holder_of(router, caller, key, verb=verb, action=action, pull=pull)
        held_repo = holder.project.repo_full_name if holder is not None else repo
        await caller.need(verb, action=action, repo=held_repo, key=key, pull=pull)
        async with caller.audited(action=action, verb=verb, key=key, repo=held_repo,
                                  pull=pull) as note:
            if holder is None:
                note.done("not-found", 404)
                return json_error(404, f"no lock is held on {key}", lockKey=key)
            if repo is not None and holder.project.repo_full_name != repo:
                note.done("collision", 409)
                return collision_json(key, holder, repo)
            if pull is not None:
                try:
                    lock = await router.release(key, owner=(holder.project.repo_full_name, pull))
                except LockNotOwned as error:
                    note.done("not-owned", 409)
                    return await not_owned(caller, error, asked={held_repo})
            else:
                # The hold read and asked about, not whatever holds the key by now: one taken
                # since by another pull (maybe of a repository the caller may not release) is
                # left to it, answered as a hold no longer found.
                try:
                    lock = await router.give_back(holder, owner=holder.owner)
                except LockNotOwned:
                    lock = None
            if lock is None:
                note.done("not-found", 404)
                return json_error(404, f"no lock is held on {key}", lockKey=key)
            note.done("released")
            note.pull = lock.pull.num
        # Encoded once, by pydantic; nothing for FastAPI to encode.
        return JsonAnswer(b'{"released":true,"lock":' + lock_json(lock) + b"}")

    async def _release_exactly(seen: Lock) -> Lock | None:
        """``seen`` released if the store holds exactly it (its fencing token); ``None`` when
        nothing was released (the key changed since, or the store did not answer): the route
        then reads the holder and decides again, as if this had not been tried."""
        try:
            return await router.release(seen.key, owner=seen.owner, token=seen.fencing_token)
        except LockingError:
            return None

    @app.delete("/v1/locks/by-pull", responses=WHO)
    async def release_pull(repo: Repo, pull: PullNum, caller: CallerDep) -> Any:
        """Release every lock of a pull request (Atlantis does this when a PR closes, and on an
        ``atlantis unlock`` comment) and drop its queued requests, as a close does: each is
        answered ``cancelled`` and listed by waiter id in ``cancelled``. When the enhanced
        store does not answer, what legacy holds is released and the answer says
        ``unavailable: ["enhanced"]`` (the pull's enhanced locks and queued requests, if any,
        stay, but for locks a store releasing in parts freed before it failed: they are
        listed)."""
        await caller.need(Verb.LOCK, action="release-pull", repo=repo, pull=pull)
        async with caller.audited(action="release-pull", verb=Verb.LOCK, repo=repo,
                                  pull=pull) as note:
            done, unreached = await router.release_by_pull_reachable(repo, pull)
            dropped = f", dropped {len(done.cancelled)} queued" if done.cancelled else ""
            note.done(f"released {len(done.released)}{dropped}")
        return {"released": _locks(done.released), "cancelled": done.cancelled,
                **({"unavailable": unreached} if unreached else {})}

    @app.get("/v1/config", responses=WHO)
    async def config(caller: SettingsCallerDep) -> Any:
        """Effective configuration (secrets masked), its generation and hash, and routing."""
        await caller.need(Verb.READ, action="config")
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
                "configuredWeight": migration.configured_weight,
                "mode": migration.mode,
                "fallback": migration.fallback,
            },
        }

    @app.get("/v1/migration", responses=WHO)
    async def migration_state(caller: CallerDep) -> Any:
        """This replica's migration machinery: the weight move (phase, from, pending and
        excluded replicas), shadow counters, fallback journal, open lock conflicts."""
        await caller.need(Verb.READ, action="migration")
        return service.migration.status().as_dict()

    @app.get("/healthz")
    @public("liveness: says only that the process answers")
    async def healthz() -> Any:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "A backend in use does not answer."}})
    @public("readiness: says whether the stores answer and how many stored locks cannot be "
            "read; their keys only while access control is off")
    async def readyz() -> JSONResponse:
        """Readiness: every backend in use answers, and locks are granted.

        Stored locks that cannot be read do not make the service unready (it serves every
        other key): ``unreadable`` counts them by side, and while access control is off
        ``unreadableKeys`` names them (with it on, ``GET /v1/locks`` does, for readers).
        ``events`` names the bus serving the events: ``process`` (this replica's own), or the
        enhanced store's shared one, ``redis`` or ``etcd``. While no lock is granted (a store
        that may hold locks is not read yet, the operator's LockPolicy is not applied yet)
        the service is not ready, and ``withheld`` says why (the words its refusals give)."""
        backends = await service.ready()
        withheld = service.router.withheld
        ready = withheld is None and all(state == "ok" for state in backends.values())
        body: dict[str, Any] = {"ready": ready, "backends": backends,
                                "events": service.events.bus.name}
        if withheld is not None:
            body["withheld"] = withheld
        found = service.unreadable()
        if found:
            counts: dict[str, int] = {}
            for entry in found:
                counts[entry.side] = counts.get(entry.side, 0) + 1
            body["unreadable"] = counts
            if holder.current().open:
                body["unreadableKeys"] = [
                    {"key": e.key, "side": e.side, "reason": e.reason} for e in found]
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/serving", responses={503: {"description": "A store does not answer here, "
                                          "and a peer reaches every store."}})
    @public("the kubelet's readiness probe: says whether this replica should take traffic, "
            "and which stores answer")
    async def serving() -> JSONResponse:
        """Readiness for the kubelet: 503 only while a store does not answer here, or no lock
        is granted here, and a peer reaches every store and grants (``withheld`` says why no
        lock is granted, as in ``/readyz``).

        A store down for every replica keeps each serving: the fall-back answers alike on all
        of them (see :mod:`enhanced_locking.peers`). ``ready`` and ``backends`` are this
        replica's stores, as in ``/readyz``; ``readyPeer`` names the peer
        (``enhanced-locking-peers``) that reaches them, when one does."""
        backends = await service.ready()
        withheld = service.router.withheld
        ready = withheld is None and all(state == "ok" for state in backends.values())
        body: dict[str, Any] = {"serving": True, "ready": ready, "backends": backends}
        if withheld is not None:
            body["withheld"] = withheld
        if not ready:
            peer = await service.peers.one_ready()
            body["serving"] = peer is None
            body["readyPeer"] = peer
        return JSONResponse(body, status_code=200 if body["serving"] else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format 0.0.4.",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                        **error_answers({404: "Metrics are off."})})
    @public("Prometheus scrapes it; the chart's NetworkPolicy admits only Prometheus and "
            "Atlantis, and no metric carries a lock key, a token or a secret")
    async def metrics() -> Response:
        """Prometheus metrics, in Prometheus's text format, not JSON (404 when the metrics flag
        is off)."""
        if not service.provider.current.config.metrics:
            return json_error(404, "metrics are off (enhanced-locking-metrics=false)")
        await service.refresh_gauges()
        return Response(service.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # The two calls of every Atlantis lock pair, without FastAPI's per-call machinery (same
    # contract: anything they do not take as it is, FastAPI's handler answers; see .direct).
    serve_directly(app, acquire)
    serve_directly(app, release_lock)
    check_routes(app)
    check_direct_routes(app)
    document_bearer(app)
    return app
