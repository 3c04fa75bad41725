"""Factory: builds the lock stack from a config snapshot, and keeps it in step with new ones.

The stack is the legacy locker, the enhanced locker (built once enhanced locking is enabled, or
at a start with it off while its store holds locks, to honour them) and the router in front of
them, sharing one event bus and one metrics registry.
:class:`LockService` is the assembled whole that the HTTP API, the CLI and the operator use.

Most settings are read live on every call and need no rebuild. A change of *where* the enhanced
locks live (backend kind, Redis connection, data dir) builds the new backend first, checks that
it answers (a refusal keeps the old config running), moves every held lock and fencing counter
across, starts the new locker on it, and only then swaps it in: a reconfiguration never drops a
held lock, and one refused at any of these steps leaves the old locker serving as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from enhanced_locking.backends import Backend, EmbeddedBackend, MemoryBackend
from enhanced_locking.backends.atlantis_redis import AtlantisRedisBackend
from enhanced_locking.backends.redis_events import RedisEventBus
from enhanced_locking.backends.redis_store import RedisBackend
from enhanced_locking.backends.shared_events import SharedEventBus
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.events import EventBus, SwitchingBus
from enhanced_locking.locking import EnhancedLocker, LegacyLocker
from enhanced_locking.metrics import Metrics
from enhanced_locking.migration import Router
from enhanced_locking.migration.controller import MigrationController, default_replica_id
from enhanced_locking.migration.handover import settle_counters
from enhanced_locking.migration.rekey import clean_stored_keys
from enhanced_locking.migration.routing_registry import RoutingRegistry
from enhanced_locking.migration.switch_gate import SwitchGate
from enhanced_locking.peers import Peers
from enhanced_locking.provider import ConfigProvider, Refusal, Snapshot
from enhanced_locking.types import (
    BackendUnavailable,
    LockingError,
    Locks,
    UnreadableLock,
    UnusableSetting,
)

__all__ = [
    "BACKEND_BUILDERS", "LockService", "backend_identity", "build_backend", "check_readable",
]

log = logging.getLogger(__name__)

BackendBuilder = Callable[[EnhancedLockingConfig, str, str | None], Backend]
"""Builds a backend from the config, its namespace and the replica id of the service (a store
that keeps per-replica records, Redis's waiter liveness, knows the replica by it)."""


def _embedded(config: EnhancedLockingConfig, namespace: str, replica_id: str | None) -> Backend:
    return EmbeddedBackend(config.data_path, namespace, initialise=config.init_store,
                           synchronous=config.store_synchronous)


def _memory(config: EnhancedLockingConfig, namespace: str, replica_id: str | None) -> Backend:
    return MemoryBackend(namespace)


def _redis(config: EnhancedLockingConfig, namespace: str, replica_id: str | None) -> Backend:
    # The legacy locker on Redis uses Atlantis's own layout, shared with Atlantis itself.
    if namespace == "legacy":
        return AtlantisRedisBackend.from_config(config, namespace)
    return RedisBackend.from_config(config, namespace, replica_id=replica_id)


def _etcd(config: EnhancedLockingConfig, namespace: str, replica_id: str | None) -> Backend:
    # etcd's modules (its client, gRPC) are loaded only by a service that uses etcd.
    from enhanced_locking.backends.etcd_store import EtcdBackend

    return EtcdBackend.from_config(config, namespace)


BACKEND_BUILDERS: dict[str, BackendBuilder] = {
    "boltdb": _embedded, "memory": _memory, "redis": _redis, "etcd": _etcd,
}
"""Backend kinds this build knows; other modules register more (e.g. ``redis``)."""

_IDENTITY_FIELDS = {
    "boltdb": ("data_dir",),
    "memory": (),
    "redis": (
        "redis_addr", "redis_password", "redis_db", "redis_username", "redis_tls",
        "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file",
        "redis_tls_skip_verify", "redis_key_prefix", "redis_pool_size",
        "redis_sentinel_addrs", "redis_sentinel_master", "redis_cluster",
    ),
    "etcd": (
        "etcd_endpoints", "etcd_username", "etcd_password", "etcd_tls", "etcd_tls_ca_file",
        "etcd_tls_cert_file", "etcd_tls_key_file", "etcd_key_prefix",
    ),
}


_TLS_FILES = {
    "redis": ("redis_tls", ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")),
    "etcd": ("etcd_tls", ("etcd_tls_ca_file", "etcd_tls_cert_file", "etcd_tls_key_file")),
}
"""Per backend kind: the setting that turns TLS on, and the files it then reads."""


def check_readable(config: EnhancedLockingConfig, fields: tuple[str, ...]) -> None:
    """Each file these settings (field names) name, where set, can be read: else
    ``UnusableSetting`` naming the setting and the path (a connection's or TLS context's own
    error would blame the address, or the other file of a pair)."""
    for name in fields:
        path = getattr(config, name)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            reason = (error.strerror or str(error)).lower()
            raise UnusableSetting(_setting(name), f"cannot read {path}: {reason}") from None


def _check_files(config: EnhancedLockingConfig, kind: str) -> None:
    """The TLS files a backend of ``kind`` will read, when its TLS is on, can be read and
    used: a CA bundle with a certificate, a certificate, and its private key. Else
    ``UnusableSetting`` naming the file's setting: the store's client would find out only when
    it connects, and its error blames the store ("did not answer")."""
    switch, names = _TLS_FILES.get(kind, ("", ()))
    if not names or not getattr(config, switch):
        return
    check_readable(config, names)
    ca, cert, key = names
    for name in (ca, cert):
        if getattr(config, name):
            _load_pem(config, name, "holds no PEM certificate",
                      lambda context, path: context.load_verify_locations(cafile=path))
    if getattr(config, cert):  # the key is set with it (the config's rule)
        cert_path = getattr(config, cert)
        _load_pem(config, key, f"holds no PEM private key, or is not the key of {cert_path} "
                  f"({_setting(cert)})",
                  lambda context, path: context.load_cert_chain(
                      cert_path, path, password=_no_password))


def _setting(field: str) -> str:
    return f"enhanced-locking-{field.replace('_', '-')}"


def _no_password() -> bytes:
    # An encrypted key: no setting gives its password, and OpenSSL would ask on the terminal.
    return b""


def _load_pem(config: EnhancedLockingConfig, field: str, problem: str,
              load: Callable[[ssl.SSLContext, str], None]) -> None:
    path = getattr(config, field)
    try:
        load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), path)
    except ssl.SSLError as error:
        # OpenSSL's reason where it gives one (KEY_VALUES_MISMATCH), not its source line.
        reason = f" ({error.reason})" if error.reason else ""
        raise UnusableSetting(_setting(field), f"{path} {problem}{reason}") from None


