"""Shadow mode: legacy decides, the enhanced store replays in its own keyspace, differences are
counted, logged and evented; the replay never changes the answer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import ServiceMaker, StoreOpener
from tests.support.locks import lock_for, request_for

from enhanced_locking.factory import LockService
from enhanced_locking.hashing import BUCKETS
from enhanced_locking.migration.shadow import sample_bucket
from enhanced_locking.types import AcquireResult, BackendUnavailable, Event

SHADOW = {"enabled": True, "backend": "boltdb", "migration_mode": "shadow"}


async def _shadow_service(make_service: ServiceMaker, **settings: Any) -> LockService:
    service = await make_service(**{**SHADOW, **settings})
    await service.migration.shadow.drain()  # the initial seeding
    return service


async def test_a_lock_only_the_shadow_side_has_is_found_and_counted(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await _shadow_service(make_service)
    seen: list[Event] = []
    service.events.subscribe(seen.append)
    await store(service, "shadow").acquire(lock_for(request_for(pull=9)))

    result = await service.router.acquire(request_for(pull=1))
    assert result.acquired and result.lock is not None and result.lock.backend == "legacy"
    await service.migration.shadow.drain()

    stats = service.migration.shadow.stats
    assert (stats.replayed, stats.mismatches, stats.matched) == (1, 1, 0)
    assert stats.by_kind == {"acquire-outcome": 1}
    metric = service.metrics.shadow_discrepancies.labels("acquire-outcome")._value.get()
    assert metric == 1
    [event] = [e for e in seen if e.type == "shadow-mismatch"]
    assert event.key == result.lock_key
    assert event.details["authoritative"] == {"granted": True, "holder": None}
    assert event.details["shadow"] == {"granted": False,
                                       "holder": {"repo": "acme/infra", "pull": 9}}
    status = service.migration.status().as_dict()["shadow"]
    assert status["active"] and status["mismatches"] == 1


async def test_a_lock_only_legacy_has_is_found_and_counted(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await _shadow_service(make_service)
    await store(service, "legacy").acquire(lock_for(request_for(pull=8), backend="legacy"))

    refused = await service.router.acquire(request_for(pull=2))
    assert not refused.acquired and refused.holder is not None and refused.holder.pull.num == 8
    await service.migration.shadow.drain()
    assert service.migration.shadow.stats.by_kind == {"acquire-outcome": 1}


async def test_agreeing_answers_are_counted_as_matches_only(make_service: ServiceMaker) -> None:
    service = await _shadow_service(make_service)
    seen: list[Event] = []
    service.events.subscribe(seen.append)
    for path in ("a", "b", "c"):
        assert (await service.router.acquire(request_for(path=path, pull=1))).acquired
    assert not (await service.router.acquire(request_for(path="a", pull=2))).acquired
    await service.router.release(request_for(path="a").key, owner=("acme/infra", 1))
    await service.router.release_by_pull("acme/infra", 1)
    await service.migration.shadow.drain()

    stats = service.migration.shadow.stats
    assert (stats.replayed, stats.matched, stats.mismatches, stats.errors) == (6, 6, 0, 0)
    assert not [e for e in seen if e.type == "shadow-mismatch"]


async def test_with_sampling_zero_nothing_is_replayed(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await _shadow_service(make_service, shadow_sample_ratio=0)
    for pull in (1, 2):
        await service.router.acquire(request_for(pull=pull))
    await service.router.release_by_pull("acme/infra", 1)
    await service.migration.shadow.drain()

    assert not service.migration.shadow.active
    assert service.migration.shadow.stats.replayed == 0
    assert await store(service, "shadow").list() == []
    assert await store(service, "shadow").export() == ([], {})


async def test_sampling_is_sticky_per_key_so_acquire_and_release_pair_up(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await _shadow_service(make_service, shadow_sample_ratio=0.3)
    requests = [request_for(path=f"p{i}", pull=i) for i in range(300)]
    for request in requests:
        assert (await service.router.acquire(request)).acquired
    for request in requests:
        await service.router.release(request.key, owner=("acme/infra", request.pull.num))
    await service.migration.shadow.drain()

    sampled = [r for r in requests if sample_bucket(r.key) < 0.3 * BUCKETS]
    assert 60 < len(sampled) < 120
    stats = service.migration.shadow.stats
    assert stats.replayed == 2 * len(sampled)
    assert stats.mismatches == 0
    assert await store(service, "shadow").list() == []


async def test_the_authoritative_answer_is_the_same_with_shadow_on_and_off(
    make_service: ServiceMaker, store: StoreOpener, tmp_path: Path,
) -> None:
    on = await _shadow_service(make_service, data_dir=str(tmp_path / "on"))
    off = await make_service(enabled=True, backend="boltdb", migration_weight=0,
                             data_dir=str(tmp_path / "off"))
    # A shadow keyspace that disagrees with legacy everywhere must still change nothing.
    for path in ("p0", "p1", "p2"):
        await store(on, "shadow").acquire(lock_for(request_for(path=path, pull=99)))
    rng = random.Random(3)
    answers: dict[str, list[Any]] = {"on": [], "off": []}
    for _ in range(300):
        path, pull, release = f"p{rng.randrange(6)}", rng.randrange(1, 5), rng.random() < 0.4
        for name, service in (("on", on), ("off", off)):
            if release:
                lock = await service.router.release(request_for(path=path).key)
                answers[name].append(None if lock is None else (lock.pull.num,
                                                                lock.fencing_token))
            else:
                result = await service.router.acquire(request_for(path=path, pull=pull))
                answers[name].append(_answer(result))
    assert answers["on"] == answers["off"]
    await on.migration.shadow.drain()
    assert on.migration.shadow.stats.mismatches > 0, "the planted disagreement was seen"


def _answer(result: AcquireResult) -> tuple[Any, ...]:
    lock = result.lock or result.holder
    assert lock is not None
    return (result.acquired, result.reason, lock.pull.num, lock.fencing_token, lock.backend)


async def test_a_full_queue_drops_replays_and_counts_them_without_refusing_anyone(
    make_service: ServiceMaker,
) -> None:
    service = await _shadow_service(make_service, shadow_queue_size=1)
    # The embedded store answers without yielding, so the replay task cannot run in between.
    results = [await service.router.acquire(request_for(path=f"p{i}")) for i in range(20)]
    assert all(result.acquired for result in results)
    assert service.migration.shadow.stats.dropped == 19
    assert service.metrics.shadow_replays.labels("dropped")._value.get() == 19
    await service.migration.shadow.drain()
    assert service.migration.shadow.stats.replayed == 1


async def test_replay_errors_are_swallowed_and_counted(make_service: ServiceMaker) -> None:
    service = await _shadow_service(make_service)
    shadow_store = service.migration.shadow.backend
    assert shadow_store is not None
    await shadow_store.close()  # the shadow store fails from now on

    result = await service.router.acquire(request_for(pull=1))
    assert result.acquired
    await service.migration.shadow.drain()
    assert service.migration.shadow.stats.errors == 1
    assert service.metrics.shadow_replays.labels("error")._value.get() == 1
    assert (await service.router.acquire(request_for(pull=2))).holder == result.lock


async def test_starting_shadow_mode_seeds_the_shadow_keyspace_from_legacy(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    service = await make_service(enabled=True, backend="boltdb", migration_weight=0)
    held = await service.router.acquire(request_for(pull=1))
    assert held.acquired
    await service.provider.set_layer("cluster", {"migration_mode": "shadow"})
    await service.migration.shadow.drain()
    assert [lock.pull.num for lock in await store(service, "shadow").list()] == [1]

    assert not (await service.router.acquire(request_for(pull=2))).acquired
    await service.router.release(request_for().key, owner=("acme/infra", 1))
    await service.migration.shadow.drain()
    stats = service.migration.shadow.stats
    assert (stats.matched, stats.mismatches) == (2, 0)

    await service.provider.set_layer("cluster", {"migration_mode": "route"})
    assert not service.migration.shadow.active


async def test_a_seed_is_never_dropped_behind_a_full_queue(
    make_service: ServiceMaker, store: StoreOpener,
) -> None:
    """The sampling changes while the replay queue is full: the namespace is seeded anew all
    the same, so the replays after it compare against legacy's holds, not the old ones."""
    service = await _shadow_service(make_service, shadow_queue_size=1)
    shadow = service.migration.shadow
    held, stale = request_for(path="held", pull=8), request_for(path="stale", pull=9)
    await store(service, "legacy").acquire(lock_for(held, backend="legacy"))
    await store(service, "shadow").acquire(lock_for(stale))
    shadow.after_release(request_for(path="other").key, None, released=None)  # queue full
    assert shadow.queued() == 1
    ratio = 1 - 1 / BUCKETS
    await shadow.configure(service.provider.current.config.model_copy(
        update={"shadow_sample_ratio": ratio}))
    assert shadow.sampled(held.key) and shadow.sampled(stale.key)
    await shadow.drain()
    assert [(lock.key, lock.pull.num) for lock in await store(service, "shadow").list()] == [
        (held.key, 8)]
    assert shadow.stats.dropped == 0


