"""Queueing: how a caller waits for its turn, and how it leaves the queue.

The backend keeps the queue and hands the lock over (see
:mod:`enhanced_locking.backends.waiting`); this module is the caller's half. A queued caller
awaits one future, with one timer for its deadline: no polling, and a release wakes exactly the
waiter it granted (no thundering herd).

It leaves the queue in one of four ways:

* **granted**: the future resolves with its locks;
* **timeout**: the timer fires first; it cancels its waiter, unless the grant won the race,
  in which case the grant stands (the caller asked for the lock and got it in time);
* **cancelled** by an admin, or dropped by the backend (deadline, store closing): the future
  resolves with the reason;
* **the caller goes away** (the HTTP client disconnected: its task is cancelled): it cancels
  its waiter and gives back anything granted meanwhile, so nothing stays held by a caller that
  is gone. A request with a ``requestId`` is given :data:`RETRY_GRACE` first: the same
  request sent again (after a broken connection) takes its waiter over, with its place and
  enqueue time, and then the clean-up leaves it alone. When that leaving fails (the store does
  not answer), whoever waits on the caller's behalf can learn it: :func:`withdrawals_noted`.
  The later clean-up of a request with a ``requestId`` tries again while the store does not
  answer (once the waiter is cancelled, only the give-back of what it was granted), until the
  wait's deadline (as far off as it was when the wait began) plus :data:`ABANDON_MARGIN`; if
  it gives up, the ``late`` hook given to :func:`withdrawals_noted` hears of it (the caller's
  answer is long gone). The same grace holds for a caller that goes away after it was queued
  but before its wait began (:func:`leave`), and for an enqueue whose answer never came, the
  caller gone or the store away (:func:`abandon`): either way nothing but that later clean-up
  would withdraw a waiter whose client never sends the request again.

A grant is given back by its fencing token (the ``give_back`` the locker passes): a give-back
tried again after a lost answer finds the hold gone and leaves alone one its pull took since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from enhanced_locking.backends.base import QueueBackend
from enhanced_locking.backends.waiting import Grant, Notice, QueuePolicy, Wait, Waiter
from enhanced_locking.types import BackendUnavailable, Reason, utcnow

__all__ = ["RETRY_GRACE", "NotWithdrawn", "abandon", "await_turn", "give_back_unheard", "leave",
           "withdraw", "withdrawals_noted"]

log = logging.getLogger(__name__)

RETRY_GRACE = 10.0
"""Seconds a waiter with a ``requestId`` outlives its caller, for the retry to take it over."""

_LATER: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class NotWithdrawn:
    """A waiter whose caller went away and that could not be taken out of its queues (or what
    it was granted meanwhile not given back): its ``keys`` may be held, ``error`` says why."""

    keys: tuple[str, ...]
    error: Exception


Late = Callable[[NotWithdrawn], Awaitable[None]]
"""Told of a waiter whose withdrawal, after the caller's answer, was given up."""

PolicyOf = Callable[[], QueuePolicy]
"""The queue policy in force when a waiter leaves: the store serves the queues it was in with
it (whom the waiter held back is granted in the same step)."""

Handed = Callable[[tuple[Grant, ...]], None]
"""Told the waiters a cancel served (the waiters behind the one it took out): the locker
counts each hand-off, as it counts a release's."""


@dataclass(frozen=True)
class _Noting:
    noted: list[NotWithdrawn]
    late: Late | None


_NOTED: ContextVar[_Noting | None] = ContextVar("not_withdrawn", default=None)


@contextlib.contextmanager
def withdrawals_noted(late: Late | None = None) -> Iterator[list[NotWithdrawn]]:
    """The block's waits that end by their caller going away and fail to withdraw add a
    :class:`NotWithdrawn` to the list given (tasks the block starts share it): the HTTP route
    that gives up on a client says in its audit trail what may still be held. A wait with a
    ``requestId`` is withdrawn later (:data:`RETRY_GRACE`), after the block: ``late`` is
    told when that withdrawal is given up."""
    noted: list[NotWithdrawn] = []
    token = _NOTED.set(_Noting(noted, late))
    try:
        yield noted
    finally:
        _NOTED.reset(token)


