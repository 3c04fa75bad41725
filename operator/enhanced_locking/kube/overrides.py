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

from pydantic import SecretStr

from enhanced_locking.kube.lockmigration import LockMigrationSpec, step_weight
from enhanced_locking.kube.lockpolicy import LockPolicySpec

__all__ = [
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


def _put(out: dict[str, Any], name: str, value: Any) -> None:
    if value is not None:
        out[name] = value


def policy_overrides(
    spec: LockPolicySpec, secrets: ResolvedSecrets = ResolvedSecrets()
) -> dict[str, Any]:
    """The config fields a LockPolicy spec sets."""
    out: dict[str, Any] = {}
    _put(out, "enabled", spec.enabled)
    _put(out, "backend", spec.backend)
    if (features := spec.features) is not None:
        _put(out, "priority_queue", features.priority_queue)
        _put(out, "retries", features.retries)
        _put(out, "metrics", features.metrics)
        _put(out, "deadlock_detection", features.deadlock_detection)
        _put(out, "events", features.events)
    if (timeouts := spec.timeouts) is not None:
        _put(out, "default_timeout", timeouts.default)
        _put(out, "max_timeout", timeouts.max)
    if (queue := spec.queue) is not None:
        _put(out, "max_queue_size", queue.max_size)
        _put(out, "starvation_threshold", queue.starvation_threshold)
        _put(out, "max_priority_boost", queue.max_priority_boost)
    if (retries := spec.retries) is not None:
        _put(out, "retry_max_attempts", retries.max_attempts)
        _put(out, "retry_backoff", retries.backoff)
    _put(out, "lock_ttl", spec.lock_ttl)
    if (redis := spec.redis) is not None:
        _put(out, "redis_addr", redis.addr)
        _put(out, "redis_db", redis.db)
        _put(out, "redis_username", redis.username)
        _put(out, "redis_key_prefix", redis.key_prefix)
        if redis.password_secret_ref is not None:
            _put(out, "redis_password", secrets.redis_password)
        if (tls := redis.tls) is not None:
            _put(out, "redis_tls", tls.enabled)
            _put(out, "redis_tls_skip_verify", tls.insecure_skip_verify)
            if tls.ca_secret_ref is not None:
                _put(out, "redis_tls_ca_file", secrets.redis_tls_ca_file)
    return out


def migration_weight(spec: LockMigrationSpec, *, step_index: int = 0) -> float | None:
    """The weight a migration asks for now: abort 0, promote 100, else the weight or the step.

    Routing resolves 0.01 percent (10,000 buckets), so the weight is rounded to two decimals.
    """
    if spec.abort:
        return 0.0
    if spec.promote:
        return 100.0
    if spec.steps is not None:
        return round(step_weight(spec.steps, step_index), 2)
    if spec.weight is not None:
        return round(spec.weight, 2)
    return None


def migration_overrides(spec: LockMigrationSpec, *, step_index: int = 0) -> dict[str, Any]:
    """The config fields a LockMigration spec sets (weight, mode, fallback, shadow sampling)."""
    out: dict[str, Any] = {}
    _put(out, "migration_weight", migration_weight(spec, step_index=step_index))
    _put(out, "migration_mode", spec.mode)
    _put(out, "fallback", spec.fallback)
    if spec.shadow is not None:
        _put(out, "shadow_sample_ratio", spec.shadow.sample_ratio)
    return out


def cluster_overrides(
    policy: LockPolicySpec | None,
    migration: LockMigrationSpec | None = None,
    *,
    secrets: ResolvedSecrets = ResolvedSecrets(),
    step_index: int = 0,
) -> Mapping[str, Any] | None:
    """The ``cluster`` layer: the policy's fields, then its migration's; ``None`` without a policy.

    A migration only counts together with its policy: on its own it would switch routing for
    a service whose policy was deleted, which is the opposite of what deleting asks for.
    """
    if policy is None:
        return None
    out = policy_overrides(policy, secrets)
    if migration is not None:
        out.update(migration_overrides(migration, step_index=step_index))
    return out
