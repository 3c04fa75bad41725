"""How a replica hears that one of its waiters was granted, wherever the release happened.

The script that hands a key over publishes ``granted:<waiter>`` (or ``timeout:``,
``cancelled:``, ``deadlock:``, ``unavailable:``) on the waiter's replica channel
``{base}notify:{replica}``. Each replica keeps one subscription to its own channel; a message
wakes exactly the waiting caller it names (no polling, no thundering herd). For a grant, the
replica first *confirms* it (the ``CONFIRM`` script ends the claim), then resolves the caller's
future with the confirmed locks.

Two things keep waiters from being lost:

* **Heartbeats.** While this replica has waiters it tells Redis every second that it is alive
  (``HEARTBEAT`` into the waiter liveness set, :data:`WAITER_HEARTBEAT_SECONDS`). A replica
  killed with ``kill -9`` stops beating; after :data:`~redis_scripts.REPLICA_MS` a hand-off
  skips (and drops) its waiters, and a grant that reached one of them just before is never
  confirmed and lapses after :data:`~redis_scripts.CLAIM_MS`.
* **Re-subscription.** A pub/sub connection that drops loses the messages sent meanwhile. After
  every reconnect the replica asks Redis where each of its waiters stands (``STATUS``) and acts
  on the answers as if the messages had arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import redis.exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub

from enhanced_locking.backends.redis_connection import DOWN, RedisConnection
from enhanced_locking.backends.waiting import LocalNotifier
from enhanced_locking.types import BackendUnavailable

__all__ = ["WAITER_HEARTBEAT_SECONDS", "Listener"]

log = logging.getLogger(__name__)

WAITER_HEARTBEAT_SECONDS = 1.0
"""How often a replica with waiters says it is alive in the store's waiter liveness set
(``{base}replicas``). Not ``replica-heartbeat``: that setting paces the routing reports of the
replica registry (:mod:`enhanced_locking.migration.routing_registry`); both use one replica
id."""
_IDLE_PING_SECONDS = 30.0
_SUBSCRIBE_WAIT = 5.0
_CLOSE_WAIT = 2.0

_AWAY: tuple[type[BaseException], ...] = (*DOWN, rexc.RedisClusterException, BackendUnavailable)
"""A subscription Redis cut off or refused (``DOWN``: an ACL without the channel too), or a
cluster that cannot name the channel's node: reconnect, with a warning."""

Handler = Callable[[str, str], Coroutine[Any, Any, None]]
"""``handler(kind, waiter_id)``: act on one notification."""


async def _confirmed(pubsub: PubSub | ClusterPubSub) -> None:
    """Wait for Redis's answer to the subscription: ``subscribe`` only sends it, and a refusal
    (an ACL without the channel: ``NOPERM``) comes as the answer, raised here. Until it has
    come, the replica is not subscribed: a waiter queued meanwhile could miss its grant."""
    async with asyncio.timeout(_SUBSCRIBE_WAIT):
        while True:
            message = await pubsub.get_message(timeout=_SUBSCRIBE_WAIT)
            if message is not None and message["type"] == "subscribe":
                return


class Listener:
    """The replica's subscription to its notify channel, plus its heartbeat."""

    def __init__(
        self,
        connection: RedisConnection,
        channel: str,
        notifier: LocalNotifier,
        *,
        handle: Handler,
        heartbeat: Callable[[], Awaitable[None]],
        recheck: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.notifier = notifier
        self._handle = handle
        self._heartbeat = heartbeat
        self._recheck = recheck
        self._subscribed = asyncio.Event()
        self._waiting = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: list[asyncio.Task[None]] = []
        self._joining = 0
        self._failed: BaseException | None = None
        """Why the latest attempt to subscribe failed (None once subscribed)."""

    @property
    def busy(self) -> bool:
        """A notification is being handled right now, or a caller waits for the subscription
        (its enqueue is on its way to Redis, only later)."""
        return bool(self._tasks) or self._joining > 0

    async def ensure(self) -> None:
        """Be subscribed (and beating) before a waiter is queued, so no grant is missed."""
        if not self._main:
            self._main = [asyncio.create_task(self._listen(), name="redis-notify"),
                          asyncio.create_task(self._beat(), name="redis-heartbeat")]
        self._waiting.set()
        if self._subscribed.is_set():
            return
        self._joining += 1
        try:
            await asyncio.wait_for(self._subscribed.wait(), _SUBSCRIBE_WAIT)
        except TimeoutError:
            failed = self._failed
            why = "" if failed is None else ": " + self.connection.scrub(
                f"{type(failed).__name__}: {failed}")
            raise BackendUnavailable(
                f"redis {self.connection.where} did not answer (subscribe to notifications)"
                f"{why}") from None
        finally:
            self._joining -= 1

    async def _listen(self) -> None:
        backoff = 0.05
        first = True
        while True:
            pubsub: PubSub | ClusterPubSub | None = None
            try:
                pubsub = await self.connection.pubsub(self.channel)
                await pubsub.subscribe(self.channel)
                await _confirmed(pubsub)
                self._failed = None
                self._subscribed.set()
                if not first:  # messages may have been lost while we were away
                    await self._recheck(self.notifier.pending())
                first, backoff = False, 0.05
                while True:
                    # None means a quiet period (not an ignored message): make sure the
                    # connection is still there rather than trusting a silent socket.
                    message = await pubsub.get_message(timeout=_IDLE_PING_SECONDS)
                    if message is None:
                        await pubsub.ping()
                    elif message["type"] == "message":
                        self._dispatch(str(message["data"]))
            except asyncio.CancelledError:
                raise
            except _AWAY as error:
                self._subscribed.clear()
                self._failed = error
                log.warning("notifications from redis %s interrupted (%s); reconnecting",
                            self.connection.where, type(error).__name__)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
            except Exception as error:  # never ends the subscription: the waiters need it
                self._subscribed.clear()
                self._failed = error
                log.exception("notifications from redis %s failed; reconnecting",
                              self.connection.where)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        # Untyped before redis 8.2, typed from it: either version passes.
                        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    def _dispatch(self, data: str) -> None:
        kind, _, waiter_id = data.partition(":")
        task: asyncio.Task[None] = asyncio.create_task(self._handle(kind, waiter_id))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("handling a redis notification failed", exc_info=task.exception())

    async def _beat(self) -> None:
        while True:
            await self._waiting.wait()
            if not self.notifier.pending():
                self._waiting.clear()
                continue
            try:
                await self._heartbeat()
            except BackendUnavailable as error:
                log.warning("heartbeat to redis failed: %s", error)
            except Exception:  # never ends the beat: without it this replica's waiters are
                log.exception("heartbeat to redis failed")  # dropped as a dead replica's
            await asyncio.sleep(WAITER_HEARTBEAT_SECONDS)

    async def close(self) -> None:
        tasks = [*self._main, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_WAIT)
        self._main = []
        self._tasks.clear()
