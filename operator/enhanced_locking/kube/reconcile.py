"""The reconciler: the bound LockPolicy and LockMigration, made into the service's config.

One operator serves one lock service and binds one LockPolicy and one LockMigration of its
namespace, by name. Whatever woke it (a watch event of either object, the rollout timer, or
the periodic resync), the reconciler does the same idempotent thing: it takes the objects as
they are now and *converges*, in two steps, under one lock:

1. the policy: its spec (with the Secrets it names) plus the migration's spec (or, when that
   one is unusable, the migration last applied) becomes the provider's ``cluster`` layer; no
   policy removes the layer;
2. the migration: the policy last applied plus the migration's spec becomes the layer.

Each step is tried on its own, so a policy the service refuses (say, a Redis address that does
not answer) never blocks a migration edit such as ``abort: true``, and the refusal of one step
leaves the last good configuration running. Each object then gets its status (observed
generation, a ``Ready`` condition with a reason, the applied config's hash and generation) and
an Event for each change applied or refused.

With ``spec.steps`` the weight comes from the rollout's state, kept in the migration's status:
the :class:`~enhanced_locking.kube.rollout_driver.RolloutDriver` advances it first (on the
replica that writes the status), then the steps above apply the weight of the step in force.
The rollout timer calls :meth:`Reconciler.tick`, which does the same without re-reading Secrets.
Replicas that do not write the status apply what it says: :meth:`Reconciler.observed_status`
follows status changes.

No finalizers are used: the service's configuration lives in this same process, so there is
nothing outside to clean up when a CR is deleted while the operator is down; on restart the
configuration is rebuilt from the objects that exist. (A finalizer would instead leave CRs and
namespaces stuck deleting whenever the operator is uninstalled first.)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from enhanced_locking import policies
from enhanced_locking.config import ConfigError
from enhanced_locking.kube.cluster import ClusterApi, SecretProblem, StatusConflict
from enhanced_locking.kube.lockmigration import (
    LockMigrationSpec,
    LockMigrationStatus,
    read_status,
)
from enhanced_locking.kube.lockpolicy import ActiveFreeze, LockPolicySpec, LockPolicyStatus
from enhanced_locking.kube.models import Condition, SecretKeyRef
from enhanced_locking.kube.overrides import POLICY_SETTINGS, ResolvedSecrets, cluster_overrides
from enhanced_locking.kube.rollout import Note, RolloutState
from enhanced_locking.kube.rollout_driver import RolloutDriver
from enhanced_locking.provider import ConfigProvider, ConfigRejected, Snapshot

__all__ = ["Binding", "Reconciler", "Verdict"]

log = logging.getLogger(__name__)

POLICIES, MIGRATIONS = "lockpolicies", "lockmigrations"

TICK_BACKOFF_LIMIT = 8.0
"""The longest wait between rollout ticks while they fail (their status write, say)."""

OPERATOR_STOPPED = "OperatorStopped"
"""The ``Ready`` reason of an object whose operator stopped (its status is ``Unknown``)."""

GRANTING = "Granting"
"""The LockPolicy's condition written while the service grants no lock (``False``), and why:
its enhanced store, switched off, may still hold locks and could not be read yet (reason
:data:`STORE_UNREAD`). Absent while locks are granted."""

STORE_UNREAD = "EnhancedStoreUnread"

POLICY_NOT_APPLIED = "PolicyNotApplied"
"""The :data:`GRANTING` reason while the operator has not applied the LockPolicy since it
started: the service's own settings are not the cluster's, and a lock granted under them could
be one the policy refuses (a key held in the store it names, a freeze, a limit)."""

WITHHELD = ("the lock service has not applied its LockPolicy since it started (see the "
            "policy's status): no lock is granted, released or read until it has")
"""The error of a lock call refused (``unavailable``) in that window."""

RETRY_BACKOFF = 2.0
"""Seconds before a failed reconcile is first tried again; each further failure in a row
doubles the wait, up to the resync interval."""


@dataclass(frozen=True)
class Binding:
    """Which objects this service takes its configuration from."""

    namespace: str
    policy: str = "default"
    migration: str = "to-enhanced"


_Event = tuple[Mapping[str, Any], "_Tracked", str, str, str]
"""An Event to post: the object's body, its tracking, type, reason and message."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one step, as the ``Ready`` condition says it."""

    ready: bool
    reason: str
    message: str


