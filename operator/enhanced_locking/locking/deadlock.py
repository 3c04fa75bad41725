"""Deadlock detection over the wait-for graph.

Nodes are owners (a pull request of a repository: Atlantis's unit of ownership). For every key
with waiters there are two kinds of edge:

* **holder**: each waiter waits for every owner holding the key (all of them, when it is
  held shared: an exclusive waiter gets it only once each has let go), except that a shared
  waiter does not wait for shared holders: it would join them, and what keeps it waiting is
  a writer served before it (the edge ahead below, and that writer's own edges), another
  key of its batch, a freeze or a limit;
* **queued behind**: each waiter waits for every owner queued ahead of it on that key (the
  lock will reach them first, and they may never give it up), except that a shared waiter
  does not wait for a shared one ahead of it: the two are granted together, and what it
  waits for through an exclusive waiter between them is reached through that waiter.

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

from enhanced_locking.backends.base import Owner
from enhanced_locking.backends.waiting import KeyWaits
from enhanced_locking.types import CycleOwner

__all__ = ["OTHER_REPOSITORY", "Edge", "cycle_repos", "describe", "edge_details", "edges",
           "find_cycle", "for_reader", "owner_name", "owners", "owners_for_reader"]


@dataclass(frozen=True)
class Edge:
    """``waiter`` waits for ``target`` on ``key``, because ``target`` holds it or is ahead."""

    waiter: Owner
    target: Owner
    key: str
    why: str  # "holds" or "ahead"


def owner_name(owner: Owner) -> str:
    return f"{owner[0]}#{owner[1]}"


def edges(graph: Iterable[KeyWaits]) -> dict[Owner, list[Edge]]:
    """The wait-for graph as adjacency lists."""
    out: dict[Owner, list[Edge]] = {}
    for entry in graph:
        for index, waiter in enumerate(entry.waiters):
            me = waiter.owner
            shared = waiter.mode == "shared"
            holders = entry.holders or ((entry.holder,) if entry.holder is not None else ())
            if shared and entry.shared:
                holders = ()
            targets: list[tuple[Owner, str]] = [(holder, "holds") for holder in holders]
            targets.extend((ahead.owner, "ahead") for ahead in entry.waiters[:index]
                           if not (shared and ahead.mode == "shared"))
            for target, why in targets:
                if target != me:
                    out.setdefault(me, []).append(Edge(me, target, entry.key, why))
    return out


def find_cycle(graph: Iterable[KeyWaits], start: Owner) -> list[Edge] | None:
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
    """
    entries = list(graph)
    mine: dict[Owner, list[tuple[int, int]]] = {}
    for at, entry in enumerate(entries):
        for index, waiter in enumerate(entry.waiters):
            mine.setdefault(waiter.owner, []).append((at, index))
    looked_all = [0] * len(entries)  # every waiter before it looked at, for an exclusive one
    looked_excl = [0] * len(entries)  # every exclusive waiter before it, for a shared one
    held_looked = [[False, False] for _ in entries]  # the holders, for [exclusive, shared]
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
                holders = entry.holders or ((entry.holder,) if entry.holder is not None else ())
                if shared and entry.shared:
                    holders = ()
                targets: list[tuple[Owner, str]] = []
                if not held_looked[at][shared]:
                    targets = [(holder, "holds") for holder in holders]
                    if marking:
                        held_looked[at][shared] = True
                first = looked_excl[at] if shared else looked_all[at]
                targets.extend((ahead.owner, "ahead") for ahead in entry.waiters[first:index]
                               if not (shared and ahead.mode == "shared"))
                if marking:
                    looked_excl[at] = max(looked_excl[at], index)
                    if not shared:
                        looked_all[at] = max(looked_all[at], index)
                for target, why in targets:
                    if target == node:
                        continue
                    edge = Edge(node, target, entry.key, why)
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