async def await_turn(
    backend: QueueBackend,
    waiter: Waiter,
    future: asyncio.Future[Notice],
    *,
    seconds: float,
    give_back: Callable[[Notice], Awaitable[None]],
    handed: Handed,
    caller: str = "",
    policy: PolicyOf = QueuePolicy,
) -> Notice:
    """Wait for ``waiter``'s notice for at most ``seconds``; see the module docstring.

    ``give_back`` releases the locks of a notice nobody will use (the caller went away);
    ``handed`` is told the waiters a cancel of it served (see :data:`Handed`).
    """
    key = waiter.keys[0]
    ends = asyncio.get_running_loop().time() + seconds
    gone = False  # the caller went without reading its future (a notice there is unheard)
    try:
        try:
            notice = _owned(await asyncio.wait_for(asyncio.shield(future), seconds), caller)
        except TimeoutError:
            # Only if this caller still owns the waiter: a retry that took it over keeps it.
            cancelled = await backend.cancel(key, waiter.id, reason=Reason.TIMEOUT,
                                             caller=caller, policy=policy())
            if cancelled.handed:
                handed(cancelled.handed)
            if cancelled.granted:
                granted_to = cancelled.waiter.caller if cancelled.waiter is not None else ""
                return _owned(Notice(locks=cancelled.granted, fresh=cancelled.fresh,
                                     kept=cancelled.kept, upgraded=cancelled.upgraded,
                                     caller=granted_to), caller)
            if future.done():
                return _owned(future.result(), caller)
            return Notice(reason=Reason.TIMEOUT)
        except asyncio.CancelledError:
            gone = True
            await leave(backend, waiter, future, give_back, handed, caller=caller, ends=ends,
                        policy=policy)
            raise
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The grant and the caller's cancellation arrived together and wait_for kept the
            # grant: the caller is still going away, so the grant goes back (only if this
            # caller owned the waiter when it was granted: a retry may have taken it over).
            await withdraw(backend, waiter, future, give_back, handed, caller=caller,
                           policy=policy)
            raise asyncio.CancelledError
        return notice
    finally:
        backend.grants.forget(waiter.id, future, gone=gone)


def _owned(notice: Notice, caller: str) -> Notice:
    """``notice`` as ``caller`` is answered with it: a grant made while another caller owned
    the waiter (a retry of the request took it over, or the first caller still runs as its
    retry's grant comes) is that caller's to give back (and to announce, an upgrade too), not
    this one's: not fresh here."""
    if ((notice.fresh or notice.upgraded) and notice.locks and caller and notice.caller
            and notice.caller != caller):
        return Notice(locks=notice.locks, fresh=False, caller=notice.caller)
    return notice


async def leave(backend: QueueBackend, waiter: Waiter, future: asyncio.Future[Notice],
                give_back: Callable[[Notice], Awaitable[None]], handed: Handed, *,
                caller: str, ends: float, policy: PolicyOf = QueuePolicy) -> None:
    """The caller of queued ``waiter`` went away (before its wait, or during it): a request
    with a ``requestId`` is withdrawn after the retry grace, only if ``caller`` still owns
    its waiter (a retry may have taken it over); any other at once. ``ends``: the wait's end
    (loop time)."""
    if waiter.request_id is not None and caller:
        _later(backend, waiter.keys, waiter.id, give_back, handed, caller, ends,
               policy=policy)
    else:
        await withdraw(backend, waiter, future, give_back, handed, caller=caller,
                       policy=policy)


