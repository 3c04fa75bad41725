"""Handing a key from one side to the other without ever granting it twice.

While a key's bucket is *moving* (some replica may still route it by the old weight), an
acquire takes it on both sides, the side it is moving from first. A hold on the old side is
therefore honoured (the first step is refused), and nobody can hold the key on the new side
alone while another replica could still grant it on the old one. If the second step is refused
or fails, the first is undone, so a refusal never leaves a lock behind (undone is what the step
granted: a hold the pull already had there stays). Releases already free both sides (the router
releases everywhere).

Fencing tokens are per side, so a key changing side could see its token fall. Each step first
raises the next side's counter to the token the previous step got, and the answer is the new
side's lock: tokens handed out for a key keep rising whichever replica, side or weight served
it. When a move settles, :func:`settle_counters` does the same for every key that stopped
moving, including keys nobody asked for during the move, and looks for keys held on both sides
by different pulls (which it reports; it never picks a winner).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from enhanced_locking.backends.base import Backend
from enhanced_locking.hashing import bucket_of
from enhanced_locking.locking import EnhancedLocker
from enhanced_locking.locking.base import Locker, give_back_grant
from enhanced_locking.migration.conflicts import ConflictBook, is_conflict
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    Lock,
    LockRequest,
    Reason,
    StoreBusy,
)

__all__ = ["acquire_both", "answer_held", "asks_upgrade", "backend_of", "raise_counter",
           "raise_counter_after", "settle_counters", "weighed_holder"]

log = logging.getLogger(__name__)


def backend_of(locker: Locker) -> Backend | None:
    """The store behind a locker, if it has one."""
    # Both lockers keep their store as ``backend``; a locker without one has no counters.
    backend = getattr(locker, "backend", None)
    return cast(Backend, backend) if hasattr(backend, "adopt") else None


async def raise_counter(locker: Locker, key: str, token: int) -> None:
    """Make the next fencing token ``locker`` gives for ``key`` greater than ``token``."""
    backend = backend_of(locker)
    if backend is not None and token > 0:
        await backend.adopt([], {key: token})


async def raise_counter_after(old_side: Locker, lock: Lock) -> None:
    """Raise ``old_side``'s fencing counter of ``lock``'s key past ``lock``'s token, ``lock``
    being the grant of a moving key on its new side. If the old side does not answer, only
    its counter lags (the key is granted already), and the move settling raises it again."""
    try:
        await raise_counter(old_side, lock.key, lock.fencing_token)
    except BackendUnavailable as error:
        log.warning("could not raise the %s fencing counter of %s: %s", old_side.side,
                    lock.key, error)


async def weighed_holder(locker: Locker, request: LockRequest, held: Lock | None) -> Lock | None:
    """Of ``held``'s key's holders on ``locker``, the one ``request`` is answered by.

    A look (``get``) answers one holder of a key held shared, any of them. The pull's own
    shared hold is not the key alone: an exclusive ask weighs another pull's hold first, a
    shared one its own (asked again, given unchanged). ``held`` is kept when the key is not
    held shared or its holders cannot be read now (an overloaded store is raised), but for an
    exclusive ask answered by the pull's own shared hold: whether another pull shares the key
    is not known then, and the store's failure is raised (the store did not answer)."""
    if held is None or held.mode != "shared" or not isinstance(locker, EnhancedLocker):
        return held
    owner = (request.project.repo_full_name, request.pull.num)
    try:
        holders = await locker.holders(request.key)
    except StoreBusy:
        raise
    except BackendUnavailable:
        if request.mode == "exclusive" and held.owned_by(*owner):
            raise
        return held
    mine = [lock for lock in holders if lock.owned_by(*owner)]
    others = [lock for lock in holders if not lock.owned_by(*owner)]
    order = others + mine if request.mode == "exclusive" else mine + others
    return order[0] if order else None


def asks_upgrade(held: Lock, request: LockRequest) -> bool:
    """Whether ``request``, of the pull holding ``held``, asks exclusive of a key it holds
    shared: an upgrade its store makes in place (or refuses while others share the key)."""
    return held.mode == "shared" and request.mode == "exclusive"


async def answer_held(locker: Locker, request: LockRequest,
                      held: Lock) -> AcquireResult | None:
    """``held``, the pull's own hold of ``request``'s key found by a look at ``locker``, as
    ``request`` is answered with it: held already, unchanged (Atlantis's rule).

    The enhanced side's store is asked for it (fail fast), not only looked at, so that it
    counts the answer as told, as it counts any answer of a hold its pull had already: the
    give-back of the grant that made the hold, when nobody heard that grant, then leaves the
    lock to this answer. (A request sent again with its ``requestId`` after its client went
    away, while a weight move sent its key to the other side: the waiter of its first try,
    granted on the enhanced side, is given back after the retry grace by the first try's
    clean-up, and the retry, answered from a look, would hold nothing.) Another answer of the
    store is weighed as the look's would be: a refusal is the answer; a fresh grant (the hold
    went since the look) is given back, and ``None`` says to ask as for a key not held."""
    if not isinstance(locker, EnhancedLocker):
        return AcquireResult.granted(held, fresh=False)
    answer = await locker.acquire(request.model_copy(update={"wait": None}))
    lock = answer.lock
    if not answer.acquired or lock is None or not answer.fresh:
        return answer
    owner = (request.project.repo_full_name, request.pull.num)
    await asyncio.shield(give_back_grant(locker, lock, owner))
    return None


