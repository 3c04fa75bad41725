"""The queue seam (``QueueBackend``): one table of behaviours, run against every queue kind.

These are the contract a backend with queues keeps (see ``backends/base.py``): grants with
rising fencing tokens, queues served in the service order, handoff straight to the next waiter
with a notice, cancel that knows about a grant that won the race, deadlines, leases, batches
that never hold a partial set, and the wait-for graph.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from datetime import timedelta

import pytest
from tests.support.backends import BACKEND_KINDS, BackendFactory
from tests.support.leases import Overrun, past, with_leases
from tests.support.locks import candidate_for, request_for
from tests.support.queues import QUEUE_BACKEND_KINDS, rig_for
from tests.support.unreadable import spoil_count

from enhanced_locking.backends import QueueBackend, base
from enhanced_locking.backends.memory import MemoryBackend
from enhanced_locking.backends.waiting import Notice, QueuePolicy, Status, Wait
from enhanced_locking.types import (
    Candidate,
    LockNotHeld,
    LockNotOwned,
    Priority,
    Reason,
    utcnow,
)

FIFO = QueuePolicy(priority=False)
PRIORITY = QueuePolicy(priority=True, starvation_threshold=timedelta(hours=1))
LONG = timedelta(seconds=30)


def want(pull: int, *, path: str = "envs/prod", priority: Priority = Priority.NORMAL,
         repo: str = "acme/infra") -> Candidate:
    return candidate_for(request_for(repo=repo, path=path, pull=pull, priority=priority))


def offer(timeout: timedelta = LONG) -> Wait:
    return Wait(id=secrets.token_hex(8), timeout=timeout)


@pytest.fixture
def backend(queue_backend_factory: BackendFactory) -> QueueBackend:
    made = queue_backend_factory()
    assert isinstance(made, QueueBackend), f"{queue_backend_factory.kind} keeps no queues"
    return made


async def queue_up(backend: QueueBackend, candidate: Candidate, policy: QueuePolicy = FIFO,
                   patience: timedelta = LONG) -> tuple[str, asyncio.Future[Notice], int]:
    wait = offer(patience)
    future = backend.grants.expect(wait.id)
    outcome = await backend.acquire_or_enqueue(candidate, ttl=None, wait=wait, policy=policy)
    assert outcome.status is Status.QUEUED, outcome
    assert outcome.position is not None
    return wait.id, future, outcome.position


async def test_a_free_key_is_granted_with_the_next_fencing_token(backend: QueueBackend) -> None:
    first = await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)
    assert first.status is Status.GRANTED and first.fresh
    await backend.release(first.locks[0].key)
    second = await backend.acquire_or_enqueue(want(2), ttl=None, wait=None, policy=FIFO)
    assert second.locks[0].fencing_token > first.locks[0].fencing_token
    assert second.locks[0].pull.num == 2


async def test_a_grant_is_stamped_with_the_backends_clock_and_lease(
    backend: QueueBackend,
) -> None:
    before = await backend.now()
    outcome = await backend.acquire_or_enqueue(want(1), ttl=timedelta(minutes=5), wait=None,
                                               policy=FIFO)
    lock = outcome.locks[0]
    assert lock.acquired_at >= before - timedelta(seconds=1)
    assert lock.expires_at == lock.acquired_at + timedelta(minutes=5)


async def test_the_holder_asking_again_gets_its_lock_back_unchanged(
    backend: QueueBackend,
) -> None:
    first = await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)
    again = await backend.acquire_or_enqueue(want(1), ttl=None, wait=offer(), policy=FIFO)
    assert again.status is Status.GRANTED and not again.fresh
    assert again.locks == first.locks


async def test_a_batch_grant_names_the_keys_its_pull_held_already(
    backend: QueueBackend,
) -> None:
    # Key by key: the pull's hold of ``a`` is answered unchanged (not the batch's to give
    # back), ``b`` is granted by this call; every key held already is not fresh at all.
    a, b = want(1, path="envs/a"), want(1, path="envs/b")
    held = await backend.acquire_or_enqueue(a, ttl=None, wait=None, policy=FIFO)
    assert held.status is Status.GRANTED and held.kept == frozenset()
    both = await backend.acquire_batch((a, b), ttl=None, wait=None, policy=FIFO)
    assert both.status is Status.GRANTED and both.fresh
    assert both.locks[0] == held.locks[0]
    assert both.kept == frozenset({a.key})
    again = await backend.acquire_batch((b, a), ttl=None, wait=None, policy=FIFO)
    assert again.status is Status.GRANTED and not again.fresh
    assert again.kept == frozenset({a.key, b.key}) and again.locks == (both.locks[1], both.locks[0])


async def test_without_a_wait_a_held_key_answers_held_naming_the_holder(
    backend: QueueBackend,
) -> None:
    await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)
    outcome = await backend.acquire_or_enqueue(want(2), ttl=None, wait=None, policy=FIFO)
    assert outcome.status is Status.HELD
    assert outcome.holder is not None and outcome.holder.pull.num == 1
    assert await backend.queue(want(2).key) == []


async def test_waiters_queue_up_in_arrival_order_and_say_their_position(
    backend: QueueBackend,
) -> None:
    await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)
    positions = [(await queue_up(backend, want(pull)))[2] for pull in (2, 3, 4)]
    assert positions == [1, 2, 3]
    assert [w.owner[1] for w in await backend.queue(want(1).key, policy=FIFO)] == [2, 3, 4]


async def test_a_release_hands_the_lock_to_the_first_waiter_and_tells_it(
    backend: QueueBackend,
) -> None:
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    first_id, first, _ = await queue_up(backend, want(2))
    _, second, _ = await queue_up(backend, want(3))
    handoff = await backend.release_and_handoff(held.key, owner=("acme/infra", 1), policy=FIFO)
    assert handoff.released == held
    assert [g.waiter.id for g in handoff.granted] == [first_id]
    notice = await asyncio.wait_for(first, 5)
    assert notice.granted and notice.locks[0].pull.num == 2
    assert notice.locks[0].fencing_token > held.fencing_token
    assert not second.done(), "exactly one waiter is woken (no thundering herd)"
    assert (await backend.get(held.key)) == notice.locks[0]
    assert [w.owner[1] for w in await backend.queue(held.key)] == [3]


async def test_with_priorities_a_higher_level_is_served_first_and_fifo_within_a_level(
    backend: QueueBackend,
) -> None:
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None,
                                             policy=PRIORITY)).locks[0]
    for pull, priority in [(2, Priority.NORMAL), (3, Priority.HIGH), (4, Priority.NORMAL),
                           (5, Priority.HIGH), (6, Priority.LOW), (7, Priority.CRITICAL)]:
        await queue_up(backend, want(pull, priority=priority), PRIORITY)
    order = [w.owner[1] for w in await backend.queue(held.key, policy=PRIORITY)]
    assert order == [7, 3, 5, 2, 4, 6]
    assert [w.owner[1] for w in await backend.queue(held.key, policy=FIFO)] == [2, 3, 4, 5, 6, 7]


async def test_with_the_priority_queue_off_waiters_are_served_fifo(backend: QueueBackend) -> None:
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    _, low, _ = await queue_up(backend, want(2, priority=Priority.LOW))
    _, critical, _ = await queue_up(backend, want(3, priority=Priority.CRITICAL))
    await backend.release_and_handoff(held.key, policy=FIFO)
    assert (await asyncio.wait_for(low, 5)).granted
    assert not critical.done()


async def test_aging_lifts_a_waiter_past_later_higher_arrivals(backend: QueueBackend) -> None:
    aging = QueuePolicy(priority=True, starvation_threshold=timedelta(milliseconds=40),
                        max_boost=3)
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=aging)).locks[0]
    await queue_up(backend, want(2, priority=Priority.LOW), aging)
    await asyncio.sleep(0.13)  # three thresholds: low is at the top level now
    await queue_up(backend, want(3, priority=Priority.CRITICAL), aging)
    assert [w.owner[1] for w in await backend.queue(held.key, policy=aging)] == [2, 3]


async def test_a_full_queue_answers_queue_full(backend: QueueBackend) -> None:
    small = QueuePolicy(max_size=2)
    await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=small)
    await queue_up(backend, want(2), small)
    await queue_up(backend, want(3), small)
    outcome = await backend.acquire_or_enqueue(want(4), ttl=None, wait=offer(), policy=small)
    assert outcome.status is Status.QUEUE_FULL
    assert outcome.key == want(4).key
    assert len(await backend.queue(want(4).key)) == 2


async def test_a_changed_policy_holds_from_the_next_call(backend: QueueBackend) -> None:
    # The Redis store keeps the arguments it sends with every call for the policy of the last
    # one: a new policy object is sent from the call that brings it.
    roomy, small = QueuePolicy(max_size=3), QueuePolicy(max_size=2)
    await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=roomy)
    await queue_up(backend, want(2), roomy)
    await queue_up(backend, want(3), roomy)
    full = await backend.acquire_or_enqueue(want(4), ttl=None, wait=offer(), policy=small)
    assert full.status is Status.QUEUE_FULL
    queued = await backend.acquire_or_enqueue(want(4), ttl=None, wait=offer(), policy=roomy)
    assert queued.status is Status.QUEUED and queued.position == 3


async def test_enqueueing_is_idempotent_per_waiter_id(backend: QueueBackend) -> None:
    await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)
    wait = offer()
    first = await backend.acquire_or_enqueue(want(2), ttl=None, wait=wait, policy=FIFO)
    again = await backend.acquire_or_enqueue(want(2), ttl=None, wait=wait, policy=FIFO)
    assert first.status is again.status is Status.QUEUED
    assert again.position == 1
    assert len(await backend.queue(want(2).key)) == 1


async def test_cancel_takes_a_waiter_out_and_tells_it_why(backend: QueueBackend) -> None:
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    waiter_id, future, _ = await queue_up(backend, want(2))
    cancelled = await backend.cancel(held.key, waiter_id)
    assert cancelled.removed and not cancelled.granted
    assert (await asyncio.wait_for(future, 5)).reason is Reason.CANCELLED
    assert await backend.queue(held.key) == []
    handoff = await backend.release_and_handoff(held.key, policy=FIFO)
    assert handoff.granted == ()
    assert await backend.get(held.key) is None


async def test_cancel_after_the_grant_won_the_race_returns_the_granted_lock(
    backend: QueueBackend,
) -> None:
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    waiter_id, _, _ = await queue_up(backend, want(2))
    await backend.release_and_handoff(held.key, policy=FIFO)
    cancelled = await backend.cancel(held.key, waiter_id)
    assert not cancelled.removed
    assert [lock.pull.num for lock in cancelled.granted] == [2]


async def _given_back_over_a_direct_answer(backend: QueueBackend, direct_by: QueueBackend, *,
                                           after_cancel: bool = False) -> None:
    """Pull 2's waiter is granted the key from the queue (on Redis: claimed, unconfirmed); a
    request of pull 2 that does not wait, sent to ``direct_by`` (``backend`` or another
    replica of its store), is answered with that hold (its pull's already); then the waiter's
    caller goes away (``after_cancel``: it went away first, and the answer comes between its
    cancel and the give-back). The locker gives back what the cancel says the grant made
    anew, by owner and token: the hold the direct caller was told it has stays."""
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    waiter_id, future, _ = await queue_up(backend, want(2))
    await backend.release_and_handoff(held.key, owner=("acme/infra", 1), policy=FIFO)
    if after_cancel:
        cancelled = await backend.cancel(held.key, waiter_id, reason=Reason.CANCELLED)
    direct = await direct_by.acquire_or_enqueue(want(2), ttl=None, wait=None, policy=FIFO)
    assert direct.status is Status.GRANTED and direct.locks[0].pull.num == 2, direct
    if not after_cancel:
        cancelled = await backend.cancel(held.key, waiter_id, reason=Reason.CANCELLED)
    backend.grants.forget(waiter_id, future)
    assert [lock.pull.num for lock in cancelled.granted] == [2], cancelled
    await rig_for(backend).locker._give_back(
        Notice(locks=cancelled.granted, fresh=cancelled.fresh, kept=cancelled.kept))
    lock = await backend.get(held.key)
    assert lock is not None and lock.pull.num == 2, (
        f"the give-back of the grant freed the hold the direct caller was told it has: {lock}")
    assert lock.fencing_token == direct.locks[0].fencing_token
    other = await backend.acquire_or_enqueue(want(3), ttl=None, wait=None, policy=FIFO)
    assert other.status is Status.HELD, other
    # The direct caller's own release frees it as ever.
    await backend.release_and_handoff(held.key, owner=("acme/infra", 2), policy=FIFO,
                                      token=direct.locks[0].fencing_token)
    assert await backend.get(held.key) is None


@pytest.mark.parametrize("after_cancel", [False, True],
                         ids=["before-the-cancel", "after-the-cancel"])
async def test_a_grant_given_back_leaves_the_hold_its_pull_was_answered_with_directly(
    queue_backend_factory: BackendFactory, after_cancel: bool,
) -> None:
    # After the cancel: it answered the lock as the grant's own (nobody else was told yet);
    # the answer that came before the give-back keeps it (before, the give-back freed it).
    backend = queue_backend_factory()
    assert isinstance(backend, QueueBackend)
    await _given_back_over_a_direct_answer(backend, backend, after_cancel=after_cancel)


@pytest.mark.parametrize(
    "queue_backend_factory",
    [name for name in QUEUE_BACKEND_KINDS if BACKEND_KINDS[name].persistent], indirect=True,
)
@pytest.mark.parametrize("after_cancel", [False, True],
                         ids=["before-the-cancel", "after-the-cancel"])
async def test_a_grant_given_back_leaves_the_hold_another_replica_answered_directly(
    queue_backend_factory: BackendFactory, after_cancel: bool,
) -> None:
    # The answer counted where every replica reads it (the embedded store: in the file, the
    # same transaction as the answer), not in the replica that gave it.
    backend, other = queue_backend_factory(), queue_backend_factory()
    assert isinstance(backend, QueueBackend) and isinstance(other, QueueBackend)
    await _given_back_over_a_direct_answer(backend, other, after_cancel=after_cancel)


@pytest.mark.parametrize(
    "queue_backend_factory",
    [name for name in QUEUE_BACKEND_KINDS if BACKEND_KINDS[name].persistent], indirect=True,
)
async def test_a_grant_given_back_leaves_the_hold_another_replicas_waiter_was_granted(
    queue_backend_factory: BackendFactory,
) -> None:
    # Pull 2 waits through two replicas: for key a, and for a batch of a and b. The first
    # one's waiter is granted a anew; the batch is granted a as its pull's already with b
    # (served by the replica it waits on, as b is freed there: on the embedded store each
    # process serves its own queues). Both callers go away: the first grant's give-back
    # leaves a to the batch (its caller was told it), and the batch's, the last told of a,
    # gives both back (nothing is left held for nobody).
    backend, other = queue_backend_factory(), queue_backend_factory()
    assert isinstance(backend, QueueBackend) and isinstance(other, QueueBackend)
    a, b = want(1, path="envs/a"), want(1, path="envs/b")
    held = (await backend.acquire_batch([a, b], ttl=None, wait=None, policy=FIFO)).locks
    first_id, first, _ = await queue_up(backend, want(2, path="envs/a"))
    batch = offer()
    second = other.grants.expect(batch.id)
    queued = await other.acquire_batch([want(2, path="envs/a"), want(2, path="envs/b")],
                                       ttl=None, wait=batch, policy=FIFO)
    assert queued.status is Status.QUEUED, queued
    await backend.release_and_handoff(a.key, owner=("acme/infra", 1), policy=FIFO)
    await other.release_and_handoff(b.key, owner=("acme/infra", 1), policy=FIFO)
    granted = await asyncio.wait_for(second, 10)
    assert sorted(lock.key for lock in granted.locks) == sorted([a.key, b.key]), granted
    assert granted.kept == frozenset({a.key}), granted
    # The locker's order for a caller gone: the cancel, then it stops listening (on etcd a
    # notice delivered to a caller that stopped listening counts as heard, and goes).
    gone = await backend.cancel(a.key, first_id, reason=Reason.CANCELLED)
    backend.grants.forget(first_id, first)
    assert [lock.key for lock in gone.granted] == [a.key], gone
    await rig_for(backend).locker._give_back(
        Notice(locks=gone.granted, fresh=gone.fresh, kept=gone.kept))
    lock = await backend.get(a.key)
    assert lock is not None and lock.pull.num == 2, (
        f"the give-back of the first grant freed the hold the batch was granted: {lock}")
    assert lock.fencing_token == next(
        lock.fencing_token for lock in granted.locks if lock.key == a.key)
    last = await other.cancel(a.key, batch.id, reason=Reason.CANCELLED)
    other.grants.forget(batch.id, second)
    assert len(last.granted) == 2, last
    await rig_for(other).locker._give_back(
        Notice(locks=last.granted, fresh=last.fresh, kept=last.kept))
    left = [await backend.get(lock.key) for lock in held]
    assert left == [None, None], f"a hold nobody was told of was left held: {left}"


@pytest.mark.parametrize(
    "queue_backend_factory",
    [name for name in QUEUE_BACKEND_KINDS if BACKEND_KINDS[name].persistent], indirect=True,
)
async def test_a_count_of_answers_the_store_cannot_read_keeps_the_hold_as_told_by_someone(
    queue_backend_factory: BackendFactory,
) -> None:
    # The count of answers given with a grant's hold, written over by hand in the real store
    # (not a count): an answer of someone unknown, never taken back. The give-back of the
    # grant leaves the hold, and a later answer is still given and counted (before, etcd
    # read it as no count at all, and the give-back freed the hold).
    backend = queue_backend_factory()
    assert isinstance(backend, QueueBackend)
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    waiter_id, future, _ = await queue_up(backend, want(2))
    await backend.release_and_handoff(held.key, owner=("acme/infra", 1), policy=FIFO)
    await spoil_count(backend, held.key, (await backend.get(held.key) or held).fencing_token)
    granted = await backend.get(held.key)
    assert granted is not None and granted.pull.num == 2, granted
    cancelled = await backend.cancel(held.key, waiter_id, reason=Reason.CANCELLED)
    backend.grants.forget(waiter_id, future)
    assert [lock.pull.num for lock in cancelled.granted] == [2], cancelled
    assert cancelled.kept == frozenset({held.key}) and not cancelled.fresh, cancelled
    await rig_for(backend).locker._give_back(
        Notice(locks=cancelled.granted, fresh=cancelled.fresh, kept=cancelled.kept))
    lock = await backend.get(held.key)
    assert lock is not None and lock.fencing_token == granted.fencing_token, (
        f"the give-back freed a hold whose count could not be read: {lock}")
    # Written over again: a refresh and a request of the pull asking again are answered
    # (Redis refused to add to such a count, and the call failed).
    await spoil_count(backend, held.key, granted.fencing_token)
    refreshed = await backend.refresh(held.key, ("acme/infra", 2), timedelta(0))
    assert refreshed.fencing_token == granted.fencing_token, refreshed
    await spoil_count(backend, held.key, granted.fencing_token)
    again = await backend.acquire_or_enqueue(want(2), ttl=None, wait=None, policy=FIFO)
    assert again.status is Status.GRANTED and not again.fresh, again
    assert again.locks[0].fencing_token == granted.fencing_token, again
    other = await backend.acquire_or_enqueue(want(3), ttl=None, wait=None, policy=FIFO)
    assert other.status is Status.HELD, other
    # Its pull's own release frees it as ever.
    await backend.release_and_handoff(held.key, owner=("acme/infra", 2), policy=FIFO,
                                      token=granted.fencing_token)
    assert await backend.get(held.key) is None


@pytest.mark.parametrize(
    "queue_backend_factory",
    [name for name in QUEUE_BACKEND_KINDS if BACKEND_KINDS[name].persistent], indirect=True,
)
async def test_a_count_the_store_cannot_read_is_not_taken_back_by_a_known_answer(
    queue_backend_factory: BackendFactory,
) -> None:
    # Pull 2's waiter for a is granted it anew; its batch of a and b is granted a as its
    # pull's already (an answer counted) and b anew. The first waiter's caller goes: a stays
    # (the batch was told it). Then the count is written over by hand (not a count), and the
    # batch's caller goes too: its own answer is taken back, the unknown one the count now
    # stands for is not, so a stays held as on every store; b, the batch's own grant, goes.
    # (Before, Redis read the count as one answer and took the batch's from it: a was freed.)
    backend = queue_backend_factory()
    assert isinstance(backend, QueueBackend)
    a, b = want(1, path="envs/a"), want(1, path="envs/b")
    await backend.acquire_batch([a, b], ttl=None, wait=None, policy=FIFO)
    first_id, first, _ = await queue_up(backend, want(2, path="envs/a"))
    batch = offer()
    second = backend.grants.expect(batch.id)
    queued = await backend.acquire_batch([want(2, path="envs/a"), want(2, path="envs/b")],
                                         ttl=None, wait=batch, policy=FIFO)
    assert queued.status is Status.QUEUED, queued
    await backend.release_and_handoff(a.key, owner=("acme/infra", 1), policy=FIFO)
    await backend.release_and_handoff(b.key, owner=("acme/infra", 1), policy=FIFO)
    granted = await asyncio.wait_for(second, 10)
    assert granted.kept == frozenset({a.key}), granted
    token = next(lock.fencing_token for lock in granted.locks if lock.key == a.key)
    gone = await backend.cancel(a.key, first_id, reason=Reason.CANCELLED)
    backend.grants.forget(first_id, first)
    await rig_for(backend).locker._give_back(
        Notice(locks=gone.granted, fresh=gone.fresh, kept=gone.kept))
    await spoil_count(backend, a.key, token)
    last = await backend.cancel(a.key, batch.id, reason=Reason.CANCELLED)
    backend.grants.forget(batch.id, second)
    await rig_for(backend).locker._give_back(
        Notice(locks=last.granted, fresh=last.fresh, kept=last.kept))
    lock = await backend.get(a.key)
    assert lock is not None and (lock.pull.num, lock.fencing_token) == (2, token), (
        f"a count that could not be read was taken to zero by a known answer: {lock}")
    assert await backend.get(b.key) is None, "the batch's own grant stayed held"
    other = await backend.acquire_or_enqueue(want(3, path="envs/a"), ttl=None, wait=None,
                                             policy=FIFO)
    assert other.status is Status.HELD, other
    await backend.release_and_handoff(a.key, owner=("acme/infra", 2), policy=FIFO, token=token)
    assert await backend.get(a.key) is None


@pytest.mark.parametrize(
    "queue_backend_factory",
    [name for name in QUEUE_BACKEND_KINDS if BACKEND_KINDS[name].persistent], indirect=True,
)
async def test_a_shared_holders_count_the_store_cannot_read_keeps_the_hold_as_told_by_someone(
    queue_backend_factory: BackendFactory,
) -> None:
    # As for an exclusive hold (the count_of_answers test two above), a shared holder's count
    # written over by hand in the real store: an answer of someone unknown, never taken back.
    # The give-back of pull 2's shared grant leaves its hold, and a later answer is still
    # given. Before, Redis read such a count of a shared holder as none, and the give-back
    # freed the hold.
    backend = queue_backend_factory()
    assert isinstance(backend, QueueBackend)
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    shared = want(2)._replace(mode="shared")
    waiter_id, future, _ = await queue_up(backend, shared)
    await backend.release_and_handoff(held.key, owner=("acme/infra", 1), policy=FIFO)
    [granted] = await backend.holders(held.key)
    assert granted.pull.num == 2 and granted.mode == "shared", granted
    await spoil_count(backend, held.key, granted.fencing_token, shared_by=("acme/infra", 2))
    cancelled = await backend.cancel(held.key, waiter_id, reason=Reason.CANCELLED)
    backend.grants.forget(waiter_id, future)
    assert [lock.pull.num for lock in cancelled.granted] == [2], cancelled
    await rig_for(backend).locker._give_back(
        Notice(locks=cancelled.granted, fresh=cancelled.fresh, kept=cancelled.kept))
    left = await backend.holders(held.key)
    assert [(lock.pull.num, lock.fencing_token) for lock in left] == [
        (2, granted.fencing_token)], f"the give-back freed a hold whose count was unread: {left}"
    await spoil_count(backend, held.key, granted.fencing_token, shared_by=("acme/infra", 2))
    again = await backend.acquire_or_enqueue(shared, ttl=None, wait=None, policy=FIFO)
    assert again.status is Status.GRANTED and not again.fresh, again
    assert again.locks[0].fencing_token == granted.fencing_token, again
    other = await backend.acquire_or_enqueue(want(3), ttl=None, wait=None, policy=FIFO)
    assert other.status is Status.HELD, other
    await backend.release_and_handoff(held.key, owner=("acme/infra", 2), policy=FIFO)
    assert await backend.holders(held.key) == []


async def test_two_callers_of_one_waiter_each_hear_its_grant_and_forget_only_their_own(
    backend: QueueBackend,
) -> None:
    # A request with a requestId sent again while the first still runs here: the retry takes
    # the waiter over, and both expect its notice.
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    first = Wait(id=secrets.token_hex(8), timeout=LONG, request_id="job-1", caller="first")
    retry = dataclasses.replace(first, caller="retry")
    heard = [backend.grants.expect(first.id)]
    assert (await backend.acquire_or_enqueue(want(2), ttl=None, wait=first,
                                             policy=FIFO)).status is Status.QUEUED
    heard.append(backend.grants.expect(retry.id))
    assert (await backend.acquire_or_enqueue(want(2), ttl=None, wait=retry,
                                             policy=FIFO)).status is Status.QUEUED
    both = await backend.acquire_or_enqueue(want(2), ttl=None, wait=retry, policy=FIFO)
    assert both.status is Status.QUEUED and len(await backend.queue(held.key)) == 1
    backend.grants.forget(first.id, heard[0])  # the first caller stops waiting
    backend.grants.forget(first.id, heard[0])  # (again: nothing more)
    await backend.release_and_handoff(held.key, policy=FIFO)
    notice = await asyncio.wait_for(heard[1], 10)
    assert [lock.pull.num for lock in notice.locks] == [2]
    assert not heard[0].done(), "a caller that forgot its waiter was told of it"
    # The first caller's withdrawal, late: the grant is the retry's, and stays.
    late = await backend.cancel(held.key, first.id, caller=first.caller)
    assert not late.removed and late.granted == (), late
    lock = await backend.get(held.key)
    assert lock is not None and lock.fencing_token == notice.locks[0].fencing_token, lock
    backend.grants.forget(retry.id, heard[1])


SHORT = timedelta(seconds=1)
"""A deadline the test then waits for the store's clock to pass (``past``) rather than
sleeping a fixed time. The steps before it need not fit in it: a waiter past its deadline is
still listed until a hand-off drops it. Leases, whose end a test's own step must beat, use
``with_leases``."""


async def test_a_waiter_past_its_deadline_is_dropped_not_granted(backend: QueueBackend) -> None:
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    late_id, late, _ = await queue_up(backend, want(2), patience=SHORT)
    _, punctual, _ = await queue_up(backend, want(3))
    deadline = next(w.deadline for w in await backend.queue(held.key) if w.id == late_id)
    await past(backend.now, deadline)
    handoff = await backend.release_and_handoff(held.key, policy=FIFO)
    assert [w.owner[1] for w in handoff.timed_out] == [2]
    assert (await asyncio.wait_for(late, 5)).reason is Reason.TIMEOUT
    assert (await asyncio.wait_for(punctual, 5)).granted


async def test_expire_frees_a_lapsed_lease_and_serves_the_queue(backend: QueueBackend) -> None:
    async def case(lease: timedelta) -> None:
        path = f"lease-{lease // timedelta(milliseconds=1)}"
        short = await backend.acquire_or_enqueue(want(1, path=path), ttl=lease, wait=None,
                                                 policy=FIFO)
        key, expires_at = short.locks[0].key, short.locks[0].expires_at
        assert expires_at is not None
        wait = offer()
        future = backend.grants.expect(wait.id)
        queued = await backend.acquire_or_enqueue(want(2, path=path), ttl=None, wait=wait,
                                                  policy=FIFO)
        if queued.status is Status.GRANTED:  # it came after the lease's end, by the store
            assert queued.locks[0].acquired_at >= expires_at, "granted over a live lease"
            raise Overrun
        assert queued.status is Status.QUEUED, queued
        early = await backend.expire(key, policy=FIFO)
        if early.released is not None:  # only if the lease had ended by then
            assert await backend.now() >= expires_at, "a live lease is left alone"
            raise Overrun
        assert not future.done(), "a live lease is left alone"
        await past(backend.now, expires_at)
        handoff = await backend.expire(key, policy=FIFO)
        assert handoff.released is not None and handoff.released.pull.num == 1
        assert (await asyncio.wait_for(future, 5)).locks[0].pull.num == 2

    await with_leases(case)


async def test_a_refreshed_lease_does_not_expire(backend: QueueBackend) -> None:
    async def case(lease: timedelta) -> None:
        path = f"refresh-{lease // timedelta(milliseconds=1)}"
        lock = (await backend.acquire_or_enqueue(want(1, path=path), ttl=lease, wait=None,
                                                 policy=FIFO)).locks[0]
        assert lock.expires_at is not None
        try:
            refreshed = await backend.refresh(lock.key, ("acme/infra", 1), timedelta(minutes=5))
        except LockNotHeld:  # only if the lease had ended by then
            assert await backend.now() >= lock.expires_at, "refused while the lease was live"
            raise Overrun from None
        await past(backend.now, lock.expires_at)
        assert (await backend.expire(lock.key)).released is None
        assert await backend.get(lock.key) == refreshed
        with pytest.raises(LockNotOwned):
            await backend.refresh(lock.key, ("acme/infra", 2), timedelta(minutes=5))

    await with_leases(case)


async def test_an_expiry_answers_who_holds_the_key_after_it_and_the_stores_clock(
    backend: QueueBackend,
) -> None:
    """The lease timer is set again from what the expiry's own step left: every live holder
    of the key (none: it is free and its queue was served) and the store's clock then. Read
    after the step instead, a lease that ran out in between read as free, and nothing looked
    at the key again."""
    ms = timedelta(milliseconds=1)  # (Redis's clock answers in ms)

    async def case(lease: timedelta) -> None:
        path = f"expiry-{lease // ms}"
        short = await backend.acquire_or_enqueue(want(1, path=path), ttl=lease, wait=None,
                                                 policy=FIFO)
        held = short.locks[0]
        key, end = held.key, held.expires_at
        assert end is not None
        wait = offer()
        future = backend.grants.expect(wait.id)
        queued = await backend.acquire_or_enqueue(want(2, path=path), ttl=timedelta(minutes=5),
                                                  wait=wait, policy=FIFO)
        if queued.status is Status.GRANTED:  # it came after the lease's end, by the store
            assert queued.locks[0].acquired_at >= end, "granted over a live lease"
            raise Overrun
        before = await backend.now()
        on = await backend.expire(key, policy=FIFO)
        if on.released is not None:  # only if the lease had ended by then
            assert await backend.now() >= end, "a live lease is left alone"
            raise Overrun
        assert on.holders == (held,), on.holders
        assert before - ms <= on.now < end, (before, on.now, end)
        await past(backend.now, end)
        off = await backend.expire(key, policy=FIFO)
        assert off.released is not None and off.released.pull.num == 1
        granted = (await asyncio.wait_for(future, 5)).locks
        assert [(h.pull.num, h.fencing_token) for h in off.holders] == [
            (2, granted[0].fencing_token)], off.holders
        assert off.now >= end - ms
        await backend.release(key)
        free = await backend.expire(key, policy=FIFO)
        assert free.released is None and free.holders == (), free

    await with_leases(case)
    shared = [candidate_for(request_for(pull=pull, path="envs/expiry-shared").model_copy(
        update={"mode": "shared"})) for pull in (1, 2)]
    both = [(await backend.acquire_or_enqueue(c, ttl=timedelta(minutes=5), wait=None,
                                              policy=FIFO)).locks[0] for c in shared]
    answer = await backend.expire(shared[0].key, policy=FIFO)
    assert sorted(answer.holders, key=lambda h: h.pull.num) == both, answer.holders


async def test_a_refresh_to_no_lease_keeps_the_lock_until_it_is_released(
    backend: QueueBackend,
) -> None:
    """A ``ttl`` of 0 ends the lease (the Atlantis adapter's hold-over ends so when its pull
    asks again): the lock is kept past its old end, as a lock granted without one, and its
    waiter is served when it is released."""
    async def case(lease: timedelta) -> None:
        path = f"no-lease-{lease // timedelta(milliseconds=1)}"
        lock = (await backend.acquire_or_enqueue(want(1, path=path), ttl=lease, wait=None,
                                                 policy=FIFO)).locks[0]
        assert lock.expires_at is not None
        try:
            kept = await backend.refresh(lock.key, ("acme/infra", 1), timedelta(0))
        except LockNotHeld:  # only if the lease had ended by then
            assert await backend.now() >= lock.expires_at, "refused while the lease was live"
            raise Overrun from None
        assert kept.expires_at is None
        assert kept.fencing_token == lock.fencing_token and kept.pull.num == 1
        _, future, _ = await queue_up(backend, want(2, path=path))
        await past(backend.now, lock.expires_at)
        assert (await backend.expire(lock.key, policy=FIFO)).released is None
        assert await backend.get(lock.key) == kept
        assert not future.done(), "a lock without a lease is not handed on"
        assert await backend.release(lock.key, owner=("acme/infra", 1)) == kept
        assert (await asyncio.wait_for(future, 5)).locks[0].pull.num == 2

    await with_leases(case)


async def test_a_refresh_of_a_free_key_says_not_held_with_the_key(backend: QueueBackend) -> None:
    lock = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    await backend.release(lock.key)
    with pytest.raises(LockNotHeld) as raised:
        await backend.refresh(lock.key, ("acme/infra", 1), timedelta(minutes=5))
    assert raised.value.key == lock.key


async def test_force_unlock_and_release_by_pull_hand_over_too(backend: QueueBackend) -> None:
    a = (await backend.acquire_or_enqueue(want(1, path="a"), ttl=None, wait=None,
                                          policy=FIFO)).locks[0]
    b = (await backend.acquire_or_enqueue(want(1, path="b"), ttl=None, wait=None,
                                          policy=FIFO)).locks[0]
    _, on_a, _ = await queue_up(backend, want(2, path="a"))
    _, on_b, _ = await queue_up(backend, want(3, path="b"))
    forced = await backend.force_unlock(a.key, policy=FIFO)
    assert forced.released == a and (await asyncio.wait_for(on_a, 5)).granted
    released = await backend.release_by_pull("acme/infra", 1, policy=FIFO)
    assert released == [b]
    assert (await asyncio.wait_for(on_b, 5)).locks[0].pull.num == 3


async def test_a_release_by_pull_answers_who_holds_the_keys_it_freed_after_it(
    backend: QueueBackend,
) -> None:
    """The lease timers of the keys a release by pull freed are set from what its own step
    left: each key's holders after its queue was served (the waiter it was handed to, the
    shared holders beside the pull's). Read after the step instead, a lease that ran out in
    between read as free, and no timer was set for it."""
    lease = timedelta(minutes=5)
    await backend.acquire_or_enqueue(want(1, path="freed-a"), ttl=None, wait=None, policy=FIFO)
    wait = offer()
    future = backend.grants.expect(wait.id)
    queued = await backend.acquire_or_enqueue(want(2, path="freed-a"), ttl=lease, wait=wait,
                                              policy=FIFO)
    assert queued.status is Status.QUEUED, queued
    shared = [candidate_for(request_for(pull=pull, path="freed-b").model_copy(
        update={"mode": "shared"})) for pull in (1, 3)]
    beside = [(await backend.acquire_or_enqueue(c, ttl=lease, wait=None, policy=FIFO)).locks[0]
              for c in shared][1]
    done = await backend.release_pull("acme/infra", 1, policy=FIFO)
    assert sorted(lock.key for lock in done.released) == sorted(
        [want(1, path="freed-a").key, shared[0].key])
    granted = (await asyncio.wait_for(future, 5)).locks[0]
    assert done.holders is not None
    assert sorted((h.key, h.pull.num, h.fencing_token) for h in done.holders) == sorted(
        [(granted.key, 2, granted.fencing_token), (beside.key, 3, beside.fencing_token)])


async def test_a_release_by_another_pull_is_refused_and_hands_nothing(
    backend: QueueBackend,
) -> None:
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    _, future, _ = await queue_up(backend, want(2))
    with pytest.raises(LockNotOwned):
        await backend.release_and_handoff(held.key, owner=("acme/infra", 9), policy=FIFO)
    assert not future.done()
    assert await backend.get(held.key) == held


async def test_a_release_of_an_earlier_hold_of_the_pull_frees_nothing_and_hands_nothing(
    backend: QueueBackend,
) -> None:
    # Held to a fencing token: the pull's newer lock of the key is not the hold asked for.
    owner = ("acme/infra", 1)
    first = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    await backend.release_and_handoff(first.key, owner=owner, policy=FIFO)
    held = (await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)).locks[0]
    assert held.fencing_token > first.fencing_token
    _, future, _ = await queue_up(backend, want(2))
    with pytest.raises(LockNotOwned):
        await backend.release_and_handoff(held.key, owner=owner, policy=FIFO,
                                          token=first.fencing_token)
    assert not future.done()
    assert await backend.get(held.key) == held
    # the hold itself, by its token, goes and the key is handed on
    handoff = await backend.release_and_handoff(held.key, owner=owner, policy=FIFO,
                                                token=held.fencing_token)
    assert handoff.released == held
    assert (await asyncio.wait_for(future, 5)).locks[0].pull.num == 2


# --- batches -----------------------------------------------------------------------------------


async def test_a_batch_gets_every_key_or_none(backend: QueueBackend) -> None:
    await backend.acquire_or_enqueue(want(9, path="b"), ttl=None, wait=None, policy=FIFO)
    refused = await backend.acquire_batch([want(1, path="a"), want(1, path="b")], ttl=None,
                                          wait=None, policy=FIFO)
    assert refused.status is Status.HELD and refused.key == want(1, path="b").key
    assert await backend.get(want(1, path="a").key) is None, "nothing taken on a refusal"
    granted = await backend.acquire_batch([want(1, path="a"), want(1, path="c")], ttl=None,
                                          wait=None, policy=FIFO)
    assert granted.status is Status.GRANTED
    assert [lock.key for lock in granted.locks] == [want(1, path=p).key for p in "ac"]


async def test_a_waiting_batch_holds_nothing_and_gets_every_key_at_once(
    backend: QueueBackend,
) -> None:
    a = (await backend.acquire_or_enqueue(want(8, path="a"), ttl=None, wait=None,
                                          policy=FIFO)).locks[0]
    b = (await backend.acquire_or_enqueue(want(9, path="b"), ttl=None, wait=None,
                                          policy=FIFO)).locks[0]
    wait = offer()
    future = backend.grants.expect(wait.id)
    outcome = await backend.acquire_batch([want(1, path="a"), want(1, path="b")], ttl=None,
                                          wait=wait, policy=FIFO)
    assert outcome.status is Status.QUEUED and outcome.key == a.key
    assert [w.id for w in await backend.queue(b.key)] == [wait.id]

    # a is freed while b is still held: the batch keeps its place and takes nothing,
    # and the single waiter behind it on a is served instead.
    _, single, _ = await queue_up(backend, want(2, path="a"))
    await backend.release_and_handoff(a.key, policy=FIFO)
    assert not future.done()
    assert (await asyncio.wait_for(single, 5)).granted
    assert (await backend.get(b.key)) == b

    await backend.release_and_handoff(b.key, policy=FIFO)
    assert not future.done(), "a is held by pull 2 now"
    await backend.release_and_handoff(a.key, policy=FIFO)
    notice = await asyncio.wait_for(future, 5)
    assert sorted(lock.key for lock in notice.locks) == sorted([a.key, b.key])
    assert all(lock.pull.num == 1 for lock in notice.locks)
    assert await backend.queue(a.key) == [] and await backend.queue(b.key) == []


async def test_cancelling_a_batch_waiter_takes_it_out_of_every_queue(
    backend: QueueBackend,
) -> None:
    await backend.acquire_or_enqueue(want(8, path="a"), ttl=None, wait=None, policy=FIFO)
    wait = offer()
    backend.grants.expect(wait.id)
    await backend.acquire_batch([want(1, path="a"), want(1, path="b")], ttl=None, wait=wait,
                                policy=FIFO)
    assert (await backend.cancel(want(1, path="a").key, wait.id)).removed
    assert await backend.queue(want(1, path="a").key) == []
    assert await backend.queue(want(1, path="b").key) == []


# --- the wait-for graph ------------------------------------------------------------------------


async def test_the_wait_graph_names_holders_and_waiters_in_order(backend: QueueBackend) -> None:
    await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)
    await queue_up(backend, want(2))
    await queue_up(backend, want(3))
    graph = await backend.wait_graph(policy=FIFO)
    assert len(graph) == 1
    assert graph[0].key == want(1).key
    assert graph[0].holder == ("acme/infra", 1)
    assert [w.owner for w in graph[0].waiters] == [("acme/infra", 2), ("acme/infra", 3)]


async def test_closing_the_backend_tells_its_waiters(backend: QueueBackend) -> None:
    await backend.acquire_or_enqueue(want(1), ttl=None, wait=None, policy=FIFO)
    _, future, _ = await queue_up(backend, want(2))
    await backend.close()
    assert (await asyncio.wait_for(future, 5)).reason is Reason.UNAVAILABLE


@pytest.mark.parametrize(
    "queue_backend_factory",
    [name for name in QUEUE_BACKEND_KINDS if BACKEND_KINDS[name].persistent], indirect=True,
)
async def test_fencing_tokens_keep_rising_in_a_reopened_store(
    queue_backend_factory: BackendFactory,
) -> None:
    first = queue_backend_factory()
    assert isinstance(first, QueueBackend)
    tokens = []
    for _ in range(3):
        lock = (await first.acquire_or_enqueue(want(1), ttl=None, wait=None,
                                               policy=FIFO)).locks[0]
        tokens.append(lock.fencing_token)
        await first.release(lock.key)
    await first.close()
    second = queue_backend_factory()
    assert isinstance(second, QueueBackend)
    again = (await second.acquire_or_enqueue(want(2), ttl=None, wait=None, policy=FIFO)).locks[0]
    assert tokens == sorted(set(tokens)) and again.fencing_token > tokens[-1]


async def test_fencing_tokens_keep_rising_past_a_memory_store_started_again() -> None:
    # The in-memory store keeps nothing past its process: a service started again on it
    # starts with no locks and no counters. A resource that outlives the service (a state
    # file a stale holder may still write to) has seen the tokens handed out before, so the
    # new store's first token of a key is above them. It restarted at 1.
    first = MemoryBackend("enhanced")
    tokens = []
    for _ in range(3):
        lock = (await first.acquire_or_enqueue(want(1), ttl=None, wait=None,
                                               policy=FIFO)).locks[0]
        tokens.append(lock.fencing_token)
        await first.release(lock.key)
    # The process started again, a moment later (its clock moved on): nothing kept.
    second = MemoryBackend("enhanced", clock=lambda: utcnow() + timedelta(milliseconds=1))
    again = (await second.acquire_or_enqueue(want(2), ttl=None, wait=None, policy=FIFO)).locks[0]
    assert tokens == sorted(set(tokens)) and again.fencing_token > tokens[-1], (tokens, again)


async def test_the_answers_counted_with_a_hold_are_bounded_as_the_grants_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pull answered with its own hold on many keys in turn (a plan run again on each project)
    # is counted per key (``_told``); only a grant still remembered is ever given back through
    # that count, so the count keeps as many keys as grants are remembered, the newest.
    monkeypatch.setattr(base, "_GRANTS_REMEMBERED", 3)
    backend = MemoryBackend("enhanced")
    keys = []
    for n in range(8):
        first = await backend.acquire_or_enqueue(want(1, path=f"envs/e{n}"), ttl=None,
                                                 wait=None, policy=FIFO)
        again = await backend.acquire_or_enqueue(want(1, path=f"envs/e{n}"), ttl=None,
                                                 wait=None, policy=FIFO)
        assert again.status is Status.GRANTED and not again.fresh, again
        keys.append(first.locks[0].key)
    assert list(backend._told) == keys[-3:]
    # Told again, a key is the newest: the one told longest ago goes first.
    await backend.acquire_or_enqueue(want(1, path="envs/e5"), ttl=None, wait=None, policy=FIFO)
    await backend.acquire_or_enqueue(want(1, path="envs/e0"), ttl=None, wait=None, policy=FIFO)
    assert list(backend._told) == [keys[7], keys[5], keys[0]]