def _later(backend: QueueBackend, keys: tuple[str, ...], waiter_id: str,
           give_back: Callable[[Notice], Awaitable[None]], handed: Handed, caller: str,
           ends: float, *, policy: PolicyOf = QueuePolicy) -> None:
    """Withdraw ``waiter`` after the retry grace, unless a retry took it over meanwhile.
    While the store does not answer it is tried again, until the wait's end ``ends`` (loop
    time: the seconds its deadline was away on the backend's clock when the wait began) plus
    ``ABANDON_MARGIN`` (as :func:`abandon`): left queued, the waiter would be granted later
    and held by a caller that is gone. A give-up is logged and told to the ``late`` hook of
    :func:`withdrawals_noted` (its keys may be held)."""
    noting = _NOTED.get()

    async def clean_up() -> None:
        await asyncio.sleep(RETRY_GRACE)
        failed = await _withdraw_retrying(backend, keys[0], waiter_id, Reason.CANCELLED,
                                          caller, give_back, handed,
                                          give_up=ends + ABANDON_MARGIN, policy=policy)
        if failed is None:
            return
        log.error("could not withdraw waiter %s from %s: gave up", waiter_id, keys,
                  exc_info=failed)
        if noting is not None and noting.late is not None:
            await noting.late(NotWithdrawn(keys, failed))

    _run_later(clean_up())


def _run_later(clean_up: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(clean_up)
    _LATER.add(task)
    task.add_done_callback(_LATER.discard)


async def _withdraw_retrying(backend: QueueBackend, key: str, waiter_id: str, reason: Reason,
                             caller: str, give_back: Callable[[Notice], Awaitable[None]],
                             handed: Handed, *, give_up: float,
                             policy: PolicyOf = QueuePolicy) -> Exception | None:
    """Cancel waiter ``waiter_id`` of ``key`` and give back what it was granted, each step
    tried again while the store does not answer, until ``give_up`` (loop time). What the
    cancel returned is kept: once it has answered only the give-back is tried again (a second
    cancel finds the waiter gone and its grant would never be given back). ``None`` when
    done; else the error it ended on."""
    loop = asyncio.get_running_loop()
    delay = 0.05
    granted: Notice | None = None
    while True:
        try:
            if granted is None:
                cancelled = await backend.cancel(key, waiter_id, reason=reason, caller=caller,
                                                 policy=policy())
                granted = Notice(locks=cancelled.granted, fresh=cancelled.fresh,
                                 kept=cancelled.kept, upgraded=cancelled.upgraded)
                if cancelled.handed:
                    handed(cancelled.handed)
            if granted.locks:
                await give_back(granted)
            return None
        except BackendUnavailable as error:
            if loop.time() > give_up:
                return error
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
        except Exception as error:
            return error


ABANDON_MARGIN = 10.0
"""Seconds past an abandoned offer's wait (or a waiting request's with a ``requestId``, whose
caller left) that its withdrawal is still tried: a waiter past its deadline is never granted,
and a grant made just before lapses after its claim."""


def abandon(backend: QueueBackend, keys: tuple[str, ...], offer: Wait,
            give_back: Callable[[Notice], Awaitable[None]], handed: Handed, *,
            reason: Reason = Reason.UNAVAILABLE, policy: PolicyOf = QueuePolicy) -> None:
    """Withdraw the waiter an enqueue of ``keys`` (a batch's every key) may have left behind
    when its answer never came.

    The store went away during the call (the script may have run, its answer lost, and the
    retry found the store still down), or the caller went away during it (``reason``
    ``cancelled``: its answer was never read): a waiter queued by that call would wait for
    nobody, and when its turn came its grant would hold the key until the claim lapsed. Once
    the store answers the waiter is cancelled (only if this caller still owns it) and anything
    it was granted is given back. A request with a ``requestId`` is given :data:`RETRY_GRACE`
    first, whichever way its call ended (its client may send it again, or may not: nothing
    else would withdraw its waiter): sending it again takes its waiter over, which is what
    that id is for, and then the clean-up leaves it alone; a give-up of that one names every
    key (:func:`_later`).
    """
    ends = asyncio.get_running_loop().time() + offer.timeout.total_seconds()
    if offer.request_id is not None:
        _later(backend, keys, offer.id, give_back, handed, offer.caller, ends, policy=policy)
        return

    async def clean_up() -> None:
        give_up = ends + ABANDON_MARGIN
        failed = await _withdraw_retrying(backend, keys[0], offer.id, reason,
                                          offer.caller, give_back, handed, give_up=give_up,
                                          policy=policy)
        if failed is not None and not isinstance(failed, BackendUnavailable):
            # (the store away past the give-up: its deadline and claim have run out meanwhile)
            log.error("could not withdraw waiter %s from %s", offer.id, keys, exc_info=failed)

    _run_later(clean_up())


def give_back_unheard(notice: Notice,
                      give_back: Callable[[Notice], Awaitable[None]]) -> asyncio.Task[None]:
    """Give back ``notice``'s grant, made by an acquire whose caller went away while the
    store's call was on its way (it never heard the answer), in a task of its own: the
    caller's is being cancelled. Tried again while the store does not answer, as a waiter's
    withdrawal is (:func:`_withdraw_retrying`), until every lease of the grant has ended (it
    lapses then); a lock without a lease, until it is given back or the locker closes (it
    cancels the task: the grant stays held, and that is logged). The task is returned for the
    locker to keep (:meth:`~enhanced_locking.locking.EnhancedLocker.close`)."""
    ends: list[datetime | None] = [lock.expires_at for lock in notice.locks]
    until = None if None in ends else max(end for end in ends if end is not None)
    keys = ", ".join(lock.key for lock in notice.locks)

    async def clean_up() -> None:
        delay = 0.05
        try:
            while True:
                try:
                    await give_back(notice)
                    return
                except BackendUnavailable as error:
                    if until is not None and utcnow() > until:
                        log.warning("could not give back %s (its caller left before the "
                                    "answer): %s; its lease has ended", keys, error)
                        return
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)
        except asyncio.CancelledError:
            log.warning("closed before the store answered the give-back of %s (its caller "
                        "left before the answer): it stays held", keys)
            raise
        except Exception:
            log.exception("could not give back %s (its caller left before the answer)", keys)

    task = asyncio.get_running_loop().create_task(clean_up())
    _LATER.add(task)
    task.add_done_callback(_LATER.discard)
    return task


