"""The enhanced locker over every queue backend: waiting, timeouts, leases, cancels, retries,
batches, events and metrics, with the live config switching behaviour between calls."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.support.backends import BACKEND_KINDS, BackendFactory
from tests.support.leases import Overrun, past, until, with_leases
from tests.support.locks import candidate_for, request_for
from tests.support.queues import LockerRig, rig_for, settle, waits_begun

from enhanced_locking.backends import QueueBackend
from enhanced_locking.backends.base import StoreBackend
from enhanced_locking.backends.memory import MemoryBackend
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import Cancelled, Notice, QueuePolicy, Status, Wait
from enhanced_locking.durations import parse_duration
from enhanced_locking.locking import queueing
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    BatchResult,
    InvalidRequest,
    LockNotHeld,
    LockNotOwned,
    LockRequest,
    Priority,
    Pull,
    Reason,
    utcnow,
)

S = timedelta(seconds=1)


def ask(pull: int, *, path: str = "envs/prod", wait: Any = None, ttl: timedelta | None = None,
        priority: Priority = Priority.NORMAL) -> LockRequest:
    request = request_for(pull=pull, path=path, ttl=ttl, priority=priority)
    return request.model_copy(update={"wait": wait})


def count(rig: LockerRig, metric: str, **labels: str) -> float:
    value = rig.metrics.registry.get_sample_value(metric, labels)
    return value or 0.0


async def test_without_wait_a_held_key_fails_fast_as_in_atlantis(rigs: Callable[..., LockerRig],
                                                                 ) -> None:
    rig = rigs()
    assert (await rig.locker.acquire(ask(1))).acquired
    refused = await rig.locker.acquire(ask(2))
    assert refused.reason is Reason.HELD and refused.holder is not None
    assert refused.holder.pull.num == 1 and refused.queue_position is None
    assert await rig.locker.queue(ask(1).key) == []


async def test_a_waiter_gets_the_lock_when_it_is_released(rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    first = await rig.locker.acquire(ask(1))
    waiting = rig.spawn(rig.locker.acquire(ask(2, wait=30 * S)))
    await settle()
    assert [w.owner[1] for w in await rig.locker.queue(ask(1).key)] == [2]
    await rig.locker.release(ask(1).key)
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.acquired and granted.lock is not None and first.lock is not None
    assert granted.lock.fencing_token > first.lock.fencing_token
    assert rig.types() == ["acquired", "queued", "released", "granted-from-queue"]
    assert count(rig, "enhanced_locking_wait_duration_seconds_count", outcome="granted") == 1
    assert count(rig, "enhanced_locking_handoffs_total") == 1


async def test_a_waiter_handed_a_lock_by_a_release_by_pull_is_counted_and_named(
    rigs: Callable[..., LockerRig],
) -> None:
    """A release by pull (Atlantis's unlock when a pull request closes) that hands a key to
    its next waiter counts the hand-off and names the waiter in its ``released`` event, as a
    release of the one key does. Before, no store's hand-off by pull was counted, and the
    event had no ``handedTo``."""
    rig = rigs()
    first = await rig.locker.acquire(ask(1))
    assert first.lock is not None
    waiting = rig.spawn(rig.locker.acquire(ask(2, wait=30 * S)))
    await settle()
    queued = [e for e in rig.events if e.type == "queued"]
    assert len(queued) == 1
    await rig.locker.release_by_pull(first.lock.project.repo_full_name, 1)
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 2
    assert rig.types() == ["acquired", "queued", "released", "granted-from-queue"]
    released = rig.events[2]
    assert released.details["how"] == "by-pull"
    assert list(released.details["handedTo"]) == [queued[0].details["waiterId"]]
    assert count(rig, "enhanced_locking_handoffs_total") == 1


async def test_a_caller_gone_just_after_its_queued_event_is_told_cancelled(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller with a request id goes away after its ``queued`` event, while the locker
    reads the store's clock for what is left of its wait: it is told ``cancelled`` (by the
    client) and counted, and leaves the queue, as a caller gone while it waits does. Before, the
    queued event was the last word of that request: no cancelled event, no count."""
    rig = rigs()
    await rig.locker.acquire(ask(1))
    backend = rig.locker.backend
    clock = backend.now
    reading = asyncio.Event()

    async def slow_clock() -> Any:
        reading.set()
        await asyncio.sleep(30)
        return await clock()

    monkeypatch.setattr(backend, "now", slow_clock)
    asked = ask(2, wait=30 * S).model_copy(update={"request_id": "job-gone"})
    task = rig.spawn(rig.locker.acquire(asked))
    await asyncio.wait_for(reading.wait(), 10)
    assert rig.types() == ["acquired", "queued"]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    monkeypatch.undo()
    assert rig.types() == ["acquired", "queued", "cancelled"], rig.types()
    assert rig.events[-1].details["by"] == "client"
    assert rig.events[-1].details["requestId"] == "job-gone"
    assert count(rig, "enhanced_locking_acquire_total", backend="enhanced",
                 outcome="cancelled") == 1
    assert count(rig, "enhanced_locking_wait_duration_seconds_count", outcome="cancelled") == 1
    # (Its waiter leaves the queue after the retry grace, as any gone caller's with a
    # request id does: a retry may take it over meanwhile.)


async def test_wait_true_waits_up_to_the_default_timeout(rigs: Callable[..., LockerRig]) -> None:
    rig = rigs(default_timeout=timedelta(milliseconds=50))
    await rig.locker.acquire(ask(1))
    answer = await asyncio.wait_for(rig.locker.acquire(ask(2, wait=True)), 5)
    assert answer.reason is Reason.TIMEOUT
    assert answer.holder is not None and answer.holder.pull.num == 1
    assert await rig.locker.queue(ask(1).key) == []
    assert "timeout" in rig.types()


async def test_a_wait_above_the_maximum_is_refused_not_clamped(
    rigs: Callable[..., LockerRig],
) -> None:
    rig = rigs(max_timeout=timedelta(minutes=1), default_timeout=S)
    with pytest.raises(InvalidRequest) as refused:
        await rig.locker.acquire(ask(1, wait=2 * 60 * S))
    assert refused.value.field == "wait" and "1m" in str(refused.value)
    assert await rig.locker.get(ask(1).key) is None


async def test_an_admin_cancel_answers_the_waiter_cancelled(rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    await rig.locker.acquire(ask(1))
    waiting = rig.spawn(rig.locker.acquire(
        ask(2, wait=30 * S).model_copy(update={"request_id": "job-7"})))
    await settle()
    assert await rig.locker.cancel_waiter(ask(1).key, "job-7") is not None
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.reason is Reason.CANCELLED
    assert await rig.locker.cancel_waiter(ask(1).key, "job-7") is None


async def test_a_caller_that_goes_away_leaves_the_queue_and_is_never_granted(
    rigs: Callable[..., LockerRig],
) -> None:
    rig = rigs()
    await rig.locker.acquire(ask(1))
    gone = rig.spawn(rig.locker.acquire(ask(2, wait=30 * S)))
    behind = rig.spawn(rig.locker.acquire(ask(3, wait=30 * S)))
    await settle()
    gone.cancel()
    await settle()
    assert [w.owner[1] for w in await rig.locker.queue(ask(1).key)] == [3]
    await rig.locker.release(ask(1).key)
    answer = await asyncio.wait_for(behind, 5)
    assert answer.lock is not None and answer.lock.pull.num == 3
    assert any(e.type == "cancelled" and e.details["by"] == "client" for e in rig.events)


async def test_a_caller_that_goes_away_after_it_is_queued_but_before_it_waits_leaves_the_queue(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Queued by the store, the caller still reads how long to wait (the store's clock, for a
    # request with a requestId) before it waits: cancelled there, its waiter stayed queued
    # with nobody to withdraw it, to be granted to a caller that is gone.
    rig = rigs()
    await rig.locker.acquire(ask(1))
    reading, never = asyncio.Event(), asyncio.Event()
    seconds_left = rig.locker._seconds_left

    async def held_there(*args: Any) -> float:
        reading.set()
        await never.wait()
        return await seconds_left(*args)

    monkeypatch.setattr(rig.locker, "_seconds_left", held_there)
    gone = rig.spawn(rig.locker.acquire(ask(2, wait=30 * S)))
    await asyncio.wait_for(reading.wait(), 5)
    assert [w.owner[1] for w in await rig.locker.queue(ask(1).key)] == [2]
    gone.cancel()
    await settle()
    assert await rig.locker.queue(ask(1).key) == []
    await rig.locker.release(ask(1).key)
    await settle()
    assert await rig.locker.get(ask(1).key) is None


async def test_a_grant_that_reaches_a_caller_gone_meanwhile_is_given_back(
    rigs: Callable[..., LockerRig],
) -> None:
    rig = rigs()
    await rig.locker.acquire(ask(1))
    gone = rig.spawn(rig.locker.acquire(ask(2, wait=30 * S)))
    behind = rig.spawn(rig.locker.acquire(ask(3, wait=30 * S)))
    await settle()
    # The release grants pull 2 and, before its task runs again, the caller goes away.
    await rig.locker.release(ask(1).key)
    gone.cancel()
    answer = await asyncio.wait_for(behind, 5)
    assert answer.lock is not None and answer.lock.pull.num == 3
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    assert gone.cancelled()


@dataclasses.dataclass
class _TakenOver:
    retry: asyncio.Task[AcquireResult]
    withdraw: asyncio.Event
    """Set by the test: the first caller's withdrawal (after the retry grace) may run."""
    withdrawn: asyncio.Event
    """Set once it ran: its cancel, and the give-back of anything that cancel returned."""
    deadlines: list[str]
    """Waiters cancelled at their wait's deadline."""


async def _taken_over(rig: LockerRig, monkeypatch: pytest.MonkeyPatch) -> _TakenOver:
    """Pull 2's acquire with a ``requestId`` waits behind pull 1; the same request, sent again
    (its client's first connection dropped), takes the waiter over while the first still
    waits; then the first's caller goes. Its withdrawal waits for the test's ``withdraw``."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.0)
    await rig.locker.acquire(ask(1))
    entered = [asyncio.Event(), asyncio.Event()]
    go, went, deadlines = asyncio.Event(), asyncio.Event(), list[str]()
    await_turn, withdraw = queueing.await_turn, queueing._withdraw_retrying
    cancel = rig.locker.backend.cancel

    async def waits(*args: Any, **kwargs: Any) -> Any:
        entered[1 if entered[0].is_set() else 0].set()
        return await await_turn(*args, **kwargs)

    async def withdrawal(*args: Any, **kwargs: Any) -> Any:
        await go.wait()
        try:
            return await withdraw(*args, **kwargs)
        finally:
            went.set()

    async def seen(key: str, waiter_id: str, *, reason: Reason = Reason.CANCELLED,
                   caller: str = "", policy: QueuePolicy | None = None) -> Any:
        if reason is Reason.TIMEOUT:
            deadlines.append(waiter_id)
        return await cancel(key, waiter_id, reason=reason, caller=caller, policy=policy)

    monkeypatch.setattr(queueing, "await_turn", waits)
    monkeypatch.setattr(queueing, "_withdraw_retrying", withdrawal)
    monkeypatch.setattr(rig.locker.backend, "cancel", seen)
    asked = ask(2, wait=30 * S).model_copy(update={"request_id": "job-9"})
    first = rig.spawn(rig.locker.acquire(asked))
    await asyncio.wait_for(entered[0].wait(), 10)
    retry = rig.spawn(rig.locker.acquire(asked))
    await asyncio.wait_for(entered[1].wait(), 10)
    first.cancel()  # the first client is gone
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert first.cancelled()
    return _TakenOver(retry=retry, withdraw=go, withdrawn=went, deadlines=deadlines)


async def test_a_retry_that_took_its_waiter_over_is_woken_by_its_grant_after_the_first_left(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first caller of a waiter taken over by its retry goes, and its withdrawal leaves
    the waiter to the retry. The holder's release grants it, and the retry hears of it from
    that grant. Before, both callers waited on one future, which the first's leaving dropped:
    the grant was told to nobody, and the retry heard of it only at its deadline, from its
    timeout's cancel."""
    rig = rigs()
    taken = await _taken_over(rig, monkeypatch)
    taken.withdraw.set()
    await asyncio.wait_for(taken.withdrawn.wait(), 10)
    assert [w.owner[1] for w in await rig.locker.queue(ask(1).key)] == [2], "not kept"
    await rig.locker.release(ask(1).key)  # grants the retry's waiter
    answer = await asyncio.wait_for(taken.retry, 60)
    assert answer.acquired and answer.lock is not None and answer.lock.pull.num == 2, answer
    assert not taken.deadlines, "the retry heard of its grant only at its deadline"
    held = await rig.locker.get(ask(1).key)
    assert held is not None and held.pull.num == 2, held


async def test_a_retry_granted_before_the_first_callers_withdrawal_keeps_its_grant(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first caller of a waiter taken over by its retry goes, and the holder's release
    grants the waiter before the first's withdrawal runs (within the retry grace). The
    withdrawal leaves the grant to the retry, which holds the lock; before, the cancel of a
    granted waiter did not look at who owned it, and the withdrawal gave the retry's lock
    back while the retry was told it held it."""
    rig = rigs()
    taken = await _taken_over(rig, monkeypatch)
    await rig.locker.release(ask(1).key)  # grants the retry's waiter
    answer = await asyncio.wait_for(taken.retry, 60)
    assert answer.acquired and answer.lock is not None and answer.lock.pull.num == 2, answer
    taken.withdraw.set()
    await asyncio.wait_for(taken.withdrawn.wait(), 10)
    held = await rig.locker.get(ask(1).key)
    assert held is not None and held.fencing_token == answer.lock.fencing_token, held


async def _both_waiting(rig: LockerRig, monkeypatch: pytest.MonkeyPatch, request_id: str,
                        ) -> tuple[asyncio.Task[AcquireResult], asyncio.Task[AcquireResult]]:
    """Pull 2's acquire with ``request_id`` waits behind pull 1, and the same request, sent
    again, takes the waiter over while the first still waits: both callers await its turn."""
    entered = waits_begun(monkeypatch, 2)
    asked = ask(2, wait=30 * S).model_copy(update={"request_id": request_id})
    first = rig.spawn(rig.locker.acquire(asked))
    await asyncio.wait_for(entered[0].wait(), 10)
    retry = rig.spawn(rig.locker.acquire(asked))
    await asyncio.wait_for(entered[1].wait(), 10)
    return first, retry


async def test_a_first_caller_cancelled_as_the_retrys_grant_arrives_leaves_it_held(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both callers of a waiter taken over by its retry wait; the holder's release grants it,
    and the first caller's task is cancelled in the same loop turn as its notice comes (from
    inside the notifier's ``deliver``). ``wait_for`` keeps the grant and the first caller
    withdraws as it goes: the grant is the retry's, and stays held. Before, that withdrawal
    named no caller, took the retry's locks back from the cancel and gave them back, while
    the retry was answered ``acquired``."""
    rig = rigs()
    backend = rig.locker.backend
    await rig.locker.acquire(ask(1))
    first, retry = await _both_waiting(rig, monkeypatch, "job-11")
    # the first client is noticed gone as the grant comes
    _cancelled_as_granted(backend, monkeypatch, lambda: first)
    await rig.locker.release(ask(1).key)  # grants the retry's waiter
    answer = await asyncio.wait_for(retry, 60)
    assert answer.acquired and answer.lock is not None and answer.lock.pull.num == 2, answer
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(first, 60)
    assert first.cancelled()
    await settle()
    held = await rig.locker.get(ask(1).key)
    assert held is not None and held.fencing_token == answer.lock.fencing_token, held


FORGETFUL_KINDS = [pytest.param(kind, marks=BACKEND_KINDS[kind].marks, id=kind)
                   for kind in ("memory", "boltdb", "redis", "redis-cluster")]
"""The queue backends whose store may forget a grant while a caller of it still waits: an
in-process store's record of it is pushed out by later grants, Redis's outcome record runs
out of time. (etcd keeps a grant's notice while any caller expects it.)"""


async def _forget(backend: QueueBackend, waiter_id: str) -> None:
    """The store no longer remembers the grant of ``waiter_id``."""
    if isinstance(backend, RedisBackend):  # its outcome record's time runs out now
        client, name = backend.connection.client, backend.keys.outcome(waiter_id)
        assert await client.pexpire(name, 1), "no outcome record of the grant"
        for _ in range(1000):
            if not await client.exists(name):
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the outcome record outlived its time")
    assert isinstance(backend, StoreBackend)
    # What its bound on grants remembered does to the oldest one (_GRANTS_REMEMBERED).
    assert backend._granted.pop(waiter_id, None) is not None, "no record of the grant"


def _withdrawn_after_forgetting(backend: QueueBackend, monkeypatch: pytest.MonkeyPatch,
                                ) -> list[Cancelled]:
    """A withdrawal's cancel (``cancelled``) finds the store has forgotten the waiter's grant;
    its answers, in order."""
    cancel, answers = backend.cancel, list[Cancelled]()

    async def forgotten(key: str, waiter_id: str, *, reason: Reason = Reason.CANCELLED,
                        caller: str = "", policy: QueuePolicy | None = None) -> Cancelled:
        if reason is Reason.CANCELLED:
            await _forget(backend, waiter_id)
        answers.append(await cancel(key, waiter_id, reason=reason, caller=caller,
                                    policy=policy))
        return answers[-1]

    monkeypatch.setattr(backend, "cancel", forgotten)
    return answers


def _cancelled_as_granted(backend: QueueBackend, monkeypatch: pytest.MonkeyPatch,
                          task: Callable[[], asyncio.Task[AcquireResult]]) -> None:
    """``task()`` is cancelled in the loop turn its waiter's grant is told (from inside the
    notifier's ``deliver``): ``wait_for`` keeps the grant and the caller withdraws as it goes."""
    deliver = backend.grants.deliver

    def told(waiter_id: str, notice: Notice) -> None:
        deliver(waiter_id, notice)
        if notice.granted:
            task().cancel()

    monkeypatch.setattr(backend.grants, "deliver", told)


async def _gone_just_before_its_grant(rig: LockerRig, monkeypatch: pytest.MonkeyPatch,
                                      request_id: str) -> LockRequest:
    """Pull 2's acquire with ``request_id`` waits behind pull 1; its task is cancelled in the
    loop turn its grant is told, just before (from inside the notifier's ``deliver``), as
    pull 1 releases. Its request, to send again."""
    backend = rig.locker.backend
    await rig.locker.acquire(ask(1))
    entered = waits_begun(monkeypatch, 1)
    asked = ask(2, wait=30 * S).model_copy(update={"request_id": request_id})
    gone = rig.spawn(rig.locker.acquire(asked))
    await asyncio.wait_for(entered[0].wait(), 10)
    deliver = backend.grants.deliver

    def told(waiter_id: str, notice: Notice) -> None:
        if notice.granted:
            gone.cancel()  # the client is noticed gone, then the grant comes
        deliver(waiter_id, notice)

    monkeypatch.setattr(backend.grants, "deliver", told)
    await rig.locker.release(ask(1).key)  # grants pull 2's waiter
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(gone, 60)
    assert gone.cancelled()
    monkeypatch.setattr(backend.grants, "deliver", deliver)
    return asked


async def test_a_caller_with_a_request_id_cancelled_just_before_its_grant_is_told_holds_nothing(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's acquire with a ``requestId`` waits behind pull 1; its task is cancelled in the
    loop turn its grant is told, just before (from inside the notifier's ``deliver``): the
    wait ends cancelled with the grant unheard, and the waiter is withdrawn after the retry
    grace. The withdrawal finds the grant and gives it back. Before, on etcd, the caller's
    stop counted the grant as heard (its future had a result) and deleted its notice, the
    store's record of it: the withdrawal's cancel found nothing, and the lock stayed held by
    a caller that was gone, with no lease to end it."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.0)
    rig = rigs()
    await _gone_just_before_its_grant(rig, monkeypatch, "job-23")
    await _withdrawn_after_the_grace()
    assert await rig.locker.get(ask(1).key) is None, "the grant outlived its caller"
    behind = await rig.locker.acquire(ask(3))
    assert behind.acquired, behind


async def _withdrawn_after_the_grace() -> None:
    """Wait for this loop's withdrawals after the retry grace (and their give-backs), those
    they start included."""
    loop = asyncio.get_running_loop()
    while later := [task for task in queueing._LATER if task.get_loop() is loop]:
        await asyncio.wait_for(asyncio.gather(*later), 60)
    await settle()


async def _a_retry_keeps_the_grant(first: LockerRig, through: LockerRig,
                                   monkeypatch: pytest.MonkeyPatch, request_id: str) -> None:
    """Pull 2's caller on ``first`` goes just before its grant; its request is sent again
    ``through`` a replica within the retry grace and answered acquired; after the first
    caller's withdrawal the retry still holds the key, on every replica's view."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 2.0)
    asked = await _gone_just_before_its_grant(first, monkeypatch, request_id)
    retry = await asyncio.wait_for(through.locker.acquire(asked), 30)  # within the grace
    assert retry.acquired and retry.lock is not None, retry
    await _withdrawn_after_the_grace()
    for replica in {id(first): first, id(through): through}.values():
        held = await replica.locker.get(ask(1).key)
        assert held is not None and held.fencing_token == retry.lock.fencing_token, held
    other = await first.locker.acquire(ask(3))
    assert not other.acquired, other


async def test_a_retry_of_a_caller_cancelled_just_before_its_grant_keeps_the_grant_it_took(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but the request is sent again within the retry grace: the retry takes the
    grant over and is answered acquired (not fresh). The first caller's withdrawal after the
    grace leaves that grant alone. Before, it found no waiter and gave back what the first
    caller's future held, the very lock the retry was told it holds: the key was free for
    another pull while the retry held it (two holders)."""
    rig = rigs()
    await _a_retry_keeps_the_grant(rig, rig, monkeypatch, "job-99")


SHARED_KINDS = [pytest.param(kind, marks=BACKEND_KINDS[kind].marks, id=kind)
                for kind in ("boltdb", "redis", "redis-cluster", "etcd")]
"""The queue backends two replicas can share (the embedded store: two connections to one file)."""


@pytest.mark.parametrize("queue_backend_factory", SHARED_KINDS, indirect=True)
async def test_a_retry_through_another_replica_keeps_the_grant_its_first_caller_never_read(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but the retry goes through another replica of the same store (a load
    balancer's next pick): it takes the grant over there, and the first replica's withdrawal
    after the grace leaves it held. A guard of what the docs promise: this passed on the
    earlier forms of the mend too (the store named the waiter the retry owned there, so the
    first replica gave nothing back)."""
    await _a_retry_keeps_the_grant(rigs(), rigs(), monkeypatch, "job-77")


async def test_callers_with_request_ids_cancelled_and_retried_at_random_never_share_a_key(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A history: pulls with a ``requestId`` each wait for one key, round after round; at
    random a caller is cancelled while it is queued, or just before its grant is told (from
    inside the notifier's ``deliver``), and then sent again within the retry grace, or never.
    Every caller answered acquired holds the key a while and releases it. No caller is ever answered
    acquired while another is told it holds the key, and at the end, once every withdrawal
    after the grace is done, nobody holds it (no grant outlived its callers)."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.2)
    rig = rigs()
    backend = rig.locker.backend
    key = ask(1).key
    chance = random.Random(2026)
    holding: set[int] = set()
    at_grant: dict[int, asyncio.Task[AcquireResult]] = {}
    deliver = backend.grants.deliver

    def told(waiter_id: str, notice: Notice) -> None:
        if notice.granted:
            attempt = at_grant.pop(notice.locks[0].pull.num, None)
            if attempt is not None:
                attempt.cancel()  # the client is noticed gone, then the grant comes
        deliver(waiter_id, notice)

    monkeypatch.setattr(backend.grants, "deliver", told)

    async def hold(pull: int, result: AcquireResult) -> None:
        assert result.acquired and result.lock is not None, result
        assert not holding, f"pull {pull} told it holds {key} while {holding} hold it"
        holding.add(pull)
        await asyncio.sleep(chance.uniform(0, 0.3))
        holding.discard(pull)
        await rig.locker.release(key, owner=(result.lock.project.repo_full_name, pull),
                                 token=result.lock.fencing_token)

    async def pull_of(pull: int) -> None:
        for round_ in range(3):
            asked = ask(pull, wait=30 * S).model_copy(
                update={"request_id": f"job-{pull}-{round_}"})
            how, again = chance.choice(("waits", "early", "at-grant")), chance.random() < 0.7
            attempt = rig.spawn(rig.locker.acquire(asked))
            if how == "at-grant":
                at_grant[pull] = attempt
            elif how == "early":  # once queued (one granted at once is answered: kept)
                for _ in range(6000):  # (within a minute)
                    if attempt.done() or asked.request_id in [
                            w.request_id for w in await backend.queue(key)]:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(chance.uniform(0, 0.05))
                attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(attempt), 60)
            at_grant.pop(pull, None)
            if attempt.cancelled():
                if not again:
                    continue  # its waiter (or grant) is withdrawn after the grace
                result = await asyncio.wait_for(rig.locker.acquire(asked), 60)
            else:
                result = attempt.result()
            await hold(pull, result)

    await asyncio.wait_for(asyncio.gather(*(pull_of(pull) for pull in range(1, 6))), 120)
    await _withdrawn_after_the_grace()
    assert await rig.locker.get(key) is None, "a grant outlived its callers"


@pytest.mark.parametrize("queue_backend_factory", FORGETFUL_KINDS, indirect=True)
async def test_a_withdrawal_the_store_forgot_gives_back_its_own_callers_grant(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2 waits behind pull 1, and its caller is cancelled as the holder's release grants
    it. Its withdrawal's cancel finds neither waiter nor grant (the store forgot the grant),
    and it falls back on what its own caller was told: a grant made while the waiter was this
    caller's, given back. (Without that fallback the lock stays held by a caller that is gone,
    with no lease to end it.)"""
    rig = rigs()
    backend = rig.locker.backend
    await rig.locker.acquire(ask(1))
    entered = waits_begun(monkeypatch, 1)
    gone = rig.spawn(rig.locker.acquire(ask(2, wait=30 * S)))
    await asyncio.wait_for(entered[0].wait(), 10)
    _cancelled_as_granted(backend, monkeypatch, lambda: gone)
    answers = _withdrawn_after_forgetting(backend, monkeypatch)
    await rig.locker.release(ask(1).key)  # grants pull 2's waiter
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(gone, 60)
    assert gone.cancelled()
    await settle()
    assert answers == [Cancelled()], f"the withdrawal's cancel found something: {answers}"
    assert await rig.locker.get(ask(1).key) is None, "the grant outlived its caller"


@pytest.mark.parametrize("queue_backend_factory", FORGETFUL_KINDS, indirect=True)
async def test_a_withdrawal_the_store_forgot_leaves_the_retrys_grant_held(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both callers of a waiter taken over by its retry wait; the holder's release grants it
    (the retry's), and the first caller is cancelled as the grant is told. Its withdrawal's
    cancel finds neither waiter nor grant (the store forgot the grant), and it falls back on
    what the first caller was told: the retry's grant, not this caller's (its caller is the
    retry), so nothing is given back and the retry holds what it was answered with. (Taking
    that notice as the first caller's own gave the retry's lock back.)"""
    rig = rigs()
    backend = rig.locker.backend
    await rig.locker.acquire(ask(1))
    first, retry = await _both_waiting(rig, monkeypatch, "job-16")
    _cancelled_as_granted(backend, monkeypatch, lambda: first)
    answers = _withdrawn_after_forgetting(backend, monkeypatch)
    await rig.locker.release(ask(1).key)  # grants the retry's waiter
    answer = await asyncio.wait_for(retry, 60)
    assert answer.acquired and answer.fresh and answer.lock is not None, answer
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(first, 60)
    assert first.cancelled()
    await settle()
    assert answers == [Cancelled()], f"the withdrawal's cancel found something: {answers}"
    held = await rig.locker.get(ask(1).key)
    assert held is not None and held.fencing_token == answer.lock.fencing_token, held


async def test_a_first_callers_deadline_after_its_retry_took_the_waiter_over_leaves_it_queued(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's acquire with a ``requestId`` waits behind pull 1; the same request, sent
    again, takes the waiter over, and then the first caller's deadline fires (its wait held
    until the retry's began, then given a twentieth of a second). The first caller is answered
    ``timeout``; the retry keeps its waiter, and the holder's release grants it. Before, the
    timeout's cancel named no caller and took the retry's waiter out of the queue."""
    rig = rigs()
    await rig.locker.acquire(ask(1))
    await_turn = queueing.await_turn
    retry_waits, calls = asyncio.Event(), 0

    async def first_ends_first(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first caller: its deadline fires once the retry waits
            await retry_waits.wait()
            kwargs["seconds"] = 0.05
        else:
            retry_waits.set()
        return await await_turn(*args, **kwargs)

    monkeypatch.setattr(queueing, "await_turn", first_ends_first)
    asked = ask(2, wait=30 * S).model_copy(update={"request_id": "job-15"})
    first = rig.spawn(rig.locker.acquire(asked))
    for _ in range(500):  # the first caller is queued before the retry is sent
        if await rig.locker.queue(ask(1).key):
            break
        await asyncio.sleep(0.01)
    retry = rig.spawn(rig.locker.acquire(asked))
    timed_out = await asyncio.wait_for(first, 60)
    assert not timed_out.acquired and timed_out.reason is Reason.TIMEOUT, timed_out
    await settle()
    assert not retry.done(), f"the retry's wait ended: {retry.result()}"
    assert len(await rig.locker.queue(ask(1).key)) == 1, "the retry's waiter was withdrawn"
    await rig.locker.release(ask(1).key)  # grants the retry's waiter
    answer = await asyncio.wait_for(retry, 60)
    assert answer.acquired and answer.fresh and answer.lock is not None, answer
    held = await rig.locker.get(ask(1).key)
    assert held is not None and held.fencing_token == answer.lock.fencing_token, held


async def test_of_two_callers_of_one_granted_waiter_only_its_owner_is_answered_fresh(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both callers of a waiter taken over by its retry wait, and one release grants it: both
    are answered with its locks, and only the retry, which owned the waiter when it was
    granted, with a fresh grant. The first caller's answer gives nothing back if its client is
    found gone as it goes out. Before, both answers were fresh, and the first one's
    give-back freed the lock the retry was told it holds."""
    rig = rigs()
    await rig.locker.acquire(ask(1))
    first, retry = await _both_waiting(rig, monkeypatch, "job-14")
    await rig.locker.release(ask(1).key)  # grants the retry's waiter
    owned = await asyncio.wait_for(retry, 60)
    heard = await asyncio.wait_for(first, 60)
    assert owned.acquired and owned.fresh, owned
    assert heard.acquired and heard.lock == owned.lock, heard
    assert not heard.fresh, "the first caller was answered with the retry's grant as its own"


@dataclasses.dataclass
class _Gated:
    withdraw: asyncio.Event
    """Set by the test: a withdrawal after the retry grace may run."""
    withdrawn: asyncio.Event
    """Set once it ran."""


async def _waiting_to_leave(rig: LockerRig, monkeypatch: pytest.MonkeyPatch, request_id: str,
                            ) -> tuple[asyncio.Task[AcquireResult], _Gated]:
    """Pull 2's acquire with ``request_id``, waiting behind pull 1; a withdrawal after the
    retry grace (none: no grace) waits for the test's ``withdraw``."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.0)
    gated = _Gated(asyncio.Event(), asyncio.Event())
    entered = asyncio.Event()
    await_turn, withdraw = queueing.await_turn, queueing._withdraw_retrying

    async def waits(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        return await await_turn(*args, **kwargs)

    async def withdrawal(*args: Any, **kwargs: Any) -> Any:
        await gated.withdraw.wait()
        try:
            return await withdraw(*args, **kwargs)
        finally:
            gated.withdrawn.set()

    monkeypatch.setattr(queueing, "await_turn", waits)
    monkeypatch.setattr(queueing, "_withdraw_retrying", withdrawal)
    first = rig.spawn(rig.locker.acquire(
        ask(2, wait=30 * S).model_copy(update={"request_id": request_id})))
    await asyncio.wait_for(entered.wait(), 10)
    return first, gated


async def _store_tidied(backend: QueueBackend) -> None:
    """The store's own clean-ups started so far are done (etcd deletes a heard notice in a
    task of its own); not etcd's task that follows its connection's state, which lasts as
    long as the store (waited for, it held each caller for the whole bound)."""
    follows = getattr(type(backend), "_channel_states", None)
    spawned = {task for task in getattr(backend, "_tasks", ())
               if follows is None
               or getattr(task.get_coro(), "cr_code", None) is not follows.__code__}
    if spawned:
        _, pending = await asyncio.wait(spawned, timeout=10)
        assert not pending, f"the store's clean-ups did not end: {pending}"


async def test_a_grant_whose_notice_came_after_its_caller_left_is_given_back_after_the_grace(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's acquire with a ``requestId`` waits; the holder's release grants the waiter,
    and the caller is cancelled before the notice reaches it (its client gone as the watch
    brings the notice, or the grant made by another replica): its withdrawal is left for the
    retry grace, and no retry comes. The withdrawal then finds the grant and gives it back.
    Before, on etcd, the caller's leaving deleted the waiter's unheard notice, the store's
    only record of the grant: the withdrawal found nothing, and the lock, with no lease, was
    held for good."""
    rig = rigs()
    backend = rig.locker.backend
    await rig.locker.acquire(ask(1))
    first, withdrawal = await _waiting_to_leave(rig, monkeypatch, "job-13")

    def told(waiter_id: str, notice: Notice) -> None:
        if notice.granted:
            first.cancel()  # gone before its notice reaches it: never told

    monkeypatch.setattr(backend.grants, "deliver", told)
    await rig.locker.release(ask(1).key)  # grants the waiter
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(first, 60)
    assert first.cancelled()
    held = await rig.locker.get(ask(1).key)
    assert held is not None and held.pull.num == 2, held
    await _store_tidied(backend)
    withdrawal.withdraw.set()
    await asyncio.wait_for(withdrawal.withdrawn.wait(), 10)
    assert await rig.locker.get(ask(1).key) is None, "the grant outlived its caller"


async def test_a_grant_a_retry_takes_while_its_first_caller_is_away_is_the_retrys_to_give_back(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's acquire with a ``requestId`` waits; its client goes, and within the retry
    grace the holder's release grants the waiter, heard by nobody. The same request, sent
    again, finds the grant and takes it: it is answered with a fresh grant, so its own route
    gives it back if its client goes too (and the first caller's withdrawal, later, finds
    nothing of it). Before, the retry was answered ``fresh: false``: nothing gave the lock
    back, and with no lease it was held for good."""
    rig = rigs()
    await rig.locker.acquire(ask(1))
    first, withdrawal = await _waiting_to_leave(rig, monkeypatch, "job-15")
    first.cancel()  # the first client is gone
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await rig.locker.release(ask(1).key)  # grants the waiter while its caller is away
    await settle()
    asked = ask(2, wait=30 * S).model_copy(update={"request_id": "job-15"})
    taken = await asyncio.wait_for(rig.locker.acquire(asked), 30)
    assert taken.acquired and taken.lock is not None and taken.lock.pull.num == 2, taken
    assert taken.fresh, "a grant nobody had heard of was not the retry's to give back"
    withdrawal.withdraw.set()
    await asyncio.wait_for(withdrawal.withdrawn.wait(), 10)
    held = await rig.locker.get(ask(1).key)
    assert held is not None and held.fencing_token == taken.lock.fencing_token, held


async def test_a_grant_its_first_caller_heard_is_not_the_retrys_to_give_back(
    rigs: Callable[..., LockerRig],
) -> None:
    """Pull 2's acquire with a ``requestId`` waits and is granted, and answered with a fresh
    grant; the same request, sent again (its client did not see the answer), finds the grant:
    it is answered with it as not fresh, since the first caller's answer gives it back if
    that client is gone."""
    rig = rigs()
    backend = rig.locker.backend
    await rig.locker.acquire(ask(1))
    asked = ask(2, wait=30 * S).model_copy(update={"request_id": "job-16"})
    first = rig.spawn(rig.locker.acquire(asked))
    await settle()
    await rig.locker.release(ask(1).key)  # grants the waiter, heard by its caller
    heard = await asyncio.wait_for(first, 30)
    assert heard.acquired and heard.fresh, heard
    await _store_tidied(backend)
    again = await asyncio.wait_for(rig.locker.acquire(asked), 30)
    assert again.acquired and again.lock == heard.lock, again
    assert not again.fresh, "the retry was answered with the first caller's grant as its own"


async def test_a_lease_that_runs_out_frees_the_lock_and_wakes_the_queue(
    rigs: Callable[..., LockerRig],
) -> None:
    async def case(lease: timedelta) -> None:
        rig = rigs()
        path = f"envs/lease-{lease // timedelta(milliseconds=1)}"
        short = await rig.locker.acquire(ask(1, path=path, ttl=lease))
        assert short.lock is not None and short.lock.expires_at is not None
        # Woken within 5 s of the lease's end.
        answer = await asyncio.wait_for(rig.locker.acquire(ask(2, path=path, wait=10 * S)),
                                        lease.total_seconds() + 5)
        assert answer.acquired and answer.lock is not None and answer.lock.pull.num == 2
        if "queued" not in rig.types():
            # Pull 2 reached the store after the lease had ended and found the key free, so
            # there was no queue to wake: only if the store stamped its grant after that end.
            assert answer.lock.acquired_at >= short.lock.expires_at, "granted over a lease"
            raise Overrun
        assert rig.types() == ["acquired", "queued", "expired", "granted-from-queue"]
        assert count(rig, "enhanced_locking_lease_expirations_total") == 1

    await with_leases(case)


async def test_a_lease_timer_early_by_a_store_clock_behind_looks_again_when_the_store_is_due(
) -> None:
    """A lease's end is stamped by the store's clock (on Redis the server's) and its timer
    runs on this process's. With the store's clock behind, the timer fires before the lease
    ends there: the store frees nothing and the holder is still there with its end passed
    here. The timer was set again for that passed end, 2 ms later, and fired again and again
    until the store's clock caught up: a call to the store every few milliseconds for as
    long as the clocks are apart (about 70 calls in 1.5 s in-process, one round trip each
    on Redis). It is set for the moment the store's clock reaches the end. A store with a clock
    of its own 1.5 s behind (the memory store takes one) stands for that store here."""

    async def case(lease: timedelta) -> None:
        calls = await _calls_to_free_a_lease_with_the_store_clock_off(-timedelta(seconds=1.5),
                                                                      lease)
        # The acquire, the early look (its expire and its holders' read), the store's clock,
        # the look when the lease ends: a few calls, not one every few milliseconds.
        assert calls <= 8, calls

    await with_leases(case)


async def test_a_lease_timer_late_by_a_store_clock_ahead_frees_the_lease_once_and_never_early(
) -> None:
    """With the store's clock ahead of this process's, the lease still ends by the store's
    clock (never sooner than its ``ttl`` after its grant there) and its timer, which runs on
    this process's clock, fires that much after the store's end: the store frees the lease
    then and serves the queue, in one look (no look that finds it on, none set again). A store
    with a clock of its own 1.5 s ahead (the memory store takes one) stands for a Redis
    server whose clock is ahead here."""

    async def case(lease: timedelta) -> None:
        calls = await _calls_to_free_a_lease_with_the_store_clock_off(timedelta(seconds=1.5),
                                                                      lease)
        # The acquire that queued, the timer's one expiry (which hands the key on).
        assert calls <= 4, calls

    await with_leases(case)


async def _calls_to_free_a_lease_with_the_store_clock_off(off: timedelta,
                                                          lease: timedelta) -> float:
    """Pull 1 holds a lease of ``lease`` on a memory store whose clock is ``off`` from this
    process's, pull 2 waits for the key: it is granted from the queue once the lease ends by
    the store's clock, never over it. The calls to the store from pull 2's acquire on. Raises
    :class:`Overrun` when pull 2 reached the store after the lease's end (a stall of a loaded
    machine longer than a short lease) and found no lease to queue behind."""
    rig = rig_for(MemoryBackend(clock=lambda: utcnow() + off))
    try:
        held = await rig.locker.acquire(ask(1, ttl=lease))
        assert held.lock is not None and held.lock.expires_at is not None
        before = count(rig, "enhanced_locking_backend_operations_total", backend="enhanced")
        answer = await asyncio.wait_for(rig.locker.acquire(ask(2, wait=lease + 10 * S)),
                                        lease.total_seconds() + 9)
        assert answer.acquired and answer.lock is not None and answer.lock.pull.num == 2
        assert answer.lock.acquired_at >= held.lock.expires_at, "granted over a lease"
        if "queued" not in rig.types():
            raise Overrun
        assert rig.types() == ["acquired", "queued", "expired", "granted-from-queue"]
        return count(rig, "enhanced_locking_backend_operations_total",
                     backend="enhanced") - before
    finally:
        await rig.close()


async def test_every_shared_lease_found_over_is_told_expired(
    rigs: Callable[..., LockerRig],
) -> None:
    """Two shared holders whose leases have both ended when the key's lease check runs: each
    is freed and told as expired (an ``expired`` event and one lease expiration each), on
    every store. Before, the in-process stores told only the first (the second went without
    an event), and no store counted the second one's expiration."""
    rig = rigs()
    backend = rig.locker.backend
    lease = timedelta(milliseconds=100)
    ends = []
    for pull in (1, 2):
        asked = ask(pull, path="envs/shared-ends").model_copy(update={"mode": "shared"})
        # Straight to the store: no lease timer of the locker's runs before both have ended.
        outcome = await backend.acquire_or_enqueue(candidate_for(asked), ttl=lease, wait=None,
                                                   policy=QueuePolicy())
        assert outcome.status is Status.GRANTED, outcome
        assert outcome.locks[0].expires_at is not None
        ends.append(outcome.locks[0].expires_at)
    await past(backend.now, max(ends))
    await rig.locker.expire(asked.key)
    expired = [e for e in rig.events if e.type == "expired"]
    assert sorted(e.lock.pull.num for e in expired if e.lock is not None) == [1, 2], expired
    assert count(rig, "enhanced_locking_lease_expirations_total") == 2
    assert count(rig, "enhanced_locking_releases_total", backend="enhanced", how="expired") == 2
    assert await rig.locker.holders(asked.key) == []


async def _lapsed_hold(rig: LockerRig, pull: int, path: str) -> LockRequest:
    """Pull ``pull`` holds ``path``'s key with a lease that has run out, taken straight from
    the store: no lease timer of the locker's is set for it (a replica that granted it and
    then died, or one whose clock is behind the store's)."""
    backend = rig.locker.backend
    asked = ask(pull, path=path)
    outcome = await backend.acquire_or_enqueue(candidate_for(asked), ttl=timedelta(
        milliseconds=100), wait=None, policy=QueuePolicy())
    assert outcome.status is Status.GRANTED and outcome.locks[0].expires_at is not None
    await past(backend.now, outcome.locks[0].expires_at)
    return asked


async def test_a_lapsed_lease_the_next_call_frees_is_told_expired(
    rigs: Callable[..., LockerRig],
) -> None:
    """A lease that ran out and is freed by the next acquire or release of its key (no lease
    timer got there first) is told as the timer tells it: an ``expired`` event before what
    the call did, one lease expiration and one release ``how="expired"``, on every store.
    Before, the store freed it in the call's step and said nothing: no event, no count."""
    rig = rigs()
    first = await _lapsed_hold(rig, 1, "envs/lapsed-acquire")
    taken = await rig.locker.acquire(ask(2, path="envs/lapsed-acquire"))
    assert taken.acquired and taken.lock is not None and taken.lock.pull.num == 2, taken
    assert rig.types() == ["expired", "acquired"], rig.types()
    gone = rig.events[0]
    assert gone.key == first.key and gone.lock is not None and gone.lock.pull.num == 1
    assert gone.details["how"] == "expired"
    assert count(rig, "enhanced_locking_lease_expirations_total") == 1
    assert count(rig, "enhanced_locking_releases_total", backend="enhanced", how="expired") == 1

    rig.events.clear()
    mine = await _lapsed_hold(rig, 3, "envs/lapsed-release")
    assert await rig.locker.release(mine.key, owner=(mine.project.repo_full_name, 3)) is None
    assert rig.types() == ["expired"], rig.types()
    assert rig.events[0].lock is not None and rig.events[0].lock.pull.num == 3
    assert count(rig, "enhanced_locking_lease_expirations_total") == 2
    assert count(rig, "enhanced_locking_releases_total", backend="enhanced", how="expired") == 2
    assert count(rig, "enhanced_locking_releases_total", backend="enhanced",
                 how="released") == 0


async def test_a_lapsed_lease_a_release_by_pull_frees_is_told_expired(
    rigs: Callable[..., LockerRig],
) -> None:
    """A pull whose lease on one key had run out (no lease timer got there first) and who
    holds another key: its release by pull frees both, answers the one still held, and tells
    the other as expired (its event, one lease expiration, one release ``how="expired"``), not
    as released. Before, the stores freed it and said nothing, on every store."""
    rig = rigs()
    lapsed = await _lapsed_hold(rig, 5, "envs/by-pull-lapsed")
    held = await rig.locker.acquire(ask(5, path="envs/by-pull-held"))
    assert held.acquired and held.lock is not None
    rig.events.clear()
    released = await rig.locker.release_by_pull(lapsed.project.repo_full_name, 5)
    assert [lock.key for lock in released] == [held.lock.key], released
    assert [(e.type, e.key, e.details["how"]) for e in rig.events] == [
        ("expired", lapsed.key, "expired"), ("released", held.lock.key, "by-pull")]
    assert count(rig, "enhanced_locking_lease_expirations_total") == 1
    assert count(rig, "enhanced_locking_releases_total", backend="enhanced", how="expired") == 1
    assert count(rig, "enhanced_locking_releases_total", backend="enhanced", how="by-pull") == 1


async def test_a_waiter_an_acquire_serves_after_freeing_a_lapsed_lease_is_a_counted_handoff(
    rigs: Callable[..., LockerRig],
) -> None:
    """Pull 1's lease ran out with pull 2 queued behind it and no lease timer of the locker's
    set (taken and queued straight in the store: a replica that did so and died). Pull 3's
    acquire frees the lapsed lock and, in the same step, hands the key to pull 2 before it
    decides (pull 3 is refused). The hand-off is counted and the ``expired`` event names
    pull 2's waiter, as when a release or the lease timer hands a key on. Before, such a
    hand-off was not counted and the event named nobody."""
    rig = rigs()
    backend = rig.locker.backend
    asked = ask(1, path="envs/lapsed-handed")
    held = await backend.acquire_or_enqueue(candidate_for(asked), ttl=timedelta(
        milliseconds=300), wait=None, policy=QueuePolicy())
    assert held.status is Status.GRANTED and held.locks[0].expires_at is not None
    wait = Wait(id="pull-2-waits", timeout=30 * S)
    queued = await backend.acquire_or_enqueue(candidate_for(ask(2, path="envs/lapsed-handed")),
                                              ttl=None, wait=wait, policy=QueuePolicy())
    assert queued.status is Status.QUEUED, queued
    await past(backend.now, held.locks[0].expires_at)
    refused = await rig.locker.acquire(ask(3, path="envs/lapsed-handed"))
    assert refused.reason is Reason.HELD and refused.holder is not None, refused
    assert refused.holder.pull.num == 2
    assert rig.types() == ["expired"], rig.types()
    assert list(rig.events[0].details["handedTo"]) == [wait.id]
    assert count(rig, "enhanced_locking_handoffs_total") == 1


async def test_a_waiter_a_cancel_lets_through_is_a_counted_handoff(
    rigs: Callable[..., LockerRig],
) -> None:
    """Pull 1 holds a key shared; pull 2 waits for it exclusive and pull 3, shared, waits
    behind pull 2. An admin cancel of pull 2 lets pull 3 through in its step: pull 3 is
    granted, and the hand-off is counted as a release's is. Before, a hand-off made by a
    cancel was never counted."""
    rig = rigs()

    def shared(pull: int, **more: Any) -> LockRequest:
        return ask(pull, path="envs/cancel-lets-through", **more).model_copy(
            update={"mode": "shared"})

    assert (await rig.locker.acquire(shared(1))).acquired
    ahead = rig.spawn(rig.locker.acquire(ask(2, path="envs/cancel-lets-through", wait=30 * S)
                                         .model_copy(update={"request_id": "job-2"})))
    await settle()
    behind = rig.spawn(rig.locker.acquire(shared(3, wait=30 * S)))
    await settle()
    key = shared(1).key
    assert [w.owner[1] for w in await rig.locker.queue(key)] == [2, 3]
    assert await rig.locker.cancel_waiter(key, "job-2") is not None
    assert (await asyncio.wait_for(ahead, 5)).reason is Reason.CANCELLED
    granted = await asyncio.wait_for(behind, 5)
    assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 3
    assert count(rig, "enhanced_locking_handoffs_total") == 1


async def test_the_default_lease_comes_from_lock_ttl_and_a_refresh_extends_it(
    rigs: Callable[..., LockerRig],
) -> None:
    async def case(lease: timedelta) -> None:
        rig = rigs(lock_ttl=lease)
        mine = ask(1, path=f"envs/ttl-{lease // timedelta(milliseconds=1)}")
        key = mine.key
        granted = await rig.locker.acquire(mine)
        assert granted.lock is not None and granted.lock.expires_at is not None
        first_end = granted.lock.expires_at
        assert first_end - granted.lock.acquired_at == lease
        try:
            refreshed = await rig.locker.refresh(key, owner=("acme/infra", 1), ttl=60 * S)
        except LockNotHeld:
            if await rig.locker.backend.now() < first_end:
                raise  # refused while the lease was live
            raise Overrun from None
        assert refreshed.expires_at is not None and refreshed.expires_at > first_end
        # The lease timer set for the first end fires after it, finds the refreshed lease and
        # leaves it alone (set again for the new end).
        await past(rig.locker.backend.now, first_end)
        assert await until(lambda: rig.locker.leases.armed().get(key) == refreshed.expires_at)
        assert await rig.locker.get(key) == refreshed

    await with_leases(case)


async def test_the_longest_lease_a_request_may_ask_is_granted_and_refreshed_on_every_store(
    rigs: Callable[..., LockerRig],
) -> None:
    """A ``ttl`` (and ``lock-ttl``) may be as long as a Go duration (2562047h). etcd's leases
    end at most 9,000,000,000 s (about 2,500,000h) after their grant, and a lock's etcd lease
    was asked for the lock's whole length: a lease above that was refused by etcd, and the
    acquire answered ``unavailable`` (503) as if the store were down."""
    longest = parse_duration("2562047h")
    rig = rigs(lock_ttl=longest)
    granted = await rig.locker.acquire(ask(1, path="envs/by-default"))
    assert granted.acquired and granted.lock is not None
    assert granted.lock.expires_at == granted.lock.acquired_at + longest
    asked = await rig.locker.acquire(ask(2, path="envs/by-request", ttl=longest))
    assert asked.acquired and asked.lock is not None
    assert asked.lock.expires_at == asked.lock.acquired_at + longest
    refreshed = await rig.locker.refresh(asked.lock_key, owner=("acme/infra", 2), ttl=longest)
    assert refreshed.expires_at is not None and refreshed.expires_at >= asked.lock.expires_at
    assert await rig.locker.get(asked.lock_key) == refreshed
    released = await rig.locker.release(granted.lock_key, owner=("acme/infra", 1))
    assert released is not None and released.fencing_token == granted.lock.fencing_token


async def test_priority_queue_off_serves_fifo_and_on_serves_by_priority_live(
    rigs: Callable[..., LockerRig],
) -> None:
    rig = rigs(priority_queue=False)
    await rig.locker.acquire(ask(1))
    for pull, priority in [(2, Priority.LOW), (3, Priority.CRITICAL)]:
        rig.spawn(rig.locker.acquire(ask(pull, wait=30 * S, priority=priority)))
        await settle()
    assert [w.owner[1] for w in await rig.locker.queue(ask(1).key)] == [2, 3]
    rig.set(priority_queue=True)
    assert [w.owner[1] for w in await rig.locker.queue(ask(1).key)] == [3, 2]
    await rig.locker.force_unlock(ask(1).key)
    await settle()
    holder = await rig.locker.get(ask(1).key)
    assert holder is not None and holder.pull.num == 3
    assert "force-unlocked" in rig.types()


async def test_a_force_unlock_of_the_holds_it_checked_leaves_a_hold_taken_since(
    rigs: Callable[..., LockerRig],
) -> None:
    """A force-unlock names the holds its caller's right was asked about (their fencing
    tokens): a hold another pull took after that read is not freed (``LockNotOwned``), the
    checked hold is, and so is every shared holder when all of them were checked."""
    rig = rigs()
    key = ask(1).key
    read = (await rig.locker.acquire(ask(1))).lock
    assert read is not None
    await rig.locker.release(key, owner=read.owner)
    taken = (await rig.locker.acquire(ask(2))).lock
    assert taken is not None
    with pytest.raises(LockNotOwned):
        await rig.locker.force_unlock(key, checked=frozenset({read.fencing_token}))
    still = await rig.locker.get(key)
    assert still is not None and still.fencing_token == taken.fencing_token
    freed = await rig.locker.force_unlock(key, checked=frozenset({taken.fencing_token}))
    assert freed is not None and freed.fencing_token == taken.fencing_token
    assert await rig.locker.get(key) is None
    shared = [(await rig.locker.acquire(ask(pull, path="envs/forced").model_copy(
        update={"mode": "shared"}))).lock for pull in (3, 4)]
    tokens = frozenset(lock.fencing_token for lock in shared if lock is not None)
    assert len(tokens) == 2
    with pytest.raises(LockNotOwned):  # one of the two holders was not checked
        await rig.locker.force_unlock(shared[0].key if shared[0] else "", checked=tokens
                                      - {min(tokens)})
    assert len(await rig.locker.holders(ask(3, path="envs/forced").key)) == 2
    await rig.locker.force_unlock(ask(3, path="envs/forced").key, checked=tokens)
    assert await rig.locker.holders(ask(3, path="envs/forced").key) == []


async def test_a_full_queue_answers_queue_full(rigs: Callable[..., LockerRig]) -> None:
    rig = rigs(max_queue_size=1)
    await rig.locker.acquire(ask(1))
    rig.spawn(rig.locker.acquire(ask(2, wait=30 * S)))
    await settle()
    answer = await rig.locker.acquire(ask(3, wait=30 * S))
    assert answer.reason is Reason.QUEUE_FULL
    assert count(rig, "enhanced_locking_acquire_total", backend="enhanced",
                 outcome="queue_full") == 1


async def test_a_batch_is_all_or_nothing_and_a_waiting_batch_holds_nothing(
    rigs: Callable[..., LockerRig],
) -> None:
    rig = rigs()
    await rig.locker.acquire(ask(9, path="b"))
    batch = BatchLockRequest(
        locks=[BatchItem(project=ask(1, path=p).project) for p in ("a", "b")],
        pull=Pull(num=1), wait=30 * S)
    refused = await rig.locker.acquire_batch(batch.model_copy(update={"wait": None}))
    assert not refused.acquired and refused.lock_key == ask(1, path="b").key
    assert refused.reason is Reason.HELD
    waiting = rig.spawn(rig.locker.acquire_batch(batch))
    await settle()
    assert await rig.locker.get(ask(1, path="a").key) is None, "no partial set while waiting"
    await rig.locker.release(ask(9, path="b").key)
    granted = await asyncio.wait_for(waiting, 5)
    assert granted.acquired and [lock.key for lock in granted.locks] == batch.keys
    released = await rig.locker.release_batch(batch.keys, owner=("acme/infra", 1))
    assert sorted(lock.key for lock in released) == sorted(batch.keys)


async def test_a_batch_tells_acquired_only_for_the_keys_it_granted(
    rigs: Callable[..., LockerRig],
) -> None:
    # The pull holds ``a``: its batch of ``a`` and ``b`` answers ``a`` unchanged (kept, not
    # acquired again: no event) and grants ``b``.
    rig = rigs()
    a, b = ask(1, path="a").key, ask(1, path="b").key
    assert (await rig.locker.acquire(ask(1, path="a"))).acquired
    batch = BatchLockRequest(
        locks=[BatchItem(project=ask(1, path=p).project) for p in ("a", "b")], pull=Pull(num=1))
    granted = await rig.locker.acquire_batch(batch)
    assert granted.acquired and granted.kept == frozenset({a})
    await settle()
    assert [(event.type, event.key) for event in rig.events] == [
        ("acquired", a), ("acquired", b)]


def _batch_of(pull: int, *paths: str, wait: timedelta | None = None) -> BatchLockRequest:
    return BatchLockRequest(locks=[BatchItem(project=ask(pull, path=p).project) for p in paths],
                            pull=ask(pull).pull, wait=wait)


async def _waiting_while_its_pull_takes_a(
    rig: LockerRig, monkeypatch: pytest.MonkeyPatch, batch: BatchLockRequest,
) -> tuple[asyncio.Task[BatchResult], AcquireResult]:
    """Pull 1 holds ``b``; pull 2's ``batch`` of ``a`` and ``b`` waits for it; meanwhile the
    pull's other request takes ``a`` (fresh: the batch holds nothing while it waits)."""
    assert (await rig.locker.acquire(ask(1, path="b"))).acquired
    [begun] = waits_begun(monkeypatch, 1)
    waiting = rig.spawn(rig.locker.acquire_batch(batch))
    await asyncio.wait_for(begun.wait(), 30)
    own = await rig.locker.acquire(ask(2, path="a"))
    assert own.acquired and own.fresh, own
    return waiting, own


async def test_a_batch_granted_from_the_queue_names_the_key_its_pull_took_while_it_waited(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's batch of ``a`` and ``b`` waits; its pull's other request takes ``a``
    meanwhile; pull 1 lets ``b`` go and the batch is granted from the queue, ``a`` answered
    with the pull's hold unchanged. The answer says so key by key (``kept``), as the store's
    grant did: a give-back that follows it (the router's batch backing off) leaves ``a``.
    Before, on Redis, the confirmation of a grant from the queue did not say it, and the look
    before the grant (when ``a`` was free) stood in."""
    rig = rigs()
    a, b = ask(2, path="a").key, ask(2, path="b").key
    waiting, own = await _waiting_while_its_pull_takes_a(
        rig, monkeypatch, _batch_of(2, "a", "b", wait=30 * S))
    assert await rig.locker.release(b, owner=("acme/infra", 1)) is not None
    granted = await asyncio.wait_for(waiting, 30)
    assert granted.acquired and granted.locks[0] == own.lock, granted
    assert granted.kept == frozenset({a}), granted.kept
    await settle()  # told from the queue is the key it granted, not the pull's hold of a
    assert [(event.type, event.key) for event in rig.events
            if event.type in ("acquired", "granted-from-queue")] == [
        ("acquired", b), ("acquired", a), ("granted-from-queue", b)]


async def test_a_batch_granted_as_its_caller_leaves_keeps_the_hold_its_pull_took_meanwhile(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, and the batch's caller leaves as its grant is told: the give-back frees
    ``b``, which the batch was granted, and never ``a``, the pull's hold that the batch was
    answered with (a cancel that finds the grant says which keys its pull held already).
    Before, on Redis and etcd, the cancel did not say it, and ``a`` was released too."""
    rig = rigs()
    backend = rig.locker.backend
    a, b = ask(2, path="a").key, ask(2, path="b").key
    waiting, own = await _waiting_while_its_pull_takes_a(
        rig, monkeypatch, _batch_of(2, "a", "b", wait=30 * S))
    deliver = backend.grants.deliver

    def told(waiter_id: str, notice: Notice) -> None:
        if notice.granted:
            waiting.cancel()  # gone as its grant is told: never answered
        else:
            deliver(waiter_id, notice)

    monkeypatch.setattr(backend.grants, "deliver", told)
    assert await rig.locker.release(b, owner=("acme/infra", 1)) is not None
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 60)
    assert waiting.cancelled()
    await settle()
    await _store_tidied(backend)
    assert await rig.locker.get(a) == own.lock, "the pull's hold of a was given back"
    assert await rig.locker.get(b) is None, "the batch's grant of b outlived its caller"


async def test_a_retry_taking_over_a_batchs_grant_names_the_key_its_pull_took_meanwhile(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's batch with a ``requestId`` waits; its pull's other request takes ``a``; the
    batch's client goes, and within the retry grace pull 1 lets ``b`` go: the batch is granted,
    heard by nobody. The same request, sent again, takes the grant over: its answer names
    ``a`` as the pull's already, so its own give-back (its client gone too) leaves it."""
    monkeypatch.setattr(queueing, "RETRY_GRACE", 0.0)
    gated = _Gated(asyncio.Event(), asyncio.Event())
    withdraw = queueing._withdraw_retrying

    async def withdrawal(*args: Any, **kwargs: Any) -> Any:
        await gated.withdraw.wait()  # the first caller's, after the grace: held back
        try:
            return await withdraw(*args, **kwargs)
        finally:
            gated.withdrawn.set()

    monkeypatch.setattr(queueing, "_withdraw_retrying", withdrawal)
    rig = rigs()
    a = ask(2, path="a").key
    batch = _batch_of(2, "a", "b", wait=30 * S).model_copy(update={"request_id": "job-21"})
    first, own = await _waiting_while_its_pull_takes_a(rig, monkeypatch, batch)
    first.cancel()  # the first client is gone
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert await rig.locker.release(ask(1, path="b").key, owner=("acme/infra", 1)) is not None
    await settle()
    taken = await asyncio.wait_for(rig.locker.acquire_batch(batch), 30)
    assert taken.acquired and taken.locks[0] == own.lock, taken
    assert taken.kept == frozenset({a}), taken.kept
    gated.withdraw.set()  # the first caller's withdrawal finds the waiter taken over
    await asyncio.wait_for(gated.withdrawn.wait(), 10)
    assert await rig.locker.get(a) == own.lock


async def test_a_batch_that_may_wait_granted_at_once_names_the_key_its_pull_held(
    rigs: Callable[..., LockerRig],
) -> None:
    # Nothing blocks it: granted in the enqueue's own step, which says ``a`` is the pull's.
    rig = rigs()
    a = ask(1, path="a").key
    held = await rig.locker.acquire(ask(1, path="a"))
    granted = await rig.locker.acquire_batch(_batch_of(1, "a", "b", wait=30 * S))
    assert granted.acquired and granted.locks[0] == held.lock, granted
    assert granted.kept == frozenset({a}), granted.kept


# --- retries -----------------------------------------------------------------------------------


class Flaky:
    """A real backend whose next ``failures`` calls of ``method`` fail as if it were down."""

    def __init__(self, inner: QueueBackend, method: str, failures: int) -> None:
        self._inner, self._method, self.failures, self.calls = inner, method, failures, 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name != self._method:
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await self.invoke(attribute, *args, **kwargs)
        return call

    async def invoke(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """One call of the flaky method: fails before reaching the store while ``failures``."""
        if self.failures > 0:
            self.failures -= 1
            raise BackendUnavailable("the store did not answer (injected)")
        return await method(*args, **kwargs)


def flaky_rig(queue_backend_factory: BackendFactory, failures: int, **settings: Any,
              ) -> tuple[LockerRig, Flaky]:
    inner = queue_backend_factory()
    assert isinstance(inner, QueueBackend)
    flaky = Flaky(inner, "acquire_or_enqueue", failures)
    return rig_for(flaky, **settings), flaky


async def test_with_retries_a_transient_failure_is_retried_with_backoff(
    queue_backend_factory: BackendFactory,
) -> None:
    rig, flaky = flaky_rig(queue_backend_factory, 2, retries=True, retry_max_attempts=3,
                           retry_backoff=timedelta(milliseconds=5))
    assert (await rig.locker.acquire(ask(1))).acquired
    assert flaky.calls == 3
    assert count(rig, "enhanced_locking_retries_total", operation="acquire") == 2


class LostAnswer(Flaky):
    """A real backend whose next ``failures`` calls of ``method`` act but lose their answer, as
    when the connection breaks after the store ran the call and the retry finds it down."""

    async def invoke(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        answer = await method(*args, **kwargs)
        if self.failures > 0:
            self.failures -= 1
            raise BackendUnavailable("the store's answer was lost (injected)")
        return answer


class GivenBackThenRetaken(Flaky):
    """A real backend whose next ``failures`` releases act but lose their answer, and whose
    pull ``again`` takes the key once more before the answer is lost."""

    def __init__(self, inner: QueueBackend, again: LockRequest) -> None:
        super().__init__(inner, "release_and_handoff", 0)
        self.again = again

    async def invoke(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        answer = await method(*args, **kwargs)
        if self.failures > 0:
            self.failures -= 1
            taken = await self._inner.acquire_or_enqueue(
                candidate_for(self.again), ttl=None, wait=None, policy=QueuePolicy())
            assert taken.status is Status.GRANTED, taken
            raise BackendUnavailable("the store's answer was lost (injected)")
        return answer


async def test_a_give_back_tried_again_leaves_the_pulls_new_hold_alone(
    queue_backend_factory: BackendFactory,
) -> None:
    """A waiter whose caller went away was granted; its withdrawal's give-back is applied but
    its answer lost, and the same pull takes the key again before the give-back is tried
    again. The repeat finds that hold not its own (another fencing token) and leaves it; before,
    it released by pull and freed the pull's new lock."""
    inner = queue_backend_factory()
    assert isinstance(inner, QueueBackend)
    again = ask(2)
    store = GivenBackThenRetaken(inner, again)
    rig = rig_for(store)
    try:
        key = again.key
        held = await inner.acquire_or_enqueue(candidate_for(ask(1)), ttl=None, wait=None,
                                              policy=QueuePolicy())
        wait = Wait(id="gone-waiter", timeout=30 * S, caller="gone")
        rig.locker.backend.grants.expect(wait.id)
        queued = await inner.acquire_or_enqueue(candidate_for(ask(2)), ttl=None, wait=wait,
                                                policy=QueuePolicy())
        assert queued.status is Status.QUEUED, queued
        await inner.release_and_handoff(key, owner=held.locks[0].owner, policy=QueuePolicy())
        granted = await inner.get(key)
        assert granted is not None and granted.pull.num == 2, granted
        store.failures = 1
        failed = await queueing._withdraw_retrying(
            rig.locker.backend, key, wait.id, Reason.CANCELLED, "gone",
            rig.locker._give_back, rig.locker._handed_on,
            give_up=asyncio.get_running_loop().time() + 5)
        assert failed is None, failed
        assert store.calls == 2, store.calls  # the give-back was tried again
        lock = await inner.get(key)
        assert lock is not None and lock.pull.num == 2, "the pull's new hold was freed"
        assert lock.fencing_token > granted.fencing_token, (lock, granted)
    finally:
        await rig.close()


async def test_an_enqueue_whose_answer_was_lost_leaves_no_waiter_behind(
    queue_backend_factory: BackendFactory,
) -> None:
    """The caller is told the store is unavailable, so the waiter its call queued is withdrawn
    once the store answers: the key is not handed to a caller that has gone."""
    inner = queue_backend_factory()
    assert isinstance(inner, QueueBackend)
    lost = LostAnswer(inner, "acquire_or_enqueue", 0)
    rig = rig_for(lost)
    try:
        key = ask(1).key
        assert (await rig.locker.acquire(ask(1))).acquired
        lost.failures = 1
        with pytest.raises(BackendUnavailable):
            await rig.locker.acquire(ask(2, wait=30 * S))
        left = await rig.locker.queue(key)
        for _ in range(500):
            if not left:
                break
            await asyncio.sleep(0.01)
            left = await rig.locker.queue(key)
        assert left == [], "a waiter queued for a caller that was told unavailable"
        await rig.locker.release(key)
        await settle()
        assert await rig.locker.get(key) is None, "granted to a caller that has gone"
        assert (await rig.locker.acquire(ask(3))).acquired
    finally:
        await rig.close()


async def test_retries_give_up_after_the_last_attempt(
    queue_backend_factory: BackendFactory,
) -> None:
    rig, flaky = flaky_rig(queue_backend_factory, 5, retries=True, retry_max_attempts=3,
                           retry_backoff=timedelta(milliseconds=1))
    with pytest.raises(BackendUnavailable):
        await rig.locker.acquire(ask(1))
    assert flaky.calls == 3


async def test_without_the_retries_flag_nothing_is_retried(
    queue_backend_factory: BackendFactory,
) -> None:
    rig, flaky = flaky_rig(queue_backend_factory, 1, retries=False)
    with pytest.raises(BackendUnavailable):
        await rig.locker.acquire(ask(1))
    assert flaky.calls == 1


async def test_a_definite_held_answer_is_never_retried(
    queue_backend_factory: BackendFactory,
) -> None:
    rig, flaky = flaky_rig(queue_backend_factory, 0, retries=True,
                           retry_backoff=timedelta(milliseconds=1))
    await rig.locker.acquire(ask(1))
    assert (await rig.locker.acquire(ask(2))).reason is Reason.HELD
    assert flaky.calls == 2


def test_backoff_doubles_with_jitter_between_half_and_full() -> None:
    from random import Random

    from enhanced_locking.locking.retrying import backoff_delays

    delays = backoff_delays(attempts=5, backoff=timedelta(milliseconds=100), rng=Random(7))
    assert len(delays) == 4
    for n, delay in enumerate(delays):
        assert 0.05 * 2**n <= delay <= 0.1 * 2**n
    again = backoff_delays(attempts=5, backoff=timedelta(milliseconds=100), rng=Random(8))
    assert again != delays, "two callers do not retry in step"



async def test_after_a_restart_the_leases_of_stored_locks_still_run_out(tmp_path: Path) -> None:
    from enhanced_locking.backends import EmbeddedBackend

    store = tmp_path / "enhanced-locking.db"
    before = rig_for(EmbeddedBackend(store), lock_ttl=timedelta(milliseconds=400))
    assert (await before.locker.acquire(ask(1))).acquired
    await before.close()
    await before.locker.backend.close()

    after = rig_for(EmbeddedBackend(store))
    await after.locker.start()
    try:
        assert ask(1).key in after.locker.leases.armed()
        answer = await asyncio.wait_for(after.locker.acquire(ask(2, wait=10 * S)), 5)
        assert answer.acquired and answer.lock is not None and answer.lock.pull.num == 2
        assert "expired" in after.types()
    finally:
        await after.close()
        await after.locker.backend.close()


async def test_a_queued_caller_is_answered_timeout_at_its_deadline_from_the_enqueue(
    rigs: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the caller does once queued and before it waits (the deadlock check, the view
    # read for the ``queued`` event; here held up by a hook for a while) counts against its
    # timeout, as it does for the store's deadline, which runs from the enqueue. Before, the
    # local timer got the whole timeout after that, and the answer came that much late.
    rig = rigs()
    await rig.locker.acquire(ask(1))
    loop = asyncio.get_running_loop()
    timeout, held = 0.6, 0.3
    seconds_left = rig.locker._seconds_left
    given: list[float] = []

    async def slow_before_waiting(*args: Any) -> float:
        await asyncio.sleep(held)
        given.append(await seconds_left(*args))
        return given[-1]

    monkeypatch.setattr(rig.locker, "_seconds_left", slow_before_waiting)
    asked = loop.time()
    answer = await asyncio.wait_for(
        rig.locker.acquire(ask(2, wait=timedelta(seconds=timeout))), 30)
    answered = loop.time()
    assert answer.reason is Reason.TIMEOUT
    # The timer got what was left after the hold, not the whole timeout...
    assert len(given) == 1 and given[0] <= timeout - held
    # ... and the answer came no earlier than the deadline.
    assert answered - asked >= timeout
