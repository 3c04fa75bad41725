"""``enhanced-locking operator``: the lock service and kopf in one process and one event loop.

The order of things:

1. the caller has bound the HTTP address (a port in use stops the process there, before any
   CR is applied or any status claims that this process serves it) and started the lock
   service (its static config is generation 1);
2. the bound LockPolicy and LockMigration are read once and applied *before* the HTTP server
   listens, so a restarted operator serves the cluster's config from its first request; their
   status names this replica (``statusWriter``) and when it was last seen alive (``lastSeenAt``,
   renewed at each resync), so a status left by a process that is gone shows its age; when
   the policy cannot be applied then (the API server away, the policy refused), the service
   grants no lock until it is (the start's own settings are not the cluster's: a key held in
   the store the policy names would be granted on legacy), and the policy's ``Granting``
   condition says why;
3. the HTTP server listens on the bound socket, then the periodic resync and kopf run
   beside it;
4. on SIGTERM/SIGINT the HTTP server drains first, then kopf stops (its own tasks: the
   service's are left to the service, see :class:`_NotKopfs`); the status of both
   objects then says ``Ready: Unknown`` (reason ``OperatorStopped``) unless another replica
   takes the status over (``--leader-election``); then the caller closes the service.

kopf reacts to watch events only (see :mod:`.handlers`), so it writes nothing on the objects;
should a handler kind that keeps state be added, kopf keeps it in annotations under the API
group (not in ``status``, which the CRDs' schemas own). kopf posts no Events of its own: the
reconciler posts one per change.

Several replicas (each one ``enhanced-locking operator`` with its own service, sharing Redis)
all apply the CRs; with ``--leader-election`` one of them, holding a Lease, writes the status
and drives the rollout (:mod:`.leader`). Without it the process is the only writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import kopf

from enhanced_locking.factory import LockService
from enhanced_locking.kube.audit_events import AdminEvents
from enhanced_locking.kube.cluster import (
    KubernetesApi,
    NoCredentials,
    client_configuration,
    new_api_client,
)
from enhanced_locking.kube.handlers import QUIET_HANDLERS, build_registry
from enhanced_locking.kube.leader import LeaseElection, SoleWriter
from enhanced_locking.kube.models import GROUP
from enhanced_locking.kube.reconcile import Binding, Reconciler
from enhanced_locking.kube.rollout_driver import RolloutDriver, live_view
from enhanced_locking.types import AuditEntry

__all__ = ["HttpServer", "OperatorOptions", "kopf_settings", "run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorOptions:
    """What ``enhanced-locking operator`` binds to and how it runs."""

    namespace: str
    policy: str = "default"
    migration: str = "to-enhanced"
    liveness: str | None = None
    resync_interval: float = 30.0
    standalone: bool = True
    leader_election: bool = False
    lease: str | None = None
    """The Lease's name (default: ``enhanced-locking-<migration>``)."""
    lease_duration: float = 15.0
    rollout_interval: float = 0.5

    @property
    def lease_name(self) -> str:
        return self.lease or f"enhanced-locking-{self.migration}"[:253]


class HttpServer(Protocol):
    """The part of ``uvicorn.Server`` the operator drives."""

    should_exit: bool
    started: bool

    async def serve(self) -> None: ...


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False
    # Events of one object are batched for this long before the handler runs: a short window
    # keeps a `kubectl patch` close to the service applying it.
    settings.batching.batch_window = 0.005
    # One named namespace is watched, so kopf needs neither to list namespaces nor to watch
    # CRDs cluster-wide; the chart's namespaced Role grants neither (least privilege), and with
    # scanning on kopf retries both for about a minute before its watches start.
    settings.scanning.disabled = True
    return settings


class _QuietHandlers(logging.Filter):
    """kopf logs every successful handler run: the watch handlers run on every event (the
    status writer's own writes included); their successes are not news."""

    QUIET = tuple(f"{handler} succeeded." for handler in QUIET_HANDLERS)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(self.QUIET)


