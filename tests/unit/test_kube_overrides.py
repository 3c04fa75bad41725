"""From CR specs to the provider's ``cluster`` layer, and through it to the running config."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from enhanced_locking.config import EnhancedLockingConfig, settings
from enhanced_locking.kube import crds
from enhanced_locking.kube.lockmigration import LockMigrationSpec
from enhanced_locking.kube.lockpolicy import LockPolicySpec
from enhanced_locking.kube.overrides import (
    MIGRATION_SETTINGS,
    POLICY_SETTINGS,
    ResolvedSecrets,
    cluster_overrides,
    migration_weight,
    policy_overrides,
)
from enhanced_locking.provider import ConfigProvider

FULL_POLICY: dict[str, Any] = {
    "enabled": True,
    "backend": "redis",
    "features": {"priorityQueue": True, "retries": True, "metrics": False,
                 "deadlockDetection": True, "events": False},
    "timeouts": {"default": "45s", "max": "10m"},
    "queue": {"maxSize": 50, "starvationThreshold": "90s", "maxPriorityBoost": 2},
    "retries": {"maxAttempts": 7, "backoff": "150ms"},
    "lockTTL": "12h",
    "redis": {"addr": "redis.atlantis.svc:6380", "db": 4, "username": "atlantis",
              "passwordSecretRef": {"name": "redis-auth", "key": "password"},
              "tls": {"enabled": True, "caSecretRef": {"name": "redis-ca", "key": "ca.crt"},
                      "insecureSkipVerify": False},
              "keyPrefix": "locks:"},
}


def _policy(data: dict[str, Any]) -> LockPolicySpec:
    return LockPolicySpec.model_validate(data)


def _migration(**data: Any) -> LockMigrationSpec:
    return LockMigrationSpec.model_validate({"policyRef": {"name": "default"}, **data})


def test_every_policy_field_sets_its_setting() -> None:
    secrets = ResolvedSecrets(SecretStr("s3cret"), "/run/ca.pem")
    overrides = policy_overrides(_policy(FULL_POLICY), secrets)
    assert overrides == {
        "enabled": True, "backend": "redis",
        "priority_queue": True, "retries": True, "metrics": False,
        "deadlock_detection": True, "events": False,
        "default_timeout": timedelta(seconds=45), "max_timeout": timedelta(minutes=10),
        "max_queue_size": 50, "starvation_threshold": timedelta(seconds=90),
        "max_priority_boost": 2,
        "retry_max_attempts": 7, "retry_backoff": timedelta(milliseconds=150),
        "lock_ttl": timedelta(hours=12),
        "redis_addr": "redis.atlantis.svc:6380", "redis_db": 4, "redis_username": "atlantis",
        "redis_key_prefix": "locks:", "redis_password": SecretStr("s3cret"),
        "redis_tls": True, "redis_tls_skip_verify": False, "redis_tls_ca_file": "/run/ca.pem",
    }
    known = {s.field for s in settings()}
    assert set(overrides) <= known


ETCD_POLICY: dict[str, Any] = {
    "backend": "etcd",
    "etcd": {"endpoints": ["etcd-0.etcd:2379", "etcd-1.etcd:2379"], "username": "locks",
             "passwordSecretRef": {"name": "etcd-auth", "key": "password"},
             "tls": {"enabled": True, "caSecretRef": {"name": "etcd-tls", "key": "ca.crt"},
                     "certSecretRef": {"name": "etcd-tls", "key": "tls.crt"},
                     "keySecretRef": {"name": "etcd-tls", "key": "tls.key"}},
             "keyPrefix": "/locks/"},
}


def test_every_etcd_field_sets_its_setting_and_the_running_config() -> None:
    secrets = ResolvedSecrets(etcd_password=SecretStr("s3cret"), etcd_tls_ca_file="/run/ca.pem",
                              etcd_tls_cert_file="/run/c.pem", etcd_tls_key_file="/run/k.pem")
    overrides = policy_overrides(_policy(ETCD_POLICY), secrets)
    assert overrides == {
        "backend": "etcd", "etcd_endpoints": ["etcd-0.etcd:2379", "etcd-1.etcd:2379"],
        "etcd_username": "locks", "etcd_password": SecretStr("s3cret"), "etcd_tls": True,
        "etcd_tls_ca_file": "/run/ca.pem", "etcd_tls_cert_file": "/run/c.pem",
        "etcd_tls_key_file": "/run/k.pem", "etcd_key_prefix": "/locks/",
    }
    assert "s3cret" not in repr(overrides)
    config = EnhancedLockingConfig.model_validate(overrides)
    assert config.etcd_endpoints == ["etcd-0.etcd:2379", "etcd-1.etcd:2379"]
    assert config.etcd_password.get_secret_value() == "s3cret"


def test_fields_left_out_keep_the_static_settings() -> None:
    assert policy_overrides(_policy({"enabled": True})) == {"enabled": True}
    assert policy_overrides(_policy({"features": {"retries": True}})) == {"retries": True}


def test_the_password_stays_a_secret_in_the_layer() -> None:
    overrides = policy_overrides(_policy(FULL_POLICY), ResolvedSecrets(SecretStr("s3cret")))
    assert "s3cret" not in repr(overrides) and "s3cret" not in str(overrides)


@pytest.mark.parametrize(
    ("spec", "weight"),
    [
        ({"weight": 25}, 25.0),
        ({"weight": 12.345}, 12.35),  # 0.01 is the routing resolution
        ({"weight": 25, "abort": True}, 0.0),
        ({"weight": 25, "promote": True}, 100.0),
        ({"steps": [{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}]}, 10.0),
        ({"mode": "shadow"}, None),
    ],
)
def test_the_migration_weight(spec: dict[str, Any], weight: float | None) -> None:
    assert migration_weight(_migration(**spec)) == weight


def test_the_weight_follows_the_current_step() -> None:
    spec = _migration(steps=[{"setWeight": 10}, {"pause": {}}, {"setWeight": 50}])
    assert migration_weight(spec, step_index=2) == 50.0


def test_a_migration_counts_only_with_its_policy() -> None:
    assert cluster_overrides(None, _migration(weight=10)) is None
    layer = cluster_overrides(_policy({"enabled": True}),
                              _migration(weight=10, mode="shadow", fallback="fail-closed",
                                         shadow={"sampleRatio": 0.5}))
    assert layer == {"enabled": True, "migration_weight": 10.0, "migration_mode": "shadow",
                     "fallback": "fail-closed", "shadow_sample_ratio": 0.5}


async def test_the_layer_changes_the_running_config_and_removing_it_restores_it() -> None:
    static = EnhancedLockingConfig(max_timeout=timedelta(minutes=5))
    provider = ConfigProvider(static)
    layer = cluster_overrides(_policy({"enabled": True, "features": {"priorityQueue": True},
                                       "timeouts": {"max": "7m"}}), _migration(weight=40))
    snapshot = await provider.set_layer("cluster", layer)
    assert snapshot.generation == 2 and snapshot.layers == ("static", "cluster")
    assert provider.feature_flags()["priorityQueue"] is True
    assert snapshot.config.max_timeout == timedelta(minutes=7)
    assert provider.current.migration.weight == 40.0
    restored = await provider.set_layer("cluster", None)
    assert restored.config == static and restored.generation == 3


def _leaves(schema: dict[str, Any], path: str = "") -> list[str]:
    props = schema.get("properties")
    if not props:
        return [path]
    found = []
    for name, child in props.items():
        found += _leaves(child, f"{path}.{name}" if path else name)
    return found


# Fields accepted now and acted on by the rollout (steps are stepped through, analysis rolls
# back) or only naming things; listed so that a new field cannot go unmapped unnoticed.
NOT_SETTINGS = {
    "policyRef.name", "paused", "analysis.window", "analysis.maxErrorRate",
    "analysis.maxMismatchRate", "analysis.maxFallbacks", "analysis.interval",
    "analysis.failureLimit",
}


@pytest.mark.parametrize(("model", "mapping"), [
    (LockPolicySpec, POLICY_SETTINGS), (LockMigrationSpec, MIGRATION_SETTINGS),
], ids=["LockPolicy", "LockMigration"])
def test_every_spec_field_sets_a_service_setting(model: Any, mapping: dict[str, str]) -> None:
    known = {s.field for s in settings()}
    assert set(mapping.values()) <= known
    leaves = _leaves(crds.structural_schema(model))
    for leaf in leaves:
        if leaf in NOT_SETTINGS:
            continue
        assert any(leaf == path or leaf.startswith(path + ".") for path in mapping), (
            f"spec.{leaf} sets no service setting"
        )