@dataclass
class _Tracked:
    """One bound object: its last seen body, the spec the service runs, the last verdict."""

    kind: str
    plural: str
    name: str
    body: dict[str, Any] | None = None
    applied: Any = None
    verdict: Verdict | None = None
    seen: bool = False
    """Whether it was read (or heard of) since the start: ``body`` None then means it is gone."""
    generation: int | None = field(default=None)


def _plain(body: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if body is None else copy.deepcopy({key: body[key] for key in body})


def _older(body: Mapping[str, Any], than: Mapping[str, Any] | None) -> bool:
    """Whether ``body`` is an older spec of the same object than ``than``.

    A resync's read and a watch event can cross; acting on the older one would flap the
    configuration back for a moment.
    """
    if than is None:
        return False
    new, old = body.get("metadata", {}), than.get("metadata", {})
    return bool(new.get("uid") == old.get("uid")
                and (new.get("generation") or 0) < (old.get("generation") or 0))


def _same_intent(body: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
    """The same object with the same spec and annotations (only its status may differ)."""
    new, old = body.get("metadata") or {}, than.get("metadata") or {}
    return bool(new.get("uid") == old.get("uid")
                and new.get("generation") == old.get("generation")
                and (new.get("annotations") or {}) == (old.get("annotations") or {}))


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in ("spec", *first["loc"]))
    return f"{where}: {str(first['msg']).removeprefix('Value error, ')}"


async def _all(calls: list[Awaitable[None]]) -> None:
    """Await every call, then raise the first failure (so kopf retries the reconcile)."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    """Converges the service's ``cluster`` config layer on the bound objects."""

    def __init__(
        self,
        provider: ConfigProvider,
        *,
        binding: Binding,
        cluster: ClusterApi,
        runtime_dir: Path,
        now: Callable[[], str] = _now,
        rollout: RolloutDriver | None = None,
        replica: str | None = None,
        show: Callable[..., None] | None = None,
        unread: Callable[[], str | None] | None = None,
        withhold: Callable[[str | None], None] | None = None,
    ) -> None:
        """``unread``: why the service grants no lock now (its enhanced store, switched off,
        may hold locks and is not read yet), said in the policy's :data:`GRANTING` condition;
        ``None``: it grants. ``withhold``: told :data:`WITHHELD` at once, and ``None`` once
        the LockPolicy is applied (or found not to exist): the service grants no lock until
        then (the operator's start window)."""
        self.provider = provider
        self._unread = unread
        self._withhold = withhold
        self.unapplied: Verdict | None = None
        """While locks are withheld: why the policy is not applied yet."""
        if withhold is not None:
            self.unapplied = Verdict(False, POLICY_NOT_APPLIED, "the LockPolicy was not read yet")
            withhold(WITHHELD)
        self.rollout = rollout
        self.binding = binding
        self.cluster = cluster
        self.runtime_dir = runtime_dir
        self._now = now
        self.replica = replica
        self._show = show  # called with the migration as last seen (the console shows it)
        self._seen_at: str | None = None  # renewed by each resync (see status_of)
        self.policy = _Tracked("LockPolicy", POLICIES, binding.policy)
        self.migration = _Tracked("LockMigration", MIGRATIONS, binding.migration)
        self._secrets = ResolvedSecrets()
        self._lock = asyncio.Lock()
        self._retry = asyncio.Event()
        self._freezes: set[str] | None = None
        """The freezes in force at the last converge (their start and end are announced);
        before the first, those the policy's status showed (a restart announces only what
        changed while the operator was down)."""

    def _tracked(self, plural: str) -> _Tracked:
        return self.policy if plural == POLICIES else self.migration

    # --- what wakes it ---------------------------------------------------------------------
    async def observed(self, plural: str, body: Mapping[str, Any]) -> None:
        """An object was created, changed or found at start-up."""
        async with self._lock:
            tracked = self._tracked(plural)
            tracked.seen = True
            if not _older(body, tracked.body):
                tracked.body = _plain(body)
            await self._converge()

    async def deleted(self, plural: str, body: Mapping[str, Any]) -> None:
        """An object is gone."""
        async with self._lock:
            tracked = self._tracked(plural)
            tracked.body, tracked.seen = None, True
            await self._converge(gone=(tracked, _plain(body) or {}))

    async def event(self, plural: str, body: Mapping[str, Any]) -> None:
        """A watch event: a changed spec or annotation converges everything, a changed status
        only what follows from it (so the status writer's frequent writes cost nothing)."""
        tracked = self._tracked(plural)
        if tracked.body is not None and _same_intent(body, tracked.body):
            await self.observed_status(plural, body)
        else:
            await self.observed(plural, body)

    def retry_soon(self) -> None:
        """Resync after a short backoff instead of the full interval (a reconcile failed)."""
        self._retry.set()

    async def stopping(self) -> None:
        """The process stops and no other replica takes its place as the status writer: each
        object's ``Ready`` becomes ``Unknown`` (reason :data:`OPERATOR_STOPPED`), so the status
        never claims a service that is gone. The next operator to start sets it again."""
        async with self._lock:
            if not self._writes():
                return
            await _all([self._report(tracked, tracked.verdict, stopped=True)
                        for tracked in (self.policy, self.migration)
                        if tracked.body is not None and tracked.verdict is not None])

    async def observed_status(self, plural: str, body: Mapping[str, Any]) -> None:
        """Any watch event of a bound object: a replica that does not write the status applies
        the rollout state the writer put there (spec changes come through :meth:`observed`)."""
        async with self._lock:
            tracked = self._tracked(plural)
            if tracked.body is None or _older(body, tracked.body):
                return
            before = self._rollout_args()
            tracked.body = _plain(body)
            if self._rollout_args() != before:
                await self._converge(policy=False)
            else:
                self._shown()

    async def tick(self) -> None:
        """The rollout timer: advance the steps, apply their weight, report (no Secret reads)."""
        async with self._lock:
            await self._converge(policy=False)

    async def tick_forever(self, interval: float) -> None:
        """:meth:`tick` every ``interval`` seconds while the migration exists; an error is
        logged once and the next tick tries again, after twice as long at each failure in a
        row (up to :data:`TICK_BACKOFF_LIMIT`)."""
        failures = 0
        limit = max(interval, TICK_BACKOFF_LIMIT)
        while True:
            await asyncio.sleep(min(interval * 2.0 ** min(failures, 32), limit))
            if self.migration.body is None:
                continue
            try:
                await self.tick()
            except Exception as error:  # the API may be briefly away; never stop ticking
                if not failures:
                    log.warning("rollout tick failed, retrying with a doubling wait (up to "
                                "%gs): %s", limit, error)
                failures += 1
            else:
                failures = 0

    async def resync(self) -> None:
        """Read both objects afresh and converge (start-up, drift, Secret rotation, retries)."""
        async with self._lock:
            self._seen_at = self._now()
            ns = self.binding.namespace
            for tracked in (self.policy, self.migration):
                found = await self.cluster.get_object(tracked.plural, ns, tracked.name)
                tracked.seen = True
                if found is None or not _older(found, tracked.body):
                    tracked.body = found
            await self._converge()

    async def resync_forever(self, interval: float) -> None:
        """Resync every ``interval`` seconds, or sooner after a failure: :data:`RETRY_BACKOFF`,
        doubled by each failure in a row up to ``interval``; errors are logged and the next
        round tries again. A resync that leaves the LockPolicy not applied since the start
        (locks withheld: :attr:`unapplied`) counts as a failure."""
        failures = 0

        def backoff() -> float:
            return min(RETRY_BACKOFF * 2.0 ** min(failures, 32), max(interval, RETRY_BACKOFF))

        while True:
            # A freeze starting or ending is a change of status: look again then.
            edges = policies.freeze_edges(self.provider.current.config.policies,
                                          datetime.now(UTC))
            wait = interval
            if edges:
                wait = max(0.05, min(interval, (edges[0] - datetime.now(UTC)).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry.wait(), wait)
            if self._retry.is_set():
                self._retry.clear()
                await asyncio.sleep(backoff())
            try:
                await self.resync()
            except Exception as error:  # the API may be briefly away; never stop resyncing
                failures += 1
                times = f" {failures} times in a row" if failures > 1 else ""
                log.warning("resync failed%s, retrying in %gs: %s", times, backoff(), error)
                self._retry.set()
            else:
                if self.unapplied is None:
                    failures = 0
                else:  # no lock is granted until the policy is applied: soon, not at interval
                    failures += 1
                    self._retry.set()

    # --- converging ------------------------------------------------------------------------
    async def _converge(
        self, gone: tuple[_Tracked, dict[str, Any]] | None = None, *, policy: bool = True
    ) -> None:
        start = self.provider.current.generation
        before = (self.policy.applied, self._secrets, self.migration.applied)
        policy_verdict = await self._policy_step() if policy else None
        if policy and self.unapplied is not None:
            self._starting(policy_verdict)
        notes = self._advance()  # after the policy: a rollout only runs with its policy applied
        migration_verdict = await self._migration_step()
        moved = self.provider.current.generation > start
        # A change is announced on the object whose spec (or Secret) it came from.
        steps = (
            (self.policy, policy_verdict,
             moved and (self.policy.applied, self._secrets) != before[:2]),
            (self.migration, migration_verdict, moved and self.migration.applied != before[2]),
        )
        events: list[_Event] = []
        reports: list[Awaitable[None]] = []
        for tracked, verdict, changed in steps:
            if gone is not None and gone[0] is tracked:
                if changed:
                    events.append((gone[1], tracked, "Normal", "ConfigRemoved",
                                   f"{tracked.kind} deleted: {self._summary()}"))
                continue
            if tracked.body is None or verdict is None:
                continue
            events += self._events_for(tracked, verdict, changed)
            reports.append(self._report(tracked, verdict))
        if self.migration.body is not None:
            events += [(self.migration.body, self.migration, n.type, n.reason, n.message)
                       for n in notes]
        events += self._freeze_events()
        # Status first (what `kubectl get` shows), both objects at once; then the Events,
        # even when a status write failed: each is made once, as the change happens (an
        # abort, a step started, a configuration applied), while the status is written
        # again at the next try.
        try:
            await _all(reports)
        finally:
            await _all([self._event(*event) for event in events])
        self._shown()

    def _starting(self, verdict: Verdict | None) -> None:
        """After a policy step in the start window: locks are granted once the policy is
        applied, or read and found not to exist (the service's own settings are then the
        cluster's wish); until then the refusal is why they are not."""
        policy = self.policy
        if policy.seen and (policy.body is None or policy.applied is not None):
            self.unapplied = None
            if self._withhold is not None:
                self._withhold(None)
            log.info("the LockPolicy is applied: locks are granted")
        elif verdict is not None:
            self.unapplied = verdict

    def _shown(self) -> None:
        if self._show is not None:
            self._show(self.migration.body, announce=self._writes())

    def _writes(self) -> bool:
        """Whether this replica writes status and posts the objects' Events (see leader.py)."""
        return self.rollout is None or self.rollout.writes

    def _advance(self) -> list[Note]:
        """Advance the rollout (the status writer only); the Events to post for it and for
        what this replica's service found."""
        rollout, body = self.rollout, self.migration.body
        if rollout is None:
            return []
        notes: list[Note] = []
        spec, _ = self._migration_spec()
        if spec is not None and body is not None and self.policy.applied is not None:
            rollout.advance(spec, body)
            notes = rollout.notes()
        return notes + rollout.findings()

    def _rollout_args(self) -> dict[str, Any]:
        """The rollout state the migration's weight is taken from."""
        body = self.migration.body
        if self.rollout is not None:
            index, aborted = self.rollout.weight(body)
        else:
            state = RolloutState.from_status(read_status((body or {}).get("status"))[0])
            index, aborted = state.step_index, state.aborted
        return {"step_index": index, "aborted": aborted}

    async def _set(self, overrides: Mapping[str, Any] | None) -> Verdict | None:
        """Apply a layer; a refusal becomes a verdict and the running config stays."""
        running = self.provider.current
        try:
            await self.provider.set_layer("cluster", overrides)
        except ConfigError as error:
            return Verdict(False, "InvalidConfig", f"{error}; {self._kept(running)}")
        except ConfigRejected as error:
            fields = [path for path, setting in POLICY_SETTINGS.items()
                      if setting in error.settings]
            named = f"{', '.join(fields)}: " if fields else ""
            return Verdict(False, "ConfigRejected", f"{named}{error}; {self._kept(running)}")
        return None

    @staticmethod
    def _kept(snapshot: Snapshot) -> str:
        return f"the service keeps running configuration generation {snapshot.generation}"

    def _migration_spec(self) -> tuple[LockMigrationSpec | None, Verdict | None]:
        """The migration's spec, or why it cannot be used (refusals other than the policy's)."""
        body = self.migration.body
        if body is None:
            return None, None
        self.migration.generation = body.get("metadata", {}).get("generation")
        try:
            spec = LockMigrationSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            return None, Verdict(False, "InvalidSpec", _describe(error))
        bound = self.binding.policy
        if spec.policy_ref.name != bound:
            return None, Verdict(False, "PolicyNotBound", f"this service applies the LockPolicy "
                                 f"{bound!r}; spec.policyRef names {spec.policy_ref.name!r}")
        return spec, None

    async def _policy_step(self) -> Verdict | None:
        body = self.policy.body
        if body is None:
            refused = await self._set(None)
            if refused is None:
                self.policy.applied, self._secrets = None, ResolvedSecrets()
            else:
                log.warning("could not return to the static config: %s", refused.message)
            return None
        self.policy.generation = body.get("metadata", {}).get("generation")
        try:
            spec = LockPolicySpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            return Verdict(False, "InvalidSpec", _describe(error))
        try:
            secrets = await self._resolve(spec)
        except SecretProblem as problem:
            return Verdict(False, problem.reason, f"{problem}; {self._kept(self.provider.current)}")
        # The policy goes in together with the migration as it is now (when that one is
        # usable), so applying both at once never routes by the policy alone in between.
        migration, unusable = self._migration_spec()
        if migration is None and unusable is not None and unusable.reason == "InvalidSpec":
            migration = self.migration.applied
        refused = await self._set(
            cluster_overrides(spec, migration, secrets=secrets, **self._rollout_args())
        )
        if refused is not None:
            return refused
        self.policy.applied, self._secrets = spec, secrets
        self.migration.applied = migration
        return Verdict(True, "Applied", "")

    async def _migration_step(self) -> Verdict | None:
        policy: LockPolicySpec | None = self.policy.applied
        spec, verdict = self._migration_spec()
        if spec is None and verdict is not None and verdict.reason == "InvalidSpec":
            return verdict  # keep routing by the last good migration
        if spec is None or policy is None:
            if self.migration.applied is not None and policy is not None:
                if refused := await self._set(cluster_overrides(policy, None,
                                                                secrets=self._secrets)):
                    return refused if self.migration.body is not None else None
            self.migration.applied = None
            if self.migration.body is None:
                return None
            return verdict or self._no_policy()
        refused = await self._set(
            cluster_overrides(policy, spec, secrets=self._secrets, **self._rollout_args())
        )
        if refused is not None:
            return refused
        self.migration.applied = spec
        return Verdict(True, "Applied", "")

    def _no_policy(self) -> Verdict:
        bound = self.binding.policy
        if self.policy.body is None:
            return Verdict(False, "PolicyNotFound", f"the LockPolicy {bound!r} does not exist")
        return Verdict(False, "PolicyNotApplied", f"the LockPolicy {bound!r} is not applied "
                       "(see its status); routing waits for it")

    def _summary(self) -> str:
        snapshot = self.provider.current
        config = snapshot.config
        if not config.enabled:
            where = "enhanced locking is off: every lock key goes to the legacy locker"
        else:
            where = (f"{config.routed_weight:g}% of lock keys go to the enhanced locker "
                     f"({config.backend}), mode {config.migration_mode}, "
                     f"fallback {config.fallback}")
        return f"{where}; configuration generation {snapshot.generation}"

    async def _resolve(self, spec: LockPolicySpec) -> ResolvedSecrets:
        """Read the Secrets the policy names (the values stay SecretStr)."""
        ns = self.binding.namespace
        found: dict[str, Any] = {}
        if (redis := spec.redis) is not None:
            if (ref := redis.password_secret_ref) is not None:
                found["redis_password"] = await self.cluster.read_secret(ns, ref.name, ref.key)
            if redis.tls is not None and (ca := redis.tls.ca_secret_ref) is not None:
                found["redis_tls_ca_file"] = await self._pem_file("redis-ca", ca)
        if (etcd := spec.etcd) is not None:
            if (ref := etcd.password_secret_ref) is not None:
                found["etcd_password"] = await self.cluster.read_secret(ns, ref.name, ref.key)
            if (tls := etcd.tls) is not None:
                for setting, name, pem_ref in (
                    ("etcd_tls_ca_file", "etcd-ca", tls.ca_secret_ref),
                    ("etcd_tls_cert_file", "etcd-cert", tls.cert_secret_ref),
                    ("etcd_tls_key_file", "etcd-key", tls.key_secret_ref),
                ):
                    if pem_ref is not None:
                        found[setting] = await self._pem_file(name, pem_ref)
        return ResolvedSecrets(**found)

    async def _pem_file(self, name: str, ref: SecretKeyRef) -> str:
        # The redis and etcd clients read PEMs from files; a CA is public, a client key is not:
        # the directory is private to this process and each file is 0600.
        pem = (await self.cluster.read_secret(self.binding.namespace, ref.name, ref.key))
        text = pem.get_secret_value()
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = self.runtime_dir / f"{name}-{digest}.pem"
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if path.read_text() == text:
                return str(path)
        # Written whole under a temporary name (0600, from mkstemp), then moved in place: a
        # write that fails (the directory is small) leaves no file under the content's name
        # that a later reconcile would take as written.
        handle, temporary = tempfile.mkstemp(dir=self.runtime_dir, prefix=f".{name}-",
                                             suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(text)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return str(path)

    # --- telling users ---------------------------------------------------------------------
    def _events_for(self, tracked: _Tracked, verdict: Verdict, changed: bool) -> list[_Event]:
        """An Event for a change applied, or for a refusal not reported before."""
        previous, tracked.verdict = tracked.verdict, verdict
        body = tracked.body or {}
        if not self._writes():
            return []
        if changed and verdict.ready:
            return [(body, tracked, "Normal", "ConfigApplied", self._summary())]
        if not verdict.ready and verdict != previous and not self._condition_says(body, verdict):
            return [(body, tracked, "Warning", verdict.reason, verdict.message)]
        return []

    def _active_freezes(self) -> list[policies.Freeze]:
        rules = self.provider.current.config.policies
        now = datetime.now(UTC)
        return [freeze for freeze in rules.freezes if freeze.active(now)]

    def _freeze_events(self) -> list[_Event]:
        """FreezeStarted / FreezeEnded on the policy, once per change of the freezes in force."""
        active = {freeze.name: freeze for freeze in self._active_freezes()}
        body = self.policy.body
        if self._freezes is None:
            shown = ((body or {}).get("status") or {}).get("activeFreezes") or []
            self._freezes = {str(f.get("name")) for f in shown if isinstance(f, dict)}
        started = sorted(set(active) - self._freezes)
        ended = sorted(self._freezes - set(active))
        self._freezes = set(active)
        if body is None or not self._writes():
            return []
        return [
            *((body, self.policy, "Normal", "FreezeStarted",
               f"freeze {name} started ({active[name].action}): {active[name].message}")
              for name in started),
            *((body, self.policy, "Normal", "FreezeEnded", f"freeze {name} ended")
              for name in ended),
        ]

    @staticmethod
    def _condition_says(body: Mapping[str, Any], verdict: Verdict) -> bool:
        """Whether the object's stored Ready condition already reports this verdict."""
        for condition in (body.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "Ready":
                return bool(
                    condition.get("reason") == verdict.reason
                    and condition.get("message") == verdict.message
                )
        return False

    async def _event(
        self, body: Mapping[str, Any], tracked: _Tracked, type_: str, reason: str, message: str
    ) -> None:
        log.log(logging.INFO if type_ == "Normal" else logging.WARNING, "%s %s: %s: %s",
                tracked.kind, tracked.name, reason, message)
        await self.cluster.post_event(body, kind=tracked.kind, type=type_, reason=reason,
                                      message=message)

    def status_of(self, tracked: _Tracked, verdict: Verdict, *,
                  stopped: bool = False) -> dict[str, Any]:
        """The status the object should show now (a JSON merge patch: None deletes).

        ``stopped``: the process is stopping, and no other replica takes the status over; its
        ``Ready`` becomes ``Unknown`` (see :meth:`stopping`)."""
        previous = (tracked.body or {}).get("status") or {}
        snapshot = self.provider.current
        ready = Condition(
            type="Ready",
            status="True" if verdict.ready else "False",
            reason=verdict.reason,
            message=verdict.message or self._summary(),
            last_transition_time=self._transition_time(previous, verdict),
            observed_generation=tracked.generation,
        )
        if stopped:
            ready = ready.model_copy(update={
                "status": "Unknown",
                "reason": OPERATOR_STOPPED,
                "message": f"the operator that applied this ({self.replica or 'this process'}) "
                           "stopped, and the lock service it ran with it; it was: "
                           f"{ready.reason}: {ready.message}"[:32768],
                "last_transition_time": self._now(),
            })
        common: dict[str, Any] = {
            "observed_generation": tracked.generation,
            "conditions": [ready],
            "applied_config_hash": snapshot.hash,
            "applied_generation": snapshot.generation,
            # Which process serves this, and when it was last known alive: a status left
            # behind by a process that is gone shows its age instead of claiming "Ready".
            "status_writer": self.replica,
            "last_seen_at": self._seen_at if self.replica is not None else None,
        }
        model: BaseModel
        if tracked is self.policy:
            waiting = None
            if self.unapplied is not None:
                waiting = (POLICY_NOT_APPLIED, "no lock is granted until this policy is applied "
                           "(the service's own settings are not the cluster's): "
                           f"{self.unapplied.reason}: {self.unapplied.message}")
            elif self._unread is not None and (why := self._unread()) is not None:
                waiting = (STORE_UNREAD, why)
            if waiting is not None:
                common["conditions"] = [ready, Condition(
                    type=GRANTING, status="False", reason=waiting[0], message=waiting[1][:32768],
                    last_transition_time=self._condition_since(previous, GRANTING, "False"),
                    observed_generation=tracked.generation)]
            model = LockPolicyStatus(**common, active_freezes=[
                ActiveFreeze(name=f.name, message=f.message, action=f.action,
                             until=f.until.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                             if f.until else None)
                for f in self._active_freezes()])
        else:
            applied: LockMigrationSpec | None = self.migration.applied
            fields: dict[str, Any] = {}
            if self.rollout is not None:
                fields, conditions = self.rollout.status_fields(applied, previous,
                                                                tracked.generation)
                common["conditions"] = [ready, *conditions]
            elif applied is not None and applied.steps:
                fields["current_step_index"] = self._rollout_args()["step_index"]
            model = LockMigrationStatus(
                **{**common, **fields},
                # What the service routes to enhanced: 0 in shadow mode (legacy decides).
                current_weight=snapshot.config.routed_weight,
                mode=snapshot.config.migration_mode,
            )
        status: dict[str, Any] = model.model_dump(mode="json", by_alias=True)
        return status

    def _transition_time(self, previous: Mapping[str, Any], verdict: Verdict) -> str:
        return self._condition_since(previous, "Ready", "True" if verdict.ready else "False")

    def _condition_since(self, previous: Mapping[str, Any], type_: str, status: str) -> str:
        """When the condition ``type_`` took ``status``: as the previous status says when it
        had it already, else now."""
        for condition in previous.get("conditions") or []:
            if condition.get("type") == type_ and condition.get("status") == status:
                return str(condition.get("lastTransitionTime") or self._now())
        return self._now()

    async def _report(self, tracked: _Tracked, verdict: Verdict, *,
                      stopped: bool = False) -> None:
        body = tracked.body
        if body is None or not self._writes():
            return
        status = self.status_of(tracked, verdict, stopped=stopped)
        current = body.get("status") or {}
        if {key: current.get(key) for key in status} == status:
            return  # already says so: no write, no new resourceVersion
        meta = body.get("metadata", {})
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        try:
            # Only onto the version this status was made from: a write still under way when
            # another replica took over the status cannot land on top of that one's.
            patched = await self.cluster.patch_status(
                tracked.plural, namespace, name, status,
                resource_version=meta.get("resourceVersion"),
            )
        except StatusConflict as conflict:
            # Read again; the next resync (soon) writes from what is there now, if this
            # replica still writes the status.
            log.info("status not written, reading the object again: %s", conflict)
            found = await self.cluster.get_object(tracked.plural, namespace, name)
            if found is not None and tracked.body is body and not _older(found, body):
                tracked.body = found  # (gone: the watch's deletion says so)
            self.retry_soon()
            return
        if patched is not None:
            body["status"] = patched.get("status", status)
            version = (patched.get("metadata") or {}).get("resourceVersion")
            if version is not None:
                meta["resourceVersion"] = version

