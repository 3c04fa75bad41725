"""The configuration model: every setting, its default, and how users spell it.

One model is the single source of truth. Each field is a setting with three spellings that are
derived from its name, as Atlantis derives its own: a YAML key ``enhanced-locking-<name>``, an
environment variable ``ATLANTIS_ENHANCED_LOCKING_<NAME>`` and a flag ``--enhanced-locking-<name>``.
(``data-dir`` keeps Atlantis's own spellings.) Sources are layered
``defaults < YAML < env < flags``; a LockPolicy CR overrides them at runtime through the
provider. The config reference in ``docs/01-foundation.md`` is generated from this module.

A bad value stops the process with exit code 2 and one line naming the setting, where the value
came from and the accepted form. The Redis and etcd passwords are ``SecretStr``: never printed.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from enhanced_locking.durations import (
    DEFAULT_MAX_TIMEOUT,
    DURATION_FORM,
    Duration,
    Ttl,
    format_duration,
)
from enhanced_locking.policies import PolicyRules
from enhanced_locking.types import BackendName, Synchronous, UnusableSetting

__all__ = [
    "ConfigError",
    "EnhancedLockingConfig",
    "Setting",
    "Sources",
    "add_flags",
    "flag_help",
    "flags_from_namespace",
    "load_config",
    "load_sourced",
    "not_utf8",
    "settings",
]

ENV_PREFIX = "ATLANTIS_ENHANCED_LOCKING_"
KEY_PREFIX = "enhanced-locking-"
SECRET_MASK = "********"
SECRET_FIELDS = (
    "redis_password", "etcd_password", "auth_tokens",
    "github_webhook_secret", "gitlab_webhook_secret", "gitea_webhook_secret",
)
"""Settings that are never shown: masked in ``config show``, ``/v1/config`` and errors."""


# A host name (letters, digits, ``-``, ``_``, dots), an IPv4 address or a bracketed IPv6 one,
# then a port of ASCII digits: nothing with spaces or another script's digits gets through.
_HOST_PORT = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})"
)


def _without_credentials(address: str) -> str:
    """``address`` as an error may show it: what stands before an ``@`` (the user and password
    of a URL such as ``redis://:PASSWORD@host:6379``, given where a host:port belongs) is
    replaced by ``***``."""
    if "@" not in address:
        return address
    head, _, tail = address.rpartition("@")
    scheme = head.partition("://")[0] + "://" if "://" in head else ""
    return f"{scheme}***@{tail}"


def _host_port(value: str) -> str:
    match = _HOST_PORT.fullmatch(value)
    # A host name's labels (between its dots) are 1 to 63 characters: a resolver refuses any
    # other name before it looks it up.
    labels = [] if value.startswith("[") else value.rpartition(":")[0].split(".")
    if (match is None or not 0 < int(match.group(1)) < 65536
            or any(not 0 < len(label) < 64 for label in labels)):
        raise ValueError(f"expected host:port such as localhost:6379, got "
                         f"{_without_credentials(value)!r}")
    return value


def _host_ports(value: list[str]) -> list[str]:
    return [_host_port(item) for item in value]


# Booleans as Atlantis's own flags take them where they are unambiguous words (Go's
# strconv.ParseBool spells): true/True/TRUE and false/False/FALSE, or a YAML boolean. Go also
# takes 1/0/t/f, and YAML 1.1 yes/no/on/off: all refused here, a typo must not turn a feature on
# or off (docs/01-foundation.md, "How values are written").
_TRUE = frozenset({"true", "True", "TRUE"})
_FALSE = frozenset({"false", "False", "FALSE"})
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")


def _strict_bool(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _TRUE | _FALSE:
        return value in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def _strict_int(value: object) -> object:
    # Not a float (1000.0), a YAML boolean, 1_000 or another script's digits.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def _strict_number(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)
    raise ValueError(f"expected a number, got {value!r}")


Flag = Annotated[bool, BeforeValidator(_strict_bool)]
Integer = Annotated[int, BeforeValidator(_strict_int)]

ROLES: dict[str, tuple[str, ...]] = {
    "viewer": ("read",),
    "locker": ("read", "lock"),
    "admin": ("read", "lock", "prioritize", "release-any", "force-unlock", "admin"),
}
"""The built-in roles of the static role map (the chart's ClusterRoles grant the same verbs)."""

VERBS = ("read", "lock", "prioritize", "release-any", "force-unlock", "admin")


def _subject(value: str) -> str:
    kind, sep, name = value.partition(":")
    if not sep or kind not in ("user", "group") or not name or len(name) > 512:
        raise ValueError(f"expected user:NAME or group:NAME, got {value!r}")
    return value


def _role_map(value: Any) -> Any:
    """``role=user:a,group:b;role2=...`` (env, flags) or a mapping (YAML) → a mapping."""
    if not isinstance(value, str):
        return value
    out: dict[str, list[str]] = {}
    for part in (p.strip() for p in value.split(";")):
        if not part:
            continue
        role, sep, subjects = part.partition("=")
        if not sep:
            raise ValueError(f"expected role=user:NAME,group:NAME;... got {part!r}")
        out.setdefault(role.strip(), []).extend(
            s.strip() for s in subjects.split(",") if s.strip())
    return out


def _roles(value: dict[str, list[str]]) -> dict[str, list[str]]:
    for role, subjects in value.items():
        if role not in ROLES and role not in VERBS:
            raise ValueError(f"unknown role or verb {role!r}; known: "
                             f"{', '.join((*ROLES, *VERBS))}")
        for subject in subjects:
            _subject(subject)
    return value


RoleMap = Annotated[
    dict[str, list[str]], BeforeValidator(_role_map), AfterValidator(_roles)
]

HostPort = Annotated[str, Field(max_length=253 + 6), AfterValidator(_host_port)]


def _path(value: str) -> str:
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL character")
    return value


PathSetting = Annotated[str, AfterValidator(_path)]
"""A file system path: no operating system takes one with a NUL character."""
Weight = Annotated[float, Field(ge=0, le=100, multiple_of=0.01), BeforeValidator(_strict_number)]
Ratio = Annotated[float, Field(ge=0, le=1), BeforeValidator(_strict_number)]


class _Together(ValueError):
    """A rule over settings that broke: the settings it is about (field names), so the error
    can say where each value came from, and what is wrong."""

    def __init__(self, fields: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.fields = fields


def _key(field: str) -> str:
    """A setting's YAML key from its field name (the names the one-line errors use)."""
    return KEY_PREFIX + field.replace("_", "-")


class EnhancedLockingConfig(BaseSettings):
    """Enhanced locking settings; defaults are the seed's (off by default, embedded store)."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", validate_default=True)

    # --- the seed's settings -------------------------------------------------------------
    enabled: Flag = Field(False, description="Turn the enhanced locking system on.")
    backend: BackendName = Field(
        "boltdb",
        description="Store of the enhanced locker: boltdb (embedded single file), redis, etcd, "
        "memory.",
    )
    priority_queue: Flag = Field(
        False, description="Serve waiters by priority with aging (off: plain FIFO)."
    )
    retries: Flag = Field(
        False, description="Retry transient backend errors with jittered exponential backoff."
    )
    metrics: Flag = Field(True, description="Export Prometheus metrics on /metrics.")
    redis_addr: HostPort = Field("localhost:6379", description="Redis address, host:port.")
    redis_password: SecretStr = Field(
        SecretStr(""), description="Redis password (never printed or logged)."
    )
    redis_db: Integer = Field(0, ge=0, le=1023, description="Redis database number.")
    default_timeout: Duration = Field(
        timedelta(seconds=30),
        description="How long a request that asks to wait without a duration (wait: true) "
        "waits; a request without wait fails fast.",
    )
    max_timeout: Duration = Field(
        DEFAULT_MAX_TIMEOUT, description="Longest wait a request may ask for (more is refused)."
    )
    max_queue_size: Integer = Field(
        1000, ge=1, le=1_000_000, description="Most waiters queued on one lock key."
    )
    starvation_threshold: Duration = Field(
        timedelta(minutes=2), description="Wait after which a waiter is raised one priority "
        "level (at least 1ms: waits are counted in whole ms)."
    )
    max_priority_boost: Integer = Field(
        3, ge=0, le=3, description="Most levels aging may raise a waiter."
    )

    # --- our additions, named the same way ------------------------------------------------
    deadlock_detection: Flag = Field(
        False, description="Refuse a wait that would close a cycle in the wait-for graph."
    )
    events: Flag = Field(True, description="Publish lock events (GET /v1/events).")
    lock_ttl: Ttl = Field(
        timedelta(0),
        description="Default lease of an enhanced lock; 0 means no expiry, else at least 1ms.",
    )
    retry_max_attempts: Integer = Field(
        3, ge=1, le=20, description="Attempts per operation when retries are on."
    )
    retry_backoff: Duration = Field(
        timedelta(milliseconds=200), description="First retry delay; doubles with jitter."
    )
    redis_username: str = Field("", max_length=256, description="Redis ACL user name.")
    redis_tls: Flag = Field(False, description="Connect to Redis over TLS.")
    redis_tls_ca_file: str = Field("", description="CA bundle that signs the Redis server.")
    redis_tls_cert_file: str = Field("", description="Client certificate for Redis TLS.")
    redis_tls_key_file: str = Field("", description="Client key for Redis TLS.")
    redis_tls_skip_verify: Flag = Field(
        False, description="Do not verify the Redis server certificate (testing only)."
    )
    redis_key_prefix: str = Field(
        "atlantis:enhanced:", min_length=1, max_length=128,
        description="Prefix of every enhanced Redis key.",
    )
    redis_pool_size: Integer = Field(50, ge=1, le=10_000, description="Redis connection pool size.")
    redis_sentinel_addrs: Annotated[list[str], AfterValidator(_host_ports)] = Field(
        default_factory=list, description="Sentinel addresses (comma-separated host:port)."
    )
    redis_sentinel_master: str = Field("", description="Sentinel master name.")
    redis_cluster: Flag = Field(
        False,
        description="The Redis at enhanced-locking-redis-addr is a Redis Cluster (the address "
        "of any node; the others are discovered). One namespace's keys share one hash slot; "
        "the legacy store in Atlantis's layout needs a Redis that is not a cluster.",
    )
    redis_restart_quarantine: Duration = Field(
        timedelta(minutes=1),
        description="After Redis comes back without its data, refuse grants this long "
        "(locks held before are unknown).",
    )
    etcd_endpoints: Annotated[list[str], AfterValidator(_host_ports)] = Field(
        default_factory=lambda: ["localhost:2379"],
        description="etcd client endpoints (comma-separated host:port).",
        min_length=1,
    )
    etcd_username: str = Field("", max_length=256, description="etcd user name (auth on).")
    etcd_password: SecretStr = Field(
        SecretStr(""), description="etcd password (never printed or logged)."
    )
    etcd_tls: Flag = Field(False, description="Connect to etcd over TLS.")
    etcd_tls_ca_file: str = Field("", description="CA bundle that signs the etcd servers.")
    etcd_tls_cert_file: str = Field("", description="Client certificate for etcd TLS.")
    etcd_tls_key_file: str = Field("", description="Client key for etcd TLS.")
    etcd_key_prefix: str = Field(
        "/atlantis/enhanced/", min_length=1, max_length=128,
        description="Prefix of every enhanced etcd key.",
    )
    legacy_backend: BackendName = Field(
        "boltdb", description="Store of the legacy (Atlantis-compatible) locker."
    )
    migration_weight: Weight | None = Field(
        None,
        description="Percent of lock keys routed to the enhanced locker (unset: all of them).",
    )
    migration_mode: Literal["route", "shadow"] = Field(
        "route", description="route: weight decides; shadow: legacy decides, enhanced replays."
    )
    fallback: Literal["legacy", "fail-closed"] = Field(
        "legacy", description="When the enhanced backend is unreachable: use legacy or refuse."
    )
    shadow_sample_ratio: Ratio = Field(
        1.0, description="Share of lock keys replayed in shadow mode (0 to 1; sticky per key)."
    )
    shadow_queue_size: Integer = Field(
        10_000, ge=1, le=1_000_000,
        description="Most shadow replays waiting to run; more are dropped and counted.",
    )
    replica_id: str = Field(
        "", max_length=253,
        description="This replica's name among the replicas (empty: host name and a suffix).",
    )
    replica_heartbeat: Duration = Field(
        timedelta(seconds=2),
        description="How often a replica reports the routing it applied (and retries "
        "fallback reconciliation).",
    )
    replica_timeout: Duration = Field(
        timedelta(0),
        description="A replica silent this long is left out of weight moves (0: three "
        "heartbeats).",
    )
    peers: Annotated[list[str], AfterValidator(_host_ports)] = Field(
        default_factory=list,
        description="The other replicas' API addresses (comma-separated host:port; a host name "
        "stands for every address it resolves to), asked when a store does not answer here: "
        "while one of them reaches every store, GET /serving is 503, and while one reaches the "
        "enhanced store, the fallback to legacy refuses (empty: no peers). With tls-cert-file "
        "they are asked over HTTPS and must present that same certificate.",
    )

    # --- who may do what (docs/08-access.md) ----------------------------------------------
    auth: Literal["none", "static", "kubernetes"] = Field(
        "none",
        description="Who may call the API: none (anyone who reaches the port; loopback only "
        "unless insecure-allow-unauthenticated), static (bearer tokens and the role map), "
        "kubernetes (TokenReview and SubjectAccessReview; static tokens are accepted too).",
    )
    auth_tokens_file: str = Field(
        "",
        description="Static bearer tokens, one per line as token,name,uid,\"group1,group2\" "
        "(Kubernetes' token file form); re-read when the file changes.",
    )
    auth_tokens: SecretStr = Field(
        SecretStr(""),
        description="Static bearer tokens given inline in the tokens file form (from a "
        "Secret, through this setting's environment variable); never printed.",
    )
    auth_roles: RoleMap = Field(
        default_factory=dict,
        description="Static mode: who holds which role (viewer, locker, admin) or verb (read, "
        "lock, prioritize, release-any, force-unlock, admin).",
    )
    auth_audience: str = Field(
        "", max_length=253,
        description="Kubernetes mode: the audience a token must be minted for (empty: the API "
        "server's own).",
    )
    auth_namespace: str = Field(
        "", max_length=63,
        description="Kubernetes mode: the namespace of the access reviews, so Roles and "
        "RoleBindings there count (empty: only cluster-wide bindings).",
    )
    auth_cache_ttl: Duration = Field(
        timedelta(seconds=10),
        description="How long an authentication or authorization answer is reused.",
    )
    insecure_allow_unauthenticated: Flag = Field(
        False,
        description="INSECURE: serve on a non-loopback address with auth none, so anyone who "
        "reaches the port may force-unlock every lock.",
    )
    tls_cert_file: str = Field(
        "", description="Serve HTTPS with this certificate (PEM); re-read when it changes."
    )
    tls_key_file: str = Field("", description="The key of tls-cert-file (PEM).")
    audit: Flag = Field(
        True, description="Keep an audit trail of every mutating call and every refusal."
    )
    audit_retention: Duration = Field(
        timedelta(days=30), description="How long audit entries are kept."
    )
    audit_max_entries: Integer = Field(
        100_000, ge=100, le=10_000_000,
        description="Most audit entries kept of each kind, refusals (401, 403) and the others "
        "(the oldest of a kind go first).",
    )
    audit_stdout: Flag = Field(
        True, description="Also print each audit entry as a JSON line on stdout."
    )
    audit_own_locks: Flag = Field(
        True,
        description="Also audit a pull's own lock calls that succeed (an acquire granted, the "
        "holder's release, a lease refreshed; batches too). false: those are left out of the "
        "trail and stdout; refusals, force-unlocks, releases by others, a closed pull's "
        "release and a gone client's give-back are still audited.",
    )

    # --- the HTTP server's limits (docs/11-overload.md) --------------------------------------
    http_max_connections: Integer = Field(
        4096, ge=1, le=1_000_000,
        description="Most open HTTP connections (never above the open-file limit less 64); "
        "more are closed at once, logged once per 10 s.",
    )
    http_header_timeout: Duration = Field(
        timedelta(seconds=10),
        description="A request's line and headers must arrive within this, else its "
        "connection is closed.",
    )
    http_body_timeout: Duration = Field(
        timedelta(seconds=30),
        description="A request's body must arrive within this after its headers, else its "
        "connection is closed.",
    )
    http_max_in_flight: Integer = Field(
        4096, ge=1, le=1_000_000,
        description="Most requests served at once (waiting acquires included); more are "
        "answered 503 with Retry-After. Releases, health, readiness and metrics are always "
        "served.",
    )
    http_max_body: Integer = Field(
        1_048_576, ge=1024, le=10_000_000,
        description="Most bytes of a request body the service reads (the VCS webhooks: 25 MB, "
        "GitHub's cap); a larger body is answered 413 before it is read or its caller checked.",
    )

    # --- event streams (docs/11-overload.md) ------------------------------------------------
    events_max_lag: Integer = Field(
        1000, ge=1, le=1_000_000,
        description="Most events a reader of GET /v1/events may fall behind, or ask to replay "
        "with Last-Event-ID; beyond, it gets a gap event (a reader that fell behind is then "
        "cut off).",
    )
    events_max_streams: Integer = Field(
        256, ge=1, le=100_000,
        description="Most GET /v1/events streams open at once; more are answered 503.",
    )
    events_max_streams_per_client: Integer = Field(
        8, ge=1, le=100_000,
        description="Most GET /v1/events streams open at once from one client address; more "
        "are answered 429.",
    )

    # --- VCS webhooks (docs/07-atlantis.md): each is off until its secret is set ----------
    github_webhook_secret: SecretStr = Field(
        SecretStr(""),
        description="Secret of the GitHub pull request webhook (POST /v1/webhooks/github); "
        "unset: that endpoint is off. Never printed or logged.",
    )
    gitlab_webhook_secret: SecretStr = Field(
        SecretStr(""),
        description="Secret token of the GitLab merge request webhook (POST "
        "/v1/webhooks/gitlab); unset: that endpoint is off. Never printed or logged.",
    )
    gitea_webhook_secret: SecretStr = Field(
        SecretStr(""),
        description="Secret of the Gitea pull request webhook (POST /v1/webhooks/gitea); "
        "unset: that endpoint is off. Never printed or logged.",
    )
    policies: PolicyRules = Field(
        default_factory=PolicyRules,
        description="Freezes, concurrency limits and priority rules (docs/08-policies.md); "
        "from a LockPolicy CR's spec, or a YAML mapping.",
    )
    init_store: Flag = Field(
        False,
        description="Start an existing embedded store file that is empty (0 bytes, or SQLite "
        "without tables) afresh instead of refusing it; its fencing tokens then continue from "
        "the clock.",
    )
    store_synchronous: Synchronous = Field(
        "normal",
        description="When the embedded store's commits reach the disk: normal (a commit "
        "survives the process being killed; an operating-system crash or power cut can lose "
        "the last ones) or full (each commit is synced to disk before its answer, at the cost "
        "of a disk flush per write).",
    )
    data_dir: PathSetting = Field(
        "~/.atlantis",
        min_length=1,
        description="Directory of the embedded store (enhanced-locking.db).",
        json_schema_extra={"env": "ATLANTIS_DATA_DIR", "flag": "--data-dir", "yaml": "data-dir"},
    )

    @model_validator(mode="after")
    def _check_together(self) -> EnhancedLockingConfig:
        if self.max_timeout < self.default_timeout:
            raise _Together(
                ("max_timeout", "default_timeout"),
                "enhanced-locking-max-timeout must be at least enhanced-locking-default-timeout "
                f"(got {_fmt(self.max_timeout)} < {_fmt(self.default_timeout)})",
            )
        for side in ("redis_tls", "etcd_tls", "tls"):
            cert, key = f"{side}_cert_file", f"{side}_key_file"
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                raise _Together(
                    (cert, key),
                    f"{_key(cert)} and {_key(key)} must be set together",
                )
        if self.starvation_threshold < timedelta(milliseconds=1):
            raise _Together(
                ("starvation_threshold",),
                "enhanced-locking-starvation-threshold must be at least 1ms (waits are counted "
                "in whole ms: under it aging would be off; enhanced-locking-max-priority-boost "
                f"0 turns aging off) (got {_fmt(self.starvation_threshold)})",
            )
        for name in ("http_header_timeout", "http_body_timeout", "replica_heartbeat",
                     "audit_retention"):
            if getattr(self, name) <= timedelta(0):
                raise _Together((name,), f"{_key(name)} must be above 0s")
        if timedelta(0) < self.replica_timeout <= self.replica_heartbeat:
            raise _Together(
                ("replica_timeout", "replica_heartbeat"),
                "enhanced-locking-replica-timeout must be longer than "
                f"enhanced-locking-replica-heartbeat (got {_fmt(self.replica_timeout)} <= "
                f"{_fmt(self.replica_heartbeat)})",
            )
        if self.auth == "static" and not (self.auth_tokens_file
                                          or self.auth_tokens.get_secret_value()):
            raise _Together(
                ("auth", "auth_tokens_file", "auth_tokens"),
                "enhanced-locking-auth static needs enhanced-locking-auth-tokens-file (or "
                "enhanced-locking-auth-tokens)",
            )
        if not timedelta(0) < self.auth_cache_ttl <= timedelta(hours=1):
            raise _Together(
                ("auth_cache_ttl",),
                "enhanced-locking-auth-cache-ttl must be above 0s and at most 1h "
                f"(got {_fmt(self.auth_cache_ttl)})",
            )
        if bool(self.redis_sentinel_addrs) != bool(self.redis_sentinel_master):
            raise _Together(
                ("redis_sentinel_addrs", "redis_sentinel_master"),
                "enhanced-locking-redis-sentinel-addrs and enhanced-locking-redis-sentinel-master "
                "must be set together",
            )
        if self.redis_cluster:
            if self.redis_sentinel_addrs:
                raise _Together(
                    ("redis_cluster", "redis_sentinel_addrs"),
                    "enhanced-locking-redis-cluster cannot be used with "
                    "enhanced-locking-redis-sentinel-addrs (a cluster fails over by itself)",
                )
            if self.redis_db != 0:
                raise _Together(
                    ("redis_cluster", "redis_db"),
                    "enhanced-locking-redis-cluster needs enhanced-locking-redis-db 0 (a Redis "
                    f"Cluster has only database 0; got {self.redis_db})",
                )
            if self.legacy_backend == "redis":
                raise _Together(
                    ("redis_cluster", "legacy_backend"),
                    "enhanced-locking-redis-cluster cannot be used with "
                    "enhanced-locking-legacy-backend redis: Atlantis's own Redis layout (pr/ keys, "
                    "read by Atlantis's non-cluster client) needs a Redis that is not a cluster",
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_config() resolves YAML, env and flags itself (to name the source of a bad
        # value); the model only validates what it is given.
        return (init_settings,)

    @property
    def data_path(self) -> Path:
        """The embedded store's file; ``UnusableSetting`` (``data-dir``) when a leading ``~``
        cannot be expanded (no such user, or no home directory known)."""
        try:
            return Path(self.data_dir).expanduser() / "enhanced-locking.db"
        except RuntimeError:
            raise UnusableSetting(
                "data-dir", f"cannot find the embedded store's directory {self.data_dir}: "
                f"{self.data_dir.split('/')[0]} names no user with a home directory") from None

    @property
    def replica_expiry(self) -> timedelta:
        """How long a silent replica still counts (``replica-timeout``, or three heartbeats)."""
        return self.replica_timeout or 3 * self.replica_heartbeat

    @property
    def routed_weight(self) -> float:
        """The percent of keys the enhanced side decides: the effective weight in route mode,
        0 in shadow mode (legacy decides every key there; enhanced only replays)."""
        return 0.0 if self.migration_mode == "shadow" else self.effective_weight

    @property
    def effective_weight(self) -> float:
        """The routing weight: 0 when disabled, 100 when enabled without a migration."""
        if not self.enabled:
            return 0.0
        return 100.0 if self.migration_weight is None else self.migration_weight

    def masked(self) -> dict[str, Any]:
        """The config as JSON-ready data with the keys users write and secrets masked."""
        data = self.model_dump(mode="json")
        data["policies"] = self.policies.model_dump(mode="json", by_alias=True,
                                                    exclude_defaults=True)
        out: dict[str, Any] = {}
        for setting in settings():
            value = data[setting.field]
            if setting.secret:
                secret: SecretStr = getattr(self, setting.field)
                value = SECRET_MASK if secret.get_secret_value() else ""
            out[setting.key] = value
        return out


def _fmt(value: timedelta) -> str:
    return format_duration(value)


@dataclass(frozen=True)
class Setting:
    """One setting and its three spellings."""

    field: str
    key: str
    env: str
    flag: str
    default: Any
    description: str
    form: str
    secret: bool
    kind: str


def _form(info: FieldInfo, annotation: Any) -> tuple[str, str]:
    text = repr(annotation)
    if annotation is PolicyRules:
        return "a mapping of freezes, concurrency and priorityRules (docs/08-policies.md)", "rules"
    # Annotated metadata (HostPort's validator) is moved from the annotation to the field.
    if any(getattr(item, "func", None) is _host_port for item in info.metadata):
        return "host:port such as localhost:6379", "str"
    if any(getattr(item, "func", None) is _path for item in info.metadata):
        return "a non-empty path without NUL characters", "str"
    if "timedelta" in text:
        return DURATION_FORM, "duration"
    if annotation is bool:
        return "true or false", "bool"
    if "Literal" in text:
        choices = re.findall(r"'([^']+)'", text)
        return "one of " + ", ".join(choices), "choice"
    if "dict" in text:
        return ("a mapping of role to subjects (YAML), or role=user:NAME,group:NAME;role=... "
                "(env, flag)", "map")
    if "list" in text:
        return "a comma-separated list of host:port", "list"
    if annotation is int:
        lo = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
        hi = next((m.le for m in info.metadata if hasattr(m, "le")), None)
        return f"an integer from {lo} to {hi}", "int"
    if "float" in text:
        if next((m.le for m in info.metadata if hasattr(m, "le")), None) == 1:
            return "a number from 0 to 1", "float"
        return "a number from 0 to 100 (two decimals at most)", "float"
    longest = next((m.max_length for m in info.metadata if hasattr(m, "max_length")), None)
    shortest = next((m.min_length for m in info.metadata if hasattr(m, "min_length")), None)
    kind = "a non-empty string" if shortest else "a string"
    if longest is not None:
        return f"{kind} of at most {longest} characters", "str"
    return kind, "str"


def settings() -> list[Setting]:
    """Every setting of the model, in declaration order."""
    result = []
    for name, info in EnhancedLockingConfig.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        dashed = name.replace("_", "-")
        form, kind = _form(info, info.annotation)
        default = info.get_default(call_default_factory=True)
        if isinstance(default, PolicyRules):
            default = "no rules"
        elif isinstance(default, timedelta):
            default = _fmt(default)
        elif isinstance(default, SecretStr):
            default = ""
        result.append(
            Setting(
                field=name,
                key=str(extra.get("yaml", KEY_PREFIX + dashed)),
                env=str(extra.get("env", ENV_PREFIX + name.upper())),
                flag=str(extra.get("flag", "--" + KEY_PREFIX + dashed)),
                default=default,
                description=info.description or "",
                form=form,
                secret=name in SECRET_FIELDS,
                kind=kind,
            )
        )
    return result


@dataclass(frozen=True)
class Sources:
    """Where the settings given came from (``flag --x``, ``env X``, ``YAML key x in FILE``),
    by field name; a setting not given has its default."""

    by_field: Mapping[str, str]

    def of_key(self, key: str) -> str:
        """Where the setting with YAML key ``key`` came from."""
        field = next((s.field for s in settings() if s.key == key), "")
        return self.by_field.get(field, "default")


class ConfigError(Exception):
    """Invalid configuration; the message is one line naming the setting."""


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add every setting's flag (bool flags take an optional ``=true|false``, as in Go)."""
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                        help="YAML config file (keys as the flags without their dashes, e.g. "
                             "enhanced-locking-enabled: true)")
    group = parser.add_argument_group(
        "enhanced locking settings",
        "Every setting also reads its ATLANTIS_ENHANCED_LOCKING_* variable and its YAML key; "
        "precedence: defaults < YAML < env < flags (docs/01-foundation.md).",
    )
    for setting in settings():
        kwargs: dict[str, Any] = {
            "dest": "cfg_" + setting.field, "default": None, "metavar": "VALUE"
        }
        if setting.kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        group.add_argument(setting.flag, help=flag_help(setting), **kwargs)


def flag_help(setting: Setting) -> str:
    """A setting's ``--help`` line: what it does and its default, never ``None`` or blank."""
    default = setting.default
    if default is None or default == "":
        shown = "not set"
    elif isinstance(default, bool):
        shown = "true" if default else "false"
    else:
        shown = str(default)
    return f"{setting.description} Default: {shown}."


def flags_from_namespace(namespace: argparse.Namespace) -> dict[str, str]:
    """The flags a user actually gave, keyed by field name."""
    return {
        setting.field: value
        for setting in settings()
        if (value := getattr(namespace, "cfg_" + setting.field, None)) is not None
    }


def _convert(setting: Setting, value: Any) -> Any:
    if setting.kind == "rules" and isinstance(value, str):
        # Read as the config file is (YAML 1.2: `yes` is text, `010` is ten).
        try:
            rules = yaml.load(value, Loader=_StrictLoader)  # a SafeLoader
        except (yaml.YAMLError, RecursionError):
            return value  # validation names the setting
        return {} if rules is None else rules
    if setting.kind == "list" and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class _StrictLoader(yaml.SafeLoader):
    """YAML as YAML 1.2 (and Go's YAML, which Atlantis reads its config with) resolves it:
    only ``true``/``false`` are booleans (not 1.1's ``yes``/``no``/``on``/``off``), integers
    are plain decimal digits (not ``1_000`` or sexagesimal ``1:30``, and ``010`` is ten, as
    in an environment variable or a flag, not 1.1's octal eight), and a key given twice is an
    error instead of the last one silently winning. Whatever cannot be built (a key that is a
    list, ``!!int 0x1f``, ``!!bool maybe``) is a ``ConstructorError`` saying where, never an
    exception of another kind."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers
                if tag not in {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                               "tag:yaml.org,2002:float"}]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key is a list or a mapping (a setting's name is text)",
                    key_node.start_mark) from None
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key} is set twice (lines {first} and "
                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            # PyYAML's constructors of explicit tags raise these on a value they cannot take
            # (`!!float abc`, `!!bool maybe`); the value itself is not repeated (it may be a
            # password).
            raise yaml.constructor.ConstructorError(
                None, None, f"a value cannot be read as {node.tag.rsplit(':', 1)[-1]}",
                node.start_mark) from None


def _decimal(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    """An integer in decimal, whatever its leading zeros (YAML 1.2's core schema)."""
    text = loader.construct_scalar(node)  # type: ignore[arg-type]
    if not isinstance(text, str) or not _INTEGER.fullmatch(text):
        raise yaml.constructor.ConstructorError(
            None, None, "an integer is written in decimal digits", node.start_mark)
    return int(text)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _decimal)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own text spans several)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(error.problem or error.context or "").split())
        return f"{problem}{where}"
    return " ".join(str(error).split())


