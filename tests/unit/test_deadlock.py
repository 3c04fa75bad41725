"""Deadlock detection: two- and three-party cycles (with batches and queued-behind edges) are
refused with the cycle named; a plain queue never is; the flag switches it off."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.locks import candidate_for, request_for
from tests.support.queues import LockerRig, settle

from enhanced_locking import policies
from enhanced_locking.backends.base import parts_of
from enhanced_locking.backends.waiting import (
    KeyWaits,
    KeyWaitsList,
    QueuePolicy,
    Status,
    Wait,
    Waiter,
)
from enhanced_locking.locking import deadlock, queueing, visibility
from enhanced_locking.policies import ConcurrencyLimit, KeyPattern, PolicyRules
from enhanced_locking.types import (
    AcquireResult,
    BatchItem,
    BatchLockRequest,
    LockRequest,
    Pull,
    Reason,
    utcnow,
)

WAIT = timedelta(seconds=30)


@pytest.fixture
def make(rigs: Callable[..., LockerRig]) -> Callable[..., LockerRig]:
    """Lockers with deadlock detection on (a test may turn it off)."""
    return functools.partial(rigs, deadlock_detection=True)


def ask(pull: int, key: str, *, wait: timedelta | None = None) -> LockRequest:
    return request_for(pull=pull, path=key, wait=wait)


def batch(pull: int, *keys: str, wait: timedelta | None = WAIT) -> BatchLockRequest:
    return BatchLockRequest(
        locks=[BatchItem(project=ask(pull, key).project) for key in keys],
        pull=Pull(num=pull), wait=wait)


def name(pull: int) -> str:
    return f"acme/infra#{pull}"


async def holds(rig: LockerRig, pull: int, key: str) -> None:
    assert (await rig.locker.acquire(ask(pull, key))).acquired


async def test_a_two_party_cycle_is_refused_with_the_cycle(make: Callable[..., LockerRig]) -> None:
    rig = make()
    await holds(rig, 1, "a")
    await holds(rig, 2, "b")
    first = rig.spawn(rig.locker.acquire(ask(1, "b", wait=WAIT)))
    await settle()
    answer = await rig.locker.acquire(ask(2, "a", wait=WAIT))
    assert answer.reason is Reason.DEADLOCK
    assert answer.cycle == [name(2), name(1), name(2)]
    assert answer.holder is not None and answer.holder.pull.num == 1
    assert [w.owner[1] for w in await rig.locker.queue(ask(1, "a").key)] == []
    assert not first.done(), "the first waiter keeps waiting; only the closing wait is refused"
    assert rig.types().count("deadlock") == 1
    assert rig.metrics.registry.get_sample_value("enhanced_locking_deadlocks_total") == 1
    event = next(e for e in rig.events if e.type == "deadlock")
    assert event.details["cycle"] == answer.cycle
    assert {edge["key"] for edge in event.details["edges"]} == {ask(1, "a").key, ask(1, "b").key}
    # The victim gives up what it held, and the survivor gets it.
    await rig.locker.release(ask(2, "b").key)
    survivor: AcquireResult = await asyncio.wait_for(first, 5)
    assert survivor.acquired


async def test_a_three_party_cycle_is_refused(make: Callable[..., LockerRig]) -> None:
    rig = make()
    for pull, key in [(1, "a"), (2, "b"), (3, "c")]:
        await holds(rig, pull, key)
    rig.spawn(rig.locker.acquire(ask(1, "b", wait=WAIT)))
    rig.spawn(rig.locker.acquire(ask(2, "c", wait=WAIT)))
    await settle()
    answer = await rig.locker.acquire(ask(3, "a", wait=WAIT))
    assert answer.reason is Reason.DEADLOCK
    assert answer.cycle == [name(3), name(1), name(2), name(3)]


def one_of_group_g(limit: int) -> PolicyRules:
    """Group g: every key under ``g``, at most ``limit`` held at once."""
    return PolicyRules(concurrency=[
        ConcurrencyLimit(name="g", match=KeyPattern(path_prefix="g"), limit=limit)])


async def test_a_cycle_through_a_concurrency_limit_is_refused(
        make: Callable[..., LockerRig]) -> None:
    """Pull 1 holds g/a, the one lock group g (limit 1) allows, and waits for k, held by pull
    2; pull 2 then waits for g/b, free but held back by the limit, that is by pull 1: neither
    can go on. The closing wait is refused ``deadlock``."""
    rig = make(policies=one_of_group_g(1))
    await holds(rig, 1, "g/a")
    await holds(rig, 2, "k")
    first = rig.spawn(rig.locker.acquire(ask(1, "k", wait=WAIT)))
    await settle()
    answer = await rig.locker.acquire(ask(2, "g/b", wait=timedelta(seconds=2)))
    assert answer.reason is Reason.DEADLOCK, answer
    assert answer.cycle == [name(2), name(1), name(2)]
    assert not first.done()
    event = next(e for e in rig.events if e.type == "deadlock")
    assert [(edge["key"], edge["why"]) for edge in event.details["edges"]] == [
        (ask(2, "g/b").key, "limit"), (ask(1, "k").key, "holds")]


async def test_a_cycle_closed_by_a_holder_of_the_group_is_refused(
        make: Callable[..., LockerRig]) -> None:
    """The same cycle closed from the other side: pull 2 (holding k) waits first for g/b, held
    back by pull 1's g/a (limit 1); pull 1, free until then, now asks for k: it would wait for
    pull 2, who waits for pull 1's lock of the group. Pull 1's wait is refused."""
    rig = make(policies=one_of_group_g(1))
    await holds(rig, 1, "g/a")
    await holds(rig, 2, "k")
    first = rig.spawn(rig.locker.acquire(ask(2, "g/b", wait=WAIT)))
    await settle()
    assert not first.done(), first.result()
    answer = await rig.locker.acquire(ask(1, "k", wait=timedelta(seconds=2)))
    assert answer.reason is Reason.DEADLOCK, answer
    assert answer.cycle == [name(1), name(2), name(1)]
    assert not first.done()


async def test_a_wait_for_a_group_with_a_holder_free_to_finish_is_no_deadlock(
        make: Callable[..., LockerRig]) -> None:
    """Group g allows 2; pull 1 holds g/a and waits for k, held by pull 2; pull 3 holds g/c and
    waits for nothing. Pull 2's wait for g/b is held back by the limit, but it goes on as soon
    as either holder lets go, and pull 3 is free to: no deadlock (a wait counted as one on
    every holder of the group would refuse it). Once pull 3 lets go, pull 2 gets g/b."""
    rig = make(policies=one_of_group_g(2))
    await holds(rig, 1, "g/a")
    await holds(rig, 2, "k")
    await holds(rig, 3, "g/c")
    first = rig.spawn(rig.locker.acquire(ask(1, "k", wait=WAIT)))
    await settle()
    second = rig.spawn(rig.locker.acquire(ask(2, "g/b", wait=WAIT)))
    await settle()
    assert not second.done(), second.result()
    await rig.locker.release(ask(3, "g/c").key)
    answer = await asyncio.wait_for(second, 10)
    assert answer.acquired, answer
    assert "deadlock" not in rig.types()
    assert not first.done()


async def test_a_batch_that_would_close_a_cycle_is_refused(make: Callable[..., LockerRig]) -> None:
    rig = make()
    await holds(rig, 1, "a")
    await holds(rig, 2, "b")
    rig.spawn(rig.locker.acquire_batch(batch(1, "b", "c")))
    await settle()
    answer = await rig.locker.acquire_batch(batch(2, "a", "d"))
    assert not answer.acquired and answer.reason is Reason.DEADLOCK
    assert answer.cycle == [name(2), name(1), name(2)]
    assert await rig.locker.get(ask(2, "d").key) is None, "the refused batch took nothing"


async def test_a_three_party_cycle_through_batches_is_refused(
    make: Callable[..., LockerRig],
) -> None:
    rig = make()
    for pull, key in [(1, "a"), (2, "b"), (3, "c")]:
        await holds(rig, pull, key)
    rig.spawn(rig.locker.acquire_batch(batch(1, "b", "x")))
    rig.spawn(rig.locker.acquire(ask(2, "c", wait=WAIT)))
    await settle()
    answer = await rig.locker.acquire_batch(batch(3, "a", "y"))
    assert answer.reason is Reason.DEADLOCK and answer.cycle is not None
    assert len(answer.cycle) == 4


async def test_waiting_behind_someone_who_waits_for_you_is_a_cycle(
    make: Callable[..., LockerRig],
) -> None:
    # X holds k. B waits first for k, A second; A holds j. When B now asks for j it would wait
    # for A, who waits behind B for k: neither ever gets both.
    rig = make()
    await holds(rig, 9, "k")
    await holds(rig, 1, "j")
    rig.spawn(rig.locker.acquire(ask(2, "k", wait=WAIT)))
    await settle()
    rig.spawn(rig.locker.acquire(ask(1, "k", wait=WAIT)))
    await settle()
    answer = await rig.locker.acquire(ask(2, "j", wait=WAIT))
    assert answer.reason is Reason.DEADLOCK
    assert answer.cycle == [name(2), name(1), name(2)]


def shared(pull: int, key: str, *, wait: timedelta | None = None) -> LockRequest:
    return ask(pull, key, wait=wait).model_copy(update={"mode": "shared"})


async def test_a_cycle_through_any_shared_holder_is_refused(
    make: Callable[..., LockerRig],
) -> None:
    # Pulls 1 and 2 hold k shared (1 first), 3 holds l. 3 waits for k, which it gets only
    # once 1 and 2 both let go; 2 now asks for l, held by 3: neither 2 nor 3 ever moves.
    # Before, the graph had 3 wait only for k's first holder (1), and the cycle through 2
    # was missed: both waited until their waits ran out.
    rig = make()
    assert (await rig.locker.acquire(shared(1, "k"))).acquired
    assert (await rig.locker.acquire(shared(2, "k"))).acquired
    await holds(rig, 3, "l")
    writer = rig.spawn(rig.locker.acquire(ask(3, "k", wait=WAIT)))
    await settle()
    answer = await rig.locker.acquire(ask(2, "l", wait=timedelta(seconds=5)))
    assert answer.reason is Reason.DEADLOCK, answer
    assert answer.cycle == [name(2), name(3), name(2)]
    assert not writer.done()


async def test_a_shared_waiter_does_not_wait_for_the_keys_shared_holders(
    make: Callable[..., LockerRig],
) -> None:
    # 1 holds k shared and 3 holds m; 2 asks for k and m together, shared, and waits (for 3's
    # m only: it would join 1 on k). 2 holds l, and 1 now asks for l: it waits for 2, who waits
    # for 3, who waits for no one. Before, 2 was taken to wait for 1 (k's shared holder), and
    # 1's wait for l was refused as a deadlock that was none.
    rig = make()
    assert (await rig.locker.acquire(shared(1, "k"))).acquired
    await holds(rig, 3, "m")
    await holds(rig, 2, "l")
    both = batch(2, "k", "m").model_copy(update={"mode": "shared"})
    reader = rig.spawn(rig.locker.acquire_batch(both))
    await settle()
    assert not reader.done(), reader.result()
    asking = rig.spawn(rig.locker.acquire(ask(1, "l", wait=WAIT)))
    await settle()
    assert not asking.done(), asking.result()
    await rig.locker.release(ask(3, "m").key)
    assert (await asyncio.wait_for(reader, 10)).acquired
    await rig.locker.release(ask(2, "l").key)
    answer = await asyncio.wait_for(asking, 10)
    assert answer.acquired, answer
    assert "deadlock" not in rig.types()


async def test_shared_waiters_queued_together_wait_for_no_one_but_the_writer(
    make: Callable[..., LockerRig],
) -> None:
    # 9 holds k; 1 and then 2 wait for it shared, and 2 holds m. When 1 now asks for m it
    # waits for 2, but 2 does not wait for 1: when 9 lets k go both readers get it together,
    # 2 goes on and frees m. Before, 2 was taken to wait for 1 (queued ahead of it), and 1's
    # wait for m was refused as a deadlock that was none.
    rig = make()
    await holds(rig, 9, "k")
    await holds(rig, 2, "m")
    readers = []
    for pull in (1, 2):
        readers.append(rig.spawn(rig.locker.acquire(shared(pull, "k", wait=WAIT))))
        await settle()
    asking = rig.spawn(rig.locker.acquire(ask(1, "m", wait=WAIT)))
    await settle()
    assert not asking.done(), asking.result()
    await rig.locker.release(ask(9, "k").key)
    for reader in readers:
        assert (await asyncio.wait_for(reader, 10)).acquired
    await rig.locker.release(ask(2, "m").key)
    answer = await asyncio.wait_for(asking, 10)
    assert answer.acquired, answer
    assert "deadlock" not in rig.types()


async def test_a_plain_queue_is_never_a_deadlock(make: Callable[..., LockerRig]) -> None:
    rig = make()
    await holds(rig, 1, "k")
    waiting = [rig.spawn(rig.locker.acquire(ask(pull, "k", wait=WAIT))) for pull in range(2, 12)]
    await settle()
    assert len(await rig.locker.queue(ask(1, "k").key)) == 10
    # A waiter's own pull holding other keys adds no cycle either.
    await holds(rig, 2, "other")
    assert (await rig.locker.acquire(ask(2, "other2", wait=WAIT))).acquired
    for holder in range(1, 12):
        await rig.locker.release(ask(holder, "k").key)
        await settle()
    assert all(task.done() and task.result().acquired for task in waiting)
    assert "deadlock" not in rig.types()


async def test_with_detection_off_a_cycle_just_waits(make: Callable[..., LockerRig]) -> None:
    rig = make(deadlock_detection=False)
    await holds(rig, 1, "a")
    await holds(rig, 2, "b")
    rig.spawn(rig.locker.acquire(ask(1, "b", wait=WAIT)))
    await settle()
    answer = await rig.locker.acquire(ask(2, "a", wait=timedelta(milliseconds=50)))
    assert answer.reason is Reason.TIMEOUT
    assert "deadlock" not in rig.types()


# --- the graph alone ---------------------------------------------------------------------------


def waiter(pull: int, *keys: str) -> Waiter:
    now = utcnow()
    return Waiter(id=f"w{pull}{''.join(keys)}", candidates=tuple(
        candidate_for(request_for(pull=pull, path=key)) for key in keys), ttl=None,
        enqueued_at=now, deadline=now + WAIT, seq=pull)


def owner(pull: int) -> tuple[str, int]:
    return ("acme/infra", pull)


def test_no_cycle_without_a_path_back() -> None:
    graph = [KeyWaits(key="k", holder=owner(1), waiters=(waiter(2, "k"), waiter(3, "k")))]
    assert deadlock.find_cycle(graph, owner(3)) is None
    assert deadlock.find_cycle(graph, owner(2)) is None


def test_the_shortest_cycle_is_reported() -> None:
    graph = [
        KeyWaits(key="a", holder=owner(1), waiters=(waiter(2, "a"),)),
        KeyWaits(key="b", holder=owner(2), waiters=(waiter(1, "b"), waiter(3, "b"))),
        KeyWaits(key="c", holder=owner(3), waiters=(waiter(1, "c"),)),
    ]
    cycle = deadlock.find_cycle(graph, owner(1))
    assert cycle is not None
    assert deadlock.describe(cycle) == [name(1), name(2), name(1)]


def test_a_pull_never_waits_for_itself() -> None:
    graph = [KeyWaits(key="a", holder=owner(1), waiters=(waiter(1, "a"), waiter(1, "a")))]
    assert deadlock.find_cycle(graph, owner(1)) is None


def _reference_find_cycle(graph: KeyWaitsList,
                          start: tuple[str, int]) -> list[deadlock.Edge] | None:
    """The search as it was: breadth first over every edge :func:`deadlock.edges` makes."""
    adjacency = deadlock.edges(graph)
    frontier: list[tuple[tuple[str, int], list[deadlock.Edge]]] = [(start, [])]
    seen = {start}
    while frontier:
        next_frontier = []
        for node, path in frontier:
            for edge in adjacency.get(node, ()):
                if edge.target == start:
                    return [*path, edge]
                if edge.target not in seen:
                    seen.add(edge.target)
                    next_frontier.append((edge.target, [*path, edge]))
        frontier = next_frontier
    return None


def _mode_waiter(pull: int, key: str, mode: str, n: int) -> Waiter:
    now = utcnow()
    request = request_for(pull=pull, path=key).model_copy(update={"mode": mode})
    return Waiter(id=f"w{n}", candidates=(candidate_for(request),), ttl=None,
                  enqueued_at=now, deadline=now + WAIT, seq=n)


KEYS_DRAWN = ("a", "b", "c", "d")


@st.composite
def _graphs(draw: st.DrawFn) -> KeyWaitsList:
    """Random wait-for graphs over a few pulls: holders (shared or not), queues of exclusive
    and shared waiters, a pull's waiters on several keys and several times on one."""
    graph, n = [], 0
    for key in draw(st.lists(st.sampled_from(KEYS_DRAWN), min_size=1, max_size=4, unique=True)):
        holders = tuple(owner(p) for p in draw(
            st.lists(st.integers(1, 6), max_size=3, unique=True)))
        waiters = []
        for pull, mode in draw(st.lists(st.tuples(st.integers(1, 6),
                                                  st.sampled_from(("exclusive", "shared"))),
                                        max_size=8)):
            n += 1
            waiters.append(_mode_waiter(pull, key, mode, n))
        graph.append(KeyWaits(key=key, holder=holders[0] if holders else None,
                              waiters=tuple(waiters), holders=holders,
                              shared=bool(holders) and draw(st.booleans())))
    return graph


