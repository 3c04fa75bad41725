"""A history checker for a lock service: no two grants of a key overlap, tokens only rise.

Many concurrent clients acquire, hold and release locks over HTTP; each one records, for every
lock it got, the interval during which it *knew* it held it: from the moment the grant answer
arrived to the moment it sent the release, or to its lease's end if that came first (a leased
lock is freed by the store when its lease ends, released or not). That interval lies inside
the real one (the server granted before the answer arrived and frees after the release
arrives, or at the lease's end), so if the real holds
of a key never overlap, neither do the recorded ones: any overlap the checker finds is a real
double grant. And since a key's next grant comes after its previous release, ordering a key's
holds by fencing token must order them in time, with strictly rising tokens.

With shared locks, holds of a key may overlap, but never an exclusive hold with any other;
a hold whose recorded interval lies wholly after an exclusive one's (or the other way round)
was really granted after it, so its token must be higher. Shared holds of a key may overlap
freely; each has a token of its own.

The checker also knows the policy rules a test ran under:

* a :class:`GroupLimit`: never more than ``limit`` holds of the group's keys at once. The
  recorded holds lie inside the real ones, so more recorded holds overlapping at one moment
  than the limit means more real ones did;
* a :class:`FreezeWindow`: no grant of a covered key inside it. Here the checker uses the
  store's own stamp of the grant (the lock's ``acquiredAt``, taken by the clock the store
  decided with) and the freeze's ``from``/``until``, so the check is exact.

The checker only speaks HTTP (the v1 API), so it works against any backend behind the
service: start the service however the test needs (embedded store, Redis, several replicas)
and point :func:`run_clients` at its URL (or URLs: clients are spread over them).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

__all__ = ["FreezeWindow", "GroupLimit", "History", "Hold", "Workload", "run_clients"]


@dataclass(frozen=True)
class Hold:
    """One lock as a client saw it: key, fencing token, and when it knew it held it."""

    client: str
    key: str
    token: int
    start: float  # time.monotonic() when the grant answer arrived
    end: float  # time.monotonic() just before the release was sent
    mode: str = "exclusive"
    granted_at: datetime | None = None
    """The store's stamp of the grant (the lock's ``acquiredAt``)."""
    lease_end: float | None = None
    """``time.monotonic()`` at the lock's ``expiresAt``, for a lock with a lease: the store
    frees it then whether or not it was released, so the client holds it no longer."""

    @property
    def held_until(self) -> float:
        """When the client stopped holding it: its release, or its lease's end if earlier.
        Not after ``start`` when the answer arrived after the lease had already ended: the
        client held nothing (the key was free from the lease's end), so such a grant is in
        no overlap and no token order; ``History.lapsed_on_arrival`` counts them."""
        return self.end if self.lease_end is None else min(self.end, self.lease_end)


@dataclass(frozen=True)
class GroupLimit:
    """A concurrency limit the service ran under: at most ``limit`` holds of ``keys`` at once."""

    name: str
    keys: frozenset[str]
    limit: int


@dataclass(frozen=True)
class FreezeWindow:
    """A freeze the service ran under: no grant of ``keys`` from ``start`` until ``end``."""

    name: str
    keys: frozenset[str]
    start: datetime
    end: datetime


@dataclass
class History:
    """Holds recorded by many clients, and what was refused and why; ``limits`` and
    ``freezes`` are the rules the service ran under (none: only locking itself is checked)."""

    holds: list[Hold] = field(default_factory=list)
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    limits: Sequence[GroupLimit] = ()
    freezes: Sequence[FreezeWindow] = ()

    def record(self, hold: Hold) -> None:
        self.holds.append(hold)

    def violations(self) -> list[str]:
        """Every exclusive hold beside another hold of its key, every token that did not
        rise, every group over its limit and every grant inside a freeze."""
        found: list[str] = []
        by_key: dict[str, list[Hold]] = collections.defaultdict(list)
        for hold in self.holds:
            by_key[hold.key].append(hold)
        for key, holds in by_key.items():
            found += _key_violations(key, holds)
            tokens = [h.token for h in holds]
            if len(tokens) != len(set(tokens)):
                found.append(f"{key}: a fencing token was handed out twice")
        for group in self.limits:
            found += _over_limit(group, [h for h in self.holds if h.key in group.keys])
        for freeze in self.freezes:
            for hold in self.holds:
                at = hold.granted_at
                if hold.key in freeze.keys and at is not None and freeze.start <= at < freeze.end:
                    found.append(
                        f"{hold.key}: {hold.client} (token {hold.token}) was granted at "
                        f"{at.isoformat()}, inside freeze {freeze.name} "
                        f"({freeze.start.isoformat()} to {freeze.end.isoformat()})")
        return found

    def overlapping_shared(self) -> int:
        """How many times a shared hold began while another shared hold of its key was held
        (that shared holders really coexisted in the run)."""
        seen = 0
        by_key: dict[str, list[Hold]] = collections.defaultdict(list)
        for hold in self.holds:
            if hold.mode == "shared":
                by_key[hold.key].append(hold)
        for holds in by_key.values():
            by_time = sorted(holds, key=lambda h: h.start)
            latest_end = float("-inf")
            for hold in by_time:
                if hold.start < latest_end:
                    seen += 1
                latest_end = max(latest_end, hold.held_until)
        return seen

    def lapsed_on_arrival(self) -> list[Hold]:
        """Grants whose answer arrived after their lease had ended (see ``Hold.held_until``)."""
        return [h for h in self.holds if h.held_until <= h.start]

    def most_at_once(self, keys: frozenset[str]) -> int:
        """The most holds of ``keys`` recorded at one moment."""
        return _peak([h for h in self.holds if h.key in keys])[0]

    def assert_consistent(self, *, min_holds: int = 1) -> None:
        problems = self.violations()
        assert not problems, "\n".join(problems[:20])
        assert not self.errors, "\n".join(self.errors[:20])
        assert len(self.holds) >= min_holds, (
            f"only {len(self.holds)} grants recorded; refusals: {dict(self.refusals)}")

    def grants_per_key(self) -> dict[str, int]:
        return dict(collections.Counter(h.key for h in self.holds))


def _key_violations(key: str, holds: Sequence[Hold]) -> list[str]:
    """One key's holds in order of their start: an exclusive hold overlaps nothing, and a
    hold that began after an exclusive one ended (or after any hold ended, for an exclusive
    one) has a higher token."""
    found: list[str] = []
    active: list[tuple[float, int, Hold]] = []  # a heap by end
    top_any: Hold | None = None  # highest token of the holds ended so far
    top_exclusive: Hold | None = None  # the same, of the exclusive ones
    held = [h for h in holds if h.held_until > h.start]  # see ``Hold.held_until``
    for n, later in enumerate(sorted(held, key=lambda h: h.start)):
        while active and active[0][0] <= later.start:
            _, _, ended = heapq.heappop(active)
            if top_any is None or ended.token > top_any.token:
                top_any = ended
            if ended.mode == "exclusive" and (
                    top_exclusive is None or ended.token > top_exclusive.token):
                top_exclusive = ended
        for _, _, earlier in sorted(active, key=lambda entry: entry[2].start):
            if later.mode == "exclusive" or earlier.mode == "exclusive":
                found.append(
                    f"{key}: {later.client} (token {later.token}) was granted while "
                    f"{earlier.client} (token {earlier.token}) still held it")
        before = top_any if later.mode == "exclusive" else top_exclusive
        if before is not None and later.token <= before.token:
            found.append(
                f"{key}: token {later.token} of {later.client} came after token "
                f"{before.token} of {before.client}")
        heapq.heappush(active, (later.held_until, n, later))
    return found


def _peak(holds: Sequence[Hold]) -> tuple[int, list[Hold]]:
    """The most holds overlapping at one moment, and those holds (ends before starts at the
    same moment: back to back is not at once)."""
    moments = sorted([(h.start, 1, n) for n, h in enumerate(holds)]
                     + [(max(h.start, h.held_until), 0, n) for n, h in enumerate(holds)])
    current: set[int] = set()
    best: tuple[int, list[Hold]] = (0, [])
    for _, starts, n in moments:
        if starts:
            current.add(n)
            if len(current) > best[0]:
                best = (len(current), [holds[i] for i in sorted(current)])
        else:
            current.discard(n)
    return best


def _over_limit(group: GroupLimit, holds: Sequence[Hold]) -> list[str]:
    count, together = _peak(holds)
    if count <= group.limit:
        return []
    names = ", ".join(f"{h.client} on {h.key} (token {h.token})" for h in together)
    return [f"group {group.name}: {count} held at once, over its limit {group.limit}: {names}"]


@dataclass(frozen=True)
class Workload:
    """What each client does: ``rounds`` times, lock one key (or a batch) and let it go."""

    clients: int = 50
    rounds: int = 20
    repo: str = "acme/history"
    paths: Sequence[str] = ("a", "b", "c", "d")
    wait: str | None = "10s"
    """Each acquire waits up to this long (``None``: fail fast)."""
    fail_fast_share: float = 0.2
    """Share of acquires that do not wait at all."""
    batch_share: float = 0.2
    """Share of rounds that lock two keys at once (``POST /v1/locks/batch``)."""
    priorities: Sequence[str] = ("low", "normal", "high", "critical")
    hold_seconds: tuple[float, float] = (0.0, 0.004)
    seed: int = 4
    shared_share: float = 0.0
    """Share of acquires (single or batch) that ask for shared locks."""
    duration: float | None = None
    """Keep going for this many seconds instead of ``rounds`` rounds."""
    min_holds: int = 0
    """With ``duration``: keep going past it until the clients together recorded this many
    holds (a loaded machine grants fewer a second; the checker wants the same coverage), but
    never past ten times ``duration`` (a service that stopped granting fails the count)."""


def _project(repo: str, path: str) -> dict[str, str]:
    return {"repoFullName": repo, "path": path, "projectName": path}


async def _client(number: int, urls: Sequence[str], work: Workload, history: History) -> None:
    rng = random.Random(work.seed * 1000 + number)
    name = f"client-{number}"
    pull = 1000 + number
    common: dict[str, Any] = {
        "pull": {"num": pull, "url": f"https://git.example/{work.repo}/pull/{pull}",
                 "author": name},
        "user": {"username": name},
    }
    url = urls[number % len(urls)]
    deadline = None if work.duration is None else time.monotonic() + work.duration
    give_up = math.inf if work.duration is None else time.monotonic() + 10 * work.duration
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0)) as http:
        for round_ in itertools.count():
            if deadline is None:
                if round_ >= work.rounds:
                    break
            elif time.monotonic() >= deadline and (
                    len(history.holds) >= work.min_holds or time.monotonic() >= give_up):
                break
            body = {**common, "priority": rng.choice(list(work.priorities))}
            if work.wait is not None and rng.random() >= work.fail_fast_share:
                body["wait"] = work.wait
            if rng.random() < work.shared_share:
                body["mode"] = "shared"
            batch = rng.random() < work.batch_share
            paths = rng.sample(list(work.paths), 2) if batch else [rng.choice(list(work.paths))]
            if batch:
                body["locks"] = [{"project": _project(work.repo, p)} for p in paths]
                response = await http.post("/v1/locks/batch", json=body)
            else:
                body["project"] = _project(work.repo, paths[0])
                response = await http.post("/v1/locks", json=body)
            answer = response.json()
            if response.status_code == 409:
                history.refusals[answer["reason"]] += 1
                continue
            if response.status_code != 200:
                history.errors.append(f"{name}: HTTP {response.status_code} {answer}")
                continue
            start = time.monotonic()
            locks = answer["locks"] if batch else [answer["lock"]]
            await asyncio.sleep(rng.uniform(*work.hold_seconds))
            end = time.monotonic()
            for lock in locks:
                history.record(Hold(name, lock["key"], lock["fencingToken"], start, end,
                                    mode=lock.get("mode", "exclusive"),
                                    granted_at=datetime.fromisoformat(lock["acquiredAt"])))
            for lock in locks:
                released = await http.delete("/v1/locks/by-key",
                                             params={"key": lock["key"], "pull": pull})
                if released.status_code != 200:
                    history.errors.append(
                        f"{name}: release of {lock['key']} answered {released.status_code} "
                        f"{released.text}")


async def run_clients(urls: str | Sequence[str], work: Workload | None = None, *,
                      history: History | None = None) -> History:
    """Run ``work.clients`` concurrent clients against the service; return their history
    (``history``: one that knows the rules the service runs under)."""
    work = work or Workload()
    targets = [urls] if isinstance(urls, str) else list(urls)
    history = history if history is not None else History()
    await asyncio.gather(*(_client(n, targets, work, history) for n in range(work.clients)))
    return history