def _identity() -> Any:
    """kopf's name for this process: the pod's. kopf's default looks the user up in
    /etc/passwd, which fails for the image's numeric user and any uid a cluster assigns."""
    return f"enhanced-locking@{os.environ.get('POD_NAME') or os.uname().nodename}"


async def _serve(http: HttpServer) -> int:
    """Serve HTTP; uvicorn's exit on a start-up failure (a port in use) becomes a code.

    uvicorn calls ``sys.exit`` when it cannot bind; raised inside a task, that would tear the
    event loop down with a traceback instead of stopping kopf in order.
    """
    try:
        await http.serve()
    except SystemExit as stopped:  # uvicorn has logged why
        return stopped.code if isinstance(stopped.code, int) else 1
    return 0


class _NotKopfs(Collection["asyncio.Task[Any]"]):
    """The tasks a stopping kopf leaves alone: those that ran before it started, and every task
    kopf did not start (whose coroutine is not kopf's own), as the service's.

    kopf takes every task started after it as one of its own: once its root tasks end it waits
    up to 5 s for them, then cancels them. The service starts tasks of its own while kopf runs
    (a config applied by a handler or the resync starts the shadow replayer, the event bus's
    followers): each stop of the operator waited those 5 s, and the service's tasks were
    cancelled by kopf rather than closed by the service. A handler still running is kopf's
    (its task runs kopf's worker) and is waited for as before."""

    def __init__(self, before: Collection[asyncio.Task[Any]]) -> None:
        self._before = frozenset(before)

    def __contains__(self, task: object) -> bool:
        if task in self._before:
            return True
        if not isinstance(task, asyncio.Task):
            return False
        code = getattr(task.get_coro(), "cr_code", None)
        return code is None or not code.co_filename.startswith(_KOPF_SOURCES)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(self._before)

    def __len__(self) -> int:
        return len(self._before)


_KOPF_SOURCES = os.path.join(os.path.dirname(kopf.__file__), "")


async def _kopf(**options: Any) -> None:
    """``kopf.operator(**options)``, whose stop waits for and cancels kopf's own tasks only
    (:class:`_NotKopfs`); the service's are the service's to close."""
    before = asyncio.all_tasks() - {asyncio.current_task()}
    tasks = await kopf.spawn_tasks(**options)
    await kopf.run_tasks(tasks, ignored=_NotKopfs(before))


STOPPED_STATUS_TIMEOUT = 5.0
"""Seconds a stopping operator gives the API server to take its last status write."""


async def _mark_stopped(reconciler: Reconciler) -> None:
    """The last status write of a sole status writer: Ready Unknown, nobody serves now."""
    try:
        async with asyncio.timeout(STOPPED_STATUS_TIMEOUT):
            await reconciler.stopping()
    except Exception as error:  # the API server may be gone too: lastSeenAt still ages
        log.warning("could not mark the status as stopped: %s", error)


