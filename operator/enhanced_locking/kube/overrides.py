"""From custom resources to the provider's ``cluster`` layer: which setting each CR field sets.

A LockPolicy spec and its LockMigration become one mapping of config field names to values,
which the operator hands to ``ConfigProvider.set_layer("cluster", ...)``. Only the fields a
user wrote appear in it, so everything else keeps the service's static setting. Values from
Secrets are resolved beforehand by the operator (this module does no I/O) and stay
``SecretStr`` all the way into the config, so no log line or repr ever shows them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr

from enhanced_locking.kube.lockmigration import LockMigrationSpec, step_weight
from enhanced_locking.kube.lockpolicy import LockPolicySpec

__all__ = [
    "MIGRATION_SETTINGS",
    "POLICY_SETTINGS",
    "ResolvedSecrets",
    "cluster_overrides",
    "migration_overrides",
    "migration_weight",
    "policy_overrides",
]


@dataclass(frozen=True)
class ResolvedSecrets:
    """What the operator read from the Secrets a policy names."""

    redis_password: SecretStr | None = None
    redis_tls_ca_file: str | None = None
    etcd_password: SecretStr | None = None
    etcd_tls_ca_file: str | None = None
    etcd_tls_cert_file: str | None = None
    etcd_tls_key_file: str | None = None


POLICY_SETTINGS: dict[str, str] = {
    "enabled": "enabled",
    "backend": "backend",
    "features.priorityQueue": "priority_queue",
    "features.retries": "retries",
    "features.metrics": "metrics",
    "features.deadlockDetection": "deadlock_detection",
    "features.events": "events",
    "timeouts.default": "default_timeout",
    "timeouts.max": "max_timeout",
    "queue.maxSize": "max_queue_size",
    "queue.starvationThreshold": "starvation_threshold",
    "queue.maxPriorityBoost": "max_priority_boost",
    "retries.maxAttempts": "retry_max_attempts",
    "retries.backoff": "retry_backoff",
    "lockTTL": "lock_ttl",
    "redis.addr": "redis_addr",
    "redis.cluster": "redis_cluster",
    "redis.db": "redis_db",
    "redis.username": "redis_username",
    "redis.passwordSecretRef": "redis_password",
    "redis.tls.enabled": "redis_tls",
    "redis.tls.caSecretRef": "redis_tls_ca_file",
    "redis.tls.insecureSkipVerify": "redis_tls_skip_verify",
    "redis.keyPrefix": "redis_key_prefix",
    "etcd.endpoints": "etcd_endpoints",
    "etcd.username": "etcd_username",
    "etcd.passwordSecretRef": "etcd_password",
    "etcd.tls.enabled": "etcd_tls",
    "etcd.tls.caSecretRef": "etcd_tls_ca_file",
    "etcd.tls.certSecretRef": "etcd_tls_cert_file",
    "etcd.tls.keySecretRef": "etcd_tls_key_file",
    "etcd.keyPrefix": "etcd_key_prefix",
    "access.mode": "auth",
    "access.roles": "auth_roles",
    "access.audience": "auth_audience",
    "access.cacheTTL": "auth_cache_ttl",
    "audit.enabled": "audit",
    "audit.retention": "audit_retention",
    "audit.maxEntries": "audit_max_entries",
    "freezes": "policies",
    "concurrency": "policies",
    "priorityRules": "policies",
}
"""Which service setting (config field) each LockPolicy spec field sets, by its path."""

MIGRATION_SETTINGS: dict[str, str] = {
    "weight": "migration_weight",
    "steps": "migration_weight",
    "abort": "migration_weight",
    "promote": "migration_weight",
    "mode": "migration_mode",
    "fallback": "fallback",
    "shadow.sampleRatio": "shadow_sample_ratio",
}
"""Which service setting each LockMigration spec field sets (weight: see migration_weight)."""


def _value(spec: BaseModel, path: str) -> Any:
    node: Any = spec
    for name in path.split("."):
        if node is None:
            return None
        field = next(f for f, info in type(node).model_fields.items()
                     if (info.alias or f) == name or f == name)
        node = getattr(node, field)
    return node


def policy_overrides(
    spec: LockPolicySpec, secrets: ResolvedSecrets = ResolvedSecrets()
) -> dict[str, Any]:
    """The config fields a LockPolicy spec sets (Secret references set the resolved values)."""
    resolved = {"redis_password": secrets.redis_password,
                "redis_tls_ca_file": secrets.redis_tls_ca_file,
                "etcd_password": secrets.etcd_password,
                "etcd_tls_ca_file": secrets.etcd_tls_ca_file,
                "etcd_tls_cert_file": secrets.etcd_tls_cert_file,
                "etcd_tls_key_file": secrets.etcd_tls_key_file}
    out: dict[str, Any] = {}
    for path, setting in POLICY_SETTINGS.items():
        if setting == "policies":
            rules = spec.rules()
            if rules is not None:
                out[setting] = rules
            continue
        value = _value(spec, path)
        if value is not None and setting in resolved:
            value = resolved[setting]
        if value is not None and setting == "auth_roles":  # a list of grants → the role map
            roles: dict[str, list[str]] = {}
            for grant in value:
                roles.setdefault(grant.role, []).extend(grant.subjects)
            value = roles
        if value is not None:
            out[setting] = value
    return out


def migration_weight(
    spec: LockMigrationSpec, *, step_index: int = 0, aborted: bool = False
) -> float | None:
    """The weight a migration asks for now: abort 0, promote 100, else the weight or the step.

    ``step_index`` and ``aborted`` are the rollout's state (its status): an automatic abort
    (analysis) sends every key back to legacy just as ``spec.abort`` does. Routing resolves
    0.01 percent (10,000 buckets), so the weight is rounded to two decimals.
    """
    if spec.abort or aborted:
        return 0.0
    if spec.promote:
        return 100.0
    if spec.steps is not None:
        return round(step_weight(spec.steps, step_index), 2)
    if spec.weight is not None:
        return round(spec.weight, 2)
    return None


def migration_overrides(
    spec: LockMigrationSpec, *, step_index: int = 0, aborted: bool = False
) -> dict[str, Any]:
    """The config fields a LockMigration spec sets (weight, mode, fallback, shadow sampling)."""
    values = {
        "migration_weight": migration_weight(spec, step_index=step_index, aborted=aborted),
        "migration_mode": spec.mode,
        "fallback": spec.fallback,
        "shadow_sample_ratio": _value(spec, "shadow.sampleRatio"),
    }
    return {setting: value for setting, value in values.items() if value is not None}


def cluster_overrides(
    policy: LockPolicySpec | None,
    migration: LockMigrationSpec | None = None,
    *,
    secrets: ResolvedSecrets = ResolvedSecrets(),
    step_index: int = 0,
    aborted: bool = False,
) -> Mapping[str, Any] | None:
    """The ``cluster`` layer: the policy's fields, then its migration's; ``None`` without a policy.

    A migration only counts together with its policy: on its own it would switch routing for
    a service whose policy was deleted, which is the opposite of what deleting asks for.
    """
    if policy is None:
        return None
    out = policy_overrides(policy, secrets)
    if migration is not None:
        out.update(migration_overrides(migration, step_index=step_index, aborted=aborted))
    return out
