"""Deadlock detection over the wait-for graph.

Nodes are owners (a pull request of a repository: Atlantis's unit of ownership). For every key
with waiters there are two kinds of edge, and a third through a concurrency group:

* **holder**: each waiter waits for every owner holding the key (all of them, when it is
  held shared: an exclusive waiter gets it only once each has let go), except that a shared
  waiter does not wait for shared holders: it would join them, and what keeps it waiting is
  a writer served before it (the edge ahead below, and that writer's own edges), another
  key of its batch, a freeze or a limit;
* **queued behind**: each waiter waits for every owner queued ahead of it on that key (the
  lock will reach them first, and they may never give it up), except that a shared waiter
  does not wait for a shared one ahead of it: the two are granted together, and what it
  waits for through an exclusive waiter between them is reached through that waiter;
* **limit** (under concurrency rules): a waiter held back by a full group waits for the
  group's holders, of every key, as one: it goes on once enough of the group's locks are let
  go, whichever they are (one, when it asks for one lock of a group at its limit). So the
  group is an OR node, not an edge to each holder: a cycle through it is a deadlock only when
  too few of its locks are held by owners that are not themselves waiting, transitively, for
  the waiter (:func:`find_cycle`; docs/08-policies.md).

A wait closes a cycle when, just after it was queued, its owner can reach itself. The locker
checks right after enqueueing (not before), so of two waits that close a cycle together the
second one always sees the first: at least one of them is refused, never neither. The refused
one leaves the queue and gets a ``deadlock`` answer naming the cycle.

Edges between waiters and holders of the same owner are left out: a pull never waits for
itself (the same pull asking again for its own lock gets it).

A cycle can cross repositories (two repositories' projects joining to the same keys, queued
together behind a waiting freeze), so each edge of the ``deadlock`` event names its ends'
repositories and pulls as data of their own (``waiterRepo``, ``waiterPull``, ``targetRepo``,
``targetPull``: never parsed back from the names), and :func:`for_reader` gives a reader only
the parts of the cycle in repositories it may read.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from enhanced_locking import policies
from enhanced_locking.backends.base import Owner, parts_of
from enhanced_locking.backends.waiting import KeyWaits, Waiter
from enhanced_locking.types import CycleOwner

__all__ = ["OTHER_REPOSITORY", "Edge", "cycle_repos", "describe", "edge_details", "edges",
           "find_cycle", "for_reader", "owner_name", "owners", "owners_for_reader"]


@dataclass(frozen=True)
class Edge:
    """``waiter`` waits for ``target`` on ``key``, because ``target`` holds it or is ahead."""

    waiter: Owner
    target: Owner
    key: str
    why: str  # "holds", "ahead" or "limit"


def owner_name(owner: Owner) -> str:
    return f"{owner[0]}#{owner[1]}"


def edges(graph: Iterable[KeyWaits]) -> dict[Owner, list[Edge]]:
    """The wait-for graph as adjacency lists."""
    out: dict[Owner, list[Edge]] = {}
    for entry in graph:
        for index, waiter in enumerate(entry.waiters):
            me = waiter.owner
            shared = waiter.mode == "shared"
            holders = () if shared and entry.shared else _holders(entry)
            targets: list[tuple[Owner, str]] = [(holder, "holds") for holder in holders]
            targets.extend((ahead.owner, "ahead") for ahead in entry.waiters[:index]
                           if not (shared and ahead.mode == "shared"))
            for target, why in targets:
                if target != me:
                    out.setdefault(me, []).append(Edge(me, target, entry.key, why))
    return out


def find_cycle(graph: Iterable[KeyWaits], start: Owner,
               rules: policies.PolicyRules | None = None) -> list[Edge] | None:
    """A shortest-first path of edges from ``start`` back to ``start``, if there is one.

    Breadth first over the owners, so the cycle reported is a shortest one (the clearest to
    read), visiting each owner's edges in :func:`edges`' order: the same cycle a search over
    :func:`edges` finds, without making them. A waiter waits for every owner ahead of it on
    its key, so :func:`edges` holds O(n²) edges for a queue of n (1.6 s of CPU for one queue
    of 1,000, 12.5 s for 3,000). Here each key keeps how far its queue has been looked along
    for an exclusive waiter and for a shared one (which waits for no shared waiter ahead):
    every owner before that point is already reached (or was ``start``, and the search ended
    there), so the edges to it change nothing and are passed over, and each waiter and each
    holder is looked at a bounded number of times: O(waiters + holders) in all. ``start``'s
    own edges are looked at in full and move no mark: they leave out ``start``'s own waiters
    and holds, which a later owner's edges reach it by.

    With ``rules`` that have concurrency limits, a waiter held back by a full group (the
    graph's entries with ``parts`` count the group's locks) waits for the group's holders as
    one: it goes on once enough of the group's locks are let go, whichever they are
    (:func:`_gates`). Such a wait closes a cycle only when too few of those locks are held by
    owners free of ``start``'s cycle: the owners stuck with ``start`` are found first
    (:func:`_stuck`), and the path is searched among them.
    """
    entries = list(graph)
    gates = _gates(entries, rules) if rules is not None and rules.concurrency else {}
    if not gates:
        return _search(entries, start, None, {})
    stuck = _stuck(entries, start, gates)
    if start not in stuck:
        return None
    held = _held_by(gates, stuck)
    through = {waiter_id: shut for waiter_id, waiter_gates in gates.items()
               if (shut := [gate for gate in waiter_gates if gate.shut(stuck, held)])}
    return _search(entries, start, stuck, through)


@dataclass(frozen=True)
class _Group:
    """A full concurrency group's locks, shared by every gate of the group (made once)."""

    name: str
    locks: dict[Owner, int]
    """How many of the group's locks each owner holds."""
    count: int
    """The group's locks held, in all."""