def not_utf8(path: str | os.PathLike[str], error: UnicodeDecodeError) -> str:
    """``PATH is not UTF-8 text (byte 0xff at offset N)``: a file of a setting whose bytes were
    decoded whole (``error.start`` is then the file's offset)."""
    return (f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start})")


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:  # decoded whole: a bad byte's offset is the file's,
            text = handle.read().decode("utf-8")  # not that of the chunk a text reader read
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {not_utf8(path, error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}"
                          ) from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None
    if data is None:  # empty, or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of setting: value")
    return data


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    yaml_file: str | os.PathLike[str] | None = None,
) -> EnhancedLockingConfig:
    """Merge defaults < YAML < env < flags and validate; raise ``ConfigError`` on bad input."""
    return load_sourced(flags=flags, env=env, yaml_file=yaml_file)[0]


def load_sourced(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    yaml_file: str | os.PathLike[str] | None = None,
) -> tuple[EnhancedLockingConfig, Sources]:
    """:func:`load_config`, and where each setting's value came from."""
    env = os.environ if env is None else env
    by_key = {s.key: s for s in settings()}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if yaml_file is not None:
        for key, value in _read_yaml(yaml_file).items():
            # In any case, as Atlantis reads its config (viper's keys are case-insensitive):
            # Enhanced-Locking-Enabled was left to Atlantis, and enhanced locking stayed off.
            setting = by_key.get(str(key).lower())
            if setting is None:
                if str(key).lower().startswith(KEY_PREFIX):
                    raise ConfigError(f"unknown setting {key} in {yaml_file}")
                continue  # the rest of Atlantis's server config is not ours
            if setting.field in origin:
                raise ConfigError(f"config file {yaml_file} is not valid YAML: {setting.key} is "
                                  f"set twice ({origin[setting.field].split()[2]} and {key})")
            values[setting.field] = _convert(setting, value)
            origin[setting.field] = f"YAML key {key} in {yaml_file}"
    for setting in settings():
        raw = env.get(setting.env)
        if raw is not None and (raw != "" or setting.kind == "str"):
            values[setting.field] = _convert(setting, raw)
            origin[setting.field] = f"env {setting.env}"
    for field, value in (flags or {}).items():
        setting = next(s for s in settings() if s.field == field)
        values[field] = _convert(setting, value)
        origin[field] = f"flag {setting.flag}"
    try:
        config = EnhancedLockingConfig(**values)
    except ValidationError as error:
        raise ConfigError(_describe(error, values, origin)) from None
    _check_tls_switches(config, origin)
    return config, Sources(origin)


