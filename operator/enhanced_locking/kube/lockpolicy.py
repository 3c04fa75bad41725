"""The ``LockPolicy`` custom resource: the lock service's settings, declared in the cluster.

Every field is optional. A field left out keeps the service's own setting (from its flags,
environment or YAML); a field written overrides it while the CR exists. So a policy of
``spec: {enabled: true}`` turns enhanced locking on and changes nothing else, and deleting the
policy returns the service to its static configuration.

The Redis and etcd passwords are never written in the CR: ``redis.passwordSecretRef`` and
``etcd.passwordSecretRef`` name a Secret of the same namespace, which the operator reads when it
applies the policy (so are the TLS CA, client certificate and key of etcd).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from enhanced_locking.kube.models import (
    Condition,
    CRDuration,
    CRLease,
    HourCRDuration,
    MillisecondsCRDuration,
    PositiveCRDuration,
    ReplicaName,
    SecretKeyRef,
    SpecModel,
    StatusModel,
    Timestamp,
    cel,
    conditions_schema_extra,
    valid_duration,
    validations,
)
from enhanced_locking.policies import ConcurrencyLimit, Freeze, PolicyRules, PriorityRule
from enhanced_locking.types import BackendName

__all__ = [
    "Access",
    "Audit",
    "Etcd",
    "EtcdTLS",
    "Features",
    "LockPolicySpec",
    "LockPolicyStatus",
    "Queue",
    "Redis",
    "RedisTLS",
    "Retries",
    "RoleGrant",
    "Timeouts",
]

_PORT = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
HOST_PORT = rf"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?):{_PORT}$"


def _host_port(value: str) -> str:
    # The same rule as the service's redis-addr setting; the pattern above already holds it.
    _host, _, port = value.rpartition(":")
    if not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port with a port from 1 to 65535, got {value!r}")
    return value


HostPort = Annotated[
    str, Field(min_length=3, max_length=261, pattern=HOST_PORT), AfterValidator(_host_port)
]


class Features(SpecModel):
    """Feature flags; each one left out keeps the service's own setting."""

    priority_queue: bool | None = Field(
        None, description="Serve waiters by priority with aging (off: plain FIFO)."
    )
    retries: bool | None = Field(
        None, description="Retry transient backend errors with jittered exponential backoff."
    )
    metrics: bool | None = Field(None, description="Export Prometheus metrics on /metrics.")
    deadlock_detection: bool | None = Field(
        None, description="Refuse a wait that would close a cycle in the wait-for graph."
    )
    events: bool | None = Field(None, description="Publish lock events (GET /v1/events).")


class Timeouts(SpecModel):
    """How long lock requests may wait."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.default) || !has(self.max) || "
                f"!{valid_duration('self.default')} || !{valid_duration('self.max')} || "
                "duration(self.max) >= duration(self.default)",
                "timeouts.max must be at least timeouts.default",
                field_path=".max",
            )
        )
    )

    default: CRDuration | None = Field(
        None, description="How long a request waits when it asks to wait but names no time."
    )
    max: CRDuration | None = Field(
        None, description="Longest wait a request may ask for; asking for more is refused."
    )

    @model_validator(mode="after")
    def _max_covers_default(self) -> Timeouts:
        if self.default is not None and self.max is not None and self.max < self.default:
            raise ValueError("timeouts.max must be at least timeouts.default")
        return self


class Queue(SpecModel):
    """The waiters' queue of each lock key."""

    max_size: int | None = Field(
        None, ge=1, le=1_000_000, description="Most waiters queued on one lock key."
    )
    starvation_threshold: MillisecondsCRDuration | None = Field(
        None, description="Wait after which a waiter is raised one priority level (at least "
        "1ms; maxPriorityBoost 0 turns aging off)."
    )
    max_priority_boost: int | None = Field(
        None, ge=0, le=3, description="Most levels aging may raise a waiter."
    )


class Retries(SpecModel):
    """Retries of transient backend errors (used when features.retries is on)."""

    max_attempts: int | None = Field(None, ge=1, le=20, description="Attempts per operation.")
    backoff: CRDuration | None = Field(None, description="First retry delay; doubles with jitter.")