@dataclass(frozen=True)
class _Gate:
    """A waiter held back by a full concurrency group: it goes on once ``need`` of the group's
    locks are let go, whichever they are (the group is an OR node of the graph, not an edge to
    each holder). A lock of the waiter's own pull counts as one that may be let go."""

    owner: Owner
    """The waiter's."""
    key: str
    """The waiter's first key in the group (the edge's key)."""
    need: int
    group: _Group

    @property
    def holders(self) -> Iterable[Owner]:
        """The owners of the group's locks, each once."""
        return self.group.locks

    def shut(self, stuck: Collection[Owner], held: dict[str, int]) -> bool:
        """Whether too few of the group's locks may be let go while ``stuck`` never move
        (``held``: :func:`_held_by` of ``stuck``): looked up, not counted lock by lock, so
        a group's holders are looked at once per set, not once per waiter held back."""
        free = self.group.count - held[self.group.name]
        if self.owner in stuck:
            free += self.group.locks.get(self.owner, 0)
        return free < self.need


def _held_by(gates: dict[str, list[_Gate]], stuck: Collection[Owner]) -> dict[str, int]:
    """By group of ``gates``: how many of its locks owners of ``stuck`` hold."""
    out: dict[str, int] = {}
    for waiter_gates in gates.values():
        for gate in waiter_gates:
            group = gate.group
            if group.name not in out:
                out[group.name] = sum(count for holder, count in group.locks.items()
                                      if holder in stuck)
    return out


def _holders(entry: KeyWaits) -> tuple[Owner, ...]:
    return entry.holders or ((entry.holder,) if entry.holder is not None else ())


def _gates(entries: list[KeyWaits], rules: policies.PolicyRules) -> dict[str, list[_Gate]]:
    """The full groups holding each waiter back, by waiter id, as the grant step counts them
    (:func:`~enhanced_locking.policies.verdict`): a key its pull holds already adds no lock;
    a group the waiter alone would take past its limit is left out (it is answered
    ``limited``, never kept waiting for it)."""
    locks: dict[str, list[Owner]] = {}
    held: dict[str, tuple[Owner, ...]] = {}
    for entry in entries:
        held[entry.key] = _holders(entry)
        if entry.parts is not None:
            for group in policies.groups_of(entry.parts, rules):
                locks.setdefault(group, []).extend(held[entry.key])
    made: dict[str, _Group] = {}
    out: dict[str, list[_Gate]] = {}
    seen: set[str] = set()
    for entry in entries:
        for waiter in entry.waiters:
            if waiter.id in seen:
                continue
            seen.add(waiter.id)
            adding: dict[str, tuple[int, int, str]] = {}  # group: (limit, locks added, key)
            for candidate in waiter.candidates:
                if waiter.owner in held.get(candidate.key, ()):
                    continue  # held already: not a new lock in its groups
                for group, limit in policies.groups_of(parts_of(candidate), rules).items():
                    _, count, key = adding.get(group, (limit, 0, candidate.key))
                    adding[group] = (limit, count + 1, key)
            for group, (limit, count, key) in adding.items():
                holding = locks.get(group, [])
                need = len(holding) + count - limit
                if 0 < need <= len(holding):
                    if group not in made:
                        tally: dict[Owner, int] = {}
                        for holder in holding:
                            tally[holder] = tally.get(holder, 0) + 1
                        made[group] = _Group(group, tally, len(holding))
                    out.setdefault(waiter.id, []).append(_Gate(waiter.owner, key, need,
                                                               made[group]))
    return out


