"""A caller that goes away while its acquire that does not wait is in the store leaves nothing
held.

The caller's task is cancelled (its client went, a timeout upstream, a shutdown) while the
store call is on its way: the store may run it all the same (Redis runs what it took however
late; etcd applies a commit once sent, and the step sees it through to etcd's answer). What
that call granted is given back by its fencing token, as a waiter's grant whose caller left
is, and a hold its pull had before the call stays. Each test runs on every store with queues.
The store's call is slowed at the real part: the redis-server (every node of the cluster) or
the etcd member stopped (SIGSTOP) while the call is sent, another connection holding the
embedded file's write lock. The in-process stores (memory, the embedded file) run a step
without awaiting anything: no caller is cancelled in the middle of one (the answer is then
its caller's, and its lock held by it).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.support.backends import BackendFactory
from tests.support.cutting_proxy import CuttingProxy, cutting_proxy
from tests.support.etcd_server import LOOPBACK, EtcdCluster, EtcdMember, frozen
from tests.support.locks import request_for
from tests.support.queues import LockerRig, rig_for

from enhanced_locking.backends.etcd_connection import (
    CALL_TIMEOUT,
    EtcdConnection,
    EtcdSettings,
)
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import HandoffUnknown
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    BatchItem,
    BatchLockRequest,
    BatchResult,
    LockRequest,
    Reason,
)

pytestmark = pytest.mark.timeout(90)

NETWORKED = ("redis", "redis-cluster", "etcd")


def ask(pull: int, path: str = "envs/prod") -> LockRequest:
    return request_for(pull=pull, path=path)


def batch_of(pull: int, *paths: str) -> BatchLockRequest:
    items = [BatchItem(project=request_for(path=p).project) for p in paths]
    return BatchLockRequest(locks=items, pull=request_for(pull=pull).pull)


@contextlib.contextmanager
def _sqlite_writer(path: Path, loop: asyncio.AbstractEventLoop,
                   task: Callable[[], asyncio.Task[Any] | None]) -> Iterator[None]:
    """Another connection holds the embedded file's write lock; a thread lets it go after
    0.3 s, the cancel of ``task()`` sent to the loop just before (the store's call blocks the
    loop meanwhile: nothing on it can cancel it)."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    def later() -> None:
        time.sleep(0.3)
        running = task()
        if running is not None:
            loop.call_soon_threadsafe(running.cancel)
        other.execute("ROLLBACK")
        other.close()

    thread = threading.Thread(target=later)
    thread.start()
    try:
        yield
    finally:
        thread.join(10)


@contextlib.contextmanager
def _stopped(request: pytest.FixtureRequest, kind: str) -> Iterator[None]:
    """The store of ``kind`` answers nothing for the block (its connections kept open)."""
    with contextlib.ExitStack() as stack:
        if kind == "redis":
            stack.enter_context(request.getfixturevalue("redis_server").paused())
        elif kind == "redis-cluster":
            for node in request.getfixturevalue("redis_cluster").nodes:
                stack.enter_context(node.paused())
        else:
            assert kind == "etcd", kind
            for member in request.getfixturevalue("etcd_cluster").members:
                stack.enter_context(frozen(member))
        yield


async def _cancelled_in_flight(
        request: pytest.FixtureRequest, factory: BackendFactory, rig: LockerRig,
        call: Callable[[], Any]) -> AcquireResult | BatchResult | None:
    """Run ``call()`` (an acquire that does not wait) as a task, cancelled while its store
    call is on its way; the task's answer if it had one before the cancel reached it (the
    in-process stores), else ``None`` (it was cancelled)."""
    task: asyncio.Task[Any] | None = None
    if factory.kind in NETWORKED:
        with _stopped(request, factory.kind):
            task = rig.spawn(call())
            await asyncio.sleep(0.3)  # sent, and not answered
            assert not task.done()
            task.cancel()
            await asyncio.sleep(0.05)
    elif factory.kind == "boltdb":
        path = request.getfixturevalue("data_dir") / "enhanced-locking.db"
        with _sqlite_writer(path, asyncio.get_running_loop(), lambda: task):
            task = rig.spawn(call())
            await asyncio.sleep(0)  # (the task's step blocks the loop in the store's call)
    else:
        task = rig.spawn(call())
        await asyncio.sleep(0)
        task.cancel()
    assert task is not None
    try:
        answer: AcquireResult | BatchResult = await asyncio.wait_for(task, 30)
    except asyncio.CancelledError:
        assert factory.kind in NETWORKED, "an in-process store's step was cancelled midway"
        return None
    assert factory.kind not in NETWORKED, "the cancel did not reach the call in the store"
    return answer


