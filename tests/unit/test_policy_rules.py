"""Policy rules and lock modes on every queue backend: one behaviour table.

Shared and exclusive modes, superseded requests, a retried request keeping its place, freezes,
concurrency limits, priority rules and what a waiter can see, each run against the memory
store, the embedded SQLite file and a real Redis (the grant step of each decides with the same
rules: ``enhanced_locking.policies.verdict``, mirrored by the Redis scripts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from tests.support.leases import Overrun, until, with_leases
from tests.support.locks import request_for
from tests.support.queues import LockerRig, rig_for, settle

from enhanced_locking import policies
from enhanced_locking.backends.memory import MemoryBackend
from enhanced_locking.locking import visibility
from enhanced_locking.policies import (
    ConcurrencyLimit,
    Freeze,
    KeyPattern,
    PolicyRules,
    PriorityRule,
)
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    BatchResult,
    LockNotOwned,
    LockRequest,
    Priority,
    Pull,
    Reason,
    utcnow,
)

WAIT = timedelta(seconds=30)
S = timedelta(seconds=1)


def ask(pull: int, *, path: str = "envs/prod", mode: str = "exclusive", wait: Any = None,
        head: str = "", request_id: str | None = None, repo: str = "acme/infra",
        priority: Priority = Priority.NORMAL, command: str | None = None) -> LockRequest:
    request = request_for(pull=pull, path=path, repo=repo, priority=priority)
    return request.model_copy(update={
        "mode": mode, "wait": wait, "request_id": request_id, "command": command,
        "pull": request.pull.model_copy(update={"head_commit": head})})


async def rules(rig: LockerRig, value: PolicyRules) -> None:
    """Apply new rules the way a config change does (every queue is served again)."""
    rig.set(policies=value)
    rig.locker.rules.changed(value)
    await settle()
    await rig.locker.wake()
    await settle()


async def queued(rig: LockerRig, request: LockRequest) -> asyncio.Task[AcquireResult]:
    task = rig.spawn(rig.locker.acquire(request))
    await settle()
    assert not task.done(), task.result()
    return task


# --- shared and exclusive ---------------------------------------------------------------------
async def test_shared_holders_coexist_and_an_exclusive_request_waits_for_all_of_them(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    first = await rig.locker.acquire(ask(1, mode="shared"))
    second = await rig.locker.acquire(ask(2, mode="shared"))
    assert first.acquired and second.acquired
    assert first.lock is not None and second.lock is not None
    assert second.lock.fencing_token > first.lock.fencing_token
    assert {lock.pull.num for lock in await rig.locker.holders(first.lock_key)} == {1, 2}
    refused = await rig.locker.acquire(ask(3))
    assert refused.reason is Reason.HELD
    writer = await queued(rig, ask(3, wait=WAIT))
    await rig.locker.release(first.lock_key, owner=("acme/infra", 1))
    await settle()
    assert not writer.done()
    await rig.locker.release(first.lock_key, owner=("acme/infra", 2))
    await settle()
    granted = await writer
    assert granted.acquired and granted.lock is not None
    assert granted.lock.mode == "exclusive"
    assert granted.lock.fencing_token > second.lock.fencing_token


async def test_a_waiting_exclusive_request_stops_new_shared_grants(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    await rig.locker.acquire(ask(1, mode="shared"))
    writer = await queued(rig, ask(2, wait=WAIT))
    reader = await queued(rig, ask(3, mode="shared", wait=WAIT))  # behind the writer
    late = await queued(rig, ask(4, mode="shared", wait=WAIT))
    assert (await rig.locker.acquire(ask(5, mode="shared"))).reason is Reason.HELD
    key = ask(1).key
    await rig.locker.release(key, owner=("acme/infra", 1))
    await settle()
    assert (await writer).acquired
    assert not reader.done() and not late.done()
    await rig.locker.release(key, owner=("acme/infra", 2))
    await settle()
    both = [await reader, await late]
    assert all(r.acquired for r in both)  # the readers behind the writer go together
    assert {lock.pull.num for lock in await rig.locker.holders(key)} == {3, 4}


@pytest.mark.parametrize("leaves", ["goes-away", "times-out"])
async def test_readers_behind_a_writer_that_leaves_join_the_shared_holders_at_once(
        rigs: Callable[..., LockerRig], leaves: str) -> None:
    """Pull 1 holds a key shared, pull 2 waits for it exclusively and pulls 3 and 4 shared
    behind it. When pull 2 leaves the queue (its caller goes away, or its wait runs out) the
    readers have nobody to wait for but a shared holder: they join it then. Before, leaving
    served nobody, and they waited for pull 1 to let go (or for their own waits to end)."""
    rig = rigs()
    key = ask(1).key
    assert (await rig.locker.acquire(ask(1, mode="shared"))).acquired
    writer = await queued(rig, ask(2, wait=2 * S if leaves == "times-out" else WAIT))
    readers = [await queued(rig, ask(pull, mode="shared", wait=WAIT)) for pull in (3, 4)]
    if leaves == "goes-away":
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer
    else:
        assert (await writer).reason is Reason.TIMEOUT
    await settle()
    for reader in readers:
        answer = await asyncio.wait_for(reader, 5)
        assert answer.acquired and answer.lock is not None and answer.lock.mode == "shared"
    assert {lock.pull.num for lock in await rig.locker.holders(key)} == {1, 3, 4}
    assert await rig.locker.queue(key) == []


async def test_a_shared_request_served_before_every_waiting_writer_joins_the_readers_at_once(
        rigs: Callable[..., LockerRig]) -> None:
    """With the priority queue on, pull 1 holds a key shared and pull 2 waits for it
    exclusively at ``low``: a ``critical`` shared request of pull 3 is served before pull 2,
    so it joins pull 1 at once; a ``low`` one of pull 4 comes after pull 2 and waits. Before,
    pull 3 was queued first in line, held back by pull 1 alone until a step walked the
    queue (pull 1's release, say: never, if pull 1 waited for something of pull 3's)."""
    rig = rigs(priority_queue=True)
    key = ask(1).key
    assert (await rig.locker.acquire(ask(1, mode="shared"))).acquired
    writer = await queued(rig, ask(2, wait=WAIT, priority=Priority.LOW))
    first = await asyncio.wait_for(rig.locker.acquire(
        ask(3, mode="shared", wait=WAIT, priority=Priority.CRITICAL)), 5)
    assert first.acquired and first.lock is not None and first.lock.mode == "shared", first
    late = await queued(rig, ask(4, mode="shared", wait=WAIT, priority=Priority.LOW))
    assert {lock.pull.num for lock in await rig.locker.holders(key)} == {1, 3}
    assert [w.owner[1] for w in await rig.locker.queue(key)] == [2, 4]
    assert not writer.done() and not late.done()


async def test_shared_waiters_served_together_each_get_a_new_higher_token(
        rigs: Callable[..., LockerRig]) -> None:
    """One release hands a key to several shared waiters in one step: each gets its own
    token, above the released one, and the next grant is above all of them."""
    rig = rigs()
    writer = await rig.locker.acquire(ask(1))
    assert writer.lock is not None
    readers = [await queued(rig, ask(pull, mode="shared", wait=WAIT)) for pull in (2, 3, 4)]
    await rig.locker.release(writer.lock.key, owner=("acme/infra", 1))
    await settle()
    tokens = []
    for reader in readers:
        answer = await reader
        assert answer.acquired and answer.lock is not None
        tokens.append(answer.lock.fencing_token)
    assert len(set(tokens)) == 3 and min(tokens) > writer.lock.fencing_token, tokens
    assert sorted(h.fencing_token for h in await rig.locker.holders(writer.lock.key)) == \
        sorted(tokens)
    late = await rig.locker.acquire(ask(5, mode="shared"))
    assert late.lock is not None and late.lock.fencing_token > max(tokens)


async def test_the_only_shared_holder_upgrades_to_exclusive_with_a_new_token(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    shared = await rig.locker.acquire(ask(1, mode="shared"))
    again = await rig.locker.acquire(ask(1, mode="shared"))
    assert again.lock == shared.lock  # the same pull asking again: unchanged
    upgraded = await rig.locker.acquire(ask(1))
    assert upgraded.lock is not None and shared.lock is not None
    assert upgraded.lock.mode == "exclusive"
    assert upgraded.lock.fencing_token > shared.lock.fencing_token
    assert (await rig.locker.acquire(ask(2, mode="shared"))).reason is Reason.HELD


async def test_a_batch_release_frees_a_pulls_shared_hold_beside_another(
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 2 holds ``a`` shared, then pull 1 too, and pull 1 holds ``b``: pull 1's release
    of both keys at once frees its two holds and leaves pull 2's. Before, the release looked
    only at each key's first holder (pull 2 on ``a``) and refused the whole call as not
    pull 1's. A key pull 1 holds nothing of still refuses it, before anything is freed."""
    rig = rigs()
    a, b, c = (ask(1, path=p).key for p in ("envs/a", "envs/b", "envs/c"))
    assert (await rig.locker.acquire(ask(2, path="envs/a", mode="shared"))).acquired
    assert (await rig.locker.acquire(ask(1, path="envs/a", mode="shared"))).acquired
    assert (await rig.locker.acquire(ask(1, path="envs/b"))).acquired
    assert (await rig.locker.acquire(ask(3, path="envs/c", mode="shared"))).acquired
    with pytest.raises(LockNotOwned):
        await rig.locker.release_batch([a, b, c], owner=("acme/infra", 1))
    assert len(await rig.locker.holders(a)) == 2 and await rig.locker.get(b) is not None
    released = await rig.locker.release_batch([a, b], owner=("acme/infra", 1))
    assert sorted((lock.key, lock.pull.num) for lock in released) == [(a, 1), (b, 1)]
    assert [lock.pull.num for lock in await rig.locker.holders(a)] == [2]
    assert await rig.locker.get(b) is None