class RedisTLS(SpecModel):
    """TLS to Redis."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.caSecretRef) || (has(self.enabled) && self.enabled)",
                "redis.tls.caSecretRef needs redis.tls.enabled: true",
                field_path=".caSecretRef",
            ),
            cel(
                "!has(self.insecureSkipVerify) || !self.insecureSkipVerify || "
                "(has(self.enabled) && self.enabled)",
                "redis.tls.insecureSkipVerify needs redis.tls.enabled: true",
                field_path=".insecureSkipVerify",
            ),
        )
    )

    enabled: bool | None = Field(None, description="Connect to Redis over TLS.")
    ca_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the PEM CA bundle that signs the Redis server."
    )
    insecure_skip_verify: bool | None = Field(
        None, description="Do not verify the Redis server certificate (testing only)."
    )

    @model_validator(mode="after")
    def _needs_enabled(self) -> RedisTLS:
        if not self.enabled:
            if self.ca_secret_ref is not None:
                raise ValueError("redis.tls.caSecretRef needs redis.tls.enabled: true")
            if self.insecure_skip_verify:
                raise ValueError("redis.tls.insecureSkipVerify needs redis.tls.enabled: true")
        return self


class Redis(SpecModel):
    """The Redis the enhanced locks live in when the backend is ``redis``."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.cluster) || !self.cluster || !has(self.db) || self.db == 0",
                "redis.cluster needs redis.db 0 (a Redis Cluster has only database 0)",
                field_path=".db",
            ),
        )
    )

    addr: HostPort | None = Field(None, description="Redis address, host:port.")
    cluster: bool | None = Field(
        None, description="The address is a node of a Redis Cluster (the others are found).")
    db: int | None = Field(None, ge=0, le=1023, description="Redis database number.")
    username: str | None = Field(None, max_length=256, description="Redis ACL user name.")
    password_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the Redis password (never copied anywhere)."
    )
    tls: RedisTLS | None = Field(None, description="TLS to Redis.")
    key_prefix: str | None = Field(
        None, max_length=128, description="Prefix of every enhanced Redis key."
    )

    @model_validator(mode="after")
    def _cluster_db(self) -> Redis:
        if self.cluster and self.db:
            raise ValueError("redis.cluster needs redis.db 0 (a Redis Cluster has only "
                             "database 0)")
        return self


class EtcdTLS(SpecModel):
    """TLS to etcd."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.caSecretRef) || (has(self.enabled) && self.enabled)",
                "etcd.tls.caSecretRef needs etcd.tls.enabled: true",
                field_path=".caSecretRef",
            ),
            cel(
                "has(self.certSecretRef) == has(self.keySecretRef)",
                "etcd.tls.certSecretRef and etcd.tls.keySecretRef must be set together",
                field_path=".certSecretRef",
            ),
            cel(
                "!has(self.certSecretRef) || (has(self.enabled) && self.enabled)",
                "etcd.tls.certSecretRef needs etcd.tls.enabled: true",
                field_path=".certSecretRef",
            ),
        )
    )

    enabled: bool | None = Field(None, description="Connect to etcd over TLS.")
    ca_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the PEM CA bundle that signs the etcd servers."
    )
    cert_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the PEM client certificate (with keySecretRef)."
    )
    key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the PEM client key (never copied anywhere)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> EtcdTLS:
        if (self.cert_secret_ref is None) != (self.key_secret_ref is None):
            raise ValueError(
                "etcd.tls.certSecretRef and etcd.tls.keySecretRef must be set together"
            )
        if not self.enabled:
            if self.ca_secret_ref is not None:
                raise ValueError("etcd.tls.caSecretRef needs etcd.tls.enabled: true")
            if self.cert_secret_ref is not None:
                raise ValueError("etcd.tls.certSecretRef needs etcd.tls.enabled: true")
        return self


class Etcd(SpecModel):
    """The etcd cluster the enhanced locks live in when the backend is ``etcd``."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.passwordSecretRef) || (has(self.username) && self.username != '')",
                "etcd.passwordSecretRef needs etcd.username (etcd logs in as a user)",
                field_path=".passwordSecretRef",
            ),
        )
    )

    endpoints: list[HostPort] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="etcd client endpoints, host:port each (all members of one cluster).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    username: str | None = Field(None, max_length=256, description="etcd user name (auth on).")
    password_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the etcd password (never copied anywhere)."
    )
    tls: EtcdTLS | None = Field(None, description="TLS to etcd.")
    key_prefix: str | None = Field(
        None, min_length=1, max_length=128, description="Prefix of every enhanced etcd key."
    )

    @model_validator(mode="after")
    def _password_needs_user(self) -> Etcd:
        if self.password_secret_ref is not None and not self.username:
            raise ValueError("etcd.passwordSecretRef needs etcd.username (etcd logs in as a user)")
        if self.endpoints is not None and len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError("etcd.endpoints names an endpoint twice")
        return self
_UNIQUE = "self.all(a, self.exists_one(b, b.name == a.name))"