async def _free_soon(rig: LockerRig, pull: int, *paths: str) -> None:
    """Another pull gets each of ``paths`` within 10 s (the give-back may wait for the store
    to answer again; so may this, a connection cut just before), and gives it back."""
    for path in paths:
        got = None
        for _ in range(100):
            try:
                got = await rig.locker.acquire(ask(pull, path))
            except BackendUnavailable:
                await asyncio.sleep(0.1)
                continue
            if got.acquired:
                break
            await asyncio.sleep(0.1)
        assert got is not None and got.acquired, (
            f"{path}: still held for a caller that went away: {got}")
        assert got.lock is not None
        await rig.locker.release(got.lock.key, owner=(got.lock.project.repo_full_name, pull))


async def _applied(member_endpoint: str, prefix: str, key: str) -> None:
    """Wait (up to 10 s) until ``key`` is held in etcd, read on the member itself (not
    through the proxy in front of it, whose answers are held): the acquire's commit was
    applied, and its answer is on its way. A fixed wait read the case before the commit was
    sent on a slow machine (a busy disk delays etcd's commit): the caller was cancelled with
    nothing written, and no give-back was owed."""
    direct = EtcdBackend(EtcdConnection(EtcdSettings(endpoints=(member_endpoint,))),
                         prefix=prefix)
    try:
        for _ in range(100):
            if await direct.get(key) is not None:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{key}: the acquire's commit was not applied within 10 s")
    finally:
        await direct.close()


async def _released(member_endpoint: str, prefix: str, key: str) -> None:
    """Wait (up to 10 s) until ``key`` is free in etcd, read on the member itself (as
    :func:`_applied`): a release's commit was applied, its answer on its way."""
    direct = EtcdBackend(EtcdConnection(EtcdSettings(endpoints=(member_endpoint,))),
                         prefix=prefix)
    try:
        for _ in range(100):
            if await direct.get(key) is None:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{key}: the release's commit was not applied within 10 s")
    finally:
        await direct.close()


@dataclass(frozen=True)
class _Proxied:
    """A locker on an etcd store reached through a proxy in front of the cluster's one member:
    the proxy can hold, cut or refuse etcd's answers (tests/support/cutting_proxy.py)."""

    proxy: CuttingProxy
    member: EtcdMember
    prefix: str
    rig: LockerRig
    key: str
    """The key pull 1 asks for, taken and released once."""


@contextlib.asynccontextmanager
async def _proxied_etcd(cluster: EtcdCluster, prefix: str, request: LockRequest,
                        **settings: Any) -> AsyncIterator[_Proxied]:
    """The locker behind the proxy (``settings``: its config's fields), its connections open
    and ``request``'s key known (taken and released once, by pull 1): the answer a test holds
    and cuts is the commit's."""
    [member] = cluster.members
    with cutting_proxy((LOOPBACK, member.client_port)) as proxy:
        backend = EtcdBackend(EtcdConnection(EtcdSettings(endpoints=(proxy.addr,))),
                              prefix=prefix)
        rig = rig_for(backend, **settings)
        try:
            warm = await rig.locker.acquire(request)
            assert warm.acquired and warm.lock is not None
            await rig.locker.release(warm.lock.key, owner=(warm.lock.project.repo_full_name, 1))
            yield _Proxied(proxy, member, prefix, rig, warm.lock.key)
        finally:
            await rig.close()
            await backend.close()


async def _sent_and_applied(etcd: _Proxied, request: LockRequest) -> asyncio.Task[AcquireResult]:
    """``request`` (pull 1's, for the known key) sent while the proxy holds the answers, once
    etcd has applied its commit: its answer is held on the way back."""
    task = etcd.rig.spawn(etcd.rig.locker.acquire(request))
    await _applied(etcd.member.endpoint, etcd.prefix, etcd.key)
    assert not task.done()
    return task


async def _cut_as_it_passes(proxy: CuttingProxy, let_go: Callable[[], None]) -> None:
    """The held answers let go, and the connection cut as the first passes."""
    proxy.chance, proxy.cutting = 1.0, True
    let_go()
    for _ in range(500):
        if proxy.cut:
            break
        await asyncio.sleep(0.01)
    proxy.cutting = False
    assert proxy.cut, "the answer was not cut: the case is not made"


def _abandoned(rig: LockerRig) -> list[str]:
    """The keys told released for a caller that went away."""
    return [event.key or "" for event in rig.events
            if event.type == "released" and event.details.get("how") == "abandoned"]


