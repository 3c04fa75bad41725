"""HTTP routes for batches, leases, queues and admin calls (v1).

* ``POST /v1/locks/batch``: acquire several locks all or nothing (200 · 409 naming the key
  and the reason · 422).
* ``DELETE /v1/locks/batch?key=..&key=..[&pull=N][&repo=R]``: release several locks.
* ``POST /v1/locks/refresh``: extend the lease of a held lock.
* ``GET /v1/queue?key=``: the key's holder and waiters in service order.
* ``DELETE /v1/queue?key=&id=``: cancel a queued request (by waiter id or request id).
* ``POST /v1/admin/force-unlock?key=&reason=``: free a lock whoever holds it; its queue is
  served.

Owner checks: releasing, refreshing or cancelling what another pull holds or queued needs
``release-any``; the pull's own needs ``lock``. Force-unlock needs ``force-unlock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from enhanced_locking.api.access import (
    Caller,
    CallerDep,
    cross_site_refusal,
    overrides_rules,
    rule_override,
)
from enhanced_locking.api.disconnect import (
    AnswerUnlessGone,
    ClientGone,
    answer_unless_gone,
    gone_answer,
    left_before_it_began,
    not_withdrawn,
)
from enhanced_locking.api.errors import (
    UNREADABLE,
    collision_json,
    error_answers,
    json_error,
    unreadable_json,
)
from enhanced_locking.api.params import Key, OnlyRepo, OptionalPullNum, PullNum
from enhanced_locking.api.responses import GRANT_NAME, JsonAnswer, refusal
from enhanced_locking.backends.waiting import Waiter
from enhanced_locking.durations import Ttl
from enhanced_locking.factory import LockService
from enhanced_locking.locking import EnhancedLocker, deadlock
from enhanced_locking.locking.queueing import NotWithdrawn, withdrawals_noted
from enhanced_locking.migration import Router
from enhanced_locking.types import (
    GRANT_HEADER,
    AcquireResult,
    BatchLockRequest,
    BatchResult,
    CycleOwner,
    Lock,
    LockingError,
    LockNotHeld,
    LockNotOwned,
    LockUnreadable,
    Priority,
    PullNumber,
    Reason,
    Verb,
    batch_grant,
    hidden_collision_message,
    utcnow,
)

__all__ = ["RefreshRequest", "forced_holds", "hold_changed", "holder_of", "install_queue_routes",
           "not_owned",
           "shown_to"]

log = logging.getLogger(__name__)

class RefreshRequest(BaseModel):
    """Move a lease: the key, the pull that holds it, and the new lease from now (0: none)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              frozen=True)

    key: Annotated[str, Field(min_length=1, max_length=4096)]
    repo: Annotated[str | None, Field(min_length=1, max_length=512, description=(
        "The pull's repository: only a lock of it is refreshed (two projects of different "
        "repositories can join to one key), and a free key is judged on it."))] = None
    pull: PullNumber
    ttl: Annotated[Ttl | None, Field(description=(
        "The lease from now; 0s: none, the lock kept until it is released (as an acquire's "
        "ttl of 0s); left out: enhanced-locking-lock-ttl."))] = None


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", by_alias=True)


def _waiter(position: int, waiter: Waiter, effective: str, now: datetime) -> dict[str, Any]:
    return {
        "position": position,
        "id": waiter.id,
        "requestId": waiter.request_id,
        "repo": waiter.owner[0],
        "pull": waiter.owner[1],
        "user": waiter.candidates[0].user.username,
        "priority": waiter.priority.value,
        "effectivePriority": effective,
        "enqueuedAt": waiter.enqueued_at.isoformat().replace("+00:00", "Z"),
        "deadline": waiter.deadline.isoformat().replace("+00:00", "Z"),
        "waitedMs": max(0, round((now - waiter.enqueued_at).total_seconds() * 1000)),
        "keys": list(waiter.keys),
        "mode": waiter.mode,
        "headCommit": waiter.head_commit or None,
    }