class _Ahead:
    """Which owners of ``among`` a key's waiters wait for by being queued behind them: the
    first two owners of ``among`` in the queue (two, so a waiter of the first's own pull still
    finds the other), of every waiter and of the exclusive ones."""

    def __init__(self, entry: KeyWaits, among: Collection[Owner]) -> None:
        self.all: list[tuple[int, Owner]] = []
        self.exclusive: list[tuple[int, Owner]] = []
        for index, waiter in enumerate(entry.waiters):
            if waiter.owner not in among:
                continue
            for found in (self.all, self.exclusive) if waiter.mode != "shared" else (self.all,):
                if len(found) < 2 and all(owner != waiter.owner for _, owner in found):
                    found.append((index, waiter.owner))
            if len(self.exclusive) == 2:
                break

    def before(self, index: int, waiter: Waiter) -> bool:
        """Whether the waiter at ``index`` waits for one of them ahead of it."""
        found = self.exclusive if waiter.mode == "shared" else self.all
        return any(at < index and owner != waiter.owner for at, owner in found)


def _waits_on(entry: KeyWaits, index: int, ahead: _Ahead, stuck: Collection[Owner],
              gates: list[_Gate], held: dict[str, int]) -> bool:
    """Whether the waiter at ``index`` of ``entry`` waits for an owner of ``stuck``: a holder
    of its key, one queued ahead of it, or a holder of a group shut while ``stuck`` never
    move (edges as :func:`edges` makes them)."""
    waiter = entry.waiters[index]
    me = waiter.owner
    if not (waiter.mode == "shared" and entry.shared) and any(
            holder in stuck and holder != me for holder in _holders(entry)):
        return True
    return ahead.before(index, waiter) or any(gate.shut(stuck, held) for gate in gates)


def _stuck(entries: list[KeyWaits], start: Owner,
           gates: dict[str, list[_Gate]]) -> set[Owner]:
    """The owners that never move if ``start``'s waits stand, each of them on a cycle through
    ``start``: the largest set of owners each of which has a waiter that waits for one of them
    (a holder of its key, one ahead of it, or a group of which too few locks are held by
    owners outside the set), and each of which reaches ``start`` by such waits. Empty when
    ``start`` is not on one.

    Found by taking out, until nothing changes, the owners with no waiter waiting for one
    left, then those that no longer reach ``start`` (:func:`_reaching`): a group's holder
    taken out frees its locks, which may open the group for a waiter that was kept for it."""
    mine: dict[Owner, list[tuple[int, int]]] = {}
    for at, entry in enumerate(entries):
        for index, waiter in enumerate(entry.waiters):
            mine.setdefault(waiter.owner, []).append((at, index))
    stuck = set(mine)
    while True:
        ahead = [_Ahead(entry, stuck) for entry in entries]
        held = _held_by(gates, stuck)
        kept = {owner for owner in stuck if any(
            _waits_on(entries[at], index, ahead[at], stuck,
                      gates.get(entries[at].waiters[index].id, []), held)
            for at, index in mine[owner])}
        reach = _reaching(entries, start, kept, mine, gates)
        if reach == stuck:
            return stuck
        stuck = reach


