"""Batches: several locks for one pull, all or nothing.

The enhanced backend does a batch in one atomic step (and queues it as one waiter that is
granted every key at once, see :mod:`enhanced_locking.backends.waiting`). This module covers
the rest: a batch on a locker that has no batch step (the legacy locker, Atlantis's
semantics: fail fast, so it tries each key and gives back what it took at the first refusal),
and releasing several keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from enhanced_locking.backends.base import Owner
from enhanced_locking.locking.base import Locker, give_back_grant
from enhanced_locking.types import (
    BatchLockRequest,
    BatchResult,
    Lock,
    LockNotOwned,
    Locks,
    Reason,
)

__all__ = ["acquire_one_by_one", "release_all"]

log = logging.getLogger(__name__)


async def acquire_one_by_one(
    locker: Locker, batch: BatchLockRequest, *,
    held_already: Callable[[Lock], object] | None = None,
) -> BatchResult:
    """All of ``batch`` or none on a fail-fast locker: roll back at the first refusal.

    Nothing waits here, so the partial set exists only between two store calls. A step that
    fails (the service overloaded, a store that does not answer, the caller gone) gives back
    what the batch took before it too, then raises: a batch answered with an error holds
    nothing it took. Taken is what each grant says it granted (``fresh``): a lock the pull
    held already is answered unchanged and never given back, nor is its shared hold upgraded
    to exclusive in place (``upgraded``). ``held_already`` is told each
    of those (answered again, not granted anew), once the whole batch is granted. What was
    taken is given back as the grant it was (:func:`give_back_grant`), never a hold the
    pull took of the key anew meanwhile.
    """
    owner = batch.owner
    locks: Locks = []
    taken: Locks = []  # the fresh ones, given back on a refusal or a failure
    again: Locks = []  # the pull's already when granted (answered unchanged, or upgraded): kept
    upgraded: set[str] = set()
    for request in batch.requests():
        try:
            result = await locker.acquire(request.model_copy(update={"wait": None}))
        except BaseException:
            await asyncio.shield(_give_back(locker, taken, owner))
            raise
        if result.acquired and result.lock is not None:
            locks.append(result.lock)
            # As the grant tells, not as a look before it saw: the pull's other request may
            # take the key in between, and that hold is not this batch's to give back.
            (taken if result.fresh else again).append(result.lock)
            if result.upgraded:
                upgraded.add(result.lock.key)
            continue
        for lock in taken:
            try:
                await give_back_grant(locker, lock, owner)
            except LockNotOwned:
                pass  # the pull's hold taken anew since, by another request: theirs
        return BatchResult(acquired=False, lock_key=request.key,
                           reason=result.reason or Reason.HELD, holder=result.holder)
    if held_already is not None:
        for lock in again:
            held_already(lock)
    return BatchResult.granted(locks, kept=frozenset(lock.key for lock in again),
                               upgraded=frozenset(upgraded))


async def _give_back(locker: Locker, taken: Locks, owner: Owner) -> None:
    """Release ``taken``, the fresh grants of a batch whose next step failed, each tried once
    (all at once: under overload each may wait for its store); one that fails is logged."""
    outcomes = await asyncio.gather(*(give_back_grant(locker, lock, owner) for lock in taken),
                                    return_exceptions=True)
    for lock, outcome in zip(taken, outcomes, strict=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, LockNotOwned):
            log.warning("could not give back %s, taken by a batch whose next step failed: %s",
                        lock.key, outcome)


async def release_all(
    locker: Locker, keys: Sequence[str], *, owner: Owner | None = None
) -> Locks:
    """Release every key of ``keys`` that is held; keys not held are skipped.

    With ``owner``, a key held by another pull refuses the whole call (``LockNotOwned``)
    before anything is released; a key the pull holds shared beside others (``get`` answers
    the first holder) is its to release.
    """
    if owner is not None:
        mine: set[str] | None = None  # the owner's keys, read once if a first holder is not it
        for key in keys:
            holder = await locker.get(key)
            if holder is not None and not holder.owned_by(*owner):
                if mine is None:
                    mine = {lock.key for lock in await locker.list(repo=owner[0], pull=owner[1])}
                if key not in mine:
                    raise LockNotOwned(key, holder)
    released: Locks = []
    for key in keys:
        lock = await locker.release(key, owner=owner)
        if lock is not None:
            released.append(lock)
    return released