@settings(max_examples=400, deadline=None)
@given(graph=_graphs(), start=st.integers(1, 6))
def test_the_search_finds_the_cycle_the_search_over_every_edge_finds(
        graph: KeyWaitsList, start: int) -> None:
    # Differential: the same cycle (or none) as the breadth-first search over every edge of
    # deadlock.edges, which makes O(n²) of them for a queue of n.
    assert deadlock.find_cycle(graph, owner(start)) == _reference_find_cycle(graph, owner(start))


GROUP_KEYS = ("g/a", "g/b", "g/c", "k", "l")


@st.composite
def _limited_graphs(draw: st.DrawFn) -> tuple[KeyWaitsList, PolicyRules]:
    """Random wait-for graphs under a group g (the keys under ``g``) of a drawn limit: held
    keys of the group nobody waits for, and batches asking for two keys of it."""
    rules = one_of_group_g(draw(st.integers(1, 3)))
    held = {key: tuple(owner(p) for p in draw(st.lists(st.integers(1, 5), max_size=2,
                                                         unique=True)))
            for key in GROUP_KEYS}
    queues: dict[str, list[Waiter]] = {key: [] for key in GROUP_KEYS}
    for n, (pull, mode, keys) in enumerate(draw(st.lists(st.tuples(
            st.integers(1, 5), st.sampled_from(("exclusive", "shared")),
            st.lists(st.sampled_from(GROUP_KEYS), min_size=1, max_size=2, unique=True)),
            max_size=7))):
        now = utcnow()
        one = Waiter(id=f"w{n}", candidates=tuple(candidate_for(request_for(
            pull=pull, path=key).model_copy(update={"mode": mode})) for key in keys),
            ttl=None, enqueued_at=now, deadline=now + WAIT, seq=n)
        for key in keys:
            queues[key].append(one)
    graph = []
    for key in GROUP_KEYS:
        holders = held[key]
        if not holders and not queues[key]:
            continue
        parts = parts_of(candidate_for(request_for(pull=1, path=key)))
        graph.append(KeyWaits(key=ask(1, key).key, holder=holders[0] if holders else None,
                              waiters=tuple(queues[key]), holders=holders,
                              shared=len(holders) > 1 or (bool(holders) and draw(st.booleans())),
                              parts=parts if holders else None))
    return graph, rules


