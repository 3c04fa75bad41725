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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from enhanced_locking.backends.base import Owner
from enhanced_locking.backends.waiting import KeyWaits

__all__ = ["Edge", "describe", "edges", "find_cycle", "owner_name"]


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
    """A shortest-first path of edges from ``start`` back to ``start``, if there is one."""
    adjacency = edges(graph)
    # Breadth first, so the cycle reported is a shortest one (the clearest to read).
    frontier: list[tuple[Owner, list[Edge]]] = [(start, [])]
    seen = {start}
    while frontier:
        next_frontier: list[tuple[Owner, list[Edge]]] = []
        for node, path in frontier:
            for edge in adjacency.get(node, ()):
                if edge.target == start:
                    return [*path, edge]
                if edge.target not in seen:
                    seen.add(edge.target)
                    next_frontier.append((edge.target, [*path, edge]))
        frontier = next_frontier
    return None


def describe(cycle: list[Edge]) -> list[str]:
    """The cycle as owner names, starting and ending with the requester."""
    return [owner_name(cycle[0].waiter), *(owner_name(edge.target) for edge in cycle)]