async def test_a_force_unlock_frees_every_shared_holder(rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    await rig.locker.acquire(ask(1, mode="shared"))
    await rig.locker.acquire(ask(2, mode="shared"))
    key = ask(1).key
    await rig.locker.force_unlock(key)
    assert await rig.locker.holders(key) == []
    assert (await rig.locker.acquire(ask(3))).acquired


@pytest.mark.parametrize("by_pull", [False, True], ids=["release", "by-pull"])
async def test_a_shared_lease_still_runs_out_after_another_shared_holder_left(
        rigs: Callable[..., LockerRig], by_pull: bool) -> None:
    """Pulls 1 and 4 (no lease) and 2 (a short lease) hold a key shared, pull 3 waits for it
    exclusively; pull 1 leaves (its release, or its pull's) before pull 2's lease ends. That
    lease still ends on time (``expired``), and once pull 4 goes too the writer has the key.
    Before, pull 1's release put away the key's lease timer (set for pull 2's lease), and
    the release of its pull set it again only for the key's first holder (pull 4, no lease):
    nothing looked at the key when the lease ended. Without pull 4 the writer then waited on
    a free key until its own wait ran out (``timeout``, no holder)."""
    async def case(lease: timedelta) -> None:
        rig = rigs()
        path = f"envs/shared-lease-{lease // timedelta(milliseconds=1)}"
        reader = ask(2, path=path, mode="shared").model_copy(update={"ttl": lease})
        for pull in (1, 4):
            assert (await rig.locker.acquire(ask(pull, path=path, mode="shared"))).acquired
        leased = await rig.locker.acquire(reader)
        assert leased.lock is not None and leased.lock.expires_at is not None
        writer = await queued(rig, ask(3, path=path, wait=lease + 20 * S))
        if by_pull:
            await rig.locker.release_by_pull("acme/infra", 1)
        else:
            await rig.locker.release(reader.key, owner=("acme/infra", 1))
        if await rig.locker.backend.now() >= leased.lock.expires_at:
            raise Overrun  # the release itself may have found the lease over
        assert await until(lambda: "expired" in rig.types(),
                           within=lease.total_seconds() + 10), "the lease never ran out"
        assert {h.pull.num for h in await rig.locker.holders(reader.key)} == {4}
        assert not writer.done()
        await rig.locker.release(reader.key, owner=("acme/infra", 4))
        answer = await asyncio.wait_for(writer, 15)
        assert answer.acquired and answer.lock is not None, answer
        assert answer.lock.pull.num == 3

    await with_leases(case)


# --- superseded and retried requests -----------------------------------------------------------
async def test_a_newer_head_commit_supersedes_the_queued_request_of_the_same_pull(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    await rig.locker.acquire(ask(1))
    old = await queued(rig, ask(2, wait=WAIT, head="aaa111"))
    other = await queued(rig, ask(3, wait=WAIT, head="ccc333"))
    new = await queued(rig, ask(2, wait=WAIT, head="bbb222"))
    stale = await old
    assert stale.reason is Reason.SUPERSEDED
    assert "superseded" in rig.types()
    waiters = await rig.locker.queue(ask(1).key)
    assert [(w.owner[1], w.head_commit) for w in waiters] == [(3, "ccc333"), (2, "bbb222")]
    await rig.locker.release(ask(1).key)
    await settle()
    assert (await other).acquired
    assert not new.done()


async def test_a_newer_head_commit_refused_for_a_full_queue_leaves_the_older_request_queued(
        rigs: Callable[..., LockerRig]) -> None:
    """A newer request of the pull that cannot queue (another of its keys has a full queue)
    is refused ``queue_full`` and pushes nothing out: the older request keeps its place and
    is granted in turn. Before, the older one was answered ``superseded`` first, and the
    pull was left with no request queued at all."""
    rig = rigs(max_queue_size=1)
    for path in ("envs/prod", "envs/dev"):
        assert (await rig.locker.acquire(ask(1, path=path))).acquired
    old = await queued(rig, ask(2, wait=WAIT, head="aaa111"))
    await queued(rig, ask(3, path="envs/dev", wait=WAIT))  # envs/dev's queue is full
    refused = await rig.locker.acquire_batch(BatchLockRequest(
        locks=[BatchItem(project=ask(2, path=p).project) for p in ("envs/prod", "envs/dev")],
        pull=Pull(num=2, head_commit="bbb222"), wait=WAIT))
    assert refused.reason is Reason.QUEUE_FULL
    await settle()
    assert not old.done(), old.result()
    assert "superseded" not in rig.types()
    assert [(w.owner[1], w.head_commit) for w in await rig.locker.queue(ask(1).key)] == [
        (2, "aaa111")]
    await rig.locker.release(ask(1).key)
    granted = await asyncio.wait_for(old, 10)
    assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 2


async def test_a_newer_head_commit_that_does_not_wait_leaves_the_older_request_queued(
        rigs: Callable[..., LockerRig]) -> None:
    """A request supersedes its pull's older ones by taking their place in the queue: one
    that does not wait is refused at once and the older one keeps waiting (the page said any
    newer request superseded it)."""
    rig = rigs()
    await rig.locker.acquire(ask(1))
    old = await queued(rig, ask(2, wait=WAIT, head="aaa111"))
    refused = await rig.locker.acquire(ask(2, head="bbb222"))
    assert refused.reason is Reason.HELD
    await settle()
    assert not old.done(), old.result()
    assert "superseded" not in rig.types()
    await rig.locker.release(ask(1).key)
    granted = await asyncio.wait_for(old, 10)
    assert granted.acquired and granted.lock is not None and granted.lock.pull.num == 2


async def test_a_request_retried_after_its_connection_broke_keeps_its_place(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    key = ask(1).key
    await rig.locker.acquire(ask(1))
    first = await queued(rig, ask(2, wait=WAIT, request_id="plan-2"))
    await queued(rig, ask(3, wait=WAIT))
    before = (await rig.locker.queue(key))[0]
    first.cancel()  # the client's connection broke
    await settle()
    retry = await queued(rig, ask(2, wait=WAIT, request_id="plan-2"))
    after = await rig.locker.queue(key)
    assert [w.owner[1] for w in after] == [2, 3]
    assert after[0].id == before.id and after[0].enqueued_at == before.enqueued_at
    await rig.locker.release(key)
    await settle()
    assert (await retry).acquired


async def test_one_request_id_on_two_keys_is_two_requests(
        rigs: Callable[..., LockerRig]) -> None:
    """A client that names two requests of a pull by one ``requestId``, one for each key,
    has two waiters, and each is answered with its own key's lock. Before, the waiter's id
    came from the pull and the ``requestId`` alone: the second request found the first's
    waiter (on the other key) and took it over, and when that key was handed over the
    request for ``b`` was answered ``acquired`` with the lock of ``a``, while ``b`` was
    still held by pull 1."""
    rig = rigs()
    a, b = ask(1, path="envs/a"), ask(1, path="envs/b")
    for held in (a, b):
        assert (await rig.locker.acquire(held)).acquired
    on_a = await queued(rig, ask(2, path="envs/a", wait=WAIT, request_id="job-7"))
    on_b = await queued(rig, ask(2, path="envs/b", wait=WAIT, request_id="job-7"))
    assert [w.owner[1] for w in await rig.locker.queue(b.key)] == [2]
    await rig.locker.release(a.key)
    granted = await asyncio.wait_for(on_a, 10)
    assert granted.acquired and granted.lock_key == a.key
    await settle()
    assert not on_b.done(), on_b.result()
    await rig.locker.release(b.key)
    answer = await asyncio.wait_for(on_b, 10)
    assert answer.acquired and answer.lock is not None and answer.lock.key == b.key, answer


# --- freezes ----------------------------------------------------------------------------------
FREEZE = Freeze(name="release-week", match=KeyPattern(path_prefix="envs/prod"),
                message="prod is frozen for the release; ask #platform")


async def test_a_freeze_refuses_with_its_message_and_leaves_held_locks_alone(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    held = await rig.locker.acquire(ask(1))
    await rules(rig, PolicyRules(freezes=[FREEZE]))
    refused = await rig.locker.acquire(ask(2, wait=WAIT))
    assert refused.reason is Reason.FROZEN
    assert refused.error == FREEZE.message
    assert (await rig.locker.acquire(ask(2, path="envs/production"))).acquired  # not under it
    assert (await rig.locker.acquire(ask(1))).lock == held.lock  # the holder keeps its lock
    await rig.locker.release(held.lock_key)
    assert (await rig.locker.acquire(ask(3))).reason is Reason.FROZEN
    assert "freeze-started" in rig.types()


@pytest.mark.parametrize("prefix", ["envs/prod/", "./envs/prod", "envs//prod"])
async def test_a_path_prefix_is_read_as_atlantis_reads_a_path(
        rigs: Callable[..., LockerRig], prefix: str) -> None:
    """A project's path is cleaned (``envs/prod/`` is ``envs/prod``), and so is a pattern's
    ``pathPrefix``: written with a trailing slash or ``./``, it covers the path and every path
    below it. Before, it was compared as written, and such a freeze froze nothing."""
    rig = rigs()
    freeze = Freeze(name="release-week", match=KeyPattern.model_validate({"pathPrefix": prefix}),
                    message="prod is frozen")
    assert freeze.match.path_prefix == "envs/prod"
    await rules(rig, PolicyRules(freezes=[freeze]))
    assert (await rig.locker.acquire(ask(2))).reason is Reason.FROZEN
    assert (await rig.locker.acquire(ask(2, path="envs/prod/eu"))).reason is Reason.FROZEN
    assert (await rig.locker.acquire(ask(2, path="envs/production"))).acquired


@pytest.mark.parametrize("prefix", [".", "./", "/"])
async def test_the_root_path_prefix_covers_every_project_of_the_repository(
        rigs: Callable[..., LockerRig], prefix: str) -> None:
    """``pathPrefix: .`` (as Atlantis names a repository's root project; ``./`` and ``/``
    clean to it) covers the root project and every path below it, as any prefix covers the
    paths below it: the whole repository, on every store. Before, it covered the root
    project alone, and a freeze of a repository by its root froze none of its projects."""
    rig = rigs()
    freeze = Freeze(name="repo-freeze", message="acme/infra is frozen",
                    match=KeyPattern.model_validate({"pathPrefix": prefix, "repo": "acme/infra"}))
    assert freeze.match.path_prefix == "."
    await rules(rig, PolicyRules(freezes=[freeze]))
    for path in (".", "envs/prod", "modules/net/eu"):
        assert (await rig.locker.acquire(ask(2, path=path))).reason is Reason.FROZEN, path
    assert (await rig.locker.acquire(ask(2, path="envs/prod", repo="acme/other"))).acquired


async def test_a_waiting_freeze_queues_and_grants_when_it_is_lifted(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    await rules(rig, PolicyRules(freezes=[FREEZE.model_copy(update={"action": "wait"})]))
    waiter = await queued(rig, ask(2, wait=WAIT))
    await rules(rig, PolicyRules())
    assert (await waiter).acquired
    assert "freeze-ended" in rig.types()


async def test_a_freeze_with_a_window_is_active_only_inside_it(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    now = utcnow()
    later = FREEZE.model_copy(update={"from_": now + timedelta(hours=1),
                                      "until": now + timedelta(hours=2)})
    await rules(rig, PolicyRules(freezes=[later]))
    assert (await rig.locker.acquire(ask(1))).acquired
    ended = FREEZE.model_copy(update={"from_": now - timedelta(hours=2),
                                      "until": now - timedelta(hours=1)})
    await rules(rig, PolicyRules(freezes=[ended]))
    assert (await rig.locker.acquire(ask(2, path="envs/prod/eu"))).acquired


async def test_a_waiting_freeze_ends_by_the_stores_clock_when_it_is_behind_the_services() -> None:
    """The store decides a freeze by its own clock (on Redis the server's ``TIME``), and a
    service on another host may read another time. The queues were woken when the service's
    own clock passed the freeze's end: with the store's clock behind, that wake found the
    freeze still on, and nothing woke the queue again for an hour, so a request queued by a
    ``wait`` freeze waited out its wait. A store with a clock of its own 1.5 s behind (the
    memory store takes one) stands for that store here."""
    behind = timedelta(seconds=1.5)
    backend = MemoryBackend(clock=lambda: utcnow() - behind)
    rig = rig_for(backend)
    try:
        until = utcnow() + timedelta(milliseconds=300)
        await rules(rig, PolicyRules(freezes=[FREEZE.model_copy(
            update={"action": "wait", "until": until})]))
        waiter = await queued(rig, ask(2, wait=WAIT))
        granted = await asyncio.wait_for(waiter, 15)
        assert granted.acquired and granted.lock is not None
        assert granted.lock.acquired_at >= until, "granted inside the freeze by the store's clock"
        assert "freeze-ended" in rig.types()
    finally:
        await rig.close()


class _FaultyWake(MemoryBackend):
    """A memory store whose wakes fail first with ``faults`` (then serve as the store does):
    a store that does not answer (``BackendUnavailable``), or a fault of the code (a
    ``TypeError``), which no real store can be made to raise on purpose."""

    def __init__(self, *faults: Exception) -> None:
        super().__init__()
        self.faults = list(faults)
        self.wakes = 0

    async def wake(self, *, policy: Any) -> Any:
        self.wakes += 1
        if self.faults:
            raise self.faults.pop(0)
        return await super().wake(policy=policy)


async def test_a_wake_that_fails_by_a_fault_is_logged_once_not_made_again_every_30_s(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The wake of the queues after a rule change is made again while the store does not
    answer (``BackendUnavailable``), and only then: a fault of the code (a ``TypeError``)
    would fail every time. Before, any exception was made again, every 30 s, forever, each
    time a warning that read as an outage; now it is logged once, as an error saying what
    failed, and the watch goes on (the next rule change wakes the queues again)."""
    monkeypatch.setattr(visibility, "WAKE_AGAIN", (0.01, 0.02))
    backend = _FaultyWake(BackendUnavailable("redis did not answer"),
                          TypeError("unsupported operand"))
    rig = rig_for(backend)
    try:
        watch = rig.locker.rules
        watch.changed(PolicyRules())
        await settle()
        limited = PolicyRules(concurrency=[ConcurrencyLimit(
            name="g", match=KeyPattern(path_prefix="g"), limit=1)])
        rig.set(policies=limited)
        watch.changed(limited)
        # The unanswered wake is made again; the one that fails by a fault is not: its task
        # ends (made again forever, it never did).
        assert await until(lambda: backend.wakes >= 2 and not watch._tasks, within=10), (
            f"{backend.wakes} wakes, the watch still making it again")
        assert backend.wakes == 2
        faults = [r for r in caplog.records if "unsupported operand" in r.getMessage()]
        assert len(faults) == 1 and faults[0].levelname == "ERROR", faults
        assert "not made again" in faults[0].getMessage()
        assert [r.levelname for r in caplog.records
                if "redis did not answer" in r.getMessage()] == ["WARNING"]

        rig.set(policies=PolicyRules())
        watch.changed(PolicyRules())  # the watch goes on: the next change wakes the queues
        assert await until(lambda: backend.wakes == 3 and not watch._tasks, within=10)
    finally:
        await rig.close()


class _FaultyClock(MemoryBackend):
    """A memory store whose clock reads fail first with ``faults`` (then answer as the store
    does): a store that does not answer, or a fault of the code (a ``TypeError``), which no
    real store can be made to raise on purpose."""

    def __init__(self, *faults: Exception) -> None:
        super().__init__()
        self.faults = list(faults)
        self.reads = 0

    async def now(self) -> Any:
        self.reads += 1
        if self.faults:
            raise self.faults.pop(0)
        return await super().now()


async def test_a_clock_read_that_fails_by_a_fault_is_logged_once_as_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """A look at the freezes reads the store's clock and goes by the process's while the store
    does not answer, with a warning at each look. Any failure was taken for that: a fault of
    the code (a ``TypeError``) was a warning at every look that read as an outage. Now only an
    unanswered store is; a fault is logged once as an error saying what failed, and the look
    goes on by the process's clock all the same."""
    backend = _FaultyClock(BackendUnavailable("redis did not answer"),
                           TypeError("unsupported operand"), TypeError("unsupported operand"))
    rig = rig_for(backend)
    try:
        watch = rig.locker.rules
        for limit in range(1, 5):  # each change of the rules looks at the clock once
            watch.changed(PolicyRules(concurrency=[ConcurrencyLimit(
                name="g", match=KeyPattern(path_prefix="g"), limit=limit)]))
            assert await until(lambda: not watch._looking and not watch._tasks, within=10)
        assert backend.reads == 4 and not backend.faults
        faults = [r for r in caplog.records if "unsupported operand" in r.getMessage()]
        assert [r.levelname for r in faults] == ["ERROR"], faults
        assert "TypeError" in faults[0].getMessage()
        assert [r.levelname for r in caplog.records
                if "redis did not answer" in r.getMessage()] == ["WARNING"]
        assert watch._timer is not None  # the looks went on: the next one is timed
    finally:
        await rig.close()


# --- concurrency limits -----------------------------------------------------------------------
async def test_a_limit_of_two_holds_five_waiters_to_two_at_a_time_in_queue_order(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    await rules(rig, PolicyRules(concurrency=[
        ConcurrencyLimit(name="prod", match=KeyPattern(path_prefix="envs"), limit=2)]))
    tasks = []
    for pull in range(1, 6):
        tasks.append(rig.spawn(rig.locker.acquire(ask(pull, path=f"envs/p{pull}", wait=WAIT))))
        await settle()
    granted = [t.result().lock for t in tasks if t.done()]
    assert [lock.pull.num for lock in granted if lock] == [1, 2]
    assert (await rig.locker.acquire(ask(9, path="envs/p9"))).reason is Reason.LIMITED
    assert (await rig.locker.acquire(ask(9, path="modules/x"))).acquired  # outside the group
    order = []
    for pull in range(1, 6):
        await rig.locker.release(f"acme/infra/envs/p{pull}/default/prod")
        await settle()
        done = [t.result().lock for t in tasks if t.done()]
        held = [lock for lock in await rig.locker.list() if lock.project.path.startswith("envs")]
        assert len(held) <= 2
        order = [lock.pull.num for lock in done if lock]
    assert order == [1, 2, 3, 4, 5]


async def test_a_batch_asking_more_locks_of_a_group_than_its_limit_is_answered_at_once(
        rigs: Callable[..., LockerRig]) -> None:
    """Three locks of a group whose limit is two can never be held together: such a batch
    queued all the same, waited out its whole wait (up to ``max-timeout``) and was answered
    ``timeout``. It is answered ``limited`` at once, naming the group and its limit. A pull
    that holds every key of it already (the limit lowered since) still gets them back
    unchanged, as any pull asking for its own locks."""
    rig = rigs()
    group = KeyPattern(path_prefix="g")
    await rules(rig, PolicyRules(concurrency=[ConcurrencyLimit(name="g", match=group, limit=2)]))
    requests = [ask(1, path=f"g/{i}") for i in range(3)]

    def batch(of: list[LockRequest]) -> BatchLockRequest:
        return BatchLockRequest(locks=[BatchItem(project=r.project) for r in of],
                                pull=of[0].pull, wait=WAIT)

    answer = await asyncio.wait_for(rig.locker.acquire_batch(batch(requests)), 10)
    assert answer.reason is Reason.LIMITED and answer.lock_key == requests[0].key, answer
    assert answer.error is not None and "3 locks" in answer.error and "limit is 2" in answer.error
    assert "queued" not in rig.types()
    assert [await rig.locker.queue(r.key) for r in requests] == [[], [], []]
    assert await rig.locker.list() == []
    two = await asyncio.wait_for(rig.locker.acquire_batch(batch(requests[:2])), 10)
    assert two.acquired
    await rig.locker.release_batch([r.key for r in requests[:2]])
    await rules(rig, PolicyRules(concurrency=[ConcurrencyLimit(name="g", match=group, limit=3)]))
    held = await rig.locker.acquire_batch(batch(requests))
    assert held.acquired
    await rules(rig, PolicyRules(concurrency=[ConcurrencyLimit(name="g", match=group, limit=2)]))
    again = await asyncio.wait_for(rig.locker.acquire_batch(batch(requests)), 10)
    assert again.acquired and [lock.fencing_token for lock in again.locks] == [
        lock.fencing_token for lock in held.locks]


async def test_a_queued_batch_whose_limit_is_lowered_below_it_is_answered_limited_at_once(
        rigs: Callable[..., LockerRig]) -> None:
    """A batch queued while its group's limit let it in, the limit then lowered below what
    it asks: it can never be granted now. It waited out its whole wait, its keys free, and
    was answered ``timeout``; the rules' change answers it ``limited`` then, naming the group
    and its new limit, and takes it out of every queue it was in."""
    rig = rigs()
    group = KeyPattern(path_prefix="g")
    await rules(rig, PolicyRules(concurrency=[ConcurrencyLimit(name="g", match=group, limit=3)]))
    requests = [ask(1, path=f"g/{i}") for i in range(3)]
    assert (await rig.locker.acquire(ask(9, path="g/0"))).acquired  # the batch waits for it
    task = rig.spawn(rig.locker.acquire_batch(BatchLockRequest(
        locks=[BatchItem(project=r.project) for r in requests], pull=requests[0].pull,
        wait=WAIT)))
    await settle()
    assert not task.done(), task.result()
    await rules(rig, PolicyRules(concurrency=[ConcurrencyLimit(name="g", match=group, limit=2)]))
    await rig.locker.release(requests[0].key)  # its keys are free; the limit holds it back
    answer = await asyncio.wait_for(task, 10)
    assert answer.reason is Reason.LIMITED, answer
    assert answer.error is not None and "group g," in answer.error and "limit is 2" in answer.error
    assert [await rig.locker.queue(r.key) for r in requests] == [[], [], []]
    assert await rig.locker.list() == []


async def test_a_limited_cancel_leaves_a_grant_that_came_first_to_its_caller(
        rigs: Callable[..., LockerRig]) -> None:
    """The cancel a lowered limit makes (``limited``) may find its batch granted already, its
    caller not yet told: the grant stays as it is (not given back, not ended), and the
    caller is answered with it."""
    rig = rigs()
    group = KeyPattern(path_prefix="g")
    await rules(rig, PolicyRules(concurrency=[ConcurrencyLimit(name="g", match=group, limit=3)]))
    requests = [ask(1, path=f"g/{i}") for i in range(3)]
    assert (await rig.locker.acquire(ask(9, path="g/0"))).acquired
    task = rig.spawn(rig.locker.acquire_batch(BatchLockRequest(
        locks=[BatchItem(project=r.project) for r in requests], pull=requests[0].pull,
        wait=WAIT)))
    await settle()
    [waiter] = await rig.locker.queue(requests[0].key)
    await rig.locker.release(requests[0].key)  # granted in this step, its caller not yet told
    cancelled = await rig.locker.backend.cancel(requests[0].key, waiter.id,
                                                reason=Reason.LIMITED)
    assert not cancelled.removed and cancelled.granted == (), cancelled
    answer = await asyncio.wait_for(task, 10)
    assert answer.acquired, answer
    held = {lock.key: lock.fencing_token for lock in await rig.locker.list()}
    assert held == {lock.key: lock.fencing_token for lock in answer.locks}


def _limit(value: int) -> PolicyRules:
    return PolicyRules(concurrency=[ConcurrencyLimit(
        name="g", match=KeyPattern(path_prefix="g"), limit=value)])


async def _batch_queued_as_rules_change(
        rig: LockerRig, meanwhile: Callable[[], Any]) -> tuple[BatchResult, list[str]]:
    """Pull 9 holds ``g/0``; pull 1's batch of ``g/0..2`` (limit 3, which it read) is queued
    by the store, and ``meanwhile()`` runs as the store's answer goes back to the locker
    (before the locker reads the rules again): the batch's answer, and the event types."""
    requests = [ask(1, path=f"g/{i}") for i in range(3)]
    assert (await rig.locker.acquire(ask(9, path="g/0"))).acquired
    backend = rig.locker.backend
    queue_batch = backend.acquire_batch

    async def answered_meanwhile(*args: Any, **kwargs: Any) -> Any:
        outcome = await queue_batch(*args, **kwargs)
        await meanwhile()
        return outcome

    backend.acquire_batch = answered_meanwhile  # type: ignore[method-assign]
    answer = await asyncio.wait_for(rig.locker.acquire_batch(BatchLockRequest(
        locks=[BatchItem(project=r.project) for r in requests], pull=requests[0].pull,
        wait=WAIT)), 10)
    return answer, rig.types()


async def test_a_batch_refused_limited_just_after_it_queued_is_announced_queued_first(
        rigs: Callable[..., LockerRig]) -> None:
    """The limit is lowered to 2 as the store's answer that queued the batch goes back: the
    locker, reading the rules again, answers it ``limited`` and takes it out of its queues.
    It was queued (for a moment, in the store): its ``queued`` event goes out before its
    refusal, as for any request that joined a queue. Before, it had none."""
    rig = rigs(policies=_limit(3))

    async def lowered() -> None:
        rig.set(policies=_limit(2))

    answer, types = await _batch_queued_as_rules_change(rig, lowered)
    assert answer.reason is Reason.LIMITED, answer
    assert types == ["acquired", "queued"], types


async def test_a_batch_granted_just_after_it_queued_is_announced_queued_then_granted(
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 9 lets ``g/0`` go as the store's answer that queued the batch goes back (the
    batch granted from the queue), and the limit is then lowered: the locker's check of the
    rules finds the batch granted (its grant stands). Its ``queued`` event goes out before
    its grant's (``granted-from-queue``)."""
    rig = rigs(policies=_limit(3))

    async def granted_then_lowered() -> None:
        await rig.locker.release(ask(9, path="g/0").key, owner=("acme/infra", 9))
        rig.set(policies=_limit(2))

    answer, types = await _batch_queued_as_rules_change(rig, granted_then_lowered)
    assert answer.acquired, answer
    assert types.index("queued") < types.index("granted-from-queue"), types
    assert types.count("granted-from-queue") == 3, types


async def test_a_glob_question_mark_is_one_character_on_every_store(
        rigs: Callable[..., LockerRig]) -> None:
    """``?`` in a policy glob is one character: Python's matcher read it so, the Redis scripts
    as one byte, so a key holding a multi-byte character was in a group on one store and out
    of it on another. ``d?`` covers the workspace ``dé`` (two bytes, one character) and not
    ``dée``, on each store."""
    rig = rigs()
    await rules(rig, PolicyRules(concurrency=[
        ConcurrencyLimit(name="d", match=KeyPattern(workspace="d?"), limit=1)]))
    one, other = (request_for(pull=pull, workspace="dé", path=path)
                  for pull, path in ((1, "envs/a"), (2, "envs/b")))
    assert (await rig.locker.acquire(one)).acquired
    assert (await rig.locker.acquire(other)).reason is Reason.LIMITED  # dé is in the group
    beyond = request_for(pull=3, workspace="dée", path="envs/c")
    assert (await rig.locker.acquire(beyond)).acquired  # three characters: outside it
    assert (await rig.locker.acquire(request_for(pull=4, workspace="d€", path="envs/d"))
            ).reason is Reason.LIMITED  # three bytes, one character


async def test_per_repository_limits_count_each_repository_apart(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    await rules(rig, PolicyRules(concurrency=[
        ConcurrencyLimit(name="one-per-repo", per="repository", limit=1)]))
    assert (await rig.locker.acquire(ask(1, repo="acme/a"))).acquired
    assert (await rig.locker.acquire(ask(2, repo="acme/b"))).acquired
    assert (await rig.locker.acquire(ask(3, repo="acme/a", path="other"))).reason is \
        Reason.LIMITED


async def test_deleting_a_limit_releases_what_it_held_back_in_queue_order(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    await rules(rig, PolicyRules(concurrency=[ConcurrencyLimit(name="all", limit=1)]))
    assert (await rig.locker.acquire(ask(1, path="a"))).acquired
    second = await queued(rig, ask(2, path="b", wait=WAIT))
    third = await queued(rig, ask(3, path="c", wait=WAIT))
    await rules(rig, PolicyRules())
    assert (await second).acquired and (await third).acquired


async def test_a_pulls_second_queued_request_gets_its_held_lock_unchanged_not_a_new_grant(
        rigs: Callable[..., LockerRig]) -> None:
    """Two waiting requests of one pull: when the limit goes, the first is granted and the
    second is answered with that same lock, unchanged (like an immediate request for a lock
    the pull holds): no second ``granted-from-queue``, and it is not the second request's to
    give back if its client leaves."""
    rig = rigs()
    await rules(rig, PolicyRules(concurrency=[
        ConcurrencyLimit(name="all", match=KeyPattern(path_prefix="envs"), limit=1)]))
    other = await rig.locker.acquire(ask(2, path="envs/a", mode="shared"))
    assert other.acquired and other.lock is not None
    first = await queued(rig, ask(1, path="envs/a", mode="shared", wait=WAIT))
    second = await queued(rig, ask(1, path="envs/a", mode="shared", wait=WAIT))
    seen = len(rig.events)
    await rules(rig, PolicyRules())
    answers = [await first, await second]
    assert all(a.acquired and a.lock is not None for a in answers)
    fresh = [a for a in answers if a.fresh]
    assert len(fresh) == 1, [(a.fresh, a.lock) for a in answers]
    lock = fresh[0].lock
    assert lock is not None and lock.fencing_token > other.lock.fencing_token
    assert [(a.lock.key, a.lock.fencing_token, a.lock.pull.num)
            for a in answers if a.lock is not None and not a.fresh] == [
        (lock.key, lock.fencing_token, 1)]
    grants = [e.lock for e in rig.events[seen:] if e.type in ("acquired", "granted-from-queue")]
    assert grants == [lock]
    holders = await rig.locker.holders(lock.key)
    assert sorted((h.pull.num, h.fencing_token) for h in holders) == sorted(
        [(2, other.lock.fencing_token), (1, lock.fencing_token)])


# --- priority rules ---------------------------------------------------------------------------
PRIORITY = PolicyRules(priority_rules=[
    PriorityRule(name="prod-apply", match=KeyPattern(path_prefix="envs/prod"),
                 commands=["apply"], priority=Priority.HIGH),
    PriorityRule(name="plans", commands=["plan"], priority=Priority.LOW),
])


async def test_priority_rules_assign_the_priority_and_a_client_may_only_ask_for_less(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs(priority_queue=True)
    await rules(rig, PRIORITY)
    await rig.locker.acquire(ask(1))
    apply = await queued(rig, ask(2, command="apply", priority=Priority.CRITICAL, wait=WAIT))
    plan = await queued(rig, ask(3, command="plan", priority=Priority.CRITICAL, wait=WAIT))
    humble = await queued(rig, ask(4, command="apply", priority=Priority.LOW, wait=WAIT))
    waiters = {w.owner[1]: w.priority for w in await rig.locker.queue(ask(1).key)}
    assert waiters == {2: Priority.HIGH, 3: Priority.LOW, 4: Priority.LOW}
    token = policies.CALLER_IS_ADMIN.set(True)
    try:
        admin = await queued(rig, ask(5, command="apply", priority=Priority.CRITICAL, wait=WAIT))
    finally:
        policies.CALLER_IS_ADMIN.reset(token)
    first = (await rig.locker.queue(ask(1).key))[0]
    assert first.owner[1] == 5 and first.priority is Priority.CRITICAL
    for task in (apply, plan, humble, admin):
        task.cancel()


async def test_a_batch_gets_the_lowest_priority_its_keys_rules_give(
        rigs: Callable[..., LockerRig]) -> None:
    """A batch is one waiter with one priority: each key's rule gives its own (a key no rule
    covers keeps what the client asked), and the batch gets the lowest of them, so no key is
    waited for at more than its rule gives (docs/08-policies.md)."""
    rig = rigs(priority_queue=True)
    await rules(rig, PRIORITY)
    for path in ("envs/prod", "envs/dev"):
        await rig.locker.acquire(ask(1, path=path))
    batch = rig.spawn(rig.locker.acquire_batch(BatchLockRequest(
        locks=[BatchItem(project=ask(2, path=p).project) for p in ("envs/prod", "envs/dev")],
        pull=Pull(num=2), wait=WAIT, command="apply", priority=Priority.CRITICAL)))
    await settle()
    assert not batch.done(), batch.result()
    for path in ("envs/prod", "envs/dev"):
        (waiter,) = await rig.locker.queue(ask(1, path=path).key)
        assert waiter.owner[1] == 2 and waiter.priority is Priority.HIGH, path
    batch.cancel()


# --- visible waiting --------------------------------------------------------------------------
async def queued_behind(rig: LockerRig, pulls: range) -> str:
    """Pull 1 holds the key (one hold time on record before), ``pulls`` wait in turn behind it,
    then the request ``mine`` (pull 26); the key."""
    key = ask(1).key
    await rig.locker.acquire(ask(1))
    await rig.locker.release(key)  # one hold time on record
    await rig.locker.acquire(ask(1))
    for pull in pulls:
        await queued(rig, ask(pull, wait=WAIT))
    await queued(rig, ask(26, wait=WAIT, request_id="mine"))
    return key


async def test_a_waiter_sees_its_position_who_blocks_it_and_an_estimate(
        rigs: Callable[..., LockerRig]) -> None:
    rig = rigs()
    key = await queued_behind(rig, range(2, 3))
    view = await rig.locker.view(key, "mine")
    assert view is not None
    seen = view.details()
    assert seen["position"] == 2
    assert [h["owner"] for h in seen["holders"]] == ["acme/infra#1"]
    assert [w["owner"] for w in seen["ahead"]] == ["acme/infra#2"]
    assert seen["estimateSeconds"] is not None and seen["estimateSeconds"] >= 0
    queued_events = [e for e in rig.events if e.type == "queued"]
    assert queued_events[-1].details["ahead"][0]["owner"] == "acme/infra#2"
    assert queued_events[-1].details["holders"][0]["owner"] == "acme/infra#1"


async def test_a_queued_event_lists_the_first_in_line_and_counts_every_waiter_ahead(
        rigs: Callable[..., LockerRig]) -> None:
    # 24 ahead: the event lists the first 20 (AHEAD_SHOWN) and says 24; its estimate counts a
    # turn for each of the 4 it leaves out, as the full view counts one for each it lists.
    rig = rigs()
    key = await queued_behind(rig, range(2, 26))
    event = [e for e in rig.events if e.type == "queued"][-1].details
    view = await rig.locker.view(key, "mine")
    assert view is not None
    seen = view.details()
    assert event["position"] == seen["position"] == 25
    assert event["aheadCount"] == seen["aheadCount"] == 24
    assert len(seen["ahead"]) == 24
    assert [w["owner"] for w in event["ahead"]] == [w["owner"] for w in seen["ahead"][:20]]
    assert event["estimateSeconds"] == pytest.approx(seen["estimateSeconds"], rel=0.05, abs=0.01)


def test_pull_has_a_head_commit_for_supersede() -> None:
    assert Pull(num=1, head_commit="abc").head_commit == "abc"


def test_the_redis_scripts_get_a_freeze_window_rounded_outward_to_whole_ms() -> None:
    # The scripts stamp a grant with the server's clock in whole ms: an end rounded down let
    # a grant stamped .725 through a freeze that lasted until .725160.
    start = utcnow().replace(microsecond=124_900)
    window = FREEZE.model_copy(update={
        "from_": start, "until": start + timedelta(seconds=1, microseconds=600_260)})
    rules = PolicyRules(freezes=[window])
    (compiled,) = policies.compile_rules(rules)["f"]
    whole = int(start.timestamp()) * 1000
    assert (compiled["from"], compiled["until"]) == (whole + 124, whole + 1726)
    exact = window.model_copy(
        update={"until": start.replace(microsecond=125_000) + timedelta(seconds=1)})
    (on_the_ms,) = policies.compile_rules(PolicyRules(freezes=[exact]))["f"]
    assert on_the_ms["until"] == whole + 1125


@pytest.mark.parametrize(("field", "moment"), [
    ("until", "9999-12-31T23:30:00-01:00"),  # 10000-01-01T00:30Z
    ("from", "0001-01-01T00:30:00+01:00"),  # 0000-12-31T23:30Z
])
def test_a_freeze_moment_past_the_years_utc_holds_is_refused_naming_it(
    field: str, moment: str,
) -> None:
    """A freeze's ``from`` or ``until`` whose offset puts it outside the years 0001 to 9999
    in UTC names no time the service can hold: the operator writes an active freeze's end in
    UTC into the policy's status, which raised OverflowError on every resync. It is refused,
    naming the field, as the CRD's rule does at the API server."""
    rule = {"name": "f", "match": {"repo": "a/*"}, "message": "m", field: moment}
    with pytest.raises(ValueError, match=field) as raised:
        policies.Freeze.model_validate(rule)
    assert "9999-12-31T23:59:59Z" in str(raised.value)
    schema = policies.Freeze.model_json_schema(by_alias=True)["properties"][field]
    rules = [entry["rule"] for entry in schema["x-kubernetes-validations"]]
    assert "self <= timestamp('9999-12-31T23:59:59.999999999Z')" in rules, rules
