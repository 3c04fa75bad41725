"""An acquire that does not wait, answered ``unavailable`` because Redis took it and did not
answer in time (a frozen Redis: SIGSTOP, its connections open), is given back once Redis
answers: Redis runs the call when it wakes, and without the give-back the pull whose caller was
told it did not get the lock held it for good, without a lease (another pull was answered
``held``). The give-back, keyed by the call's id, releases only the hold that call granted, and
leaves it when a later request was told it holds it; sent before the call runs, it makes the
call write nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import pytest
from tests.conftest import ServiceMaker
from tests.support.locks import candidate_for, request_for
from tests.support.redis_server import RedisServer

from enhanced_locking.backends import redis_replies, redis_scripts, redis_store
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import Handoff, Notice, Outcome, QueuePolicy, Status, Wait
from enhanced_locking.types import (
    BackendUnavailable,
    Candidate,
    Lock,
    LockRequest,
    Project,
    Pull,
    Reason,
)

pytestmark = pytest.mark.redis

A = request_for(path="a", project="a", pull=1)
B = request_for(path="b", project="b", pull=1)
A2 = request_for(path="a", project="a", pull=2)
B2 = request_for(path="b", project="b", pull=2)
C = request_for(path="c", project="c", pull=1)
C2 = request_for(path="c", project="c", pull=2)


@pytest.fixture
def backend(redis_backend: RedisBackend) -> RedisBackend:
    """A backend on ``redis_server`` that has called it once (its connection is open)."""
    return redis_backend


async def _settled(backend: RedisBackend, within: float = 8.0) -> None:
    """Until the backend owes no give-back (Redis answered them all)."""
    end = time.monotonic() + within
    while backend.owed:
        assert time.monotonic() < end, f"{backend.owed} give-backs not answered"
        await asyncio.sleep(0.05)


async def _fail_fast(backend: RedisBackend, *asked: Candidate) -> Outcome:
    return await backend.acquire_batch(asked, ttl=None, wait=None, policy=QueuePolicy())


async def _told_unavailable(redis_server: RedisServer, backend: RedisBackend,
                            *asked: Candidate) -> None:
    """A fail-fast acquire of ``asked`` sent to a frozen Redis, its caller told Redis did not
    answer; then Redis wakes, runs it, and answers its give-back."""
    with redis_server.paused():
        with pytest.raises(BackendUnavailable, match="within the call's 5 s limit"):
            await _fail_fast(backend, *asked)
    await _settled(backend)


async def test_with_redis_frozen_a_fail_fast_acquire_answered_unavailable_does_not_hold_the_key(
    redis_server: RedisServer, backend: RedisBackend,
) -> None:
    # One key, no wait, no rules: the lean function. Before, when Redis woke it granted pull 1
    # (told unavailable) and pull 2 was answered `held`, with no lease to end it.
    await _told_unavailable(redis_server, backend, candidate_for(A))
    assert await backend.get(A.key) is None
    other = await _fail_fast(backend, candidate_for(A2))
    assert other.status is Status.GRANTED, other


async def test_with_redis_frozen_a_fail_fast_batch_is_given_back_but_what_the_pull_held_before(
    redis_server: RedisServer, backend: RedisBackend,
) -> None:
    # A batch goes to the full script ('granted' with lock rows). Key a was the pull's before
    # the batch (its earlier request was told so): it stays; key b, granted by the batch
    # nobody heard, is given back.
    before = await _fail_fast(backend, candidate_for(A))
    assert before.status is Status.GRANTED
    await _told_unavailable(redis_server, backend, candidate_for(A), candidate_for(B))
    held = await backend.get(A.key)
    assert held is not None and held.fencing_token == before.locks[0].fencing_token
    assert await backend.get(B.key) is None


async def _granted_unheard(backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
                           call_id: str, *asked: Candidate) -> None:
    """An acquire under ``call_id`` that Redis ran and whose answer nobody heard (as when
    its caller was told unavailable): the backend owes its give-back, not yet sent."""
    monkeypatch.setattr(redis_store, "_new_call_id", lambda: call_id)
    try:
        await _fail_fast(backend, *asked)
    finally:
        monkeypatch.undo()


def _owed(call_id: str, *asked: Candidate) -> redis_store._GiveBack:
    first = asked[0]
    return redis_store._GiveBack(call_id, first.project.repo_full_name, first.pull.num,
                                 tuple(c.key for c in asked))


async def _answered_again_then_given_back(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch, asked: Candidate,
) -> Outcome:
    """An acquire of ``asked`` nobody heard, the same pull's acquire of it again (answered,
    with the hold the first granted), then the first one's give-back: the second's answer."""
    await _granted_unheard(backend, monkeypatch, "a1" * 8, asked)
    again = await _fail_fast(backend, asked)
    assert again.status is Status.GRANTED and not again.fresh
    await backend._give_back(_owed("a1" * 8, asked))
    return again


async def test_a_give_back_leaves_a_hold_a_later_request_was_told_it_has(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pull 1's retry (here or on another replica) is answered with the lock the unheard call
    # granted: the give-back must not take it from under it. A refresh is answered with it
    # too. Without a later answer, the same give-back releases it.
    again = await _answered_again_then_given_back(backend, monkeypatch, candidate_for(A))
    held = await backend.get(A.key)
    assert held is not None and held.fencing_token == again.locks[0].fencing_token

    await _granted_unheard(backend, monkeypatch, "b2" * 8, candidate_for(B))
    await backend.refresh(B.key, (B.project.repo_full_name, 1), timedelta(minutes=5))
    await backend._give_back(_owed("b2" * 8, candidate_for(B)))
    assert await backend.get(B.key) is not None

    await backend.release(B.key, owner=(B.project.repo_full_name, 1))
    await _granted_unheard(backend, monkeypatch, "c3" * 8, candidate_for(B))
    assert await backend.get(B.key) is not None
    handoff = await backend._give_back(_owed("c3" * 8, candidate_for(B)))
    assert handoff.released is not None and handoff.released.key == B.key
    assert await backend.get(B.key) is None
    # Sent again (its answer was lost): nothing more is released.
    granted = await _fail_fast(backend, candidate_for(B2))
    assert granted.status is Status.GRANTED
    again_back = await backend._give_back(_owed("c3" * 8, candidate_for(B)))
    assert again_back.released is None
    held = await backend.get(B.key)
    assert held is not None and held.pull.num == 2


async def test_a_give_back_that_reaches_redis_before_its_call_makes_the_call_write_nothing(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After a freeze, Redis may run the give-back (sent on a new connection) before the call
    # it gives back: the call, when it runs, answers what the give-back kept and grants
    # nothing. (A full call and a lean one.)
    for call_id, asked in (("d4" * 8, (candidate_for(A),)),
                           ("e5" * 8, (candidate_for(A), candidate_for(B)))):
        handoff = await backend._give_back(_owed(call_id, *asked))
        assert handoff.released is None
        # (it answers the mark the give-back kept, which no acquire's caller can read: its
        # caller was told unavailable long before)
        with pytest.raises(ValueError, match="not enough values to unpack"):
            await _granted_unheard(backend, monkeypatch, call_id, *asked)
        assert await backend.get(A.key) is None
        assert await backend.get(B.key) is None


async def _given_back_to_a_waiter(backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
                                  call_id: str, unheard: Candidate,
                                  waiting: Candidate) -> Handoff:
    """``unheard`` granted by call ``call_id`` nobody heard of, ``waiting`` queued behind it
    (waiter ``w2``), then the call given back: its hand-off, which served ``w2`` (told it is
    granted)."""
    await _granted_unheard(backend, monkeypatch, call_id, unheard)
    heard = backend.grants.expect("w2")
    queued = await backend.acquire_or_enqueue(
        waiting, ttl=None, policy=QueuePolicy(),
        wait=Wait(id="w2", timeout=timedelta(seconds=10)))
    assert queued.status is Status.QUEUED
    handoff = await backend._give_back(_owed(call_id, unheard))
    assert [grant.waiter.id for grant in handoff.granted] == ["w2"]
    notice = await asyncio.wait_for(heard, 5)
    assert notice.reason is None, notice
    return handoff


async def test_a_give_back_hands_the_key_to_its_next_waiter(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pull 2 queued behind the hold nobody heard of: the give-back serves it, as a release.
    await _given_back_to_a_waiter(backend, monkeypatch, "f6" * 8, candidate_for(A),
                                  candidate_for(A2))
    held: Lock | None = await backend.get(A.key)
    assert held is not None and held.pull.num == 2


async def test_with_fallback_legacy_a_frozen_redis_s_late_grant_does_not_outlive_the_release(
    make_service: ServiceMaker, redis_server: RedisServer,
) -> None:
    # The router answered pull 1 from legacy (the fall-back) while Redis was frozen, and pull
    # 1 released it; when Redis woke it ran the acquire it had taken. Before, that late grant
    # held the key on Redis for good (two holds across the stores until the release; then
    # one nobody knew of) and pull 2 was answered `held`.
    service = await make_service(enabled=True, backend="redis", redis_addr=redis_server.addr)
    request = LockRequest(project=Project(repo_full_name="acme/late", path="p"), pull=Pull(num=1))
    await service.router.acquire(request)  # (Redis's connection is open)
    await service.router.release(request.key, owner=("acme/late", 1))
    with redis_server.paused():
        granted = await service.router.acquire(request)
        assert granted.acquired and granted.lock is not None
        assert granted.lock.backend == "legacy"
        await service.router.release(request.key, owner=("acme/late", 1))
    end = time.monotonic() + 10
    other = request.model_copy(update={"pull": Pull(num=2)})
    while not (answer := await service.router.acquire(other)).acquired:
        assert time.monotonic() < end, answer
        await asyncio.sleep(0.2)
    assert answer.lock is not None and answer.lock.pull.num == 2


async def test_a_hold_answered_only_to_requests_told_unavailable_is_given_back(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pull 1 asked again while Redis was frozen (the router fell back to legacy each time):
    # Redis ran both calls when it woke, the second answered with the lock the first granted,
    # and neither answer was heard. Before, the second marked the lock told and both
    # give-backs left it: held for good by a pull told twice it did not get it. In either
    # order of the give-backs it is freed; a call that was heard keeps it.
    for first, second, ids in ((0, 1, ("a7" * 8, "b8" * 8)), (1, 0, ("a8" * 8, "b9" * 8))):
        await _granted_unheard(backend, monkeypatch, ids[0], candidate_for(A))
        await _granted_unheard(backend, monkeypatch, ids[1], candidate_for(A))
        await backend._give_back(_owed(ids[first], candidate_for(A)))
        await backend._give_back(_owed(ids[second], candidate_for(A)))
        assert await backend.get(A.key) is None, (first, second)
    heard = await _fail_fast(backend, candidate_for(B))
    assert heard.status is Status.GRANTED
    await _granted_unheard(backend, monkeypatch, "c9" * 8, candidate_for(B))
    await backend._give_back(_owed("c9" * 8, candidate_for(B)))
    held = await backend.get(B.key)
    assert held is not None and held.fencing_token == heard.locks[0].fencing_token


def _shared(request: LockRequest) -> Candidate:
    return candidate_for(request)._replace(mode="shared")


async def test_with_redis_frozen_a_shared_fail_fast_acquire_answered_unavailable_is_given_back(
    redis_server: RedisServer, backend: RedisBackend,
) -> None:
    # A shared acquire is given back as an exclusive one is: only its own hold goes, the
    # key's other shared holder (pull 2, heard) stays. Before, pull 1 (told unavailable)
    # held the key shared for good, without a lease, and no exclusive request was granted.
    other = await _fail_fast(backend, _shared(A2))
    assert other.status is Status.GRANTED
    await _told_unavailable(redis_server, backend, _shared(A))
    assert [lock.pull.num for lock in await backend.holders(A.key)] == [2]
    await backend.release(A.key, owner=(A.project.repo_full_name, 2))
    taken = await _fail_fast(backend, candidate_for(A2))
    assert taken.status is Status.GRANTED, taken


async def test_a_shared_give_back_leaves_a_hold_a_later_request_was_told_it_has(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As for an exclusive hold: a later shared request of the pull answered with it, or a
    # refresh of it, keeps it; without one the give-back frees it and serves the key's queue.
    await _answered_again_then_given_back(backend, monkeypatch, _shared(A))
    assert [lock.pull.num for lock in await backend.holders(A.key)] == [1]

    await _granted_unheard(backend, monkeypatch, "b2" * 8, _shared(B))
    await backend.refresh(B.key, (B.project.repo_full_name, 1), timedelta(minutes=5))
    await backend._give_back(_owed("b2" * 8, _shared(B)))
    assert [lock.pull.num for lock in await backend.holders(B.key)] == [1]

    handoff = await _given_back_to_a_waiter(backend, monkeypatch, "c3" * 8, _shared(C),
                                            candidate_for(C2))
    assert handoff.released is not None and handoff.released.mode == "shared"
    held = await backend.get(C.key)
    assert held is not None and held.pull.num == 2 and held.mode == "exclusive"


async def _batch_waiting_while_its_pull_takes_a(
    backend: RedisBackend, waiter_id: str,
) -> tuple[asyncio.Future[Notice], Lock]:
    """Pull 1 holds ``b``; pull 2's batch of ``a`` and ``b`` waits for it (waiter
    ``waiter_id``, its caller waiting here: what it is told); meanwhile the pull's other
    request takes ``a`` (its lock)."""
    assert (await _fail_fast(backend, candidate_for(B))).status is Status.GRANTED
    offer = Wait(id=waiter_id, timeout=timedelta(seconds=60))
    told = backend.grants.expect(offer.id)
    queued = await backend.acquire_batch((candidate_for(A2), candidate_for(B2)), ttl=None,
                                         wait=offer, policy=QueuePolicy())
    assert queued.status is Status.QUEUED, queued
    own = await _fail_fast(backend, candidate_for(A2))
    assert own.status is Status.GRANTED and own.kept == frozenset(), own
    return told, own.locks[0]


async def test_a_grant_from_the_queue_says_per_key_what_its_pull_held_and_an_older_one_does_not(
    backend: RedisBackend,
) -> None:
    """Pull 2's batch of ``a`` and ``b`` waits (pull 1 holds ``b``); the pull's other request
    takes ``a``; pull 1's release grants the batch, nobody listening. The waiter's outcome
    records each lock with whether its pull held it already (``a``), and a cancel that finds
    the grant answers so. An outcome an older replica wrote (a rolling upgrade) has no such
    mark: the cancel answers that it does not say (the caller falls back to its look before
    the grant, as before)."""
    policy = QueuePolicy()
    told, own = await _batch_waiting_while_its_pull_takes_a(backend, "batch-kept")
    backend.grants.forget("batch-kept", told)  # its caller left: nobody confirms the grant
    await backend.release_and_handoff(B.key, owner=(B.project.repo_full_name, 1), policy=policy)
    client, name = backend.connection.client, backend.keys.outcome("batch-kept")
    text = await client.hget(name, "locks")
    assert text is not None, "no outcome record of the grant"
    recorded = json.loads(text)
    assert [(key, held) for key, _, held in recorded] == [(A2.key, 1), (B2.key, 0)]
    older = json.dumps([[key, token] for key, token, _ in recorded])
    cancelled = await backend.cancel(A2.key, "batch-kept", policy=policy)
    assert cancelled.fresh and cancelled.kept == frozenset({A2.key}), cancelled
    assert cancelled.granted[0] == own
    # The same grant as an older replica recorded it, cancelled again.
    await client.hset(name, "locks", older)
    again = await backend.cancel(A2.key, "batch-kept", policy=policy)
    assert again.granted == cancelled.granted and again.fresh and again.kept is None, again


async def test_a_batch_whose_claim_lapsed_before_its_confirmation_leaves_its_pulls_own_hold(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's batch of ``a`` and ``b`` waits (pull 1 holds ``b``); the pull's other request
    takes ``a``; pull 1's release grants the batch, and its confirmation comes after the
    claim on ``b`` lapsed (the replica cut off for longer). The batch is all or nothing: its
    caller is told ``unavailable`` and what is left of the grant goes back, which is not the
    pull's hold of ``a`` (answered unchanged). Before, CONFIRM answered ``a`` among the locks
    to give back and the replica released it by owner."""
    told, own = await _batch_waiting_while_its_pull_takes_a(backend, "batch-lapsed")
    confirm = backend._confirm

    async def late(waiter_id: str) -> redis_replies.Confirm:
        await asyncio.sleep(redis_scripts.CLAIM_MS / 1000 + 1)  # past the claim
        return await confirm(waiter_id)

    monkeypatch.setattr(backend, "_confirm", late)
    await backend.release_and_handoff(B.key, owner=(B.project.repo_full_name, 1),
                                      policy=QueuePolicy())
    notice = await asyncio.wait_for(told, 60)
    assert not notice.granted and notice.reason is Reason.UNAVAILABLE, notice
    assert await backend.get(A2.key) == own, "the pull's hold of a was given back"
    assert await backend.get(B2.key) is None


async def test_a_give_back_of_an_upgrade_leaves_the_pull_holding_the_key(
    backend: RedisBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pull 1 holds a shared; its exclusive acquire, nobody heard of, upgraded that hold in
    # place (a new token). Its give-back leaves the upgrade: releasing it by its token would
    # free the shared hold the pull had before the call. Before, the key was left free.
    shared = await _fail_fast(backend, _shared(A))
    assert shared.status is Status.GRANTED
    await _granted_unheard(backend, monkeypatch, "d4" * 8, candidate_for(A))
    upgraded = await backend.get(A.key)
    assert upgraded is not None and upgraded.mode == "exclusive"
    assert upgraded.fencing_token > shared.locks[0].fencing_token
    handoff = await backend._give_back(_owed("d4" * 8, candidate_for(A)))
    assert handoff.released is None, handoff
    assert [(lock.pull.num, lock.fencing_token) for lock in await backend.holders(A.key)] == [
        (1, upgraded.fencing_token)]
    other = await _fail_fast(backend, _shared(A2))
    assert other.status is Status.HELD, other
