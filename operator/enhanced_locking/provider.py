"""ConfigProvider: the running configuration as versioned, immutable snapshots.

The static config (defaults < YAML < env < flags) is the bottom layer. Named layers can be put
on top at runtime, for instance ``cluster`` from a LockPolicy/LockMigration CR. Each change
produces a new :class:`Snapshot` with a higher generation and a content hash.

Applying a snapshot has three steps. *Checks* (e.g. the access control's) look at it and may
refuse it; they act on nothing. Only when every check passed do *appliers* (the factory) make
it real; an applier may still refuse, e.g. when a new Redis address does not answer. A refusal
leaves the previous snapshot running and raises :class:`ConfigRejected`. Then *listeners* are
told of the snapshot that took effect. A check never runs after an applier acted: a refusal
then would leave the service running what the snapshot in force does not say (a new store
started while the config still names the old one).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from enhanced_locking.config import ConfigError, EnhancedLockingConfig, settings
from enhanced_locking.hashing import bucket_of, is_enhanced_bucket

__all__ = ["ConfigProvider", "ConfigRejected", "MigrationConfig", "Refusal", "Snapshot"]

Applier = Callable[["Snapshot"], Awaitable[None]]
Check = Callable[["Snapshot"], Awaitable[None]]
Listener = Callable[["Snapshot"], Awaitable[None] | None]


@dataclass(frozen=True)
class MigrationConfig:
    """Where lock traffic goes: the enhanced share in percent, the mode and the fallback."""

    weight: float
    """The percent of keys that route to enhanced (0 in shadow mode, whatever is configured)."""
    mode: str
    fallback: str
    configured_weight: float
    """The configured weight (in shadow mode: the share of keys replayed on enhanced)."""


@dataclass(frozen=True)
class Snapshot:
    """One immutable configuration with its generation and a hash of its (masked) content."""

    config: EnhancedLockingConfig
    generation: int
    hash: str
    layers: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def migration(self) -> MigrationConfig:
        return MigrationConfig(
            weight=self.config.routed_weight,
            mode=self.config.migration_mode,
            fallback=self.config.fallback,
            configured_weight=self.config.effective_weight,
        )

    def should_use_enhanced(self, key: str) -> bool:
        """The sticky routing decision for one lock key under this snapshot."""
        return is_enhanced_bucket(bucket_of(key), self.config.effective_weight)


class ConfigRejected(Exception):
    """A new configuration could not be applied; the previous one keeps running.

    An applier may raise it itself to say which config fields the refusal is about
    (``settings``: their field names, empty when not known)."""

    def __init__(self, message: str, *, settings: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.settings = settings


@dataclass(frozen=True)
class Refusal:
    """A change :meth:`ConfigProvider.set_layer` refused; the snapshot in force keeps running."""

    layer: str
    """The layer whose change was refused."""
    generation: int
    """The generation in force, which keeps running."""
    message: str
    settings: tuple[str, ...] = ()
    """The config fields the refusal is about, when an applier named them."""


def content_hash(config: EnhancedLockingConfig) -> str:
    """Hash of what the config says, secrets masked (the hash must not reveal a password)."""
    text = json.dumps(config.masked(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ConfigProvider:
    """Holds the current snapshot; layers overrides; asks checks, tells appliers and listeners."""

    def __init__(self, static: EnhancedLockingConfig) -> None:
        self._static = static
        self._layers: dict[str, dict[str, Any]] = {}
        self._checks: list[Check] = []
        self._appliers: list[Applier] = []
        self._listeners: list[Listener] = []
        self._refused: list[Callable[[Refusal], None]] = []
        self._lock = asyncio.Lock()
        self.current = Snapshot(static, 1, content_hash(static), ("static",))
        """The snapshot in force; only :meth:`set_layer` replaces it. A plain attribute, not a
        property: a served lock pair reads it about 14 times (the access control, the audit
        switches, the request limit, the locker's settings, the event switch, the routing),
        and a property's call costs about 550 instructions more a read."""

    # --- the seed's questions ----------------------------------------------------------------

    def feature_flags(self) -> dict[str, bool]:
        c = self.current.config
        return {
            "enabled": c.enabled,
            "priorityQueue": c.priority_queue,
            "retries": c.retries,
            "metrics": c.metrics,
            "deadlockDetection": c.deadlock_detection,
            "events": c.events,
        }

    # --- subscriptions -----------------------------------------------------------------------
    def add_check(self, check: Check) -> None:
        """``check`` may refuse a candidate (raise) and must change nothing; every check runs
        before any applier, whenever it was added."""
        self._checks.append(check)

    def add_applier(self, applier: Applier) -> None:
        """``applier`` makes a candidate real; it runs only once every check passed."""
        self._appliers.append(applier)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def on_refused(self, listener: Callable[[Refusal], None]) -> Callable[[], None]:
        """``listener`` is told of every change :meth:`set_layer` refuses (an invalid layer,
        a check's or an applier's refusal), before the refusal is raised."""
        self._refused.append(listener)
        return lambda: self._refused.remove(listener)

    # --- changes -----------------------------------------------------------------------------
    def layer(self, name: str) -> Mapping[str, Any] | None:
        return self._layers.get(name)

    async def set_layer(self, name: str, overrides: Mapping[str, Any] | None) -> Snapshot:
        """Put (or with ``None`` remove) a named layer of field overrides; apply the result."""
        async with self._lock:
            try:
                candidate = await self._changed(name, overrides)
            except (ConfigError, ConfigRejected) as error:
                refusal = Refusal(layer=name, generation=self.current.generation,
                                  message=str(error),
                                  settings=error.settings if isinstance(error, ConfigRejected)
                                  else ())
                for refused in list(self._refused):
                    refused(refusal)
                raise
            if candidate is None:
                return self.current
        for listener in list(self._listeners):
            outcome = listener(candidate)
            if inspect.isawaitable(outcome):
                await outcome
        return candidate

    async def _changed(self, name: str,
                       overrides: Mapping[str, Any] | None) -> Snapshot | None:
        """:meth:`set_layer`'s change, under its lock: the snapshot now in force, or ``None``
        when the layers make the same config (they are kept, nothing else changes)."""
        layers = dict(self._layers)
        if overrides is None:
            layers.pop(name, None)
        else:
            layers[name] = dict(overrides)
        config = self._merge(layers)
        if config == self.current.config:
            self._layers = layers
            return None
        candidate = Snapshot(
            config,
            self.current.generation + 1,
            content_hash(config),
            ("static", *layers),
        )
        for step in (*self._checks, *self._appliers):
            try:
                await step(candidate)
            except ConfigRejected:
                raise
            except Exception as error:
                raise ConfigRejected(str(error) or type(error).__name__) from error
        self._layers = layers
        self.current = candidate
        return candidate

    def _merge(self, layers: Mapping[str, Mapping[str, Any]]) -> EnhancedLockingConfig:
        values = self._static.model_dump()
        for overrides in layers.values():
            values.update(overrides)
        try:
            return EnhancedLockingConfig(**values)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            names = {s.field: s.key for s in settings()}
            raise ConfigError(
                f"invalid setting {names.get(where, where) or 'config'}: "
                f"{str(first['msg']).removeprefix('Value error, ')}"
            ) from None