async def withdraw(
    backend: QueueBackend,
    waiter: Waiter,
    future: asyncio.Future[Notice],
    give_back: Callable[[Notice], Awaitable[None]],
    handed: Handed,
    *,
    caller: str = "",
    policy: PolicyOf = QueuePolicy,
) -> None:
    """Take ``waiter`` out of its queues; give back whatever was granted to it meanwhile. With
    ``caller``, only if that caller still owns the waiter (else a retry took it over)."""
    # Runs while the caller's task is being cancelled: shield the clean-up so a second cancel
    # (the server shutting down) cannot leave a lock granted to nobody.
    async def clean_up() -> None:
        cancelled = await backend.cancel(waiter.keys[0], waiter.id, reason=Reason.CANCELLED,
                                         caller=caller, policy=policy())
        if cancelled.handed:
            handed(cancelled.handed)
        notice = Notice(locks=cancelled.granted, fresh=cancelled.fresh, kept=cancelled.kept,
                        upgraded=cancelled.upgraded)
        if cancelled.waiter is None and future.done():  # the backend no longer remembers it
            notice = _owned(future.result(), caller)
        if notice.locks:
            await give_back(notice)

    try:
        await asyncio.shield(clean_up())
    except Exception as error:  # the store failed: the lease (if any) or an admin frees it
        log.exception("could not withdraw waiter %s from %s", waiter.id, waiter.keys)
        noting = _NOTED.get()
        if noting is not None:
            noting.noted.append(NotWithdrawn(waiter.keys, error))