async def acquire_both(first: Locker, second: Locker, request: LockRequest) -> AcquireResult:
    """Take ``request``'s key on ``first`` (the old side), then on ``second`` (the new one).

    Answers with the second side's answer. A refusal or error on the second side undoes the
    first step. A pull that already holds the key, on either side, gets its lock back
    unchanged, unless it holds it shared and asks for it exclusive: each side holding it
    upgrades it in place or refuses, as that store does alone (an upgrade is never undone).
    """
    key = request.key
    owner = (request.project.repo_full_name, request.pull.num)
    # Asked first, not told by timestamps: a store may stamp grants with its own clock.
    before = await weighed_holder(first, request, await first.get(key))
    had_first = before is not None and before.owned_by(*owner)
    if before is not None and had_first and not asks_upgrade(before, request):
        # The pull asks again for a key it holds: its lock, unchanged (Atlantis's rule), as it
        # was answered before: the new side's copy if it has one, else the old side's.
        mine = await second.get(key)
        answered = await (answer_held(second, request, mine)
                          if mine is not None and mine.owned_by(*owner)
                          else answer_held(first, request, before))
        # (``None``: the hold went since the look, asked again as for a key not held)
        return answered if answered is not None else await acquire_both(first, second, request)
    # Its lock on the new side alone (taken before the move began, or by another replica):
    # its lock too, answered without the old side, where a request waiting on the new side
    # may hold the key for the time of its wait. A shared hold asked for exclusive is not
    # answered so: each side it is held on upgrades it, or refuses, as that store does alone.
    mine = await weighed_holder(second, request, await second.get(key))
    had_second = mine is not None and mine.owned_by(*owner)
    if mine is not None and had_second and not had_first and not asks_upgrade(mine, request):
        answered = await answer_held(second, request, mine)
        return answered if answered is not None else await acquire_both(first, second, request)
    if had_first and (foreign := mine if mine is not None and not had_second else None):
        # An upgrade the second side would refuse is not made on the first: it cannot be
        # undone there (its release would free the pull's shared hold).
        return AcquireResult.refused(key, Reason.HELD, foreign)
    first_result = await first.acquire(request)
    if not first_result.acquired or first_result.lock is None:
        return first_result
    # Undoing a step frees only what it granted: a hold of the pull it answered (its other
    # request took the key on that side since the look above) is not this request's to drop,
    # nor is an upgrade of a hold it had (its release would free the pull's shared hold).
    undo_first = first_result.fresh and not had_first
    try:
        await raise_counter(second, key, first_result.lock.fencing_token)
        second_result = await second.acquire(request)
    except BaseException:
        if undo_first:
            await _undo(first, key, owner)
        raise
    if not second_result.acquired or second_result.lock is None:
        if undo_first:
            await _undo(first, key, owner)
        return second_result
    try:
        await raise_counter_after(first, second_result.lock)
    except asyncio.CancelledError:  # the caller went away: nobody will use either half
        await asyncio.shield(_undo_both(
            first if undo_first else None,
            second if second_result.fresh and not had_second else None, key, owner))
        raise
    if (had_first or had_second) and second_result.fresh:
        # An upgrade of a hold the pull had: not a grant of this call to give back (a batch
        # refused later, a caller gone), whose release would free that hold.
        return AcquireResult.granted(second_result.lock, fresh=False)
    return second_result


async def _undo_both(first: Locker | None, second: Locker | None, key: str,
                     owner: tuple[str, int]) -> None:
    """Undo the steps given (``None``: a step that granted nothing new)."""
    if second is not None:
        await _undo(second, key, owner)
    if first is not None:
        await _undo(first, key, owner)


async def _undo(locker: Locker, key: str, owner: tuple[str, int]) -> None:
    try:
        await locker.release(key, owner=owner)
    except Exception as error:  # the caller reports the original answer or error
        log.warning("could not undo the %s half of a two-sided acquire of %s: %s",
                    locker.side, key, error)


async def settle_counters(
    *,
    legacy: Backend,
    enhanced: Backend,
    leaving: Callable[[int], bool],
    conflicts: ConflictBook | None,
) -> int:
    """For keys whose bucket stops moving: align both sides' counters, report double holds
    (to ``conflicts``; ``None``: the counters only).

    Returns how many counters were raised. Raises ``BackendUnavailable`` if a side does not
    answer (the move then stays unsettled and is tried again).
    """
    legacy_locks, legacy_tokens = await legacy.export()
    enhanced_locks, enhanced_tokens = await enhanced.export()
    for lock in legacy_locks:
        legacy_tokens[lock.key] = max(legacy_tokens.get(lock.key, 0), lock.fencing_token)
    for lock in enhanced_locks:
        enhanced_tokens[lock.key] = max(enhanced_tokens.get(lock.key, 0), lock.fencing_token)
    keys = {key for key in (*legacy_tokens, *enhanced_tokens) if leaving(bucket_of(key))}
    raise_enhanced = {k: legacy_tokens[k] for k in keys
                      if legacy_tokens.get(k, 0) > enhanced_tokens.get(k, 0)}
    raise_legacy = {k: enhanced_tokens[k] for k in keys
                    if enhanced_tokens.get(k, 0) > legacy_tokens.get(k, 0)}
    if raise_enhanced:
        await enhanced.adopt([], raise_enhanced)
    if raise_legacy:
        await legacy.adopt([], raise_legacy)
    if conflicts is None:
        return len(raise_enhanced) + len(raise_legacy)
    held_legacy = {lock.key: lock for lock in legacy_locks if lock.key in keys}
    for lock in enhanced_locks:
        other = held_legacy.get(lock.key)
        if other is not None and is_conflict(other, lock):
            conflicts.report(key=lock.key, legacy=other, enhanced=lock, source="weight-move")
    return len(raise_enhanced) + len(raise_legacy)