async def holder_of(router: Router, caller: Caller, key: str, *, verb: Verb, action: str,
                    pull: int | None) -> Lock | None:
    """The lock held on ``key``, read to judge which repository's right a call needs. A stored
    lock that cannot be read names no repository: the right is asked without one (as for a
    force-unlock) before the answer says anything of what is stored (its 409). A store that
    does not answer is a 503 only to a caller the right is not refused to without the read."""
    try:
        return await caller.read_for_right(router.get(key), verb, action=action, key=key,
                                           pull=pull)
    except LockUnreadable:
        await caller.need(verb, action=action, key=key, pull=pull)
        raise


_Answer = TypeVar("_Answer", AcquireResult, BatchResult)


async def shown_to(caller: Caller, result: _Answer, *, repo: str) -> _Answer:
    """``result`` as ``caller`` may read it. A refusal can name another repository than the
    caller's own ``repo`` (the one it was allowed to lock): projects of two repositories can
    join to the same keys. A ``deadlock``'s cycle owner there that the caller may not read is
    ``(other repository)`` with no repository or pull, and ``hiddenOwners`` counts them; such
    a holder is left out (``null``), and a ``collision``'s words do not describe it.
    ``result`` itself when nothing is left out (every answer but such a one)."""
    owners: list[CycleOwner] | None = result.cycle_owners
    holder = result.holder
    held_in = holder.project.repo_full_name if holder is not None else repo
    named = [*(owner.repo for owner in owners or ()), held_in]
    readable: set[str | None] = {repo}
    for other in dict.fromkeys(named):
        if other not in readable and other is not None and await caller.may(
                Verb.READ, repo=other):
            readable.add(other)
    update: dict[str, Any] = {}
    if owners is not None:
        shown, hidden = deadlock.owners_for_reader(owners, readable)
        if hidden:
            update.update(cycle=[owner.name for owner in shown], cycle_owners=shown,
                          hidden_owners=hidden)
    if held_in not in readable:
        update["holder"] = None
        if result.reason is Reason.COLLISION:
            update["error"] = hidden_collision_message(result.lock_key or "")
    return result.model_copy(update=update) if update else result


async def not_owned(caller: Caller, error: LockNotOwned, *,
                    asked: Collection[str | None]) -> JSONResponse:
    """The 409 of a release or refresh whose pull does not hold the lock, naming the holder;
    but a holder of a repository the call's right was not asked on (``asked``; another
    repository's project can take a key that joins to the same name between the read and the
    release) only to a caller who may read that repository."""
    repo = error.holder.project.repo_full_name
    if repo in asked or await caller.may(Verb.READ, repo=repo):
        return json_error(409, str(error), lockKey=error.key, holder=_dump(error.holder))
    return json_error(409, f"lock {error.key} is held by a project of another repository (one "
                      "this caller may not read)", lockKey=error.key, holder=None,
                      reason="not-owned")


async def forced_holds(service: LockService, caller: Caller, key: str, holder: Lock | None,
                       *, reason: str | None) -> tuple[Lock, ...]:
    """The holds a force-unlock of ``key`` frees, as read (``holder``: the one whose
    repository's right was asked): with the key held shared on the enhanced side, every
    holder, the right asked on each one's repository too. Nothing when the key was free or
    unreadable (the right was asked on every repository: whatever holds it goes)."""
    if holder is None:
        return ()
    holds = [holder]
    enhanced = service.enhanced
    if (holder.backend == "enhanced" and holder.mode == "shared"
            and isinstance(enhanced, EnhancedLocker)):
        holds = [*await caller.read_for_right(enhanced.holders(key), Verb.FORCE_UNLOCK,
                                              action="force-unlock", key=key, reason=reason)]
        holds = holds if holder in holds else [holder, *holds]
    for repo in dict.fromkeys(h.project.repo_full_name for h in holds):
        if repo != holder.project.repo_full_name:
            await caller.need(Verb.FORCE_UNLOCK, action="force-unlock", repo=repo, key=key,
                              reason=reason)
    return tuple(holds)