async def test_a_fail_fast_acquire_whose_caller_left_in_the_call_holds_nothing(
        request: pytest.FixtureRequest, queue_backend_factory: BackendFactory,
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 1's acquire (no wait) of a free key is cancelled while the store has it; the
    store runs it. Before, the lock stayed held by pull 1 for good (no lease): every other
    pull was refused ``held``. Now another pull gets it, and the give-back is told (a
    ``released`` event, ``how`` ``abandoned``, as for a waiter's grant whose caller left)."""
    rig = rigs()
    warm = await rig.locker.acquire(ask(1))  # (connections open, the key known)
    assert warm.acquired and warm.lock is not None
    await rig.locker.release(warm.lock.key, owner=(warm.lock.project.repo_full_name, 1))
    answer = await _cancelled_in_flight(request, queue_backend_factory, rig,
                                        lambda: rig.locker.acquire(ask(1)))
    if answer is not None:  # an in-process store: answered, its lock its caller's
        assert isinstance(answer, AcquireResult) and answer.acquired and answer.lock
        held = await rig.locker.get(answer.lock.key)
        assert held == answer.lock
        return
    await _free_soon(rig, 2, "envs/prod")
    assert _abandoned(rig) == [warm.lock.key], rig.events


async def test_a_waiting_acquire_granted_at_once_whose_caller_left_in_the_call_holds_nothing(
        request: pytest.FixtureRequest, queue_backend_factory: BackendFactory,
        rigs: Callable[..., LockerRig]) -> None:
    """As above for an acquire that may wait, of a free key: the store grants it at once (no
    waiter queued) after its caller was cancelled. The withdrawal of its waiter by id finds
    none; the grant is given back all the same. Before, on Redis and Redis Cluster the lock
    stayed held by pull 1 for good (no lease): every other pull was refused ``held``."""
    rig = rigs()
    asked = request_for(pull=1, wait=timedelta(seconds=30))
    warm = await rig.locker.acquire(asked)  # (connections open, the key known)
    assert warm.acquired and warm.lock is not None
    await rig.locker.release(warm.lock.key, owner=(warm.lock.project.repo_full_name, 1))
    answer = await _cancelled_in_flight(request, queue_backend_factory, rig,
                                        lambda: rig.locker.acquire(asked))
    if answer is not None:  # an in-process store: answered, its lock its caller's
        assert isinstance(answer, AcquireResult) and answer.acquired and answer.lock
        assert await rig.locker.get(answer.lock.key) == answer.lock
        return
    await _free_soon(rig, 2, "envs/prod")
    assert _abandoned(rig) == [warm.lock.key], rig.events


async def test_a_fail_fast_batch_whose_caller_left_in_the_call_keeps_what_its_pull_held(
        request: pytest.FixtureRequest, queue_backend_factory: BackendFactory,
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 1 holds ``a``; its batch of ``a`` and ``b`` (no wait) is cancelled while the
    store has it, and the store runs it: ``b`` granted, ``a`` answered as held already. ``b``
    is given back; ``a`` stays pull 1's, its token as before."""
    rig = rigs()
    own = await rig.locker.acquire(ask(1, "envs/a"))
    assert own.acquired and own.lock is not None
    answer = await _cancelled_in_flight(
        request, queue_backend_factory, rig,
        lambda: rig.locker.acquire_batch(batch_of(1, "envs/a", "envs/b")))
    if answer is not None:
        assert isinstance(answer, BatchResult) and answer.acquired
        for lock in answer.locks:
            assert await rig.locker.get(lock.key) == lock
        return
    await _free_soon(rig, 2, "envs/b")
    held = await rig.locker.get(own.lock.key)
    assert held == own.lock, "the pull's hold from before the batch was given back"
    refused = await rig.locker.acquire(ask(2, "envs/a"))
    assert not refused.acquired and refused.reason is Reason.HELD, refused
    b = request_for(path="envs/b").key
    assert _abandoned(rig) == [b], rig.events


async def test_a_fail_fast_acquire_of_a_held_key_whose_caller_left_keeps_the_hold(
        request: pytest.FixtureRequest, queue_backend_factory: BackendFactory,
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 1 holds the key and asks for it again (no wait); the call is cancelled while
    the store has it and answered as held already: nothing is given back."""
    rig = rigs()
    own = await rig.locker.acquire(ask(1))
    assert own.acquired and own.lock is not None
    answer = await _cancelled_in_flight(request, queue_backend_factory, rig,
                                        lambda: rig.locker.acquire(ask(1)))
    if answer is not None:
        assert isinstance(answer, AcquireResult) and answer.acquired and not answer.fresh
    await asyncio.sleep(1.5)  # (a give-back owed would be sent meanwhile)
    assert await rig.locker.get(own.lock.key) == own.lock
    refused = await rig.locker.acquire(ask(2))
    assert not refused.acquired and refused.reason is Reason.HELD, refused
    assert _abandoned(rig) == [], rig.events


@pytest.mark.etcd
async def test_a_grant_whose_caller_left_is_given_back_once_etcd_answers_again(
        etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:
    """The commit of pull 1's acquire (no wait) is applied while its answer is held on the
    way back (a proxy in front of the member), and its caller is cancelled; the answer comes
    as the proxy stops letting any request through (the connection reset: the member never
    sees it): the give-back's calls fail (``unavailable``). It is tried again, and once the
    member can be reached the key is free, its give-back told."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, rig = etcd.proxy, etcd.rig
        with proxy.holding() as let_go:
            task = await _sent_and_applied(etcd, ask(1))  # (answer held)
            task.cancel()
            proxy.refusing = True
            try:
                let_go()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, 10)
                await asyncio.sleep(2)  # (the give-back's calls fail meanwhile)
                assert _abandoned(rig) == [], "given back while etcd was out of reach"
            finally:
                proxy.refusing = False
        await _free_soon(rig, 2, "envs/prod")
        assert _abandoned(rig) == [etcd.key], rig.events


@pytest.mark.etcd
async def test_a_grant_whose_caller_left_and_whose_answer_was_lost_is_given_back(
        etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:
    """The commit of pull 1's acquire (no wait) is applied while its answer is held on the
    way back, its caller is cancelled, and then the connection is cut as the answer passes:
    the step cannot know from the answer whether etcd applied it. It reads the keys again
    (never running again for a caller that is gone), finds its write there, and the grant is
    given back. Before, the step ended at the lost answer and the lock stayed held for good."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, rig = etcd.proxy, etcd.rig
        with proxy.holding() as let_go:
            task = await _sent_and_applied(etcd, ask(1))  # (answer held)
            task.cancel()
            await _cut_as_it_passes(proxy, let_go)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
        await _free_soon(rig, 2, "envs/prod")
        assert _abandoned(rig) == [etcd.key], rig.events


@pytest.mark.etcd
@pytest.mark.parametrize("wait", [None, timedelta(seconds=30)], ids=["no-wait", "waiting"])
async def test_a_grant_whose_answer_was_lost_is_given_back_after_etcd_was_away_longer_than_a_call(
        etcd_cluster: EtcdCluster, etcd_prefix: str, wait: timedelta | None) -> None:
    """The commit of pull 1's acquire (no wait, or one that waits granted at once) is applied
    while its answer is held, its caller is cancelled, the connection is cut as the answer
    passes, and no request reaches the member for longer than a call may take
    (``CALL_TIMEOUT``). Once etcd can be reached again, the grant etcd applied is given back
    and told: the step's reads gave up at the call's limit and handed the commit to the
    locker's background look, as for a caller answered ``unavailable``. Before, the reads
    gave up there and the lock (no lease) stayed held for good, never told: another pull was
    refused ``held``."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix,
                             request_for(pull=1, wait=wait)) as etcd:
        proxy, rig = etcd.proxy, etcd.rig
        with proxy.holding() as let_go:
            task = await _sent_and_applied(  # (answer held)
                etcd, request_for(pull=1, wait=wait))
            task.cancel()
            proxy.refusing = True
            try:
                await _cut_as_it_passes(proxy, let_go)
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, 15)
                await asyncio.sleep(CALL_TIMEOUT)  # (still out of reach past a call)
            finally:
                proxy.refusing = False
        await _free_soon(rig, 2, "envs/prod")
        assert _abandoned(rig) == [etcd.key], rig.events


async def test_a_fail_fast_upgrade_whose_caller_left_in_the_call_keeps_the_pulls_hold(
        request: pytest.FixtureRequest, queue_backend_factory: BackendFactory,
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 1 holds the key shared and asks for it exclusive (no wait); the call is
    cancelled while the store has it. The store upgrades the hold in place (a new token), or,
    where the give-back reached it first (Redis), the call writes nothing. An upgrade is never
    given back: releasing it would free the shared hold the pull had before the call. Pull 1
    still holds the key either way, and nothing is abandoned."""
    rig = rigs()
    own = await rig.locker.acquire(ask(1).model_copy(update={"mode": "shared"}))
    assert own.acquired and own.lock is not None
    answer = await _cancelled_in_flight(request, queue_backend_factory, rig,
                                        lambda: rig.locker.acquire(ask(1)))
    if answer is not None:
        assert isinstance(answer, AcquireResult) and answer.upgraded and not answer.fresh
    await asyncio.sleep(1.5)  # (a give-back owed would be sent meanwhile)
    held = await rig.locker.holders(own.lock.key)
    assert [lock.pull.num for lock in held] == [1], "the give-back freed the pull's hold"
    assert held[0] == own.lock or (held[0].mode == "exclusive"
                                   and held[0].fencing_token > own.lock.fencing_token), held
    refused = await rig.locker.acquire(ask(2))
    assert not refused.acquired and refused.reason is Reason.HELD, refused
    assert _abandoned(rig) == [], rig.events


async def test_a_fail_fast_upgrade_whose_caller_left_in_the_call_is_announced(
        request: pytest.FixtureRequest, queue_backend_factory: BackendFactory,
        rigs: Callable[..., LockerRig]) -> None:
    """Pull 1 holds the key shared and asks for it exclusive (no wait); the call is
    cancelled while the store has it. An upgrade the store made is kept (never given back)
    and is a grant of its own, a new token: it is announced ``acquired`` with that token, as
    when its caller hears it. Before, the locker never told it (etcd answered the upgrade with
    the cancellation; on Redis the give-back by the call's id kept it without a word)."""
    rig = rigs()
    own = await rig.locker.acquire(ask(1).model_copy(update={"mode": "shared"}))
    assert own.acquired and own.lock is not None
    await _cancelled_in_flight(request, queue_backend_factory, rig,
                               lambda: rig.locker.acquire(ask(1)))
    held: list[Any] = []
    for _ in range(100):  # (a give-back owed is sent once the store answers)
        held = await rig.locker.holders(own.lock.key)
        if held and held[0] != own.lock and _announced(rig, held[0].fencing_token):
            break
        await asyncio.sleep(0.05)
    assert [lock.pull.num for lock in held] == [1], held
    if held[0] == own.lock:  # (Redis: the give-back reached it first; nothing was granted)
        return
    assert held[0].mode == "exclusive", held
    assert _announced(rig, held[0].fencing_token) == ["exclusive"], [
        (e.type, e.lock.fencing_token if e.lock else None) for e in rig.events]


async def test_an_upgrade_whose_caller_left_at_any_step_of_its_call_is_announced_if_kept(
        queue_backend_factory: BackendFactory, rigs: Callable[..., LockerRig]) -> None:
    """Pull 1 holds the key shared and asks for it exclusive (no wait); its caller is
    cancelled after a few event-loop steps, the store running as usual. Whatever the step,
    pull 1 still holds the key, and an upgrade made (a new token) is announced ``acquired``
    with its token, heard by its caller or not. On the networked stores some rounds cancel
    the caller while the store has the call (the case is made).

    The steps are swept from 0 until a round's call ends before its cancel (every step of
    the call tried; at least 40), and swept again until a round has its caller leave while
    the store has the upgrade: how many steps a call takes is as many as the loop turns
    while the store answers, which varies with the machine (on Redis an answer was seen
    within 4 steps or after more than 40, so a fixed 40 found the lean call that refuses an
    upgrade still on its way, and no round cancelled the upgrade itself)."""
    rig = rigs()
    unheard = 0
    for _sweep in range(_SWEEPS):
        heard: bool | None = False
        steps = 0
        while steps < 40 or not heard:
            assert steps < _MOST_STEPS, "the call never ended before its cancel"
            heard = await _upgrade_cancelled_after(rig, steps)
            unheard += heard is None
            steps += 1
        if unheard or queue_backend_factory.kind not in NETWORKED:
            break
    if queue_backend_factory.kind in NETWORKED:
        assert unheard, "no round's caller left while the store had its upgrade"


_SWEEPS = 5
"""Most sweeps of the steps of a call looking for a caller that leaves while the store has
its upgrade (``test_an_upgrade_whose_caller_left_at_any_step_of_its_call_is_announced_if_kept``)."""

_MOST_STEPS = 5000
"""Most event-loop steps a sweep tries before a call ends before its cancel."""


async def _upgrade_cancelled_after(rig: LockerRig, steps: int) -> bool | None:
    """One round: pull 1 takes the key shared and asks for it exclusive, its caller cancelled
    after ``steps`` event-loop steps; pull 1 still holds the key, and an upgrade made is
    announced ``acquired`` with its token. Whether the caller heard its answer: ``None`` for
    an upgrade made that its caller never heard of (it left while the store had the call)."""
    own = await rig.locker.acquire(ask(1).model_copy(update={"mode": "shared"}))
    assert own.acquired and own.lock is not None
    task = rig.spawn(rig.locker.acquire(ask(1)))
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    try:
        await asyncio.wait_for(task, 30)
        heard = True
    except asyncio.CancelledError:
        heard = False
    held: list[Any] = []
    for _ in range(100):  # (a give-back owed is sent once the store answers)
        held = await rig.locker.holders(own.lock.key)
        if held and held[0] != own.lock and _announced(rig, held[0].fencing_token):
            break
        if held == [own.lock] and not getattr(rig.locker.backend, "owed", 0):
            break
        await asyncio.sleep(0.05)
    assert [lock.pull.num for lock in held] == [1], (steps, held)
    upgraded = held[0] != own.lock
    if upgraded:
        assert held[0].mode == "exclusive", (steps, held)
        assert _announced(rig, held[0].fencing_token) == ["exclusive"], (steps, [
            (e.type, e.lock.fencing_token if e.lock else None) for e in rig.events])
    await rig.locker.release_by_pull("acme/infra", 1)
    return None if upgraded and not heard else heard


def _announced(rig: LockerRig, token: int) -> list[str]:
    """The modes of the locks told ``acquired`` with fencing token ``token``."""
    return [event.lock.mode for event in rig.events
            if event.type == "acquired" and event.lock is not None
            and event.lock.fencing_token == token]


@pytest.mark.etcd
async def test_a_grant_whose_answer_was_lost_and_whose_caller_left_as_it_ran_again_is_given_back(
        etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:
    """The commit of pull 1's acquire (no wait) is applied while its answer is held on the
    way back, and the connection is cut as the answer passes (its caller still there): the
    step runs again on fresh reads, and while it reads (the member stopped) its caller is
    cancelled. The step cannot know whether its first commit landed: it reads the keys again
    once etcd answers, finds its write there, and the grant is given back. Before, the step
    ended at the cancellation with the lost commit's grant held for good, never told."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, member, rig = etcd.proxy, etcd.member, etcd.rig
        with proxy.holding() as let_go:
            task = await _sent_and_applied(etcd, ask(1))  # (answer held)
            await _cut_as_it_passes(proxy, let_go)
        with frozen(member):
            await asyncio.sleep(0.5)  # the step runs again: its reads wait for the member
            assert not task.done(), "the step ended at the lost answer: the case is not made"
            task.cancel()
            await asyncio.sleep(0.2)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        await _free_soon(rig, 2, "envs/prod")
        assert _abandoned(rig) == [etcd.key], rig.events


@pytest.mark.etcd
async def test_a_grant_whose_answer_was_lost_as_the_connection_was_cut_is_answered(
        etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:
    """The commit of pull 1's acquire (no wait) is applied while its answer is held on the
    way back, and the connection is cut as the answer passes (its caller still there): the
    step runs again on fresh reads, for up to a call's time while the connection comes back,
    finds its write there and answers the grant. Before, the first read after the cut failed
    at once (the channel reconnecting) and ended the step: the caller was told `unavailable`
    while the lock etcd had granted stayed held for good, its pull never told."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, rig = etcd.proxy, etcd.rig
        with proxy.holding() as let_go:
            task = await _sent_and_applied(etcd, ask(1))  # (answer held)
            await _cut_as_it_passes(proxy, let_go)
        got = await asyncio.wait_for(task, 15)
        assert got.acquired and got.fresh and got.lock is not None, got
        await rig.locker.release(got.lock.key, owner=(got.lock.project.repo_full_name, 1))
        await _free_soon(rig, 2, "envs/prod")


@pytest.mark.etcd
async def test_a_lost_grant_is_looked_for_though_its_caller_is_cancelled_again(
        etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:
    """The commit of pull 1's acquire (no wait) is applied while its answer is held, its
    caller is cancelled, and the connection is cut as the answer passes; while the step reads
    its keys again (the member stopped) the caller's task is cancelled a second time (a
    shutdown behind a client gone). The reads are seen through all the same, and the grant
    found there is given back. Before, the second cancel ended the reads and the grant stayed
    held for good, never told."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, member, rig = etcd.proxy, etcd.member, etcd.rig
        with proxy.holding() as let_go:
            task = await _sent_and_applied(etcd, ask(1))  # (answer held)
            task.cancel()
            await _cut_as_it_passes(proxy, let_go)
        with frozen(member):
            await asyncio.sleep(0.5)  # the step reads its keys again: they wait
            assert not task.done(), "the step did not read again: the case is not made"
            task.cancel()
            await asyncio.sleep(0.2)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        await _free_soon(rig, 2, "envs/prod")
        assert _abandoned(rig) == [etcd.key], rig.events


@pytest.mark.etcd
@pytest.mark.parametrize("wait", [None, timedelta(seconds=30)], ids=["no-wait", "waiting"])
async def test_an_acquire_answered_unavailable_whose_commit_landed_holds_nothing(
        etcd_cluster: EtcdCluster, etcd_prefix: str, wait: timedelta | None) -> None:
    """The commit of pull 1's acquire (no wait, or one that waits granted at once) is applied
    while its answer is held on the way back; the connection is cut as the answer passes, and
    etcd is out of reach for a moment after (the proxy resets every request): the step cannot
    learn whether its commit landed, and its caller, still there, is answered
    ``unavailable``. Atlantis never releases what it was refused, so the grant is given back
    by its fencing token once etcd answers again. Before, the lock stayed held by pull 1 for
    good (no lease): every other pull was refused ``held``."""
    # (taken and released once with the same wait: a waiting replica's session open too)
    async with _proxied_etcd(etcd_cluster, etcd_prefix,
                             request_for(pull=1, wait=wait)) as etcd:
        proxy, rig = etcd.proxy, etcd.rig
        try:
            with proxy.holding() as let_go:
                task = await _sent_and_applied(  # (answer held)
                    etcd, request_for(pull=1, wait=wait))
                # (etcd out of reach from the cut on, before the step reads again)
                proxy.refuse_on_cut = True
                await _cut_as_it_passes(proxy, let_go)
                with pytest.raises(BackendUnavailable):
                    await asyncio.wait_for(task, 15)
        finally:
            proxy.refusing = False
        await _free_soon(rig, 2, "envs/prod")
        assert _abandoned(rig) == [etcd.key], [(e.type, e.details) for e in rig.events]


@pytest.mark.etcd
@pytest.mark.parametrize("wait", [None, timedelta(seconds=30)], ids=["no-wait", "waiting"])
async def test_an_acquire_tried_again_whose_first_commit_landed_unanswered_holds_nothing(
        etcd_cluster: EtcdCluster, etcd_prefix: str, wait: timedelta | None) -> None:
    """As above, with the locker's retries on: the first try's commit is applied, its answer
    cut, etcd out of reach for every try after it, and the caller is answered ``unavailable``
    by the last try. What the first try granted is given back once etcd answers again, as
    without retries. Before, the retry loop dropped the first try's error (its grant to be
    learnt) and raised the last one's: the lock stayed held by pull 1 for good, every other
    pull refused ``held``."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, request_for(pull=1, wait=wait),
                             retries=True, retry_max_attempts=2) as etcd:
        proxy, rig = etcd.proxy, etcd.rig
        try:
            with proxy.holding() as let_go:
                task = await _sent_and_applied(  # (answer held)
                    etcd, request_for(pull=1, wait=wait))
                proxy.refuse_on_cut = True
                await _cut_as_it_passes(proxy, let_go)
                with pytest.raises(BackendUnavailable):
                    await asyncio.wait_for(task, 30)
        finally:
            proxy.refusing = False
        await _free_soon(rig, 2, "envs/prod")
        assert _abandoned(rig) == [etcd.key], [(e.type, e.details) for e in rig.events]


@pytest.mark.etcd
async def test_a_give_back_whose_answer_was_lost_is_told_once(
        etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pull 1's acquire (no wait) is granted as its caller goes away, and the grant is given
    back; the give-back's release is sent to the member stopped, applied once it runs again
    while its answer is held, and the connection is cut as the answer passes, etcd out of
    reach from then on past the call's limit: the give-back cannot learn from the answer
    whether its release landed. Once etcd answers again the key is free and the release is
    told once (``released``, ``how`` ``abandoned``). Before, the give-back was sent again,
    found the key free and said nothing: no event told that the lock was gone."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, member, rig = etcd.proxy, etcd.member, etcd.rig
        # The give-back's step giving up (its answer unknown, etcd not read again within the
        # call's limit), seen, not guessed at from the time gone by: a step slower than that
        # (a busy machine) read etcd again once it answered and took the other path.
        gave_up = asyncio.Event()
        release_and_handoff = rig.locker.backend.release_and_handoff

        async def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                return await release_and_handoff(*args, **kwargs)
            except HandoffUnknown:
                gave_up.set()
                raise

        monkeypatch.setattr(rig.locker.backend, "release_and_handoff", watched)
        try:
            with contextlib.ExitStack() as held:
                let_go = held.enter_context(proxy.holding())
                task = await _sent_and_applied(etcd, ask(1))  # (answer held)
                task.cancel()
                with frozen(member):
                    let_go()  # the grant heard, given back: its release waits for the member
                    with pytest.raises(asyncio.CancelledError):
                        await asyncio.wait_for(task, 10)
                    await asyncio.sleep(0.3)
                    assert _abandoned(rig) == [], "given back with the member stopped"
                    let_go = held.enter_context(proxy.holding())  # (the release's answer)
                await _released(member.endpoint, etcd.prefix, etcd.key)  # (answer held)
                proxy.refuse_on_cut = True  # (and out of reach from the cut on)
                await _cut_as_it_passes(proxy, let_go)
            await asyncio.wait_for(gave_up.wait(), CALL_TIMEOUT + 30)  # (past a call's limit)
            assert _abandoned(rig) == [], "told while etcd was out of reach"
        finally:
            proxy.refusing = False
        for _ in range(100):  # (the key is free already: told once the give-back learns it)
            if _abandoned(rig):
                break
            await asyncio.sleep(0.1)
        await _free_soon(rig, 2, "envs/prod")
        assert _abandoned(rig) == [etcd.key], [(e.type, e.details) for e in rig.events]


def _told_released(rig: LockerRig, how: str) -> list[str]:
    """The keys told released (``released`` or ``expired`` event) with ``how``."""
    return [event.key or "" for event in rig.events
            if event.type in ("released", "expired") and event.details.get("how") == how]


@pytest.mark.etcd
async def test_a_release_whose_answer_was_lost_is_told_once_it_is_learnt(
        etcd_cluster: EtcdCluster, etcd_prefix: str) -> None:
    """Pull 1 holds the key and releases it; the release's commit is applied while its
    answer is held, and the connection is cut as the answer passes, etcd out of reach from
    then on past the call's limit: the caller is answered ``unavailable`` (it cannot be told
    whether its release landed). Once etcd answers again the locker learns the release
    landed and tells it once (``released``, ``how`` ``released``). Before, nobody read what
    landed: the lock was gone and no event ever said so."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, member, rig = etcd.proxy, etcd.member, etcd.rig
        got = await rig.locker.acquire(ask(1))
        assert got.acquired and got.lock is not None
        before = _told_released(rig, "released")
        try:
            with proxy.holding() as let_go:
                task = rig.spawn(rig.locker.release(etcd.key, owner=(
                    got.lock.project.repo_full_name, 1)))
                await _released(member.endpoint, etcd.prefix, etcd.key)  # (answer held)
                assert not task.done()
                proxy.refuse_on_cut = True  # (and out of reach from the cut on)
                await _cut_as_it_passes(proxy, let_go)
                with pytest.raises(BackendUnavailable):
                    await asyncio.wait_for(task, 15)
            assert _told_released(rig, "released") == before, "told while etcd was away"
        finally:
            proxy.refusing = False
        for _ in range(100):  # (the key is free already: told once the locker learns it)
            if _told_released(rig, "released") != before:
                break
            await asyncio.sleep(0.1)
        await _free_soon(rig, 2, "envs/prod")
        assert _told_released(rig, "released") == [*before, etcd.key, etcd.key], [
            (e.type, e.details) for e in rig.events]


@pytest.mark.etcd
async def test_a_grant_whose_caller_left_after_the_locker_closed_starts_no_give_back(
        etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The commit of pull 1's acquire (no wait) is applied while its answer is held on the
    way back, the locker is closed (a store switch closes the old one with calls still on
    their way), and then the caller is cancelled and the answer let go: etcd answers the
    grant with the cancellation. Before, the locker started a give-back then, after its
    close, which ran on with nobody to wait for it or cancel it and called the store (a
    closed etcd connection opens its channel again for it, and nothing closes it). Now it is
    not started, and logged with what stays held: no task of the locker is left, and the
    store is not called for it."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, rig = etcd.proxy, etcd.rig
        backend = rig.locker.backend
        closed = False
        after_close: list[str] = []
        release = backend.release_and_handoff

        async def counted(key: str, **kwargs: Any) -> Any:
            if closed:
                after_close.append(key)
            return await release(key, **kwargs)

        monkeypatch.setattr(backend, "release_and_handoff", counted)
        with proxy.holding() as let_go:
            task = await _sent_and_applied(etcd, ask(1))  # (answer held)
            await rig.locker.close()
            closed = True
            task.cancel()
            let_go()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
        for _ in range(20):  # whatever would have been scheduled has had its turns
            await asyncio.sleep(0)
        assert after_close == [], "the store was called after the locker closed"
        assert not rig.locker._giving_back, "a give-back runs on after the locker closed"
        said = [r for r in caplog.records if "could start" in r.getMessage()]
        assert len(said) == 1 and etcd.key in said[0].getMessage(), said
        assert "stays held" in said[0].getMessage()


@pytest.mark.etcd
async def test_a_lost_grant_learnt_as_the_locker_closes_leaves_no_task_and_no_call_after(
        etcd_cluster: EtcdCluster, etcd_prefix: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Pull 1's acquire is answered ``unavailable`` though its commit landed (its answer cut,
    etcd out of reach after): the locker reads etcd again until it answers, to give the grant
    back. The locker is closed while etcd is still out of reach, and etcd answers again as
    the close waits. Whether the read finds the grant within the close's wait or not (gRPC's
    reconnect decides), nothing of the locker runs on after its close: before, a grant found
    during the wait started a give-back the close never waited for, which called the store
    after it. Either way what stays held is logged."""
    async with _proxied_etcd(etcd_cluster, etcd_prefix, ask(1)) as etcd:
        proxy, rig = etcd.proxy, etcd.rig
        backend = rig.locker.backend
        closed = False
        after_close: list[str] = []
        release = backend.release_and_handoff

        async def counted(key: str, **kwargs: Any) -> Any:
            if closed:
                after_close.append(key)
            return await release(key, **kwargs)

        monkeypatch.setattr(backend, "release_and_handoff", counted)
        try:
            with proxy.holding() as let_go:
                task = await _sent_and_applied(etcd, ask(1))  # (answer held)
                proxy.refuse_on_cut = True  # (etcd out of reach from the cut on)
                await _cut_as_it_passes(proxy, let_go)
                with pytest.raises(BackendUnavailable):
                    await asyncio.wait_for(task, 15)
            assert rig.locker._giving_back, "the grant is not being learnt"
            closing = asyncio.create_task(rig.locker.close())
            await asyncio.sleep(0)  # (the close begun: it waits for the learning)
            proxy.refusing = False
            await closing
        finally:
            proxy.refusing = False
        closed = True
        assert not rig.locker._giving_back, "a task of the locker runs on after its close"
        for _ in range(20):  # whatever would have been scheduled has had its turns
            await asyncio.sleep(0)
        assert after_close == [], "the store was called after the locker closed"
        said = [r.getMessage() for r in caplog.records if "closed before" in r.getMessage()]
        assert len(said) == 1 and "stay" in said[0], said
        assert _abandoned(rig) == [], rig.events
