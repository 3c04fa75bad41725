"""ConfigProvider: versioned immutable snapshots, layers, checks and appliers that may refuse,
listeners."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from enhanced_locking.config import ConfigError, EnhancedLockingConfig
from enhanced_locking.provider import ConfigProvider, ConfigRejected, Snapshot, content_hash

SECRET = "correct-horse-battery-staple"


def provider(**settings: Any) -> ConfigProvider:
    return ConfigProvider(EnhancedLockingConfig(**settings))


def test_the_first_snapshot_is_generation_one_of_the_static_config() -> None:
    config = EnhancedLockingConfig(redis_db=3)
    current = ConfigProvider(config).current
    assert (current.generation, current.config, current.layers) == (1, config, ("static",))


def test_a_snapshot_cannot_be_changed() -> None:
    snapshot = provider().current
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.generation = 7  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        snapshot.config.enabled = True  # type: ignore[misc]


async def test_each_change_makes_a_new_generation_and_no_change_makes_none() -> None:
    p = provider()
    first = p.current
    second = await p.set_layer("cluster", {"enabled": True})
    third = await p.set_layer("cluster", {"enabled": True, "migration_weight": 10})
    assert [first.generation, second.generation, third.generation] == [1, 2, 3]
    assert p.current is third
    same = await p.set_layer("cluster", {"enabled": True, "migration_weight": 10})
    assert same is third
    assert first.config.enabled is False  # old snapshots keep what they said


def test_the_hash_is_stable_for_the_same_content_and_differs_for_other_content() -> None:
    assert provider(redis_db=2).current.hash == provider(redis_db=2).current.hash
    assert provider(redis_db=2).current.hash != provider(redis_db=3).current.hash
    assert provider().current.hash == content_hash(EnhancedLockingConfig())
    assert len(provider().current.hash) == 16


def test_the_hash_neither_contains_nor_reveals_the_password() -> None:
    with_secret = provider(redis_password=SECRET).current.hash
    other_secret = provider(redis_password="another-password").current.hash
    assert SECRET not in with_secret
    # Nothing about the password's value goes in: two passwords give the same hash, so the
    # hash cannot be used to test guesses. Setting one at all is still a visible change.
    assert with_secret == other_secret
    assert with_secret != provider().current.hash


async def test_layers_override_the_static_config_and_removing_one_restores_it() -> None:
    p = provider(redis_db=1, enabled=True)
    await p.set_layer("cluster", {"redis_db": 5})
    assert p.current.config.redis_db == 5
    assert list(p.current.layers) == ["static", "cluster"]
    assert p.layer("cluster") == {"redis_db": 5}
    await p.set_layer("cluster", None)
    assert p.current.config.redis_db == 1
    assert p.current.config.enabled is True
    assert list(p.current.layers) == ["static"]
    assert p.layer("cluster") is None


async def test_a_later_layer_wins_over_an_earlier_one() -> None:
    p = provider()
    await p.set_layer("policy", {"redis_db": 5, "max_queue_size": 10})
    await p.set_layer("migration", {"redis_db": 6})
    assert (p.current.config.redis_db, p.current.config.max_queue_size) == (6, 10)
    assert p.current.layers == ("static", "policy", "migration")


async def test_an_invalid_layer_is_a_config_error_naming_the_setting_and_changes_nothing() -> None:
    p = provider()
    before = p.current
    with pytest.raises(ConfigError, match="enhanced-locking-redis-db"):
        await p.set_layer("cluster", {"redis_db": -1})
    with pytest.raises(ConfigError, match="max-timeout"):
        await p.set_layer("cluster", {"default_timeout": "10m"})
    assert p.current is before
    assert p.layer("cluster") is None


async def test_an_invalid_address_in_a_layer_never_shows_its_password() -> None:
    p = provider()
    with pytest.raises(ConfigError, match="enhanced-locking-redis-addr") as raised:
        await p.set_layer("cluster", {"redis_addr": f"redis://:{SECRET}@redis.example:6379"})
    assert SECRET not in str(raised.value) and "redis://***@redis.example:6379" in str(
        raised.value)


async def test_an_applier_can_refuse_and_the_old_snapshot_keeps_running() -> None:
    p = provider()
    before = p.current
    heard: list[Snapshot] = []
    p.subscribe(heard.append)

    async def refuse_redis(candidate: Snapshot) -> None:
        if candidate.config.backend == "redis":
            raise RuntimeError("redis at localhost:6379 does not answer")

    p.add_applier(refuse_redis)
    with pytest.raises(ConfigRejected, match="does not answer"):
        await p.set_layer("cluster", {"enabled": True, "backend": "redis"})
    assert p.current is before
    assert p.layer("cluster") is None
    assert heard == []
    accepted = await p.set_layer("cluster", {"enabled": True})
    assert accepted.generation == before.generation + 1
    assert heard == [accepted]


async def test_every_check_runs_before_any_applier_whatever_the_order_they_were_added() -> None:
    p = provider()
    before = p.current
    order: list[str] = []

    async def applier(candidate: Snapshot) -> None:
        order.append("applier")

    async def check(candidate: Snapshot) -> None:
        order.append("check")
        if candidate.config.redis_db == 9:
            raise ConfigRejected("db 9 is refused", settings=("redis_db",))

    p.add_applier(applier)
    p.add_check(check)
    with pytest.raises(ConfigRejected, match="db 9 is refused"):
        await p.set_layer("cluster", {"redis_db": 9})
    assert order == ["check"]
    assert p.current is before
    await p.set_layer("cluster", {"redis_db": 8})
    assert order == ["check", "check", "applier"]


async def test_appliers_see_the_candidate_before_listeners_see_the_result() -> None:
    p = provider()
    order: list[tuple[str, int, int]] = []

    async def applier(candidate: Snapshot) -> None:
        order.append(("applier", candidate.generation, p.current.generation))

    async def async_listener(snapshot: Snapshot) -> None:
        order.append(("async listener", snapshot.generation, p.current.generation))

    def listener(snapshot: Snapshot) -> None:
        order.append(("listener", snapshot.generation, p.current.generation))

    p.add_applier(applier)
    p.subscribe(async_listener)
    unsubscribe = p.subscribe(listener)
    await p.set_layer("cluster", {"redis_db": 9})
    assert order == [("applier", 2, 1), ("async listener", 2, 2), ("listener", 2, 2)]
    unsubscribe()
    await p.set_layer("cluster", {"redis_db": 8})
    assert [entry[0] for entry in order[3:]] == ["applier", "async listener"]


async def test_nothing_is_applied_or_told_when_the_content_does_not_change() -> None:
    p = provider(redis_db=4)
    calls: list[str] = []

    async def applier(candidate: Snapshot) -> None:
        calls.append("applier")

    p.add_applier(applier)
    p.subscribe(lambda snapshot: calls.append("listener"))
    await p.set_layer("cluster", {"redis_db": 4})
    assert calls == []
    assert p.current.generation == 1


async def test_it_answers_the_seeds_questions() -> None:
    p = provider()
    assert p.current.config.enabled is False
    assert p.feature_flags() == {
        "enabled": False, "priorityQueue": False, "retries": False, "metrics": True,
        "deadlockDetection": False, "events": True,
    }
    migration = p.current.migration
    assert (migration.weight, migration.mode, migration.fallback) == (0.0, "route", "legacy")
    assert not p.current.should_use_enhanced("acme/infra/./default/")

    await p.set_layer("cluster", {"enabled": True, "priority_queue": True,
                                  "migration_weight": 100, "fallback": "fail-closed"})
    assert p.current.config.enabled is True
    assert p.feature_flags()["priorityQueue"] is True
    assert p.current.migration.weight == 100.0
    assert p.current.migration.fallback == "fail-closed"
    assert p.current.should_use_enhanced("acme/infra/./default/")
