"""A grant from the queue is *claimed* until its waiter's replica confirms it: unconfirmed, it
lapses after the claim window (``CLAIM_MS``) and the key moves on. A pull's second request
granted while the pull's first one still awaits its confirmation is answered with that lock
unchanged (the pull holds it already), its claim the first waiter's. Whether that claim ends
depends on whether a caller of the second request hears the grant: heard (its confirmation, a
retry taking the grant over, a cancel whose caller is then answered with it: the wait's end, a
deadlock refusal; or the answer itself, to a request that does not wait), the pull relies on
the lock and it must not lapse under it; given back
unheard (the caller went away), the lock is not the second request's and the claim stays the
first waiter's, to be confirmed or to lapse. Against a real redis-server; the first waiter's
replica never confirms (nobody waits for it here), as when that replica died after its last
heartbeat.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from tests.support.locks import candidate_for, request_for
from tests.support.queues import rig_for

from enhanced_locking.backends import redis_scripts
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.waiting import Notice, Outcome, QueuePolicy, Status, Wait
from enhanced_locking.types import Candidate, Reason

pytestmark = pytest.mark.redis

HOLDER, PULL, OTHER = 1, 2, 3


def _asked(tag: str, name: str, pull: int) -> Candidate:
    return candidate_for(request_for(path=f"{tag}-{name}", project=f"{tag}-{name}", pull=pull))


async def _fail_fast(backend: RedisBackend, *asked: Candidate) -> Outcome:
    return await backend.acquire_batch(asked, ttl=None, wait=None, policy=QueuePolicy())


async def _queued(backend: RedisBackend, waiter_id: str, *asked: Candidate) -> None:
    outcome = await backend.acquire_batch(
        asked, ttl=None, wait=Wait(id=waiter_id, timeout=timedelta(seconds=120)),
        policy=QueuePolicy())
    assert outcome.status is Status.QUEUED, outcome


async def _granted_over_a_claim(
    backend: RedisBackend, tag: str, *, listening: bool,
) -> tuple[str, asyncio.Future[Notice] | None]:
    """Pull 1 holds ``a`` and ``b``. Pull 2's request ``first`` waits for ``a`` (nobody here
    waits for its grant: its claim is never confirmed), its batch ``second`` for ``b`` and
    ``a``. Pull 1 releases ``a`` (granted to ``first``, claimed), then ``b``: ``second`` is
    granted ``b`` and, unchanged, the pull's claimed lock of ``a``. The waiter id of
    ``second`` and, when its caller is ``listening``, what it is told."""
    a, b = _asked(tag, "a", PULL), _asked(tag, "b", PULL)
    holder = (a.project.repo_full_name, HOLDER)
    assert (await _fail_fast(backend, _asked(tag, "a", HOLDER), _asked(tag, "b", HOLDER))
            ).status is Status.GRANTED
    first, second = f"{tag}-first", f"{tag}-second"
    await _queued(backend, first, a)
    told = backend.grants.expect(second) if listening else None
    await _queued(backend, second, b, a)
    await backend.release_and_handoff(a.key, owner=holder, policy=QueuePolicy())
    claimed = await backend.get(a.key)
    assert claimed is not None and claimed.pull.num == PULL, claimed
    assert await backend.connection.client.hget(backend.keys.lock(a.key), "claim") == first
    handoff = await backend.release_and_handoff(b.key, owner=holder, policy=QueuePolicy())
    assert [grant.waiter.id for grant in handoff.granted] == [second], handoff
    # The hand-off does not say which keys the pull held already (nothing gives back from
    # it: redis_replies.GrantRow); the waiter's own answer does (below).
    assert handoff.granted[0].kept is None and handoff.granted[0].fresh
    return second, told


async def test_a_claim_of_another_waiter_ends_only_when_a_caller_hears_the_grant(
    redis_backend: RedisBackend,
) -> None:
    backend = redis_backend
    policy = QueuePolicy()
    # Heard: the second request's caller waits here and its replica confirms the grant.
    _, told = await _granted_over_a_claim(backend, "confirmed", listening=True)
    assert told is not None
    notice = await asyncio.wait_for(told, 30)
    assert notice.granted and notice.kept == frozenset({_asked("confirmed", "a", PULL).key}), (
        notice)
    # Heard: a retry of the second request takes its grant over.
    second, _ = await _granted_over_a_claim(backend, "retried", listening=False)
    retry = await backend.acquire_batch(
        (_asked("retried", "b", PULL), _asked("retried", "a", PULL)), ttl=None,
        wait=Wait(id=second, timeout=timedelta(seconds=120)), policy=policy)
    assert retry.status is Status.GRANTED, retry
    assert retry.kept == frozenset({_asked("retried", "a", PULL).key}), retry
    # Heard: the second request's wait ended and its cancel finds the grant, which its caller
    # is answered with.
    second, _ = await _granted_over_a_claim(backend, "timed-out", listening=False)
    ended = await backend.cancel(_asked("timed-out", "b", PULL).key, second,
                                 reason=Reason.TIMEOUT, policy=policy)
    assert ended.granted and ended.kept == frozenset({_asked("timed-out", "a", PULL).key})
    # Heard: a request of the pull that does not wait is answered with the claimed lock.
    answered_a = _asked("answered", "a", PULL)
    assert (await _fail_fast(backend, _asked("answered", "a", HOLDER))).status is Status.GRANTED
    await _queued(backend, "answered-first", answered_a)
    await backend.release_and_handoff(answered_a.key, owner=(answered_a.project.repo_full_name,
                                                             HOLDER), policy=policy)
    again = await _fail_fast(backend, answered_a)
    assert again.status is Status.GRANTED and again.kept == frozenset({answered_a.key}), again
    # Given back unheard: the second request's caller went away; its cancel finds the grant,
    # and the caller gives back what the grant made (``b``), not the pull's hold of ``a``.
    second, _ = await _granted_over_a_claim(backend, "gone", listening=False)
    gone_a = _asked("gone", "a", PULL).key
    left = await backend.cancel(_asked("gone", "b", PULL).key, second,
                                reason=Reason.CANCELLED, policy=policy)
    assert left.granted and left.kept == frozenset({gone_a}), left
    assert await backend.connection.client.hget(backend.keys.lock(gone_a), "claim") == (
        "gone-first"), "the cancel of a grant given back ended another waiter's claim"
    await backend.release_and_handoff(_asked("gone", "b", PULL).key,
                                      owner=(left.granted[1].project.repo_full_name, PULL),
                                      token=left.granted[1].fencing_token, policy=policy)

    # Past the claim window (Redis's clock runs as this one from the grants on).
    await asyncio.sleep(redis_scripts.CLAIM_MS / 1000 + 1.5)
    for tag in ("confirmed", "retried", "timed-out", "answered"):
        other = await _fail_fast(backend, _asked(tag, "a", OTHER))
        assert other.status is Status.HELD and other.holder is not None, (
            f"{tag}: the pull's lock of a, which a caller was answered with, lapsed with the "
            f"first waiter's claim and went to another pull: {other}")
        assert other.holder.pull.num == PULL
    other = await _fail_fast(backend, _asked("gone", "a", OTHER))
    assert other.status is Status.GRANTED, (
        f"a claim nobody confirmed, on a lock nobody was answered with, never lapsed: {other}")


async def test_a_lock_another_waiter_of_the_pull_was_granted_goes_with_the_last_give_back(
    redis_backend: RedisBackend,
) -> None:
    # ``first`` was granted ``a`` (claimed), ``second`` was granted ``b`` and, unchanged, the
    # pull's ``a``. Neither caller has heard its grant; each goes away in turn and the locker
    # gives back what its cancel says the grant made anew. ``first``'s give-back leaves ``a``
    # (``second``'s grant counts in ``told``: it may yet be heard); ``second``'s, the last
    # that may be heard, takes ``a`` too: nothing stays held for nobody.
    backend = redis_backend
    policy = QueuePolicy()
    give_back = rig_for(backend).locker._give_back
    second, _ = await _granted_over_a_claim(backend, "both-gone", listening=False)
    a, b = _asked("both-gone", "a", PULL).key, _asked("both-gone", "b", PULL).key
    first = await backend.cancel(a, "both-gone-first", reason=Reason.CANCELLED, policy=policy)
    assert first.granted and first.kept == frozenset({a}) and not first.fresh, first
    await give_back(Notice(locks=first.granted, fresh=first.fresh, kept=first.kept))
    held = await backend.get(a)
    assert held is not None and held.pull.num == PULL, (
        f"the first grant's give-back freed the lock the second grant holds: {held}")
    left = await backend.cancel(b, second, reason=Reason.CANCELLED, policy=policy)
    assert left.granted and left.kept == frozenset() and left.fresh, left
    again = await backend.cancel(b, second, reason=Reason.CANCELLED, policy=policy)
    assert again.kept == frozenset(), f"a second cancel answered otherwise: {again}"
    await give_back(Notice(locks=left.granted, fresh=left.fresh, kept=left.kept))
    for key in (a, b):
        assert await backend.get(key) is None, f"{key} stayed held for nobody"


async def test_a_confirmation_after_the_other_grant_was_given_back_keeps_the_lock(
    redis_backend: RedisBackend,
) -> None:
    # As above, but ``second``'s replica confirms after ``first`` left: it is granted, ``a``
    # among the keys its pull held already, and ``a`` stays its pull's.
    second, _ = await _granted_over_a_claim(redis_backend, "then-heard", listening=False)
    a = _asked("then-heard", "a", PULL).key
    first = await redis_backend.cancel(a, "then-heard-first", reason=Reason.CANCELLED,
                                       policy=QueuePolicy())
    assert first.kept == frozenset({a}), first
    await rig_for(redis_backend).locker._give_back(
        Notice(locks=first.granted, fresh=first.fresh, kept=first.kept))
    confirmed = await redis_backend._confirm(second)  # (its replica's CONFIRM)
    assert confirmed.granted and confirmed.kept_keys == frozenset({a}), confirmed
    other = await _fail_fast(redis_backend, _asked("then-heard", "a", OTHER))
    assert other.status is Status.HELD and other.holder is not None, other
    assert other.holder.pull.num == PULL


async def test_an_answer_between_a_cancel_and_its_give_back_keeps_the_lock(
    redis_backend: RedisBackend,
) -> None:
    # ``first`` of the pull was granted ``a`` from the queue; its caller went away and its
    # cancel answers ``a`` as the grant's own (nobody else was told). Before the locker's
    # give-back reaches Redis, a request of the pull that does not wait is answered with
    # ``a`` (held already): the give-back must leave it.
    backend = redis_backend
    policy = QueuePolicy()
    a = _asked("between", "a", PULL)
    assert (await _fail_fast(backend, _asked("between", "a", HOLDER))).status is Status.GRANTED
    await _queued(backend, "between-first", a)
    await backend.release_and_handoff(a.key, owner=(a.project.repo_full_name, HOLDER),
                                      policy=policy)
    left = await backend.cancel(a.key, "between-first", reason=Reason.CANCELLED, policy=policy)
    assert left.granted and left.fresh and not left.kept, left
    again = await _fail_fast(backend, a)
    assert again.status is Status.GRANTED and again.kept == frozenset({a.key}), again
    await rig_for(backend).locker._give_back(
        Notice(locks=left.granted, fresh=left.fresh, kept=left.kept))
    held = await backend.get(a.key)
    assert held is not None and held.pull.num == PULL, (
        f"the give-back freed the lock a request of its pull was answered with: {held}")
    assert held.fencing_token == again.locks[0].fencing_token