def backend_identity(config: EnhancedLockingConfig, kind: str) -> tuple[Any, ...]:
    """What decides which store a backend of ``kind`` talks to: a change means a new one."""
    return (kind, *(getattr(config, name) for name in _IDENTITY_FIELDS.get(kind, ())))


def build_backend(
    config: EnhancedLockingConfig, kind: str, namespace: str, *, replica_id: str | None = None
) -> Backend:
    """A backend of ``kind``; ``replica_id``: the service's (None: the backend is on its own)."""
    try:
        builder = BACKEND_BUILDERS[kind]
    except KeyError:
        raise BackendUnavailable(f"backend {kind!r} is not available in this build") from None
    _check_files(config, kind)
    return builder(config, namespace, replica_id)


_SHARED_BUSES = ("redis", "etcd")
"""Stores whose events every replica on them shares (a Redis stream, an etcd key's history)."""


_LOG_FIELDS = {
    "redis": ("redis_addr", "redis_db", "redis_sentinel_addrs", "redis_sentinel_master",
              "redis_cluster", "redis_key_prefix"),
    "etcd": ("etcd_endpoints", "etcd_key_prefix"),
}
"""Per shared bus: the settings that say where its log is (the rest, how it connects)."""


async def _state(backend: Backend) -> str:
    """``ok`` when ``backend`` answers its ping, else why it did not."""
    try:
        await backend.ping()
    except BackendUnavailable as error:
        return str(error)
    return "ok"


