"""The LockPolicy and LockMigration models: what users may write, and what they are told.

The same rules are in the CRDs (checked against a real API server in tests/e2e); here the
operator's own reading of a spec is checked, which guards it when a CRD is older than the
operator or was edited by hand.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from enhanced_locking.kube.lockmigration import LockMigrationSpec, Step, step_weight
from enhanced_locking.kube.lockpolicy import LockPolicySpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

DESIGN_POLICY: dict[str, Any] = {
    "enabled": True,
    "backend": "redis",
    "features": {"priorityQueue": True, "retries": True, "metrics": True,
                 "deadlockDetection": True, "events": True},
    "timeouts": {"default": "30s", "max": "5m"},
    "queue": {"maxSize": 1000, "starvationThreshold": "2m", "maxPriorityBoost": 3},
    "retries": {"maxAttempts": 3, "backoff": "200ms"},
    "lockTTL": "24h",
    "redis": {"addr": "redis.atlantis.svc:6379", "db": 0,
              "passwordSecretRef": {"name": "redis-auth", "key": "password"},
              "tls": {"enabled": False}},
}

DESIGN_MIGRATION: dict[str, Any] = {
    "policyRef": {"name": "default"},
    "mode": "route",
    "weight": 25,
    "paused": False,
    "abort": False,
    "fallback": "legacy",
    "analysis": {"window": "5m", "maxErrorRate": 0.01, "maxMismatchRate": 0.001,
                 "maxFallbacks": 10},
}


def _error(model: type[LockPolicySpec | LockMigrationSpec], data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    first = caught.value.errors()[0]
    return ".".join(str(p) for p in first["loc"]) + ": " + first["msg"]


def test_the_design_shapes_are_accepted_as_written() -> None:
    policy = LockPolicySpec.model_validate(DESIGN_POLICY)
    assert policy.timeouts is not None and policy.timeouts.max == timedelta(minutes=5)
    assert policy.lock_ttl == timedelta(hours=24)
    assert policy.redis is not None and policy.redis.password_secret_ref is not None
    assert policy.redis.password_secret_ref.key == "password"
    migration = LockMigrationSpec.model_validate(DESIGN_MIGRATION)
    assert migration.weight == 25 and migration.policy_ref.name == "default"


def test_steps_are_accepted_in_the_argo_rollouts_shape() -> None:
    steps = [{"setWeight": 10}, {"pause": {"duration": "10m"}}, {"setWeight": 50},
             {"pause": {}}, {"setWeight": 100}]
    spec = LockMigrationSpec.model_validate({"policyRef": {"name": "default"}, "steps": steps})
    assert spec.steps is not None and len(spec.steps) == 5
    assert spec.steps[3].pause is not None and spec.steps[3].pause.duration is None


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("lock*.yaml")), ids=lambda p: p.name)
def test_every_example_is_a_valid_spec(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    model = LockPolicySpec if document["kind"] == "LockPolicy" else LockMigrationSpec
    model.model_validate(document["spec"])


def test_an_etcd_policy_is_accepted() -> None:
    policy = LockPolicySpec.model_validate(
        {"backend": "etcd", "etcd": {"endpoints": ["etcd-0.etcd:2379", "[::1]:2379"],
                                     "username": "locks",
                                     "passwordSecretRef": {"name": "etcd-auth", "key": "p"}}})
    assert policy.etcd is not None and policy.etcd.endpoints == ["etcd-0.etcd:2379", "[::1]:2379"]


def test_an_empty_policy_overrides_nothing() -> None:
    assert LockPolicySpec.model_validate({}).model_dump(exclude_none=True) == {}


def test_models_are_frozen() -> None:
    spec = LockPolicySpec.model_validate({"enabled": True})
    with pytest.raises(ValidationError):
        spec.enabled = False  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"backend": "zookeeper"},
         "backend: Input should be 'boltdb', 'redis', 'etcd' or 'memory'"),
        ({"timeouts": {"default": "10m", "max": "1m"}},
         "timeouts: Value error, timeouts.max must be at least timeouts.default"),
        ({"timeouts": {"default": "-5s"}}, "timeouts.default: Value error, expected a Go duration"),
        ({"timeouts": {"max": "5 minutes"}}, "timeouts.max: Value error, expected a Go duration"),
        ({"lockTTL": "9000h"}, "lockTTL: Value error, must be at most 8760h"),
        # Leases are counted in whole ms: a shorter one read as none (400ns) or as 1ms.
        ({"lockTTL": "400ns"}, "lockTTL: Value error, '400ns' is under half a microsecond"),
        ({"lockTTL": "999us"}, "lockTTL: Value error, 999µs is under 1ms"),
        ({"queue": {"maxPriorityBoost": 4}}, "queue.maxPriorityBoost: Input should be less than"),
        # The service's own bounds of these settings, refused here rather than by the service.
        ({"queue": {"starvationThreshold": "0s"}},
         "queue.starvationThreshold: Value error, must be at least 1ms, got 0s"),
        ({"access": {"cacheTTL": "2h"}}, "access.cacheTTL: Value error, must be at most 1h"),
        ({"access": {"cacheTTL": "0s"}}, "access.cacheTTL: Value error, must be above 0"),
        ({"audit": {"retention": "0s"}}, "audit.retention: Value error, must be above 0"),
        ({"redis": {"keyPrefix": "x" * 129}}, "redis.keyPrefix: String should have at most 128"),
        ({"redis": {"cluster": True, "db": 2}},
         "redis: Value error, redis.cluster needs redis.db 0"),
        ({"redis": {"addr": "redis"}}, "redis.addr: String should match pattern"),
        ({"redis": {"addr": "redis:70000"}}, "redis.addr: String should match pattern"),
        ({"redis": {"tls": {"caSecretRef": {"name": "ca", "key": "ca.crt"}}}},
         "redis.tls: Value error, redis.tls.caSecretRef needs redis.tls.enabled: true"),
        ({"redis": {"passwordSecretRef": {"name": "Not_A_Name", "key": "password"}}},
         "redis.passwordSecretRef.name: String should match pattern"),
        ({"bogus": True}, "bogus: Extra inputs are not permitted"),
        ({"backend": "etcd"},
         ": Value error, backend etcd needs etcd.endpoints (where the etcd cluster is)"),
        ({"backend": "etcd", "etcd": {"username": "locks"}},
         ": Value error, backend etcd needs etcd.endpoints"),
        ({"etcd": {"endpoints": []}}, "etcd.endpoints: List should have at least 1 item"),
        ({"etcd": {"endpoints": ["etcd.svc"]}}, "etcd.endpoints.0: String should match pattern"),
        ({"etcd": {"endpoints": ["etcd:2379", "etcd:2379"]}},
         "etcd: Value error, etcd.endpoints names an endpoint twice"),
        ({"etcd": {"passwordSecretRef": {"name": "etcd-auth", "key": "password"}}},
         "etcd: Value error, etcd.passwordSecretRef needs etcd.username"),
        ({"etcd": {"keyPrefix": ""}}, "etcd.keyPrefix: String should have at least 1"),
        ({"etcd": {"tls": {"enabled": True, "certSecretRef": {"name": "t", "key": "c"}}}},
         "etcd.tls: Value error, etcd.tls.certSecretRef and etcd.tls.keySecretRef must be set"),
        ({"etcd": {"tls": {"caSecretRef": {"name": "t", "key": "ca"}}}},
         "etcd.tls: Value error, etcd.tls.caSecretRef needs etcd.tls.enabled: true"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(data: dict[str, Any], expected: str) -> None:
    assert _error(LockPolicySpec, data).startswith(expected)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"weight": 150}, "weight: Input should be less than or equal to 100"),
        ({"weight": -1}, "weight: Input should be greater than or equal to 0"),
        ({"weight": 10, "steps": [{"setWeight": 20}]},
         "Value error, spec.weight and spec.steps are mutually exclusive"),
        ({"steps": [{"setWeight": 20, "pause": {}}]},
         "steps.0: Value error, each step sets exactly one of setWeight and pause"),
        ({"steps": [{}]}, "steps.0: Value error, each step sets exactly one"),
        ({"steps": []}, "steps: List should have at least 1 item"),
        ({"mode": "canary"}, "mode: Input should be 'route' or 'shadow'"),
        ({"abort": True, "promote": True}, "Value error, spec.abort and spec.promote cannot"),
        ({"analysis": {"maxErrorRate": 2}}, "analysis.maxErrorRate: Input should be less than"),
        ({"analysis": {"window": "0s", "maxErrorRate": 0.01}},
         "analysis.window: Value error, must be above 0, got 0s"),
        ({"analysis": {"interval": "0s", "maxErrorRate": 0.01}},
         "analysis.interval: Value error, must be above 0, got 0s"),
        # Under half a microsecond rounds to 0: refused as what was written, as the CRD does.
        ({"analysis": {"interval": "400ns", "maxErrorRate": 0.01}},
         "analysis.interval: Value error, must be at least 1us: durations are counted in "
         "whole microseconds, got '400ns'"),
    ],
)
def test_a_bad_migration_is_refused_naming_the_field(data: dict[str, Any], expected: str) -> None:
    assert expected in _error(LockMigrationSpec, {"policyRef": {"name": "default"}, **data})


def test_a_migration_needs_its_policy_ref() -> None:
    assert _error(LockMigrationSpec, {"weight": 10}).startswith("policyRef: Field required")


def test_the_weight_in_force_is_the_last_set_weight_up_to_the_step() -> None:
    shapes: list[dict[str, Any]] = [
        {"setWeight": 10}, {"pause": {}}, {"setWeight": 50}, {"pause": {"duration": "1m"}},
    ]
    steps = [Step.model_validate(shape) for shape in shapes]
    assert [step_weight(steps, i) for i in range(4)] == [10, 10, 50, 50]
    pause_first = [Step.model_validate({"pause": {}}), Step.model_validate({"setWeight": 5})]
    assert step_weight(pause_first, 0) == 0


# --- policy rules in a LockPolicy -------------------------------------------------------------
_RULES_SPEC = {
    "freezes": [{"name": "release-week", "match": {"pathPrefix": "envs/prod"},
                 "message": "prod is frozen", "from": "2026-12-01T00:00:00Z",
                 "until": "2026-12-08T00:00:00Z"}],
    "concurrency": [{"name": "prod", "match": {"repo": "acme/*"}, "per": "repository",
                     "limit": 2}],
    "priorityRules": [{"name": "apply", "commands": ["apply"], "priority": "high"}],
}


def test_a_policy_with_rules_sets_the_policies_setting() -> None:
    from enhanced_locking.kube.lockpolicy import LockPolicySpec
    from enhanced_locking.kube.overrides import policy_overrides

    spec = LockPolicySpec.model_validate(_RULES_SPEC)
    rules = policy_overrides(spec)["policies"]
    assert [f.name for f in rules.freezes] == ["release-week"]
    assert rules.concurrency[0].limit == 2 and rules.concurrency[0].per == "repository"
    assert rules.priority_rules[0].priority.value == "high"
    assert "policies" not in policy_overrides(LockPolicySpec.model_validate({"enabled": True}))


@pytest.mark.parametrize(("change", "field"), [
    ({"freezes": [{"name": "f", "match": {}, "message": "m"}]}, "freezes.0.match"),
    ({"concurrency": [{"name": "c", "limit": 0}]}, "concurrency.0.limit"),
    ({"freezes": [{"name": "f", "match": {"repo": "a/*"}, "message": "m",
                   "from": "2026-12-08T00:00:00Z", "until": "2026-12-01T00:00:00Z"}]},
     "freezes.0"),
    ({"priorityRules": [{"name": "p", "commands": ["deploy"], "priority": "high"}]},
     "priorityRules.0.commands.0"),
    ({"priorityRules": [{"name": "a", "commands": ["apply"], "priority": "high"},
                        {"name": "b", "commands": ["apply", "plan"], "priority": "low"}]},
     "priorityRules"),
])
def test_bad_rules_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    from pydantic import ValidationError

    from enhanced_locking.kube.lockpolicy import LockPolicySpec

    with pytest.raises(ValidationError) as raised:
        LockPolicySpec.model_validate(change)
    text = str(raised.value)
    assert field.split(".")[0] in text
    if "priorityRules" in change and len(change["priorityRules"]) > 1:
        assert "depend on their order" in text