def _apart(field: str) -> str:
    """CEL: the glob ``field`` of the patterns ``a.match`` and ``b.match`` differs."""
    return (f"has(a.match.{field}) != has(b.match.{field}) || "
            f"(has(a.match.{field}) && a.match.{field} != b.match.{field})")


_CLEANING_ROUNDS = 4
"""Rounds of dropping empty and ``.`` elements (``//`` and ``/./`` as ``/``): each halves every
run of them, so four leave none of a run of up to 15 in a row (16 is the first they leave one
of). More rounds cost more than the API server's budget for the rule allows (each is costed
by the pathPrefix's longest length, for every pair of rules); a longer run is left to the
operator, which refuses the LockPolicy when the rules are ambiguous."""


def _cleaned(side: str) -> str:
    """CEL: ``side``'s pathPrefix as the service cleans it (``clean_path``), in a form of its
    own: ``/{elements}/`` (the root ``.``, and ``/``, is ``/``), marked ``^`` in front when
    rooted; exact for a path with no ``..`` element and no run of more than 15 empty or ``.``
    elements, and otherwise never the form of a path the service reads apart from it."""
    path = f"{side}.match.pathPrefix"
    only_separators = rf"{path}.matches(r'^(\.?/)*\.?$')"
    text = f"(({path}.startsWith('/') && !{only_separators}) ? '^/' : '/') + {path} + '/'"
    for _ in range(_CLEANING_ROUNDS):
        text = f"({text}).replace('//', '/').replace('/./', '/')"
    return text


_PATHS_APART = (
    # As the service cleans a pathPrefix (``clean_path``): repeated and trailing slashes and
    # ``.`` elements go, and a path of none of the others is the root ``.`` (``/`` as well).
    # A ``..`` element is not resolved here: such paths are compared by those elements.
    "has(a.match.pathPrefix) != has(b.match.pathPrefix) || (has(a.match.pathPrefix) && "
    f"{_cleaned('a')} != {_cleaned('b')})"
)

_UNAMBIGUOUS = (
    "self.all(a, self.all(b, a.name == b.name || a.priority == b.priority"
    " || has(a.match) != has(b.match)"
    f" || (has(a.match) && ({_apart('repo')} || {_apart('workspace')} || {_apart('key')}"
    f" || {_PATHS_APART}))"
    " || (has(a.commands) && size(a.commands) > 0 && has(b.commands) && size(b.commands) > 0"
    " && !a.commands.exists(c, c in b.commands))))"
)
"""Two priority rules of different priorities on the same pattern and overlapping commands
are refused (as :meth:`PolicyRules._consistent` refuses them): the pattern compared as the
service compares it, its ``pathPrefix`` cleaned (``envs/prod/`` and ``./envs/prod`` are
``envs/prod``), not as written."""


Subject = Annotated[str, Field(min_length=6, max_length=520, pattern=r"^(user|group):.+$")]


class RoleGrant(SpecModel):
    """One role (or single verb) and who holds it."""

    role: Literal["viewer", "locker", "admin", "read", "lock", "prioritize", "release-any",
                  "force-unlock"] = Field(
        description="A role (viewer, locker, admin) or a verb (read, lock, prioritize, "
        "release-any, force-unlock; admin is both).")
    subjects: Annotated[list[Subject], Field(min_length=1, max_length=256)] = Field(
        description="Who holds it: user:NAME or group:NAME.")


class Access(SpecModel):
    """Who may call the lock API (docs/08-access.md); the tokens themselves stay in files or
    Secrets, never in the CR."""

    mode: Literal["none", "static", "kubernetes"] | None = Field(
        None, description="none, static (tokens and the role map) or kubernetes (TokenReview "
        "and SubjectAccessReview).")
    roles: Annotated[list[RoleGrant], Field(max_length=32)] | None = Field(
        None, description="Static mode: the role map, as role and subjects.")
    audience: str | None = Field(
        None, max_length=253, description="Kubernetes mode: the audience tokens must have.")
    cache_ttl: HourCRDuration | None = Field(
        None, alias="cacheTTL",
        description="How long an authentication or authorization answer is reused (above 0, "
        "at most 1h).")


class Audit(SpecModel):
    """The audit trail of mutating calls and refusals."""

    enabled: bool | None = Field(None, description="Keep the audit trail.")
    retention: PositiveCRDuration | None = Field(
        None, description="How long entries are kept (above 0).")
    max_entries: int | None = Field(
        None, ge=100, le=10_000_000, description="Most entries kept of each kind, refusals "
        "(401, 403) and the others (the oldest of a kind go first).")