def _bus_log(config: EnhancedLockingConfig, kind: str | None) -> tuple[Any, ...]:
    """Where the events of a ``kind`` store are: a new bus with the same is on the same log."""
    return (kind, *(getattr(config, name) for name in _LOG_FIELDS.get(kind or "", ())))


def _bus_identity(config: EnhancedLockingConfig, kind: str | None) -> tuple[Any, ...]:
    """What decides which bus serves the events of a ``kind`` store (``None``: no enhanced
    store): the store's own for a shared one, else the process's own (every such store's)."""
    return backend_identity(config, kind) if kind in _SHARED_BUSES else ("process",)


def _event_bus(config: EnhancedLockingConfig, kind: str | None, *,
               enabled: Callable[[], bool]) -> EventBus:
    # With the enhanced locks in Redis (etcd), events go through a Redis Stream (an etcd key's
    # history) so every replica's GET /v1/events shows every replica's events; the bus follows
    # the store in force (``LockService._swap``).
    if kind == "redis":
        return RedisEventBus.from_config(config, enabled=enabled)
    if kind == "etcd":
        from enhanced_locking.backends.etcd_events import EtcdEventBus

        return EtcdEventBus.from_config(config, enabled=enabled)
    return EventBus(enabled=enabled)


async def _clean_keys(backend: Backend) -> None:
    """Locks stored before paths were cleaned move to their clean key (see ``rekey``)."""
    try:
        await clean_stored_keys(backend)
    except LockingError as error:
        # An unreadable store is reported by the calls that need it; opening goes on.
        log.warning("could not check the %s locks for uncleaned keys: %s",
                    backend.namespace, error)


LOOK_AGAIN = (0.5, 30.0)
"""Seconds before an enhanced store that could not be read at the look while off
(:meth:`LockService._look_while_off`) is looked at again: the first pause, doubled after each
look that fails, up to the second."""

UNREAD_STORE = ("enhanced locking is off and the store its locks were kept in, which may "
                "still hold some, could not be read: no lock is granted until it is read")
"""The error of an acquire refused (``unavailable``) while that store is not read."""


async def _left_while_off(config: EnhancedLockingConfig, backend: Backend,
                          legacy: Backend) -> Locks:
    """The locks ``backend``, the enhanced store of ``config``, holds at a start with enhanced
    locking off: ones taken before it was switched off (or copied there by ``migrate import``),
    which the router honours only when the enhanced locker is built (none: nothing to build).
    Both sides' counters are settled first, as a move to weight 0 settles them, so a key's
    tokens keep rising on legacy. A key held on both sides is not reported as a conflict here:
    the settings applied next may name another store, and this one's locks be copies a switch
    left behind (see :meth:`LockService._apply`). A store that cannot be read raises
    ``BackendUnavailable``: its locks may remain (see :meth:`LockService._look_while_off`)."""
    try:
        await backend.ping()
        await settle_counters(legacy=legacy, enhanced=backend, leaving=lambda bucket: True,
                              conflicts=None)
        return await backend.list()
    except BackendUnavailable:
        raise
    except LockingError as error:
        raise BackendUnavailable(str(error)) from error
    finally:
        await backend.close()