def _waits_for(graph: KeyWaitsList, rules: PolicyRules, entry: KeyWaits, index: int,
               stuck: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Whom the waiter at ``index`` of ``entry`` waits for while ``stuck`` never move, written
    out from the rule in docs/08-policies.md (not from the search): its key's holders, the
    waiters ahead of it, and every holder of a group it would take past the limit of which
    too few locks are held outside ``stuck`` (its own pull's counted as free)."""
    waiter = entry.waiters[index]
    me, shared = waiter.owner, waiter.mode == "shared"
    holders = {e.key: set(e.holders) for e in graph}
    out = set() if shared and entry.shared else set(entry.holders)
    out |= {a.owner for a in entry.waiters[:index] if not (shared and a.mode == "shared")}
    locks: dict[str, list[tuple[str, int]]] = {}
    for e in graph:
        if e.parts is not None:
            for group in policies.groups_of(e.parts, rules):
                locks.setdefault(group, []).extend(e.holders)
    adding: dict[str, int] = {}
    limits = {rule.name: rule.limit for rule in rules.concurrency}  # (per: pattern)
    for candidate in waiter.candidates:
        if me not in holders.get(candidate.key, set()):
            for group in policies.groups_of(parts_of(candidate), rules):
                adding[group] = adding.get(group, 0) + 1
    for group, count in adding.items():
        held = locks.get(group, [])
        need = len(held) + count - limits[group]
        if 0 < need <= len(held) and sum(h == me or h not in stuck for h in held) < need:
            out |= set(held)
    return out - {me}


def _deadlocked_with(graph: KeyWaitsList, rules: PolicyRules,
                     start: tuple[str, int]) -> set[tuple[str, int]]:
    """Every owner of a set of owners containing ``start`` none of which can move (each has a
    waiter waiting for one of them) and each of which reaches ``start`` through them: by
    trying every set."""
    waiting = sorted({w.owner for e in graph for w in e.waiters})
    found: set[tuple[str, int]] = set()
    for size in range(1, len(waiting) + 1):
        for chosen in itertools.combinations(waiting, size):
            stuck = set(chosen)
            if start not in stuck:
                continue
            edges_in: dict[tuple[str, int], set[tuple[str, int]]] = {o: set() for o in stuck}
            for e in graph:
                for index, w in enumerate(e.waiters):
                    if w.owner in stuck:
                        edges_in[w.owner] |= _waits_for(graph, rules, e, index, stuck) & stuck
            if any(not targets for targets in edges_in.values()):
                continue
            reach = {start}
            while True:
                more = {o for o in stuck - reach if edges_in[o] & reach}
                if not more:
                    break
                reach |= more
            if reach == stuck:
                found |= stuck
    return found


@settings(max_examples=600, deadline=None)
@given(drawn=_limited_graphs(), start=st.integers(1, 5))
def test_a_cycle_through_a_group_is_found_exactly_when_the_rule_says(
        drawn: tuple[KeyWaitsList, PolicyRules], start: int) -> None:
    # Differential against the rule tried on every set of owners: a cycle is found exactly
    # when one exists (no false victim, none missed), and each of its edges is a wait of
    # the set.
    graph, rules = drawn
    cycle = deadlock.find_cycle(graph, owner(start), rules)
    stuck = _deadlocked_with(graph, rules, owner(start))
    assert (cycle is not None) == bool(stuck), (cycle, stuck)
    if cycle is not None:
        assert cycle[0].waiter == cycle[-1].target == owner(start)
        for before, edge in itertools.pairwise(cycle):
            assert before.target == edge.waiter
        for edge in cycle:
            assert edge.target in stuck
            assert any(edge.target in _waits_for(graph, rules, e, index, stuck)
                       for e in graph for index, w in enumerate(e.waiters)
                       if w.owner == edge.waiter), edge


def test_a_batch_needing_two_locks_of_a_group_needs_two_holders_free() -> None:
    # Group g allows 2; pull 1 holds g/a and waits for k, held by 3; pull 2 holds g/c; pull 3
    # asks for g/b and g/d together: two locks, so both holders must let go. Pull 2 is free,
    # pull 1 waits for 3: too few can let go. With limit 3 one is enough: no deadlock.
    def graph() -> KeyWaitsList:
        both = Waiter(id="w3", candidates=tuple(candidate_for(request_for(pull=3, path=key))
                                                for key in ("g/b", "g/d")), ttl=None,
                      enqueued_at=utcnow(), deadline=utcnow() + WAIT, seq=3)
        parts = {key: parts_of(candidate_for(request_for(pull=1, path=key)))
                 for key in ("g/a", "g/c")}
        return [
            KeyWaits(key=ask(1, "g/a").key, holder=owner(1), holders=(owner(1),), waiters=(),
                     parts=parts["g/a"]),
            KeyWaits(key=ask(1, "g/c").key, holder=owner(2), holders=(owner(2),), waiters=(),
                     parts=parts["g/c"]),
            KeyWaits(key=ask(1, "k").key, holder=owner(3), holders=(owner(3),),
                     waiters=(waiter(1, "k"),)),
            KeyWaits(key=ask(1, "g/b").key, holder=None, waiters=(both,)),
            KeyWaits(key=ask(1, "g/d").key, holder=None, waiters=(both,)),
        ]
    cycle = deadlock.find_cycle(graph(), owner(3), one_of_group_g(2))
    assert cycle is not None and deadlock.describe(cycle) == [name(3), name(1), name(3)]
    assert cycle[0].why == "limit"
    assert deadlock.find_cycle(graph(), owner(3), one_of_group_g(3)) is None
    assert deadlock.find_cycle(graph(), owner(3)) is None, "no rules: no group"


def test_a_lock_of_the_waiters_own_pull_counts_as_free() -> None:
    # Group g allows 2: pull 2 holds g/c itself, pull 1 holds g/a and waits for k, held by 2.
    # Pull 2's wait for g/b goes on if it lets g/c go: not counted as a deadlock.
    parts = {key: parts_of(candidate_for(request_for(pull=1, path=key)))
             for key in ("g/a", "g/c")}
    graph = [
        KeyWaits(key=ask(1, "g/a").key, holder=owner(1), holders=(owner(1),), waiters=(),
                 parts=parts["g/a"]),
        KeyWaits(key=ask(1, "g/c").key, holder=owner(2), holders=(owner(2),), waiters=(),
                 parts=parts["g/c"]),
        KeyWaits(key=ask(1, "k").key, holder=owner(2), holders=(owner(2),),
                 waiters=(waiter(1, "k"),)),
        KeyWaits(key=ask(1, "g/b").key, holder=None, waiters=(waiter(2, "g/b"),)),
    ]
    assert deadlock.find_cycle(graph, owner(2), one_of_group_g(2)) is None
    # With limit 1 (lowered below the two held) pull 2 needs both to go, its own and pull 1's.
    cycle = deadlock.find_cycle(graph, owner(2), one_of_group_g(1))
    assert cycle is not None and deadlock.describe(cycle) == [name(2), name(1), name(2)]


def test_one_long_queue_is_searched_without_an_edge_per_pair() -> None:
    # 3,000 waiters on one key: the search over every edge made 4.5 million of them. Counted
    # by the Edge objects made, not timed: one per waiter ahead of the start, each reached
    # once.
    waiters = tuple(_mode_waiter(10 + i, "k", "exclusive", i) for i in range(3000))
    graph = [KeyWaits(key="k", holder=owner(1), waiters=waiters, holders=(owner(1),))]
    made = []
    real = deadlock.Edge

    def counted(*args: Any) -> deadlock.Edge:
        made.append(1)
        return real(*args)

    deadlock.Edge = counted  # type: ignore[misc, assignment]
    try:
        assert deadlock.find_cycle(graph, waiters[-1].owner) is None
    finally:
        deadlock.Edge = real  # type: ignore[misc]
    assert len(made) <= 2 * len(waiters)


class _Looked(tuple[str, int]):
    """An owner that counts how often it is hashed or compared (a look at it)."""

    looks = 0

    def __hash__(self) -> int:
        _Looked.looks += 1
        return super().__hash__()

    def __eq__(self, other: object) -> bool:
        _Looked.looks += 1
        return super().__eq__(other)


@pytest.mark.parametrize("free", [0, 600])
def test_a_full_group_is_searched_without_a_look_per_waiter_and_holder(free: int) -> None:
    # 600 pulls, each holding one lock of group g and waiting for another lock of it, and
    # ``free`` pulls holding one each and waiting for nothing. With none free (limit 1) every
    # one waits for the others: a deadlock. With 600 free (limit 600) each goes on once 601
    # are let go, its own and the free pulls': none. Counted (not timed): the search looked
    # at every holder of the group for every waiter, again at each pass, 1.9 million looks
    # with 600 free, where each is now looked at a bounded number of times.
    n = 600
    graph = [KeyWaits(key=ask(i, f"g/h{i}").key, holder=owner(i), waiters=(),
                      holders=(_Looked(owner(i)),),
                      parts=parts_of(candidate_for(request_for(pull=i, path=f"g/h{i}"))))
             for i in range(1, n + free + 1)]
    graph += [KeyWaits(key=ask(i, f"g/w{i}").key, holder=None, waiters=(waiter(i, f"g/w{i}"),))
              for i in range(1, n + 1)]
    _Looked.looks = 0
    cycle = deadlock.find_cycle(graph, owner(1), one_of_group_g(max(free, 1)))
    assert (cycle is not None) == (not free)
    assert _Looked.looks <= 40 * (n + free), _Looked.looks


def in_repo(owner: tuple[str, int], key: str) -> Waiter:
    now = utcnow()
    return Waiter(id=f"w{owner}{key}", candidates=(candidate_for(request_for(
        repo=owner[0], pull=owner[1], path=key)),), ttl=None, enqueued_at=now,
        deadline=now + WAIT, seq=owner[1])


def test_a_reader_gets_only_the_parts_of_a_cycle_in_repositories_it_may_read() -> None:
    mine, theirs, third = ("acme/infra", 1), ("acme/infra/sub", 2), ("other/net", 3)
    graph = [
        KeyWaits(key="a", holder=None, waiters=(in_repo(mine, "a"),
                                                in_repo(theirs, "a"))),
        KeyWaits(key="b", holder=None, waiters=(in_repo(theirs, "b"),
                                                in_repo(third, "b"))),
        KeyWaits(key="c", holder=None, waiters=(in_repo(third, "c"),
                                                in_repo(mine, "c"))),
    ]
    cycle = deadlock.find_cycle(graph, mine)
    assert cycle is not None
    details: dict[str, Any] = {"cycle": deadlock.describe(cycle),
                               "edges": deadlock.edge_details(cycle)}
    assert details["edges"][0] == {
        "waiter": "acme/infra#1", "waiterRepo": "acme/infra", "waiterPull": 1,
        "target": "other/net#3", "targetRepo": "other/net", "targetPull": 3,
        "key": "c", "why": "ahead"}
    assert deadlock.cycle_repos(details) == {"acme/infra", "acme/infra/sub", "other/net"}
    everything = {"acme/infra", "acme/infra/sub", "other/net"}
    assert deadlock.for_reader(details, everything) is details
    shown = deadlock.for_reader(details, {"acme/infra", "other/net"})
    assert shown["cycle"] == ["acme/infra#1", "other/net#3", deadlock.OTHER_REPOSITORY,
                              "acme/infra#1"]
    assert [e["key"] for e in shown["edges"]] == ["c", None, None]
    assert shown["hiddenOwners"] == 1
    assert "acme/infra/sub" not in repr(shown)
    alone = deadlock.for_reader(details, {"acme/infra"})
    assert alone["cycle"] == ["acme/infra#1", *[deadlock.OTHER_REPOSITORY] * 2, "acme/infra#1"]
    assert alone["hiddenOwners"] == 2
    assert not {"acme/infra/sub", "other/net", "b"} & {str(v) for e in alone["edges"]
                                                       for v in e.values()}
    # An edge that does not name its ends' repositories (an older replica's event) is shown
    # only to a reader of every repository (``None``: the right without a repository).
    old = {"cycle": details["cycle"], "edges": [
        {k: e[k] for k in ("waiter", "target", "key", "why")} for e in details["edges"]]}
    assert deadlock.cycle_repos(old) == {None}
    assert deadlock.for_reader(old, {"acme/infra", None}) is old
    assert deadlock.for_reader(old, {"acme/infra"})["hiddenOwners"] == 3


async def test_a_deadlock_found_by_a_caller_whose_retry_took_its_waiter_over_leaves_it(
    make: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2's wait for ``a`` (with a ``requestId``) is checked for a cycle; before the check
    reads the graph, the same request, sent again, takes the waiter over (its own check finds
    no cycle) and waits, and then pull 1 queues for ``b``, which pull 2 holds. The first
    caller's check now finds the cycle: it is refused, but the waiter is the retry's and stays
    queued for it. Before, that refusal's cancel named no caller: it removed the retry's
    waiter, and the retry was told ``deadlock`` by a check it never made."""
    rig = make()
    backend = rig.locker.backend
    await holds(rig, 1, "a")
    await holds(rig, 2, "b")
    asked = ask(2, "a", wait=WAIT).model_copy(update={"request_id": "job-12"})
    waiting, checks = asyncio.Event(), list[str]()
    await_turn, wait_graph = queueing.await_turn, backend.wait_graph_from
    retry: list[asyncio.Task[AcquireResult]] = []

    async def waits(*args: Any, **kwargs: Any) -> Any:
        waiting.set()
        return await await_turn(*args, **kwargs)

    async def graph(waiter: Waiter, *, policy: QueuePolicy | None = None) -> KeyWaitsList:
        checks.append("check")
        if len(checks) == 1:  # the first caller's check: the retry comes, then pull 1 waits
            retry.append(rig.spawn(rig.locker.acquire(asked)))
            await asyncio.wait_for(waiting.wait(), 10)
            wait = Wait(id="pull-1-b", timeout=WAIT)
            backend.grants.expect(wait.id)  # (expected before it is queued)
            queued = await backend.acquire_or_enqueue(candidate_for(ask(1, "b")), ttl=None,
                                                       wait=wait, policy=QueuePolicy())
            assert queued.status is Status.QUEUED, queued
        return await wait_graph(waiter, policy=policy)

    monkeypatch.setattr(queueing, "await_turn", waits)
    monkeypatch.setattr(backend, "wait_graph_from", graph)
    first = await asyncio.wait_for(rig.locker.acquire(asked), 30)
    assert first.reason is Reason.DEADLOCK, first
    await settle()
    assert not retry[0].done(), retry[0]
    assert [w.owner[1] for w in await rig.locker.queue(ask(1, "a").key)] == [2], "not kept"
    await rig.locker.release(ask(1, "a").key)  # the retry's waiter is served
    answer = await asyncio.wait_for(retry[0], 30)
    assert answer.acquired and answer.lock is not None and answer.lock.pull.num == 2, answer


async def test_a_wait_granted_before_its_deadlock_refusal_could_withdraw_it_is_told_granted(
    make: Callable[..., LockerRig], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pull 2 closes a cycle, but pull 1 lets go of the key pull 2 waits for between the check
    and the withdrawal: pull 2 is answered with the grant, as the store made it. That grant
    was a state change nobody was told of (no ``granted-from-queue`` event, where every other
    grant from the queue has one) and its lease had no timer of this locker. Its wait is told
    ``queued`` before that grant, as every waiter's (it was told no ``queued`` at all)."""
    rig = make()
    await holds(rig, 1, "a")
    await holds(rig, 2, "b")
    first = rig.spawn(rig.locker.acquire(ask(1, "b", wait=WAIT)))
    await settle()
    backend = rig.locker.backend
    graph = backend.wait_graph_from

    async def then_pull_1_lets_go(waiter: Waiter, **kwargs: Any) -> KeyWaitsList:
        found = await graph(waiter, **kwargs)
        await rig.locker.release(ask(1, "a").key, owner=("acme/infra", 1))
        return found

    monkeypatch.setattr(backend, "wait_graph_from", then_pull_1_lets_go)
    asked = request_for(pull=2, path="a", wait=WAIT, ttl=timedelta(minutes=5))
    answer = await rig.locker.acquire(asked)
    monkeypatch.undo()
    assert answer.acquired and answer.lock is not None and answer.lock.pull.num == 2, answer
    granted = [e for e in rig.events if e.type == "granted-from-queue"]
    assert [(e.key, e.lock.pull.num if e.lock else None) for e in granted] == [
        (asked.key, 2)], rig.types()
    released = next(e for e in rig.events if e.type == "released")
    assert list(released.details["handedTo"]) == [granted[0].details["waiterId"]]
    told = [e.type for e in rig.events if e.details.get("waiterId") == released.details[
        "handedTo"][0]]
    assert told == ["queued", "granted-from-queue"], told
    assert asked.key in rig.locker.leases.armed()
    assert rig.types().count("deadlock") == 0
    await rig.locker.release(ask(2, "b").key)
    assert (await asyncio.wait_for(first, 5)).acquired


def test_a_reader_gets_only_the_holders_and_waiters_ahead_in_repositories_it_may_read() -> None:
    """A ``queued`` event's view of the key can name another repository's pull (projects of two
    repositories can join to the same keys): each is kept only for a reader of its repository."""
    details: dict[str, Any] = {
        "position": 2, "estimateSeconds": None,
        "holders": [{"owner": "acme/infra/sub#2", "repo": "acme/infra/sub", "pull": 2,
                     "mode": "exclusive", "since": "2026-01-01T00:00:00Z"}],
        "ahead": [{"id": "w-1", "requestId": "r-1", "owner": "acme/infra/sub#3",
                   "repo": "acme/infra/sub", "pull": 3, "mode": "exclusive",
                   "priority": "normal"},
                  {"id": "w-2", "requestId": None, "owner": "acme/infra#4", "repo": "acme/infra",
                   "pull": 4, "mode": "exclusive", "priority": "normal"}]}
    assert visibility.wait_repos(details) == {"acme/infra/sub", "acme/infra"}
    assert visibility.wait_for_reader(details, {"acme/infra", "acme/infra/sub"}) is details
    shown = visibility.wait_for_reader(details, {"acme/infra"})
    assert shown["hiddenOwners"] == 2
    assert shown["holders"][0] == {"owner": "(other repository)", "repo": None, "pull": None,
                                   "mode": "exclusive", "since": "2026-01-01T00:00:00Z"}
    assert shown["ahead"][0] == {"id": None, "requestId": None, "owner": "(other repository)",
                                 "repo": None, "pull": None, "mode": "exclusive",
                                 "priority": "normal"}
    assert shown["ahead"][1] == details["ahead"][1]
    assert "acme/infra/sub" not in str(shown)