async def test_a_shadow_store_replaced_by_another_is_closed(
    make_service: ServiceMaker, tmp_path: Path,
) -> None:
    """Settings that name another shadow store (a data dir, a Redis address or pool) make a
    new backend: the one it replaces is closed once the replays are done with it, not kept
    open until shadow mode ends (one more open store for every such change)."""
    service = await _shadow_service(make_service)
    shadow = service.migration.shadow
    replaced = shadow.backend
    assert replaced is not None
    other = tmp_path / "other"
    other.mkdir()
    await shadow.configure(service.provider.current.config.model_copy(
        update={"data_dir": other}))
    await shadow.drain()
    replacing = shadow.backend
    assert replacing is not None and replacing is not replaced and shadow.active
    with pytest.raises(BackendUnavailable):
        await replaced.ping()
    await replacing.ping()


async def test_a_force_unlock_is_replayed_as_a_release(make_service: ServiceMaker,
                                                       store: StoreOpener) -> None:
    """A lock freed by force-unlock is freed in the shadow namespace too: the next pull's grant
    matches there instead of being refused by a holder only the shadow side still has."""
    service = await _shadow_service(make_service)
    assert (await service.router.acquire(request_for(pull=1))).acquired
    freed = await service.router.force_unlock(request_for().key)
    assert freed is not None and freed.pull.num == 1
    assert (await service.router.acquire(request_for(pull=2))).acquired
    await service.migration.shadow.drain()
    stats = service.migration.shadow.stats
    assert (stats.replayed, stats.matched, stats.mismatches) == (3, 3, 0)
    assert [lock.pull.num for lock in await store(service, "shadow").list()] == [2]