class LockService:
    """The assembled lock stack: provider, event bus, metrics, lockers and router."""

    def __init__(
        self,
        provider: ConfigProvider,
        *,
        metrics: Metrics | None = None,
        routing_registry: RoutingRegistry | None = None,
    ) -> None:
        """``routing_registry``: where replicas report their routing (default: the enhanced
        Redis when there is one, else this process alone)."""
        self.provider = provider
        self.metrics = metrics or Metrics()
        config = provider.current.config
        self.replica_id = config.replica_id or default_replica_id()
        """This replica's one identity: in the routing registry, the status it writes, the
        Lease it holds and the Redis store's waiter liveness."""
        kind = config.backend if config.enabled else None
        self._bus_identity = _bus_identity(config, kind)
        self._bus_log = _bus_log(config, kind)
        self.events = SwitchingBus(self._event_bus(config, kind))
        """The events of the enhanced store in force: its shared bus (Redis, etcd), else this
        process's own; a switch of the store moves them (:meth:`_swap`)."""
        self._serving(self.events.bus)
        self._unreadable_watch: dict[str, Callable[[], None]] = {}
        self.legacy_backend = self._build(config, config.legacy_backend, "legacy")
        self._watch_unreadable("legacy", self.legacy_backend)
        self.legacy = LegacyLocker(self.legacy_backend)
        self.enhanced: EnhancedLocker | None = None
        self.switch_gate = SwitchGate()
        """Closed by a switch of the enhanced store from its export to its swap: the router's
        writes of the enhanced side wait there (see :mod:`.migration.switch_gate`)."""
        self._enhanced_identity: tuple[Any, ...] | None = None
        self._looked_at: list[tuple[Any, ...]] = []  # compared by ==: some hold lists
        """The enhanced stores looked at for locks while enhanced locking was off."""
        self.unread_store: str | None = None
        """Why the enhanced store the settings in force name is not read yet for the locks left
        there, enhanced locking off (it did not answer at the look); ``None``: read, or none to
        read. While set, no lock is granted (``unavailable``: its locks may remain) and the
        store is looked at again, after :data:`LOOK_AGAIN`'s growing pauses."""
        self.on_unread_store: list[Callable[[], None]] = []
        """Told each time :attr:`unread_store` changes (the operator reports it in the status)."""
        self._looking: asyncio.Task[None] | None = None
        self._withheld: str | None = None  # see withhold
        self._applying = asyncio.Lock()
        """Held while settings are applied: by the provider's change, or a look made again."""
        self._last_applied: Snapshot | None = None
        """The newest settings applied (under :attr:`_applying`): the ones a look made again
        applies, never older ones it read before they came in."""
        provider.add_applier(self._apply)
        provider.subscribe(self._applied)
        provider.on_refused(self._refused)
        self.migration = MigrationController(
            provider=provider,
            legacy=lambda: self.legacy,
            enhanced=lambda: self.enhanced,
            build=self._build,
            identity=backend_identity,
            events=self.events,
            metrics=self.metrics,
            replica_id=self.replica_id,
            routing_registry=routing_registry,
        )
        self.peers = Peers(self._peer_settings)
        self.router = Router(
            legacy=self.legacy,
            enhanced=lambda: self.enhanced,
            snapshot=lambda: self.provider.current,
            events=self.events,
            metrics=self.metrics,
            migration=self.migration,
            gate=self.switch_gate,
            peer_on_enhanced=lambda: self.peers.one_reaching("enhanced"),
        )

    _honouring = False
    """Enhanced locking is off but its store held locks when it was looked at: the enhanced
    locker is built all the same, to honour them (:meth:`_look_while_off`)."""

    @staticmethod
    def _left_on_enhanced(config: EnhancedLockingConfig) -> bool:
        """Whether the enhanced store of ``config`` may hold locks from before (the memory
        store starts empty; an embedded store whose file is not there holds none, and is not
        made)."""
        if config.backend == "memory":
            return False
        return config.backend != "boltdb" or config.data_path.exists()

    def _peer_settings(self) -> tuple[list[str], str]:
        """The other replicas (``enhanced-locking-peers``) and the certificate they present
        (``tls-cert-file``, shared by the replicas; ``""``: they speak plain HTTP)."""
        config = self.provider.current.config
        return config.peers, config.tls_cert_file

    def _build(self, config: EnhancedLockingConfig, kind: str, namespace: str) -> Backend:
        return build_backend(config, kind, namespace, replica_id=self.replica_id)

    rollout: dict[str, Any] | None = None
    """The LockMigration this service follows, as the operator last saw it (name, spec,
    status), for the console; None outside the operator or before it read one."""

    def show_rollout(self, body: Mapping[str, Any] | None, *, announce: bool = True) -> None:
        """Keep the operator's latest view of the LockMigration; when its rollout moved (phase,
        step, weight, message), publish ``rollout-changed`` (``announce``: this replica writes
        the status, so each move is told once)."""
        if body is None:
            view = None
        else:
            meta = body.get("metadata") or {}
            view = {"metadata": {k: meta.get(k) for k in ("name", "namespace", "generation")},
                    "spec": dict(body.get("spec") or {}),
                    "status": dict(body.get("status") or {})}
        before, self.rollout = self.rollout, view
        if not announce or view is None:
            return
        status = view["status"]
        moved = {k: status.get(k) for k in ("phase", "step", "currentWeight", "message")}
        if before is None or moved != {k: (before.get("status") or {}).get(k) for k in moved}:
            self.events.publish("rollout-changed", name=view["metadata"]["name"], **moved)

    async def start(self) -> None:
        """Build what the initial snapshot asks for (raises if its backend does not answer)."""
        await self.legacy_backend.ping()
        await _clean_keys(self.legacy_backend)
        await self._apply(self.provider.current)
        self._applied(self.provider.current)
        await self.migration.start()

    async def close(self) -> None:
        if self._looking is not None:
            self._looking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._looking
        await self.migration.close()
        if self.enhanced is not None:
            await self.enhanced.close()
            await self.enhanced.backend.close()
        await self.legacy_backend.close()
        await self.events.close()

    async def _look_while_off(self, config: EnhancedLockingConfig,
                              identity: tuple[Any, ...]) -> None:
        """With enhanced locking off and no enhanced locker: whether the store ``config``
        names holds locks, looked at once per store it names (at the start, and whenever
        settings applied later name another, as the operator's LockPolicy does after the
        start's own settings); if so the enhanced locker is built to honour them.

        A store that does not answer may hold locks all the same: nothing is granted while it
        is not read (:attr:`unread_store`), and it is looked at again, with growing pauses,
        until it answers or the settings name another store (or turn enhanced locking on)."""
        if identity in self._looked_at or not self._left_on_enhanced(config):
            self._unread(None)
            return
        try:
            held = await _left_while_off(
                config, self._build(config, config.backend, "enhanced"), self.legacy_backend)
        except BackendUnavailable as error:
            if self.unread_store is None:
                log.warning("enhanced locking is off (enhanced-locking-enabled) and its %s "
                            "store could not be read for the locks held there, which may "
                            "remain: no lock is granted until it is read; it is looked at "
                            "again, first in %gs: %s", config.backend, LOOK_AGAIN[0], error)
            self._unread(f"enhanced locking is off and its {config.backend} store, which may "
                         f"still hold locks, could not be read: {error}")
            return
        self._looked_at.append(identity)
        if held:
            # Honoured as after enhanced locking is switched off while serving: held until
            # their release, and the keys' new grants on legacy (docs/02-migration.md).
            log.warning(
                "enhanced locking is off (enhanced-locking-enabled) but its %s store holds "
                "%d lock(s) (first: %s, pull #%d): the enhanced locker is started to honour "
                "them until they are released; new grants are on legacy", config.backend,
                len(held), held[0].key, held[0].pull.num)
            self._honouring = True
        else:
            self._unread(None)

    def _unread(self, why: str | None) -> None:
        """Say whether (and why) the store the settings name is not read yet; while it is
        not, look at it again in the background."""
        if why == self.unread_store:
            return
        before, self.unread_store = self.unread_store, why
        if why is not None and (self._looking is None or self._looking.done()):
            self._looking = asyncio.create_task(self._look_again(), name="look again")
        self._grants()
        if (before is None) != (why is None):
            for told in list(self.on_unread_store):
                told()
        if why is None and before is not None:
            log.info("the enhanced store is read: locks are granted again")

    def withhold(self, why: str | None) -> None:
        """Serve no lock call while ``why`` is set (``None``: serve again): the operator's
        start, until it has applied the LockPolicy (the start's own settings are not the
        cluster's: their stores are not the policy's, nor their access settings)."""
        self._withheld = why
        self._grants()

    @property
    def withheld(self) -> str | None:
        """Why no lock call is served now (:meth:`withhold`; ``None``: they are): no lock is
        granted, and the API answers every other call that reads or changes locks ``503``
        with these words."""
        return self._withheld

    def _grants(self) -> None:
        """Tell the router whether, and why not, locks are granted now."""
        self.router.withheld = (self._withheld if self._withheld is not None
                                else UNREAD_STORE if self.unread_store is not None else None)

    async def _look_again(self) -> None:
        """Apply the settings in force again, after a pause that doubles each time, while the
        store they name is not read (:meth:`_look_while_off`)."""
        pause = LOOK_AGAIN[0]
        while self.unread_store is not None:
            await asyncio.sleep(pause)
            pause = min(pause * 2, LOOK_AGAIN[1])
            # The settings are chosen once the lock is held: newer ones may have come in while
            # this waited for it (and made the look needless), and older ones applied after
            # them would move the locker back to a store the settings in force do not name.
            async with self._applying:
                last = self._last_applied
                if self.unread_store is None or last is None:
                    return
                try:
                    await self._apply_now(last)
                except Exception as error:  # the store went away again: look again later
                    log.warning("could not honour the locks of the enhanced store: %s", error)

    async def _apply(self, snapshot: Snapshot) -> None:
        async with self._applying:
            await self._apply_now(snapshot)
            self._last_applied = snapshot

    async def _apply_now(self, snapshot: Snapshot) -> None:
        config = snapshot.config
        identity = backend_identity(config, config.backend)
        if not config.enabled and self.enhanced is None and not self._honouring:
            await self._look_while_off(config, identity)
            if not self._honouring:
                return  # never enabled, nothing held there: nothing to build, no request to it
        if identity == self._enhanced_identity:
            self._honouring = self._honouring and not config.enabled  # on: its store in force
            self._unread(None)
            return
        backend = self._build(config, config.backend, "enhanced")
        self._watch_unreadable("enhanced", backend)
        locker: EnhancedLocker | None = None
        try:
            await backend.ping()
            await _clean_keys(backend)
            if self.enhanced is None or self._honouring:
                # A locker built at the start only to honour what its store held (enhanced
                # locking off) is not copied from: the settings in force now name another
                # store, and what the one it was built on holds may be a copy a switch away
                # from it left behind (a switch copies), released since in the store it went to.
                locker = self._locker(backend)
                await locker.start()
                previous, retired = self._swap(config, backend, locker, identity)
                self._honouring = self._honouring and not config.enabled
            else:
                # From the export to the swap the old locker must not change its store (a grant
                # made then would never reach the new one, a release would leave its copy held):
                # the router's writes wait at the gate meanwhile, then go to the locker in force.
                # So do its lease timers: a lease ending meanwhile, freed in the old store, was
                # freed again in the new one, and told expired twice. They wait until the switch
                # failed, or are dropped with the old locker.
                old = self.enhanced
                old.leases.hold()
                try:
                    async with self.switch_gate.switching():
                        locks, tokens = await old.backend.export()
                        conflicts = await backend.adopt(locks, tokens)
                        if conflicts:
                            raise BackendUnavailable(
                                f"the new backend holds {len(conflicts)} of the current locks "
                                f"for other pulls (first: {conflicts[0].key}); not switching"
                            )
                        locker = self._locker(backend)
                        await locker.start()
                        # Each adopted lease, also one that ended since the export (the new
                        # store's list, which its start arms, leaves a lapsed lock out).
                        for lock in locks:
                            locker.leases.arm(lock.key, lock.expires_at)
                        previous, retired = self._swap(config, backend, locker, identity)
                except BaseException:
                    old.leases.release()
                    raise
        except Exception:
            try:
                if locker is not None:
                    await locker.close()
            finally:  # a close that fails still restores the watch and closes the backend
                self._unreadable_watch.pop("enhanced")()
                if self.enhanced is not None:
                    self._watch_unreadable("enhanced", self.enhanced.backend)
                else:
                    self.metrics.unreadable_locks.labels("enhanced").set(0)
                    if self._honouring:  # its locks found, the locker not built: look again
                        self._honouring = False
                        with contextlib.suppress(ValueError):
                            self._looked_at.remove(identity)
                await backend.close()
            raise
        if previous is not None:
            await previous.close()
            await previous.backend.close()
        if retired is not None:
            await retired.close()
        self._unread(None)
        log.info("enhanced locker now on the %s backend", config.backend)

    def _locker(self, backend: Backend) -> EnhancedLocker:
        # Started before it serves (its lease timers and rules are its own): a start that
        # fails leaves the locker in force serving, and the same config can be tried again.
        return EnhancedLocker(
            backend,
            settings=lambda: self.provider.current.config,
            events=self.events,
            metrics=self.metrics,
        )

    def _event_bus(self, config: EnhancedLockingConfig, kind: str | None) -> EventBus:
        bus = _event_bus(config, kind, enabled=lambda: self.provider.current.config.events)
        if isinstance(bus, SharedEventBus):
            bus.count_dropped = self.metrics.events_dropped.inc
        return bus

    def _serving(self, bus: EventBus) -> None:
        """Say which bus serves the events now (``enhanced_locking_event_bus``)."""
        for name in ("process", *_SHARED_BUSES):
            self.metrics.event_bus.labels(name).set(1 if name == bus.name else 0)

    def _swap(self, config: EnhancedLockingConfig, backend: Backend, locker: EnhancedLocker,
              identity: tuple[Any, ...]) -> tuple[EnhancedLocker | None, EventBus | None]:
        """Put ``locker`` (on ``backend``) in force, and the events on its store's bus when that
        is another bus than the one serving (its readers are moved, told ``gap``); the locker
        and the bus it replaces, if any (for the caller to close)."""
        bus_identity = _bus_identity(config, config.backend)
        retired = None
        if bus_identity != self._bus_identity:
            log_now = _bus_log(config, config.backend)
            retired = self.events.switch(self._event_bus(config, config.backend),
                                         same_log=log_now == self._bus_log)
            self._bus_identity, self._bus_log = bus_identity, log_now
            self._serving(self.events.bus)
            log.info("events now on the %s bus (were on the %s bus)", self.events.bus.name,
                     retired.name)
        bus = self.events.bus
        if bus.name == "etcd":  # (an etcd bus: the etcd modules are loaded)
            from enhanced_locking.backends.etcd_events import EtcdEventBus
            from enhanced_locking.backends.etcd_store import EtcdBackend

            if (isinstance(backend, EtcdBackend) and isinstance(bus, EtcdEventBus)
                    and backend.connection.settings == bus.connection.settings):
                backend.carry(bus)  # the events ride in the lock steps' transactions
        previous, self.enhanced = self.enhanced, locker
        self._enhanced_identity = identity
        return previous, retired

    def _applied(self, snapshot: Snapshot) -> None:
        if self.enhanced is not None:
            # A rule edit reaches this replica's queues: waiters a rule held back are served.
            self.enhanced.rules.changed(snapshot.config.policies)
        self.metrics.config_generation.set(snapshot.generation)
        self.metrics.routing_weight.set(snapshot.config.routed_weight)
        self.metrics.config_changes.labels("applied").inc()
        if snapshot.generation > 1:
            self.events.publish(
                "config-applied", generation=snapshot.generation, hash=snapshot.hash,
                weight=snapshot.config.effective_weight, mode=snapshot.config.migration_mode,
            )

    def _refused(self, refusal: Refusal) -> None:
        self.metrics.config_changes.labels("rejected").inc()
        self.events.publish("config-rejected", generation=refusal.generation,
                            layer=refusal.layer, message=refusal.message,
                            settings=list(refusal.settings))

    # --- stored locks that cannot be read (see backends.unreadable) ---------------------------
    def _watch_unreadable(self, side: str, backend: Backend) -> None:
        """Report ``backend``'s unreadable locks (event, metric, log) from now on."""
        stop = self._unreadable_watch.pop(side, None)
        if stop is not None:
            stop()

        def changed(entry: UnreadableLock, found: bool) -> None:
            self.metrics.unreadable_locks.labels(side).set(len(backend.unreadable))
            details: dict[str, Any] = {"side": entry.side, "reason": entry.reason,
                                       "size": entry.size, "digest": entry.digest}
            if found:
                log.warning("the stored lock of %s (%s) cannot be read: %s (%d bytes, sha256 "
                            "%s...); it is set aside: nothing is granted on the key until a "
                            "force-unlock clears it", entry.key, entry.side, entry.reason,
                            entry.size, entry.digest)
                self.events.publish("lock-unreadable", key=entry.key, **details)
            else:
                log.info("the unreadable lock of %s (%s) is gone", entry.key, entry.side)
                self.events.publish("lock-unreadable-cleared", key=entry.key, **details)

        self._unreadable_watch[side] = backend.unreadable.listen(changed)
        self.metrics.unreadable_locks.labels(side).set(len(backend.unreadable))

    def unreadable(self) -> list[UnreadableLock]:
        """Every stored lock this replica found unreadable, legacy's first, in key order."""
        backends = [self.legacy_backend]
        if self.enhanced is not None:
            backends.append(self.enhanced.backend)
        return [entry for backend in backends for entry in backend.unreadable.entries()]

    async def refresh_gauges(self) -> None:
        """Set the gauges that are cheaper to read at scrape time than to keep up to date."""
        lockers: list[tuple[str, LegacyLocker | EnhancedLocker]] = [("legacy", self.legacy)]
        backends: dict[str, Backend] = {"legacy": self.legacy_backend}
        if self.enhanced is not None:
            lockers.append(("enhanced", self.enhanced))
            backends["enhanced"] = self.enhanced.backend
        for side, locker in lockers:
            held: int | None = None
            depth: int | None = None
            with contextlib.suppress(BackendUnavailable):  # not read: absent (store_up 0)
                held = len(await locker.list())
            if locker is self.enhanced and self.enhanced is not None:
                with contextlib.suppress(BackendUnavailable):
                    depth = await self.enhanced.queue_depth()
            self.metrics.store_read(side, held=held, depth=depth)
            # Not read: not granting either (its readiness check would wait the same limit).
            granting = held is not None and await _state(backends[side]) == "ok"
            self.metrics.store_granting.labels(side).set(1 if granting else 0)

    async def ready(self) -> dict[str, str]:
        """Each backend's state: ``ok`` or why it is not reachable. The stores are asked at
        once: one that does not answer takes its call's whole limit to say so, and two asked in
        turn (one Redis for both sides) took twice that, past the readiness probe's time out."""
        sides = {"legacy": self.legacy_backend}
        if self.enhanced is not None:
            sides["enhanced"] = self.enhanced.backend
        answers = await asyncio.gather(*(_state(backend) for backend in sides.values()))
        status = dict(zip(sides, answers, strict=True))
        if status.get("enhanced") == "ok":
            self.migration.enhanced_answered()  # reconcile fallback grants, if any
        return status