def _reaching(entries: list[KeyWaits], start: Owner, kept: set[Owner],
              mine: dict[Owner, list[tuple[int, int]]],
              gates: dict[str, list[_Gate]]) -> set[Owner]:
    """The owners of ``kept`` that reach ``start`` by waits for owners of ``kept`` (a group's
    holders only through a group shut while ``kept`` never move): breadth first, backwards
    from ``start``, each waiter and each holder looked at a bounded number of times (a key
    keeps how far its queue has been looked along from the back, as :func:`find_cycle`)."""
    if start not in kept:
        return set()
    holds: dict[Owner, list[int]] = {}
    for at, entry in enumerate(entries):
        for holder in dict.fromkeys(_holders(entry)):
            holds.setdefault(holder, []).append(at)
    held = _held_by(gates, kept)
    shut: dict[str, list[_Gate]] = {}  # by group: its gates shut while ``kept`` never move
    groups: dict[Owner, list[_Group]] = {}  # the groups each owner holds locks of
    for waiter_gates in gates.values():
        for gate in waiter_gates:
            if gate.group.name not in shut:
                shut[gate.group.name] = []
                for holder in gate.holders:
                    groups.setdefault(holder, []).append(gate.group)
            if gate.owner in kept and gate.shut(kept, held):
                shut[gate.group.name].append(gate)
    group_looked: set[str] = set()  # a group's shut gates reached once: every owner of them
    held_looked = [False] * len(entries)
    behind_all = [len(entry.waiters) for entry in entries]  # from here on: exclusive reached
    behind_excl = list(behind_all)  # from here on: shared waiters reached
    reach = {start}
    frontier = [start]

    def reached(owner: Owner) -> None:
        if owner in kept and owner not in reach:
            reach.add(owner)
            frontier.append(owner)

    while frontier:
        node = frontier.pop()
        for at in holds.get(node, ()):
            if not held_looked[at]:
                held_looked[at] = True
                entry = entries[at]
                for waiter in entry.waiters:
                    if not (waiter.mode == "shared" and entry.shared):
                        reached(waiter.owner)
        for at, index in mine.get(node, ()):
            entry = entries[at]
            if index + 1 < behind_all[at]:
                for waiter in entry.waiters[index + 1:behind_all[at]]:
                    if waiter.mode != "shared":
                        reached(waiter.owner)
                behind_all[at] = index + 1
            if entry.waiters[index].mode != "shared" and index + 1 < behind_excl[at]:
                for waiter in entry.waiters[index + 1:behind_excl[at]]:
                    if waiter.mode == "shared":
                        reached(waiter.owner)
                behind_excl[at] = index + 1
        for group in groups.get(node, ()):
            if group.name not in group_looked:
                group_looked.add(group.name)
                for gate in shut[group.name]:
                    reached(gate.owner)
    return reach


def _search(entries: list[KeyWaits], start: Owner, within: Collection[Owner] | None,
            through: dict[str, list[_Gate]]) -> list[Edge] | None:
    """:func:`find_cycle`'s breadth-first search, over the owners of ``within`` only (every
    owner when ``None``), a waiter of ``through`` also waiting for the holders of each group
    shut listed there (the edge naming the gate's key). A group's holders are looked at once
    (and again for ``start``'s own gates, which move no mark, as its other edges): every one
    is reached by then."""
    mine: dict[Owner, list[tuple[int, int]]] = {}
    for at, entry in enumerate(entries):
        for index, waiter in enumerate(entry.waiters):
            mine.setdefault(waiter.owner, []).append((at, index))
    looked_all = [0] * len(entries)  # every waiter before it looked at, for an exclusive one
    looked_excl = [0] * len(entries)  # every exclusive waiter before it, for a shared one
    held_looked = [[False, False] for _ in entries]  # the holders, for [exclusive, shared]
    group_looked: set[str] = set()  # the groups whose holders were looked at
    seen = {start}
    came: dict[Owner, tuple[Owner, Edge]] = {}

    def path_to(node: Owner, last: Edge) -> list[Edge]:
        out = [last]
        while node != start:
            node, edge = came[node]
            out.append(edge)
        return out[::-1]

    frontier = [start]
    while frontier:
        next_frontier: list[Owner] = []
        for node in frontier:
            marking = node != start
            for at, index in mine.get(node, ()):
                entry = entries[at]
                waiter = entry.waiters[index]
                shared = waiter.mode == "shared"
                holders = () if shared and entry.shared else _holders(entry)
                targets: list[tuple[Owner, str, str]] = []
                if not held_looked[at][shared]:
                    targets = [(holder, "holds", entry.key) for holder in holders]
                    if marking:
                        held_looked[at][shared] = True
                first = looked_excl[at] if shared else looked_all[at]
                targets.extend((ahead.owner, "ahead", entry.key)
                               for ahead in entry.waiters[first:index]
                               if not (shared and ahead.mode == "shared"))
                if marking:
                    looked_excl[at] = max(looked_excl[at], index)
                    if not shared:
                        looked_all[at] = max(looked_all[at], index)
                for gate in through.get(waiter.id, ()):
                    if gate.group.name not in group_looked:
                        if marking:
                            group_looked.add(gate.group.name)
                        targets.extend((holder, "limit", gate.key) for holder in gate.holders)
                for target, why, key in targets:
                    if target == node or (within is not None and target not in within):
                        continue
                    edge = Edge(node, target, key, why)
                    if target == start:
                        return path_to(node, edge)
                    if target not in seen:
                        seen.add(target)
                        came[target] = (node, edge)
                        next_frontier.append(target)
        frontier = next_frontier
    return None