def hold_changed(key: str) -> JSONResponse:
    """The 409 of a force-unlock whose key another hold took after it was read: nothing was
    freed (the answer names no holder: the caller's right was not asked about it)."""
    return json_error(409, f"the lock on {key} changed after it was read (another hold took "
                      "it, which this force-unlock did not check): nothing was freed; read it "
                      "again and force-unlock what holds it now", lockKey=key, reason="changed")


WHO = error_answers({401: "No or invalid credentials (see WWW-Authenticate).",
                     403: "The caller lacks the right the call needs (the body names the verb)."})


def install_queue_routes(app: FastAPI, service: LockService) -> None:
    router = service.router

    @app.post("/v1/locks/batch", response_model=BatchResult, response_model_by_alias=True,
              responses={200: {"headers": {GRANT_HEADER: {
                  "description": "One word a lock of locks, in their order, comma-separated: "
                                 "new (this call granted it), again (its pull held it "
                                 "already, unchanged) or upgraded (its pull's shared hold made "
                                 "exclusive in place), as an acquire's 200 says of its lock.",
                  "schema": {"type": "string", "example": "new, again"}}}},
                  409: {"model": BatchResult}, **WHO})
    async def acquire_batch(body: BatchLockRequest, request: Request, caller: CallerDep) -> Any:
        """Acquire several locks of one pull, all or nothing; with ``wait`` it waits holding
        none of them. 409 names the key that blocked it and why. A batch granted to a client
        that left before the answer is given back (but what its pull held before)."""
        repo, pull = body.owner
        keys = ",".join(body.keys)
        await caller.need(Verb.LOCK, action="acquire-batch", repo=repo, key=keys, pull=pull)
        if body.priority.level > Priority.NORMAL.level:
            await caller.need(Verb.PRIORITIZE, action="acquire-batch", repo=repo, key=keys,
                              pull=pull)
        tried: list[tuple[str, Exception | None]] | None = None
        before = frozenset[str]()

        async def given_up(failed: NotWithdrawn) -> None:
            # A wait with a requestId, withdrawn after the answer, that could not be.
            await caller.gave_back(action="release-batch", repo=repo, pull=pull,
                                   tried=not_withdrawn([failed], kept=before))

        async with caller.audited(action="acquire-batch", verb=Verb.LOCK, key=keys, repo=repo,
                                  pull=pull) as note:
            before = await _held_by(body)
            try:
                with (rule_override(await overrides_rules(caller, repo=repo)),
                      withdrawals_noted(late=given_up) as unwithdrawn):
                    work = router.acquire_batch(body)
                    result = await answer_unless_gone(request, work, watch=bool(body.wait))
            except ClientGone as gone:
                tried = [*await _give_back(gone.answer, body, before),
                         *not_withdrawn(unwithdrawn, kept=before)]
                note.done("client-gone", 499)
            else:
                status = 200
                if not result.acquired:
                    result, status = refusal(result)
                note.done("acquired" if result.acquired else str(result.reason), status)
                if not result.acquired:  # a refusal: shown as the caller may read it
                    result = await shown_to(caller, result, repo=repo)
        if tried is not None:
            # A batch granted as its client went, or a wait that could not be left: what
            # became of it follows the request's row.
            await caller.gave_back(action="release-batch", repo=repo, pull=pull, tried=tried)
            return gone_answer()
        if not result.acquired:
            return JSONResponse(_dump(result), status_code=status)
        kept = result.kept_or(before)
        grant = (GRANT_NAME,
                 batch_grant(result.locks, kept, result.upgraded).encode("latin-1"))
        if all(lock.key in kept for lock in result.locks):
            return JsonAnswer(_dump(result), status_code=200, raw_header=grant)
        return AnswerUnlessGone(_dump(result), status_code=200, raw_header=grant,
                                on_gone=lambda: _give_back_granted(result, body, before, caller))

    async def _held_by(body: BatchLockRequest) -> frozenset[str]:
        """The batch's keys its pull holds already: asked again they are granted unchanged,
        and a client that leaves does not give back what it had before (a key that cannot be
        looked at counts as held before: never released on a guess)."""
        held: set[str] = set()
        for key in body.keys:
            try:
                lock = await router.get(key)
            except LockingError:
                held.add(key)
                continue
            if lock is not None and lock.owned_by(*body.owner):
                held.add(key)
        return frozenset(held)

    async def _give_back(result: BatchResult | None, body: BatchLockRequest,
                         before: frozenset[str]) -> list[tuple[str, LockingError | None]]:
        """A batch granted to a client that is gone is released, never left held by nobody
        (only what it granted: see :meth:`BatchResult.kept_or`). Returns each lock tried and
        why it could not be given back (None: it was)."""
        tried: list[tuple[str, LockingError | None]] = []
        if result is None or not result.acquired:
            return tried
        kept = result.kept_or(before)
        for lock in result.locks:
            if lock.key in kept:
                continue
            try:
                # By what answered it (Router.give_back): a newer hold of the same pull (a
                # retry's) is not this answer's to free.
                await asyncio.shield(router.give_back_answer(lock, owner=body.owner))
            except LockingError as error:  # freed or taken meanwhile, or the store failed
                log.warning("could not give back %s (its client left before the answer): %s",
                            lock.key, error)
                tried.append((lock.key, error))
                continue
            log.info("gave back %s: its client left before the answer", lock.key)
            tried.append((lock.key, None))
        return tried

    async def _give_back_granted(result: BatchResult, body: BatchLockRequest,
                                 before: frozenset[str], caller: Caller) -> None:
        """The client left as its batch's answer went out, after the ``acquired`` row: the
        give-back writes a row of its own (action ``release-batch``, see
        :meth:`~enhanced_locking.api.access.Caller.gave_back`)."""
        repo, pull = body.owner
        await caller.gave_back(action="release-batch", repo=repo, pull=pull,
                               tried=await _give_back(result, body, before))

    @app.delete("/v1/locks/batch", responses={**error_answers({
        409: "With pull: a key is held by another pull (the body names the holder); with "
             "repo: by a project of another repository whose key is the same. Or, for a "
             "key: " + UNREADABLE}), **WHO})
    async def release_batch(
        http: Request,
        caller: CallerDep,
        key: Annotated[list[str], Query(min_length=1, max_length=100,
                                        description="The lock keys (repeat the parameter).")],
        pull: PullNum | None = None,
        repo: OnlyRepo = None,
    ) -> Any:
        """Release several locks; with ``pull``, only if that pull holds every held one; with
        ``repo``, only if every held one is that repository's (else 409, nothing released).

        Needs ``lock`` with ``pull``; ``release-any`` without it: on the repository of every
        held key, asked for each before anything is released. Each of those repositories gets
        an audit row naming its held keys and the keys nobody held. What is released is what
        was read and asked about: a key free when read is left alone, and without ``pull`` a
        key whose holder changed since it was read is left to its new holder (``notHeld``).
        Without ``pull`` each key is released on its own: one the store did not answer for is
        listed in ``notReached`` (still held as far as is known) and the others are released."""
        if (late := left_before_it_began(http)) is not None:
            return late
        verb = Verb.LOCK if pull is not None else Verb.RELEASE_ANY
        action = "release-batch" if pull is not None else "release-any"
        read = {k: lock for k in key if (lock := await holder_of(
            router, caller, k, verb=verb, action=action, pull=pull)) is not None}
        held = {k: lock.project.repo_full_name for k, lock in read.items()}
        repos: list[str | None] = list(dict.fromkeys(held.values())) or [repo]
        keys = ",".join(key)
        for owner_repo in repos:
            await caller.need(verb, action=action, repo=owner_repo, key=keys, pull=pull)
        async with contextlib.AsyncExitStack() as rows:
            notes = [(owner_repo, await rows.enter_async_context(caller.audited(
                action=action, verb=verb, repo=owner_repo, pull=pull,
                key=",".join(k for k in key if held.get(k, owner_repo) == owner_repo))))
                for owner_repo in reversed(repos)]  # the rows are written in the stack's order
            stranger = next((k for k, r in held.items() if repo is not None and r != repo),
                            None)
            if stranger is not None and repo is not None:
                for _, note in notes:
                    note.done("collision", 409)
                return collision_json(stranger, read[stranger], repo)
            unreached: list[str] = []
            if pull is None:
                released, unreached = await _release_read(read)
            elif not held:
                released = []  # nothing was held: nothing was asked about, nothing is freed
            else:
                try:
                    released = await router.release_batch(
                        key, owner=(held[next(iter(held))], pull))
                except LockNotOwned as error:
                    for _, note in notes:
                        note.done("not-owned", 409)
                    return await not_owned(caller, error, asked=repos)
            for owner_repo, note in notes:
                alone = len(repos) == 1
                freed = sum(alone or held.get(lock.key) == owner_repo for lock in released)
                missed = sum(alone or held[k] == owner_repo for k in unreached)
                note.done(f"released {freed}" + (f", not reached {missed}" if missed else ""))
        gone = {lock.key for lock in released}
        return {"released": [_dump(lock) for lock in released],
                "notHeld": [k for k in key if k not in gone and k not in unreached],
                **({"notReached": unreached} if unreached else {})}

    async def _release_read(read: dict[str, Lock]) -> tuple[list[Lock], list[str]]:
        """Each lock of ``read`` freed if it is still the hold that was read (the enhanced side
        by its fencing token, legacy by its owner); one taken by another pull since is left.
        A key whose release failed otherwise (its store did not answer, ...) does not stop the
        others: it is returned among the keys not reached, still held as far as is known."""
        released: list[Lock] = []
        unreached: list[str] = []
        for key, lock in read.items():
            try:
                freed = await router.give_back(lock, owner=lock.owner)
            except LockNotOwned:
                continue
            except LockingError:
                unreached.append(key)
                continue
            if freed is not None:
                released.append(freed)
        return released, unreached

    @app.post("/v1/locks/refresh", responses={**error_answers({
        404: "No lock is held on the key.",
        409: "Held by another pull; with repo, by a project of another repository whose key is "
             "the same; or held on the legacy side, whose locks have no lease; or no ttl given "
             "and no enhanced-locking-lock-ttl configured.",
    }), **WHO})
    async def refresh(body: RefreshRequest, caller: CallerDep) -> Any:
        """Move the lease of a held lock to ``now + ttl`` (default ``lock-ttl``; ``0s``: none).

        Needs ``lock`` when ``pull`` holds it; refreshing another pull's lock is refused (409)
        whatever the rights. Every request the schema allows is served or answered by the
        lock's state (404, 409); 422 is only for what the schema refuses."""
        holder = await holder_of(router, caller, body.key, verb=Verb.LOCK, action="refresh",
                                 pull=body.pull)
        repo = holder.project.repo_full_name if holder is not None else body.repo
        await caller.need(Verb.LOCK, action="refresh", repo=repo, key=body.key, pull=body.pull)
        async with caller.audited(action="refresh", verb=Verb.LOCK, key=body.key, repo=repo,
                                  pull=body.pull) as note:
            if holder is None:
                note.done("not-found", 404)
                return json_error(404, f"no lock is held on {body.key}", lockKey=body.key)
            if body.repo is not None and holder.project.repo_full_name != body.repo:
                note.done("collision", 409)
                return collision_json(body.key, holder, body.repo)
            if holder.backend == "legacy":
                note.done("no-lease", 409)
                return json_error(409, f"lock {body.key} is held on the legacy side, whose "
                                  "locks have no lease (Atlantis semantics)", lockKey=body.key,
                                  holder=_dump(holder))
            if body.ttl is None and service.provider.current.config.lock_ttl <= timedelta(0):
                note.done("no-lease", 409)
                return json_error(409, f"lock {body.key}: no ttl given and no "
                                  "enhanced-locking-lock-ttl configured to refresh to",
                                  lockKey=body.key)
            owner = (holder.project.repo_full_name, body.pull)
            try:
                lock = await router.refresh(body.key, owner=owner, ttl=body.ttl)
            except LockNotHeld:  # it expired or was released between the two calls
                lock = None
            except LockNotOwned as error:
                note.done("not-owned", 409)
                return await not_owned(caller, error, asked={repo})
            if lock is None:
                note.done("not-found", 404)
                return json_error(404, f"no lock is held on {body.key}", lockKey=body.key)
            note.done("refreshed")
        return {"lock": _dump(lock)}

    @app.get("/v1/queue", responses={**error_answers({409: UNREADABLE}), **WHO})
    async def queue(key: Key, caller: CallerDep) -> Any:
        """The holder of ``key`` and its waiters in service order (first is served next)."""
        await caller.need(Verb.READ, action="queue", key=key)
        waiters = await router.queue(key)
        holder = await router.get(key)
        enhanced = service.enhanced
        now = utcnow()
        rows = []
        for position, waiter in enumerate(waiters, start=1):
            effective = (enhanced.effective_priority(waiter).value
                         if isinstance(enhanced, EnhancedLocker) else waiter.priority.value)
            rows.append(_waiter(position, waiter, effective, now))
        holders = (await enhanced.holders(key) if isinstance(enhanced, EnhancedLocker)
                   else [holder] if holder else [])
        return {"key": key, "holder": _dump(holder) if holder else None,
                "holders": [_dump(lock) for lock in holders], "waiters": rows}

    @app.get("/v1/groups", responses=WHO)
    async def groups(caller: CallerDep) -> Any:
        """Every concurrency group that holds locks now: its limit and its holders."""
        await caller.need(Verb.READ, action="groups")
        enhanced = service.enhanced
        found = await enhanced.groups() if isinstance(enhanced, EnhancedLocker) else []
        return {"groups": [{"group": g["group"], "limit": g["limit"],
                            "holders": [_dump(lock) for lock in g["holders"]]} for g in found]}

    @app.get("/v1/queue/waiter",
             responses={**error_answers({404: "No such request is queued."}), **WHO})
    async def waiter_view(
        key: Key, caller: CallerDep,
        id: Annotated[str, Query(min_length=1, max_length=128,
                                 description="The waiter id or the request's requestId.")],
    ) -> Any:
        """Where a queued request stands: its position, the holders and the waiters ahead of
        it (who blocks it), and an estimate of its wait from the key's recent hold times."""
        await caller.need(Verb.READ, action="queue", key=key)
        enhanced = service.enhanced
        view = await enhanced.view(key, id) if isinstance(enhanced, EnhancedLocker) else None
        if view is None:
            return json_error(404, f"no request {id} is queued on {key}", lockKey=key)
        return {"key": key, "id": view.waiter.id, "requestId": view.waiter.request_id,
                **view.details()}

    @app.delete("/v1/queue",
                responses={**error_answers({404: "No such request is queued."}), **WHO})
    async def cancel(
        key: Key,
        id: Annotated[str, Query(min_length=1, max_length=128,
                                 description="The waiter id or the request's requestId.")],
        caller: CallerDep,
        pull: Annotated[OptionalPullNum, Query(
            description="The pull that queued it: cancelling one's own needs lock; without "
                        "it (or for another pull's) release-any.")] = None,
    ) -> Any:
        """Cancel a queued request: it leaves the queue and is answered ``cancelled``."""
        # Without the queue's answer whose request it is is unknown: the right asked is the
        # one the call claims (lock with ``pull``: its own; release-any without).
        queued = await caller.read_for_right(
            router.queue(key), Verb.LOCK if pull is not None else Verb.RELEASE_ANY,
            action="cancel" if pull is not None else "cancel-any", key=key, pull=pull)
        named = [w for w in queued if id in (w.id, w.request_id)]
        # Several pulls may name requests alike: the one of the pull the call names, if any.
        waiter = next((w for w in named if w.owner[1] == pull), named[0] if named else None)
        repo, owner_pull = waiter.owner if waiter is not None else (None, None)
        own = pull is not None and (waiter is None or owner_pull == pull)
        verb = Verb.LOCK if own else Verb.RELEASE_ANY
        action = "cancel" if own else "cancel-any"
        await caller.need(verb, action=action, repo=repo, key=key, pull=owner_pull)
        async with caller.audited(action=action, verb=verb, key=key, repo=repo,
                                  pull=owner_pull) as note:
            if waiter is None or not await router.cancel_waiter(key, waiter.id):
                note.done("not-found", 404)
                return json_error(404, f"no request {id} is queued on {key}", lockKey=key)
            note.done("cancelled")
        return {"cancelled": True, "key": key, "id": id}

    @app.post("/v1/admin/force-unlock",
              responses={**error_answers({
                  404: "No lock is held on the key.",
                  409: "Another hold took the key after it was read (reason `changed`): "
                       "nothing was freed. Or, for a key: " + UNREADABLE}), **WHO})
    async def force_unlock(
        key: Key,
        caller: CallerDep,
        request: Request,
        reason: Annotated[str | None, Query(
            min_length=1, max_length=1024,
            description="Why (kept in the audit trail); required when access control is on.")]
        = None,
    ) -> Any:
        """Free a lock whoever holds it (the holder is not asked); the queue is served.

        Needs ``force-unlock``, and a ``reason`` unless access control is off. A key whose
        stored lock cannot be read is cleared: whatever is stored goes (``lock`` null,
        ``unreadable`` what it was). What is freed is the hold read and asked about (every
        holder of a key held shared, the right asked on each one's repository): another
        hold that took the key since is left, answered 409 ``changed`` naming no holder.
        A post a browser says comes from another site's page
        is refused (403): behind a proxy that adds a signed-in user's token, such a page could
        make that user's browser post one as a plain form."""
        try:
            holder, unreadable = await caller.read_for_right(
                router.get(key), Verb.FORCE_UNLOCK, action="force-unlock", key=key,
                reason=reason), None
        except LockUnreadable as error:  # whose it is cannot be read: the right is checked
            holder, unreadable = None, error.found  # without a repository
        repo = holder.project.repo_full_name if holder is not None else None
        refused = await cross_site_refusal(
            caller, request, key=key, repo=repo, reason=reason,
            instead="send it from a client that is no browser (the CLI, curl) or from the "
                    "service's own pages")
        if refused is not None:
            return refused
        await caller.need(Verb.FORCE_UNLOCK, action="force-unlock", repo=repo, key=key,
                          reason=reason)
        if not caller.access.open and not (reason or "").strip():
            return json_error(422, "reason: a force-unlock needs a reason (it is audited)",
                              field="reason")
        checked = await forced_holds(service, caller, key, holder, reason=reason)
        async with caller.audited(action="force-unlock", verb=Verb.FORCE_UNLOCK, key=key,
                                  repo=repo, reason=reason) as note:
            try:
                lock: Lock | None = await router.force_unlock(key, checked=checked)
            except LockNotOwned:  # taken after the read by a hold the right was not asked of
                note.done("changed", 409)
                return hold_changed(key)
            if lock is None and unreadable is not None:
                note.done("cleared-unreadable")
                return {"released": True, "lock": None, "unreadable": unreadable_json(unreadable)}
            if lock is None:
                note.done("not-found", 404)
                return json_error(404, f"no lock is held on {key}", lockKey=key)
            note.done("released")
            note.pull = lock.pull.num
        return {"released": True, "lock": _dump(lock)}