class LockPolicySpec(SpecModel):
    """What the lock service runs with; every field left out keeps the service's setting.

    ``freezes``, ``concurrency`` and ``priorityRules`` are the policy's rules
    (docs/08-policies.md): written, they replace the service's own rules as one set.
    """

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.backend) || self.backend != 'etcd' || "
                "(has(self.etcd) && has(self.etcd.endpoints))",
                "backend etcd needs etcd.endpoints (where the etcd cluster is)",
                field_path=".etcd",
            ),
        )
    )

    enabled: bool | None = Field(None, description="Turn the enhanced locking system on.")
    backend: BackendName | None = Field(
        None,
        description="Store of the enhanced locks: boltdb (embedded single file), redis, etcd, "
        "memory.",
    )
    features: Features | None = Field(None, description="Feature flags.")
    timeouts: Timeouts | None = Field(None, description="How long lock requests may wait.")
    queue: Queue | None = Field(None, description="The waiters' queue of each lock key.")
    retries: Retries | None = Field(None, description="Retries of transient backend errors.")
    lock_ttl: CRLease | None = Field(
        None,
        alias="lockTTL",
        description="Default lease of an enhanced lock; 0 means no expiry, else at least 1ms.",
    )
    redis: Redis | None = Field(None, description="The Redis connection (backend: redis).")
    etcd: Etcd | None = Field(None, description="The etcd connection (backend: etcd).")
    access: Access | None = Field(None, description="Who may call the lock API.")
    audit: Audit | None = Field(None, description="The audit trail.")

    @model_validator(mode="after")
    def _etcd_needs_endpoints(self) -> LockPolicySpec:
        if self.backend == "etcd" and (self.etcd is None or self.etcd.endpoints is None):
            raise ValueError("backend etcd needs etcd.endpoints (where the etcd cluster is)")
        return self
    freezes: list[Freeze] | None = Field(
        None, max_length=32,
        description="No new grants on matching keys while active (held locks stay).",
        json_schema_extra=validations(cel(_UNIQUE, "every freeze needs its own name")),
    )
    concurrency: list[ConcurrencyLimit] | None = Field(
        None, max_length=32,
        description="At most limit locks held at once in a group of keys; more wait.",
        json_schema_extra=validations(cel(_UNIQUE,
                                          "every concurrency limit needs its own name")),
    )
    priority_rules: list[PriorityRule] | None = Field(
        None, max_length=32,
        description="The priority the server gives requests by key pattern and command.",
        json_schema_extra=validations(
            cel(_UNIQUE, "every priority rule needs its own name"),
            cel(_UNAMBIGUOUS, "two priority rules cover the same keys and commands with "
                "different priorities (which wins would depend on their order); narrow one")),
    )

    @model_validator(mode="after")
    def _rules_agree(self) -> LockPolicySpec:
        self.rules()  # names twice, ambiguous priority rules: the same checks as the service
        return self

    def rules(self) -> PolicyRules | None:
        """The policy's rules, or ``None`` when it writes none (the service keeps its own)."""
        if self.freezes is None and self.concurrency is None and self.priority_rules is None:
            return None
        return PolicyRules(freezes=self.freezes or [], concurrency=self.concurrency or [],
                           priority_rules=self.priority_rules or [])


class ActiveFreeze(StatusModel):
    """A freeze in force."""

    name: str = Field(max_length=63)
    message: str = Field(max_length=1024)
    action: str = Field(max_length=16)
    until: str | None = Field(None, max_length=64, description="When it ends (none: lifted "
                              "by editing the policy).")


class LockPolicyStatus(StatusModel):
    """What the operator observed and what the service runs."""

    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation the operator last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready: the service runs this generation of the spec. Granting (False "
        "only, absent while locks are granted): the service grants no lock, and why (reason "
        "PolicyNotApplied: the operator has not applied this policy since it started; "
        "EnhancedStoreUnread: enhanced locking is off and its store, which may still hold "
        "locks, could not be read yet; it is looked at again).",
        json_schema_extra=conditions_schema_extra(),
    )
    applied_config_hash: str | None = Field(
        None, max_length=64, description="Hash of the configuration the service runs."
    )
    applied_generation: int | None = Field(
        None, ge=0, description="The service's configuration generation (GET /v1/config)."
    )
    status_writer: ReplicaName | None = Field(
        None, description="The replica (service process) that applied this configuration and "
        "writes this status."
    )
    last_seen_at: Timestamp | None = Field(
        None, description="When that replica last confirmed it is alive and serving (renewed "
        "at each resync, 30s by default); an old time means the status may be stale."
    )
    active_freezes: list[ActiveFreeze] = Field(
        default_factory=list, max_length=32,
        description="The freezes in force now (their message is what refused requests get).",
    )