def describe(cycle: list[Edge]) -> list[str]:
    """The cycle as owner names, starting and ending with the requester."""
    return [owner_name(cycle[0].waiter), *(owner_name(edge.target) for edge in cycle)]


def owners(cycle: list[Edge]) -> list[CycleOwner]:
    """The cycle as typed owners (name, repository, pull), in :func:`describe`'s order."""
    return [CycleOwner(name=owner_name(owner), repo=owner[0], pull=owner[1])
            for owner in (cycle[0].waiter, *(edge.target for edge in cycle))]


def owners_for_reader(shown: list[CycleOwner], readable: Collection[str | None]
                      ) -> tuple[list[CycleOwner], int]:
    """A refusal's cycle owners as a caller who may read only the repositories in
    ``readable`` gets them: an owner elsewhere is :data:`OTHER_REPOSITORY` (no repository, no
    pull), as in :func:`for_reader`; and how many owners were left out."""
    hidden = {(owner.repo, owner.pull) for owner in shown if owner.repo not in readable}
    if not hidden:
        return shown, 0
    return [owner if owner.repo in readable else CycleOwner(name=OTHER_REPOSITORY)
            for owner in shown], len(hidden)


OTHER_REPOSITORY = "(other repository)"
"""What a reader of a ``deadlock`` event sees in place of an owner of a repository it may not
read: its name, repository and pull, and the key of every edge that touches it, are left out."""


def edge_details(cycle: list[Edge]) -> list[dict[str, Any]]:
    """The ``edges`` of a ``deadlock`` event: each end by name, repository and pull."""
    return [{"waiter": owner_name(e.waiter), "waiterRepo": e.waiter[0], "waiterPull": e.waiter[1],
             "target": owner_name(e.target), "targetRepo": e.target[0],
             "targetPull": e.target[1], "key": e.key, "why": e.why} for e in cycle]


def cycle_repos(details: dict[str, Any]) -> set[str | None]:
    """The repositories a ``deadlock`` event's cycle names (``None`` for an edge end that does
    not say: an event from before the repositories were data of their own)."""
    out: set[str | None] = set()
    for edge in details.get("edges") or ():
        out.add(edge.get("waiterRepo"))
        out.add(edge.get("targetRepo"))
    return out


def for_reader(details: dict[str, Any], readable: Collection[str | None]) -> dict[str, Any]:
    """A ``deadlock`` event's details as a reader who may read only the repositories in
    ``readable`` gets them: an owner elsewhere is :data:`OTHER_REPOSITORY` (no repository, no
    pull), an edge's key is kept only when both its ends are shown, and ``hiddenOwners`` counts
    the owners of the cycle left out. ``details`` itself when nothing is left out."""
    edges_in = details.get("edges") or []
    if all(e.get("waiterRepo") in readable and e.get("targetRepo") in readable
           for e in edges_in):
        return details
    hidden: set[tuple[Any, Any]] = set()

    def end(edge: dict[str, Any], side: str) -> tuple[bool, dict[str, Any]]:
        repo = edge.get(f"{side}Repo")
        if repo in readable:
            return True, {side: edge.get(side), f"{side}Repo": repo,
                          f"{side}Pull": edge.get(f"{side}Pull")}
        hidden.add((repo, edge.get(f"{side}Pull") if repo is not None else edge.get(side)))
        return False, {side: OTHER_REPOSITORY, f"{side}Repo": None, f"{side}Pull": None}

    shown_edges = []
    for edge in edges_in:
        waiter_shown, waiter = end(edge, "waiter")
        target_shown, target = end(edge, "target")
        shown_edges.append({**waiter, **target,
                            "key": edge.get("key") if waiter_shown and target_shown else None,
                            "why": edge.get("why")})
    cycle = ([shown_edges[0]["waiter"], *(e["target"] for e in shown_edges)]
             if shown_edges else [])
    return {**details, "cycle": cycle, "edges": shown_edges, "hiddenOwners": len(hidden)}