_TLS_SWITCHES = {
    "redis_tls": ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file",
                  "redis_tls_skip_verify"),
    "etcd_tls": ("etcd_tls_ca_file", "etcd_tls_cert_file", "etcd_tls_key_file"),
}
"""Per TLS switch, the settings that mean something only with it on."""


def _check_tls_switches(config: EnhancedLockingConfig, origin: Mapping[str, str]) -> None:
    """A TLS setting given with its TLS off is refused, as a LockPolicy refuses it
    (``redis.tls.caSecretRef needs redis.tls.enabled: true``): the connection would be plain
    TCP, the password sent in clear where a TLS one was meant. Only for what the static sources
    give: a cluster layer may turn TLS off over them."""
    for switch, names in _TLS_SWITCHES.items():
        if getattr(config, switch):
            continue
        for name in names:
            if getattr(config, name):
                raise ConfigError(
                    f"invalid configuration: {_key(name)} needs {_key(switch)} true (without "
                    "it the connection is plain TCP: no certificate, the password in clear) "
                    f"({_key(name)} from {origin.get(name, 'default')}, {_key(switch)} from "
                    f"{origin.get(switch, 'default')})")


def _describe(error: ValidationError, values: Mapping[str, Any], origin: Mapping[str, str]) -> str:
    first = error.errors()[0]
    loc = first["loc"]
    by_field = {s.field: s for s in settings()}
    if not loc or loc[0] not in by_field:
        message = str(first["msg"]).removeprefix("Value error, ")
        broken = (first.get("ctx") or {}).get("error")
        if isinstance(broken, _Together):
            sources = ", ".join(
                f"{by_field[field].key} from {origin.get(field, 'default')}"
                for field in broken.fields)
            return f"invalid configuration: {message} ({sources})"
        return f"invalid configuration: {message}"
    setting = by_field[str(loc[0])]
    source = origin.get(setting.field, "default")
    if setting.kind == "rules":
        where = ".".join(str(part) for part in loc[1:]) or setting.key
        message = str(first["msg"]).removeprefix("Value error, ")
        return (f"invalid setting {setting.key} (from {source}): {where}: {message}; "
                f"expected {setting.form}")
    value = values.get(setting.field)
    if "host:port" in setting.form and isinstance(value, str | list):  # an address or a list
        value = ([_without_credentials(v) if isinstance(v, str) else v for v in value]
                 if isinstance(value, list) else _without_credentials(value))
    shown = "(hidden)" if setting.secret else repr(value)
    # A duration of the right form refused for its value (a lease that rounds to none) says
    # why; a value of the wrong form is told the form.
    message = str(first["msg"]).removeprefix("Value error, ")
    why = ("" if setting.secret or setting.kind != "duration" or message.startswith("expected")
           else f" ({message})")
    return (
        f"invalid setting {setting.key} (from {source}): got {shown}{why}; "
        f"expected {setting.form}"
    )
