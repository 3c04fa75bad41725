"""A history checker for a lock service: no two grants of a key overlap, tokens only rise.

Many concurrent clients acquire, hold and release locks over HTTP; each one records, for every
lock it got, the interval during which it *knew* it held it: from the moment the grant answer
arrived to the moment it sent the release. That interval lies inside the real one (the server
granted before the answer arrived and frees after the release arrives), so if the real holds
of a key never overlap, neither do the recorded ones: any overlap the checker finds is a real
double grant. And since a key's next grant comes after its previous release, ordering a key's
holds by fencing token must order them in time, with strictly rising tokens.

The checker only speaks HTTP (the v1 API), so it works against any backend behind the
service: start the service however the test needs (embedded store, Redis, several replicas)
and point :func:`run_clients` at its URL (or URLs: clients are spread over them).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["History", "Hold", "Workload", "run_clients"]


@dataclass(frozen=True)
class Hold:
    """One lock as a client saw it: key, fencing token, and when it knew it held it."""

    client: str
    key: str
    token: int
    start: float  # time.monotonic() when the grant answer arrived
    end: float  # time.monotonic() just before the release was sent


@dataclass
class History:
    """Holds recorded by many clients, and what was refused and why."""

    holds: list[Hold] = field(default_factory=list)
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)

    def record(self, hold: Hold) -> None:
        self.holds.append(hold)

    def violations(self) -> list[str]:
        """Every overlap of two holds of a key and every token that did not rise."""
        found: list[str] = []
        by_key: dict[str, list[Hold]] = collections.defaultdict(list)
        for hold in self.holds:
            by_key[hold.key].append(hold)
        for key, holds in by_key.items():
            by_time = sorted(holds, key=lambda h: h.start)
            for earlier, later in itertools.pairwise(by_time):
                if later.start < earlier.end:
                    found.append(
                        f"{key}: {later.client} (token {later.token}) was granted while "
                        f"{earlier.client} (token {earlier.token}) still held it")
                if later.token <= earlier.token:
                    found.append(
                        f"{key}: token {later.token} of {later.client} came after token "
                        f"{earlier.token} of {earlier.client}")
            tokens = [h.token for h in holds]
            if len(tokens) != len(set(tokens)):
                found.append(f"{key}: a fencing token was handed out twice")
        return found

    def assert_consistent(self, *, min_holds: int = 1) -> None:
        problems = self.violations()
        assert not problems, "\n".join(problems[:20])
        assert not self.errors, "\n".join(self.errors[:20])
        assert len(self.holds) >= min_holds, (
            f"only {len(self.holds)} grants recorded; refusals: {dict(self.refusals)}")

    def grants_per_key(self) -> dict[str, int]:
        return dict(collections.Counter(h.key for h in self.holds))


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
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60.0)) as http:
        for _ in range(work.rounds):
            body = {**common, "priority": rng.choice(list(work.priorities))}
            if work.wait is not None and rng.random() >= work.fail_fast_share:
                body["wait"] = work.wait
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
                history.record(Hold(name, lock["key"], lock["fencingToken"], start, end))
            for lock in locks:
                released = await http.delete("/v1/locks/by-key",
                                             params={"key": lock["key"], "pull": pull})
                if released.status_code != 200:
                    history.errors.append(
                        f"{name}: release of {lock['key']} answered {released.status_code} "
                        f"{released.text}")


async def run_clients(urls: str | Sequence[str], work: Workload | None = None) -> History:
    """Run ``work.clients`` concurrent clients against the service; return their history."""
    work = work or Workload()
    targets = [urls] if isinstance(urls, str) else list(urls)
    history = History()
    await asyncio.gather(*(_client(n, targets, work, history) for n in range(work.clients)))
    return history
