"""Steps on one key through one replica wait in a line (``EtcdBackend._atomic``); callers
give up on them at any point: waiting in the line, as their turn comes, in the middle of
their transaction. No grant overlaps, every step not given up on is answered, and the lines
are gone once nobody steps."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.support.etcd_fixtures import QUEUE_POLICY as POLICY
from tests.support.etcd_fixtures import etcd_config, grant, started
from tests.support.etcd_server import frozen
from tests.support.grant_history import GrantHistory
from tests.support.locks import candidate_for, request_for

from enhanced_locking.backends.base import Owner
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.backends.waiting import Status, Wait
from enhanced_locking.types import LockNotOwned

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]


async def test_callers_giving_up_at_any_point_of_a_key_s_line_leave_no_grant_twice(
    etcd_replicas: tuple[EtcdBackend, EtcdBackend],
) -> None:
    """16 clients on two replicas, two keys, waiting and fail-fast acquires; about a third
    of the acquires are given up on after a random moment (0 to 30 ms: in line, on their
    turn, mid-transaction). A client that gave up takes its waiter out and lets go of what
    it may have been granted, as the service does for a caller that is gone. The history of
    the grants answered has no overlap, the steps not given up on are all answered, and no
    replica is left with a line."""
    replicas = etcd_replicas
    history = GrantHistory()
    paths = ["envs/a", "envs/b"]
    deadline = time.monotonic() + 8
    gave_up = 0

    async def let_go(on: EtcdBackend, key: str, owner: Owner, wait: Wait | None) -> None:
        if wait is not None:
            await on.cancel(key, wait.id, policy=POLICY)
        try:
            await on.release_and_handoff(key, owner=owner, policy=POLICY)
        except LockNotOwned:
            pass

    async def client(number: int) -> None:
        nonlocal gave_up
        rng = random.Random(number)
        who = f"client-{number}"
        while time.monotonic() < deadline:
            on = rng.choice(replicas)
            candidate = candidate_for(request_for(repo="acme/infra", path=rng.choice(paths),
                                                  pull=100 + number))
            wait = (Wait(id=secrets.token_hex(8), timeout=timedelta(seconds=2))
                    if rng.random() < 0.5 else None)
            told = on.grants.expect(wait.id) if wait is not None else None
            step = asyncio.ensure_future(on.acquire_or_enqueue(candidate, ttl=None, wait=wait,
                                                               policy=POLICY))
            if rng.random() < 0.35:
                await asyncio.sleep(rng.uniform(0, 0.03))
                step.cancel()
            try:
                outcome = await step
            except asyncio.CancelledError:
                gave_up += 1
                await let_go(on, candidate.key, candidate.owner, wait)
                if wait is not None and told is not None:
                    on.grants.forget(wait.id, told)
                continue
            lock = None
            if outcome.status is Status.GRANTED:
                lock = outcome.locks[0]
            elif outcome.status is Status.QUEUED:
                assert told is not None
                notice = await asyncio.wait_for(told, 10)
                lock = notice.locks[0] if notice.locks else None
            if wait is not None and told is not None:
                on.grants.forget(wait.id, told)
            if lock is None:
                await asyncio.sleep(rng.uniform(0, 0.01))
                continue
            history.granted(who, lock)
            await asyncio.sleep(rng.uniform(0, 0.005))
            history.releasing(who, lock.key)
            await rng.choice(replicas).release_and_handoff(lock.key, owner=lock.owner,
                                                           policy=POLICY)

    await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(16))), 60)
    assert not history.violations, history.violations[:10]
    assert history.grants > 30, history.grants
    assert gave_up > 10, gave_up
    assert not any(r._lines for r in replicas)


async def test_a_step_given_up_on_in_the_middle_of_its_commit_ends_once_etcd_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An acquire given up on once its commit is sent, etcd not answering yet (stopped as it
    gets the commit): the step goes on until etcd has answered, then raises
    ``CancelledError``; what it wrote stays (the lock is held by the pull) and the caller's
    clean-up behind it in the key's line finds it and gives it back. A step that ended as
    its caller gave up, its call cancelled once sent, left etcd free to apply the commit
    after that clean-up, which then found nothing to undo (the lock held for good)."""
    with started(tmp_path / "etcd") as cluster:
        member = cluster.members[0]
        backend = EtcdBackend.from_config(etcd_config(cluster, "/line/"), "enhanced")
        stopped = contextlib.ExitStack()
        try:
            await grant(backend, candidate_for(request_for(repo="acme/infra", path="envs/warm",
                                                           pull=1)))
            candidate = candidate_for(request_for(repo="acme/infra", path="envs/a", pull=7))
            sent = asyncio.Event()
            transact = backend.connection.transact
            lock_key = backend.lock_key(candidate.key)

            def stopping(client: Any, request: Any, *, read: bool = False) -> Any:
                if not read and not sent.is_set() and any(
                        op.request_put.key == lock_key for op in request.success):
                    stopped.enter_context(frozen(member))  # etcd gets the commit, answers later
                    sent.set()
                return transact(client, request, read=read)

            monkeypatch.setattr(backend.connection, "transact", stopping)
            step = asyncio.ensure_future(backend.acquire_or_enqueue(candidate, ttl=None,
                                                                    wait=None, policy=POLICY))
            await sent.wait()
            step.cancel()
            done, _ = await asyncio.wait({step}, timeout=0.3)
            assert not done, "the step ended while etcd had its commit unanswered"
            step.cancel()  # given up on again: the same
            stopped.close()
            with pytest.raises(asyncio.CancelledError):
                await step
            held = await backend.get(candidate.key)
            assert held is not None and held.owner == candidate.owner, held
            await backend.release_and_handoff(candidate.key, owner=candidate.owner,
                                              policy=POLICY)
            assert await backend.get(candidate.key) is None
            assert not backend._lines
        finally:
            stopped.close()
            await backend.close()