async def run(
    service: LockService, options: OperatorOptions, *, http: HttpServer,
    audit_sinks: list[Callable[[AuditEntry], None]] | None = None,
) -> int:
    """Run kopf, the resync and the HTTP server until a signal; 0 on a clean stop.

    ``audit_sinks``: the HTTP API's audit sinks; administrative actions are also posted there
    as Events on the bound LockPolicy."""
    try:
        api_client = new_api_client(client_configuration())
    except NoCredentials as error:
        log.error("%s", error)
        return 2  # a usage error, as for an invalid setting
    runtime_dir = Path(tempfile.mkdtemp(prefix="enhanced-locking-"))
    binding = Binding(options.namespace, options.policy, options.migration)
    cluster = KubernetesApi(api_client)
    if audit_sinks is not None:
        audit_sinks.append(AdminEvents(cluster, binding))
    election = LeaseElection(
        cluster, namespace=options.namespace, name=options.lease_name,
        identity=service.replica_id, duration=options.lease_duration,
        deadline=options.lease_duration * 2 / 3, retry=options.lease_duration / 7.5,
    ) if options.leader_election else None
    rollout = RolloutDriver(live_view(service), writer=election or SoleWriter())
    reconciler = Reconciler(
        service.provider, binding=binding, cluster=cluster, runtime_dir=runtime_dir,
        rollout=rollout, replica=service.replica_id, show=service.show_rollout,
        unread=lambda: service.unread_store, withhold=service.withhold,
    )
    # The policy's Granting condition follows the service's look at its store, soon.
    service.on_unread_store.append(reconciler.retry_soon)
    electing = None
    if election is not None:
        # One round before the first reconcile: a lone replica writes the status from the start.
        try:
            await election.round()
        except Exception as error:
            log.warning("leader election: %s", error)
        electing = asyncio.create_task(election.run(), name="leader election")
    quiet = _QuietHandlers()
    logging.getLogger("kopf.objects").addFilter(quiet)
    try:
        await reconciler.resync()
    except Exception as error:  # the API server may be starting too; kopf catches up later
        log.warning("could not read LockPolicy %s/%s at start-up (kopf will retry): %s",
                    options.namespace, options.policy, error)
    if reconciler.unapplied is not None:  # no lock is granted meanwhile: try again soon
        log.warning("LockPolicy %s/%s is not applied: no lock is granted until it is (%s: %s)",
                    options.namespace, options.policy, reconciler.unapplied.reason,
                    reconciler.unapplied.message)
        reconciler.retry_soon()
    log.info("binding LockPolicy %s/%s and LockMigration %s/%s",
             options.namespace, options.policy, options.namespace, options.migration)

    server = asyncio.create_task(_serve(http), name="http server")
    while not http.started and not server.done():  # noqa: ASYNC110 (a flag, no event)
        await asyncio.sleep(0.01)  # uvicorn says it listens with a flag only
    if server.done():  # it could not start (a port in use): kopf never starts either
        if election is None:
            await _mark_stopped(reconciler)
        if electing is not None:
            electing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await electing
        if election is not None:
            await election.release()
        rollout.close()
        service.on_unread_store.remove(reconciler.retry_soon)
        logging.getLogger("kopf.objects").removeFilter(quiet)
        api_client.close()  # type: ignore[no-untyped-call]
        shutil.rmtree(runtime_dir, ignore_errors=True)
        return server.result()

    stop = asyncio.Event()
    ready = asyncio.Event()
    resync = asyncio.create_task(
        reconciler.resync_forever(options.resync_interval), name="resync"
    )
    ticking = asyncio.create_task(
        reconciler.tick_forever(options.rollout_interval), name="rollout timer"
    )
    operator = asyncio.create_task(
        _kopf(
            registry=build_registry(reconciler, service.provider),
            settings=kopf_settings(),
            namespaces=[options.namespace],
            standalone=options.standalone,
            liveness_endpoint=options.liveness,
            identity=_identity(),
            stop_flag=stop,
            ready_flag=ready,
        ),
        name="kopf",
    )

    def drain() -> None:
        log.info("stopping: draining HTTP requests, then the operator")
        http.should_exit = True

    exit_code = 0
    try:
        started = asyncio.create_task(ready.wait())
        await asyncio.wait({started, operator, server}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if ready.is_set():
            # kopf installed its own signal handlers; ours replace them so the HTTP server
            # drains its requests before kopf's tasks are torn down.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, drain)
        await asyncio.wait({operator, server}, return_when=asyncio.FIRST_COMPLETED)
        if not server.done():
            drain()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            exit_code = await server
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await operator
    finally:
        for background in (resync, ticking):
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
        if election is None:  # with a Lease, the next holder writes the status (release)
            await _mark_stopped(reconciler)
        if electing is not None:
            electing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await electing
        if election is not None:
            await election.release()  # the next replica takes over at once
        rollout.close()
        service.on_unread_store.remove(reconciler.retry_soon)
        logging.getLogger("kopf.objects").removeFilter(quiet)
        for task in (server, operator):
            if not task.done():
                task.cancel()
        api_client.close()  # type: ignore[no-untyped-call]
        shutil.rmtree(runtime_dir, ignore_errors=True)
    return exit_code
