"""The Redis backend: one lock space, with its queues, shared by every replica of the service.

Every operation that checks and changes is one Lua script (:mod:`redis_scripts`), so replicas
never disagree: Redis runs one script at a time. Fencing tokens come from a per-key counter
that only rises; leases, ages and deadlines are decided by the server's clock. Queues live in
Redis too, so a release on one replica hands the key to a waiter on another, which hears of
it through pub/sub (:mod:`redis_notify`) within a millisecond or so.

A held lock is a hash next to Atlantis's JSON (``data``): the owner, the fencing token, the
grant time (``at``) and the lease end (``exp``) are fields of their own, because the scripts
decide on them; the JSON's ``Time``/``Enhanced`` values are the request's and are not used.
When Redis does not answer, every call raises :class:`~enhanced_locking.types.BackendUnavailable`,
which ``/readyz`` reports and the router's fallback acts on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.exceptions as rexc
from redis.commands.core import AsyncScript

from enhanced_locking import policies
from enhanced_locking.backends import codec, redis_replies, redis_scripts
from enhanced_locking.backends.base import Owner, clock_floor
from enhanced_locking.backends.redis_connection import (
    DOWN,
    RedisConnection,
    connect,
    down,
    is_retryable,
    refused_login,
    resp_body,
    unavailable,
    unusable_db,
    will_not_serve,
    within_limit,
    wrong_type,
)
from enhanced_locking.backends.redis_notify import Listener
from enhanced_locking.backends.redis_replies import GrantRow, LockRow, Served, WaiterRecord
from enhanced_locking.backends.unreadable import UnreadableLocks
from enhanced_locking.backends.waiting import (
    Cancelled,
    Expiry,
    Grant,
    GrantNotifier,
    Handoff,
    KeyWaits,
    KeyWaitsList,
    LocalNotifier,
    Notice,
    Outcome,
    PullRelease,
    QueuePolicy,
    Status,
    Wait,
    Waiter,
    Waiters,
    service_order,
)
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import (
    BackendUnavailable,
    Candidate,
    Lock,
    LockingError,
    LockNotHeld,
    LockNotOwned,
    Locks,
    LockUnreadable,
    Reason,
    StoreBusy,
    UnreadableLock,
    utcnow,
)

__all__ = ["SEQ_DIGITS", "RedisBackend", "RedisKeys"]

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_KNOWN = 4096
"""Locks kept by key so that answers about them are not decoded again (``_lock``)."""

_PACKS = 4096
"""Lean calls kept packed, oldest let go first (``RedisBackend._lean_packed``): one per lock
key and kind of call in use, about as many as the locks kept by key."""

_HINTS = 64
"""Most names remembered per lock key from scripts' asks (``RedisBackend._hinted``)."""

_HEADS = 4
"""Most of this replica's waiters on one key whose names a hand-off of it declares."""

_WALK_BOUND = 128
"""Most queue entries the deadlock check's walk (``wait_graph_from.lua``) meets before it
stops and the whole graph is read instead: a step of the walk is a call, each reading again
what the steps before read, so a walk over most of a long queue costs a few times the whole
read (measured in docs/benchmarks.md); bounded, the check costs at most the whole read and a
walk of this many."""

_CALL_ID_BYTES = 8
"""Random bytes in a call's id (written as twice as many hex digits)."""

_CALL_IDS_DRAWN = 256
"""Call ids drawn from the system's randomness at a time (:func:`_new_call_id`)."""

_drawn: list[str] = []
"""Call ids drawn and not used yet (:func:`_new_call_id`)."""


def _new_call_id() -> str:
    """A new call's id: :data:`_CALL_ID_BYTES` bytes of the system's randomness as hex, drawn
    :data:`_CALL_IDS_DRAWN` at a time (one read of the randomness, one hex: a draw of each
    call's own cost it about 3.4k instructions, a drawn one about 1k). A forked process keeps
    none of its parent's (each id is used by one process only)."""
    if not _drawn:
        text = secrets.token_hex(_CALL_ID_BYTES * _CALL_IDS_DRAWN)
        size = 2 * _CALL_ID_BYTES
        _drawn.extend(text[start:start + size] for start in range(0, len(text), size))
    return _drawn.pop()


os.register_at_fork(after_in_child=_drawn.clear)

_OWED = 4096
"""Most give-backs waiting for Redis to answer (``RedisBackend._owe``); past it the oldest is
let go (logged)."""

_GIVE_BACK_PAUSE = 1.0
"""Seconds between a give-back Redis did not answer and the next try."""


@dataclass(frozen=True, slots=True)
class _GiveBack:
    """An acquire that did not wait, answered ``unavailable`` (Redis did not answer it in time,
    or its connection broke): Redis may run it yet, and grant. Given back by its call id
    (``lua/give_back.lua``) once Redis answers."""

    call_id: str
    repo: str
    pull: int
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Heads:
    """The arguments every call sends around its call id, made for one queue policy and one
    incarnation of the store (``RedisBackend._head``)."""

    policy: QueuePolicy
    incarnation: str
    before: tuple[Any, ...]
    """``ARGV[1..7]`` of every script: base, the queue policy, replica id, incarnation."""
    after: tuple[Any, ...]
    """``ARGV[9..10]``: the restart quarantine in ms, the compiled rules."""
    lean: tuple[Any, ...]
    """The lean functions' ``ARGV[1]``: the incarnation (no call id: it ends ``KEYS[2]``; no
    quarantine: a store that lost its data is left to the full scripts)."""


@dataclass(frozen=True, slots=True)
class _Packed:
    """A lean call packed in RESP around the two values that change from call to call: its
    call id (the end of ``KEYS[2]``, ``op:<call id>``) and one argument (a lock's JSON), made
    for one set of the call's other names and arguments (``RedisBackend._lean_packed``)."""

    head: bytes
    """Up to the call id: the array header, ``FCALL``, the function, the number of keys,
    ``KEYS[1]``, and ``KEYS[2]``'s length and text before the call id."""
    middle: bytes
    """From the end of ``KEYS[2]`` to the changing argument's length."""
    tail: bytes
    """From the end of the changing argument to the end of the command."""


SEQ_DIGITS = 16
"""The digits of a waiter's enqueue number in its queue entries (:meth:`RedisKeys.queue_member`):
the counter is raised by one an enqueue, or started again above the clock in µs (16 digits)."""


class RedisKeys:
    """The key layout of one namespace, written once (``docs/03-redis.md``, "Key layout").

    Every name starts with :attr:`base`. On one Redis (or Sentinel) that is
    ``{prefix}{namespace}:`` and each lock key is a hash tag of its own (``lock:{K}``). On a
    Redis Cluster the base itself carries the hash tag, ``{prefix}{{prefix}{namespace}}:``:
    every key of the namespace then hashes to one slot, which is what lets one script grant a
    batch, serve a queue whose waiters hold other keys, count a concurrency group or release a
    pull's keys atomically (the later ``{K}`` is then not a tag: Redis hashes the first one).

    Scripts get :meth:`common` and every other key they touch in ``KEYS``: the caller
    declares what it knows (:meth:`of_key`, :meth:`of_waiter`, :meth:`pull`), and a script
    that finds it needs another (a waiter's record named in a queue, the lock of a key listed
    in an index) answers which ones before writing anything; it is called again with them
    (``RedisBackend._run``). The scripts form those names with the ``*_name`` functions of
    ``lua/lib.lua``, which mirror the methods here (a test checks they agree) and check each
    against ``KEYS``.
    """

    def __init__(self, prefix: str, namespace: str, *, cluster: bool = False) -> None:
        self.base = f"{prefix}{{{prefix}{namespace}}}:" if cluster else f"{prefix}{namespace}:"
        self.incarnation = self.base + "epoch"
        """The store's incarnation (a hash). Stored under the name ``epoch``, the name it had
        before; renaming it would orphan the incarnation of a running store."""
        self.held = self.base + "held"
        self.fenced = self.base + "fenced"
        self.queued = self.base + "queued"
        self.liveness = self.base + "replicas"
        """Until when each replica id's waiters count as alive (a sorted set; stored under its
        earlier name ``replicas``)."""
        self.seq = self.base + "seq"
        self.by_pull_mark = self.base + "bypull"
        """Whether the indexes by pull (:meth:`by_pull`) can be trusted (a hash): ``seq``, the
        enqueue counter as the last enqueue that kept its entries left it, and ``gen``, the
        generation each index is stamped with; an enqueue by a release that keeps no index
        moves it on (``lua/lib.lua``, ``pull_generation``). Declared by an acquire that waits."""

    def of_key(self, key: str) -> tuple[str, ...]:
        """Every key of lock key ``key``: its lock, shared holders, fencing counter, queues,
        and its waiters' index by pull."""
        return (self.lock(key), self.shared(key), self.fence(key),
                *(self.queue(key, level) for level in range(4)), self.by_pull(key))

    def of_waiter(self, waiter_id: str) -> tuple[str, str]:
        """A waiter's record and outcome."""
        return self.waiter(waiter_id), self.outcome(waiter_id)

    def common(self, call_id: str) -> list[str]:
        """``KEYS[1..7]`` of every script (``lua/lib.lua``)."""
        return [self.incarnation, self.op(call_id), self.held, self.fenced, self.queued,
                self.liveness, self.seq]

    def lean_common(self, call_id: str) -> list[str]:
        """``KEYS[1..5]`` of the lean functions (``begin_lean`` in ``lua/lib.lua``)."""
        return [self.incarnation, self.op(call_id), self.held, self.fenced, self.queued]

    def op(self, call_id: str) -> str:
        return f"{self.base}op:{call_id}"

    def lock(self, key: str) -> str:
        return f"{self.base}lock:{{{key}}}"

    def shared(self, key: str) -> str:
        return f"{self.base}shared:{{{key}}}"

    def fence(self, key: str) -> str:
        return f"{self.base}fence:{{{key}}}"

    def queue(self, key: str, level: int) -> str:
        """``key``'s waiters of one base priority ``level`` (a sorted set of
        :meth:`queue_member` entries, scored by the enqueue time, server ms)."""
        return f"{self.base}queue{level}:{{{key}}}"

    @staticmethod
    def queue_member(seq: int, waiter_id: str) -> str:
        """A waiter's entry in a queue (:meth:`queue`): its enqueue number (its record's
        ``seq``), zero-padded to :data:`SEQ_DIGITS` digits so that text order is number
        order, ``:``, its id. ``lua/lib.lua`` forms and reads it with ``queue_member``,
        ``member_waiter`` and ``member_seq``, which mirror this and :meth:`member_waiter`
        (a test holds them to each other)."""
        return f"{seq:0{SEQ_DIGITS}d}:{waiter_id}"

    @staticmethod
    def member_waiter(member: str) -> str:
        """The waiter id of a queue entry (:meth:`queue_member`)."""
        return member[SEQ_DIGITS + 1:]

    def by_pull(self, key: str) -> str:
        """``key``'s waiters by pull: a sorted set of one entry per entry of its queues,
        ``repo#pull\\nW`` (``\\nW`` for a waiter whose record is gone), all of score 0, so a
        pull's own waiters are one range of it (``lua/lib.lua``, ``pull_waiters``); and, first,
        its stamp, ``\\t<generation>`` (:attr:`by_pull_mark`)."""
        return f"{self.base}bypull:{{{key}}}"

    def waiter(self, waiter_id: str) -> str:
        return f"{self.base}waiter:{waiter_id}"

    def outcome(self, waiter_id: str) -> str:
        return f"{self.base}outcome:{waiter_id}"

    def pull(self, repo: str, num: int | str) -> str:
        return f"{self.base}pull:{{{repo}#{num}}}"

    def waits(self, repo: str, num: int | str) -> str:
        """The ids of a pull's waiters (a set), the deadlock check's walk from a pull to the
        keys it waits on; trusted while :attr:`by_pull_mark`'s field ``waits`` is the enqueue
        counter (``lua/lib.lua``, ``waits_trusted``)."""
        return f"{self.base}waits:{{{repo}#{num}}}"

    def notify(self, replica_id: str) -> str:
        """A pub/sub channel (not a key): ``granted:<waiter>`` etc. for one replica."""
        return f"{self.base}notify:{replica_id}"


def _function_missing(error: rexc.ResponseError) -> bool:
    """Redis does not have the function called (it lost its library, or never had it)."""
    return str(error).startswith("Function not found")


def _at(ms: Any) -> datetime:
    return _EPOCH + timedelta(milliseconds=int(ms))


def _ms(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(milliseconds=1)


def _duration_ms(value: timedelta | None) -> int:
    return max(1, value // timedelta(milliseconds=1)) if value else 0


class RedisBackend:
    """Locks and queues of one namespace in Redis; any number of replicas may share them."""

    kind = "redis"

    def __init__(
        self,
        connection: RedisConnection,
        *,
        prefix: str,
        namespace: str = "enhanced",
        quarantine: timedelta = timedelta(minutes=1),
        replica_id: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.quarantine = quarantine
        self.unreadable = UnreadableLocks(namespace)
        self.incarnation = ""
        """The store's incarnation this backend knows ('' until its first write): a Redis that
        comes back without its data starts a new one (``RedisKeys.incarnation``)."""
        self.connection = connection
        self.keys = RedisKeys(prefix, namespace, cluster=connection.cluster)
        self.replica_id = replica_id or secrets.token_hex(8)
        """Whose waiters these are: the service's replica id (one per process, the same one
        it reports routing under); a backend built on its own gets a fresh one."""
        self._notifier = LocalNotifier()
        self.grants: GrantNotifier = self._notifier
        self._enqueued: set[str] = set()
        """Waiters of this replica whose ``ACQUIRE`` answered ``queued``: only for those does
        a record missing after a reconnect mean the record was lost (``_recheck``)."""
        self._enqueues = 0
        self.in_flight = 0
        """Calls waiting for Redis right now (tests use it to know when all is quiet)."""
        self._policy = QueuePolicy()
        self._rules: tuple[policies.PolicyRules, str] = (self._policy.rules, "")
        self._heads: _Heads | None = None
        """The arguments around each call's id, made for the policy and incarnation of the
        calls before (``_head``)."""
        self._packs: dict[tuple[Any, ...], _Packed] = {}
        """The lean calls lately sent, packed but for their call id and changing argument, by
        the rest of what they send (``_lean_packed``); at most ``_PACKS``."""
        self._known: dict[str, tuple[tuple[str, str, str, str], Lock]] = {}
        """By key: the stored JSON, token, grant time and lease end of a lock last answered,
        and the lock made of them (``_lock``)."""
        self._scripts: dict[str, AsyncScript] | None = None
        """The scripts by ``EVALSHA``, only on a Redis without functions (before 7.0)."""
        self._hints: dict[str, tuple[str, ...]] = {}
        """By lock key (or script, for calls about no one key): the names scripts asked for
        last (``_run``): declared again next time, so a key's usual hand-off asks no more."""
        self._busy: dict[str, None] = {}
        """Lock keys a lean function lately could not serve (someone held, shared or waited
        for them; oldest first): their calls go to the full scripts at once (``_lean``) until
        one of those finds the key free again."""
        self._waiting_on: dict[str, dict[str, tuple[str, ...]]] = {}
        """By lock key: this replica's waiters queued on it, oldest first, with every name
        a grant to each touches (declared by a hand-off of the key)."""
        self._owed: dict[str, _GiveBack] = {}
        """By call id, oldest first: the give-backs not yet answered (``_owe``)."""
        self._giving: asyncio.Task[None] | None = None
        """The task that sends them until Redis answers, while there are any."""
        self.gave_back: Callable[[Handoff], None] = _untold
        """Told what each give-back released and handed on (``GivesBack``: set by the
        locker)."""
        self._telling: dict[str, asyncio.Task[Any]] = {}
        """By lock key: the task handling the latest message about one of this replica's
        waiters on it, while it runs (``_notified`` tells callers of one key in order)."""
        self._listener = Listener(
            connection, self.keys.notify(self.replica_id), self._notifier,
            handle=self._notified, heartbeat=self._heartbeat, recheck=self._recheck,
        )

    @classmethod
    def from_config(
        cls, config: EnhancedLockingConfig, namespace: str, *, replica_id: str | None = None
    ) -> RedisBackend:
        return cls(connect(config), prefix=config.redis_key_prefix, namespace=namespace,
                   quarantine=config.redis_restart_quarantine, replica_id=replica_id)

    def __repr__(self) -> str:
        return f"RedisBackend({self.connection.where}, namespace={self.namespace!r})"

    # --- calling scripts -----------------------------------------------------------------
    async def _run(
        self, name: str, *args: Any, keys: Sequence[str] = (), policy: QueuePolicy | None = None,
        key: str | None = None, hint: str | None = None, changing: int | None = None,
        reserved: bool = False, call_id: str | None = None,
    ) -> Any:
        if policy is not None:
            self._policy = policy
        action = name.lower().replace("_", " ")
        function = redis_scripts.FUNCTION_NAMES[name]
        execute = self.connection.call_reserved if reserved else self.connection.call
        evalsha = self._evalsha_reserved if reserved else self._evalsha
        if self._scripts is not None:  # a Redis before 7.0
            execute, function = evalsha, name
        # One id per call: a write's answer is kept under it, so the one retry below (after a
        # connection broke, when we cannot know whether the script ran) never writes twice.
        # (Given by a caller that may have to give the call back: ``_owe``.)
        call_id = call_id or _new_call_id()
        # Every key the script touches is declared (KEYS): what we know, what its last calls
        # about this key asked for, and what this one asks for (it wrote nothing then).
        hint = hint or key or name
        lean = name in redis_scripts.LEAN  # the lean functions' shorter layout
        # A lean call to one Redis is packed by ``_lean_packed`` (not on a cluster, whose
        # client finds the node from the arguments, nor by EVALSHA).
        packs = lean and changing is not None and not self.connection.cluster
        common = self.keys.lean_common(call_id) if lean else self.keys.common(call_id)
        declared = [*common, *keys, *self._hinted(hint)]
        asked: list[str] = []
        retried = loaded = rebuilt = spoiled = False
        changes = 0
        self.in_flight += 1
        try:
            while changes < 4:
                before, after = self._head(call_id, lean)
                try:
                    if packs and self._scripts is None:
                        assert changing is not None
                        call = self.connection.call_packed(self._lean_packed(
                            function, declared, before, args, changing, call_id))
                    else:
                        call = execute("FCALL", function, len(declared), *declared, *before,
                                       *after, *args)
                    answer = await within_limit(call, counted=self.connection.counted)
                except DOWN as error:
                    # (the ping of a start or a switch: a refused login is the setting's)
                    if name == "PING" and (bad_login := refused_login(self.connection,
                                                                      error)) is not None:
                        raise bad_login from None
                    # (READONLY: a connection kept from before a failover reaches the old
                    # master, now a replica; the address may lead to the new one. The call
                    # did not run: sent once more on a new connection.)
                    if retried or not (is_retryable(error)
                                       or isinstance(error, rexc.ReadOnlyError)):
                        raise down(self.connection, action, error, key=key) from None
                    retried = True
                    await self.connection.drop_idle()
                    continue
                except rexc.ResponseError as error:
                    if (unusable := unusable_db(self.connection, error, key=key)) is not None:
                        raise unusable from None
                    if will_not_serve(error):  # out of memory, busy, an ACL
                        raise down(self.connection, action, error, key=key) from None
                    if self._scripts is None and str(error).startswith("unknown command"):
                        self._scripts = {}  # no FCALL: Redis 6.2, scripts by EVALSHA
                        execute, function = evalsha, name
                        continue
                    if not spoiled and wrong_type(error):
                        # Maybe the answer kept under this call's id (the first thing a write
                        # reads): another Redis type stands there.
                        kind = await self._type(self.keys.op(call_id), action, key)
                        if kind not in ("string", "none"):
                            spoiled = True
                            await self._drop_kept_answer(call_id, f"not a string (Redis type "
                                                         f"{kind})", action=action, key=key)
                            continue
                    if loaded or not _function_missing(error):
                        raise
                    # A Redis without our library (new, or restarted without persistence):
                    # load it and call again, once.
                    loaded = True
                    await self._load_functions(action, key)
                    continue
                # A refusal, a broken index, a spoiled answer and a call for more names are
                # lists; a lean function's own answer is the JSON text it keeps (a string).
                if type(answer) is not str:
                    refused = redis_replies.refusal(answer)
                    if refused is not None:
                        changes += 1
                        self._incarnation_changed(refused, key=key)
                        continue
                    broken = redis_replies.broken_index(answer)
                    if broken is not None:  # it wrote nothing: rebuild the index, call again
                        if rebuilt:
                            raise BackendUnavailable(
                                f"redis {self.connection.where}: the index {broken[0]} is "
                                f"{broken[1]} again after it was rebuilt", key=key)
                        rebuilt = True
                        await self._rebuild_index(*broken, key=key)
                        continue
                    why = redis_replies.spoiled_answer(answer)
                    if why is not None:  # it wrote nothing: drop what stands there, call again
                        if spoiled:
                            raise BackendUnavailable(
                                f"redis {self.connection.where}: the answer kept under "
                                f"{self.keys.op(call_id)} is {why} again after it was deleted",
                                key=key)
                        spoiled = True
                        await self._drop_kept_answer(call_id, why, action=action, key=key)
                        continue
                    needed = redis_replies.need(answer)
                    if needed is not None:
                        fresh = [n for n in needed if n not in declared]
                        if not fresh:  # never: a script asks only for names it was not given
                            raise BackendUnavailable(
                                f"redis {self.connection.where}: the {action} script asked again "
                                f"for keys it was given ({', '.join(needed)})", key=key)
                        declared.extend(fresh)
                        asked.extend(fresh)
                        continue
                if asked:
                    self._hint(hint, asked)
                return answer
            raise BackendUnavailable(f"redis {self.connection.where}: the store's incarnation "
                                     "keeps changing; try again", key=key)
        finally:
            self.in_flight -= 1

    def _lean_packed(self, function: str, declared: Sequence[str], head: tuple[Any, ...],
                     args: tuple[Any, ...], changing: int, call_id: str) -> bytes:
        """The lean call ``FCALL function len(declared) *declared *head *args`` in RESP, the
        bytes ``hiredis.pack_command`` makes of it (a test holds the two to each other).

        ``declared[1]`` is ``op:<call id>``, new each call, and ``args[changing]`` the one
        argument that changes from call to call (a lock's JSON, whose time is the request's);
        everything else a replica sends for one key and owner is the same each time (the
        names, the incarnation, the lease, the project). Packed once and kept
        (:attr:`_packs`): hiredis formats each of a lean call's 16 to 20 arguments with
        ``sprintf``, about 23k instructions a call; finding the kept parts by the rest of the
        call (a tuple of its 20-odd values, hashed and compared) and packing the two changing
        values cost about 12k."""
        before, after = args[:changing], args[changing + 1:]
        found = (function, *declared[2:], None, *head, None, *before, None, *after)
        packed = self._packs.get(found)
        if packed is None:
            op = (self.keys.base + "op:").encode()
            total = 3 + len(declared) + len(head) + len(args)
            packed = _Packed(
                head=(b"*%d\r\n" % total
                      + resp_body(("FCALL", function, len(declared), declared[0]))
                      + b"$%d\r\n" % (len(op) + 2 * _CALL_ID_BYTES) + op),
                middle=b"\r\n" + resp_body((*declared[2:], *head, *before)),
                tail=b"\r\n" + resp_body(after))
            packs = self._packs
            if len(packs) >= _PACKS:
                del packs[next(iter(packs))]  # the oldest
            packs[found] = packed
        value = args[changing].encode()
        return b"".join((packed.head, call_id.encode(), packed.middle,
                         b"$%d\r\n" % len(value), value, packed.tail))

    def _script(self, name: str) -> AsyncScript:
        scripts = self._scripts
        assert scripts is not None
        script = scripts.get(name)
        if script is None:
            script = scripts[name] = self.connection.client.register_script(
                redis_scripts.script(name))
        return script

    async def _evalsha(self, command: str, name: str, count: int, *keys_and_args: Any) -> Any:
        """``execute_command("FCALL", ...)``'s stand-in on a Redis without functions."""
        return await self._script(name)(keys=keys_and_args[:count], args=keys_and_args[count:])

    async def _evalsha_reserved(self, command: str, name: str, count: int,
                                *keys_and_args: Any) -> Any:
        """:meth:`_evalsha` on the reserved connection (``call_reserved``, outside the pool):
        the heartbeat on a Redis without functions must not wait behind a flood either. A
        server that does not have the script yet (``NOSCRIPT``) is sent it first, there too."""
        script = self._script(name)
        try:
            return await self.connection.call_reserved("EVALSHA", script.sha, count,
                                                       *keys_and_args)
        except rexc.NoScriptError:
            await self.connection.call_reserved("SCRIPT", "LOAD", script.script)
            return await self.connection.call_reserved("EVALSHA", script.sha, count,
                                                       *keys_and_args)

    async def _load_functions(self, action: str, key: str | None) -> None:
        """``FUNCTION LOAD REPLACE`` of the scripts' library (on a cluster: on every master)."""
        async with unavailable(self.connection, action, key=key):
            await self.connection.client.function_load(redis_scripts.FUNCTIONS, replace=True)

    async def _type(self, name: str, action: str, key: str | None) -> str:
        """The Redis type of ``name`` (``"none"`` when there is no such key)."""
        async with unavailable(self.connection, action, key=key):
            return str(await self.connection.client.type(name))

    async def _drop_kept_answer(self, call_id: str, why: str, *, action: str,
                                key: str | None) -> None:
        """Delete what stands under ``call_id`` where a write keeps its answer, found to be
        ``why`` (something else wrote there: it is no answer of this call's). The call then
        runs as a first call. Logged; what stood there is never read."""
        name = self.keys.op(call_id)
        async with unavailable(self.connection, action, key=key):
            await self.connection.client.delete(name)
        log.warning("redis %s: the answer kept under %s was %s, not an answer (written over "
                    "by something else?); deleted, and the call (%s) runs as a first call",
                    self.connection.where, name, why, action)

    async def _rebuild_index(self, name: str, why: str, *, key: str | None = None) -> None:
        """Rebuild index set ``name``, found to be ``why`` (another Redis type: something
        else wrote there), from the keys of the namespace (``lua/reindex.lua``).

        An index lists the lock keys a reader must look at, and may list more than it needs
        (each reader checks each key), never fewer: ``held`` and a pull's index get every key
        with a lock or shared holders, ``queued`` every key with a queue, ``fenced`` every
        key with a fencing counter. While the index is of another type, the scripts leave
        their entries out of it, so it is rebuilt twice: a grant between the first scan and
        its rebuild is found by the second. Logged; what stood there is never read."""
        keys = self.keys
        if name in (keys.held, keys.queued, keys.fenced) or name.startswith(keys.base + "pull:{"):
            kinds = (("lock", "shared") if name != keys.queued and name != keys.fenced else
                     ("queue0", "queue1", "queue2", "queue3") if name == keys.queued else
                     ("fence",))
        else:
            raise BackendUnavailable(f"redis {self.connection.where}: {name} is {why}", key=key)
        found: set[str] = set()
        for _ in range(2):
            found = await self._scan(kinds)
            ordered = sorted(found)
            for start in range(0, max(1, len(ordered)), 1000):
                await self._run("REINDEX", *ordered[start:start + 1000], keys=[name],
                                hint="REINDEX")
        log.warning("redis %s: the index %s was %s (written over by something else?); rebuilt "
                    "from the %d keys found in the namespace", self.connection.where, name, why,
                    len(found))

    async def _scan(self, kinds: Sequence[str]) -> set[str]:
        """The lock keys ``K`` of every ``{base}{kind}:{K}`` in Redis, for each of ``kinds``."""
        base = self.keys.base
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in base)
        found: set[str] = set()
        async with unavailable(self.connection, "rebuild an index"):
            for kind in kinds:
                start = len(base) + len(kind) + 2
                async for name in self.connection.client.scan_iter(
                        match=f"{pattern}{kind}:{{*", count=1000):
                    text = name.decode() if isinstance(name, bytes) else str(name)
                    if text.endswith("}"):
                        found.add(text[start:-1])
        return found

    def _ahead(self, waiter: redis_replies.Ahead) -> list[str]:
        names = [*self.keys.of_waiter(waiter.id)]
        if waiter.repo:
            names += [self.keys.pull(waiter.repo, waiter.pull),
                      self.keys.waits(waiter.repo, waiter.pull)]
            names += [name for k in waiter.keys for name in self.keys.of_key(k)]
        return names

    def _hinted(self, hint: str) -> tuple[str, ...]:
        return self._hints.get(hint, ())

    def _hint(self, hint: str, asked: Sequence[str]) -> None:
        """Remember what a call about ``hint`` asked for (the newest first, a few)."""
        names = tuple(dict.fromkeys([*asked, *self._hints.get(hint, ())]))[:_HINTS]
        hints = self._hints
        if len(hints) >= _KNOWN and hint not in hints:
            del hints[next(iter(hints))]  # the oldest
        hints[hint] = names

    def _queued_names(self, key: str) -> list[str]:
        """The names a grant of ``key`` to this replica's oldest waiters on it touches (the
        first :data:`_HEADS` whose callers still wait; those met whose callers do not are
        forgotten). Only the oldest are looked at: each call of the key declares them, and
        reading every waiter of the key, each looked up in the pending list, cost a call
        O(n²) in this replica's waiters on it (6 ms of CPU an enqueue at 1,000)."""
        waiting = self._waiting_on.get(key)
        if not waiting:
            return []
        waits = self._notifier.waits
        names: list[str] = []
        gone: list[str] = []
        heads = 0
        for waiter_id, its in waiting.items():
            if not waits(waiter_id):
                gone.append(waiter_id)
                continue
            names += its
            heads += 1
            if heads == _HEADS:
                break
        for waiter_id in gone:
            del waiting[waiter_id]
        if not waiting:
            del self._waiting_on[key]
        return names

    def _forget_unheard(self) -> None:
        """Forget every waiter whose caller here no longer waits (now and then: the calls of
        a key forget only those among its oldest)."""
        self._enqueued.intersection_update(self._notifier.pending())
        waits = self._notifier.waits
        for key, waiting in list(self._waiting_on.items()):
            for waiter_id in [w for w in waiting if not waits(w)]:
                del waiting[waiter_id]
            if not waiting:
                del self._waiting_on[key]

    def _own_names(self, waiter_id: str) -> tuple[str, ...]:
        """Every name a grant to (or the drop of) one of this replica's waiters touches."""
        for waiting in self._waiting_on.values():
            names = waiting.get(waiter_id)
            if names is not None:
                return names
        return self.keys.of_waiter(waiter_id)

    def _key_names(self, key: str, owner: Owner | None = None) -> list[str]:
        """What a call about ``key`` declares: its keys, the owner's index, and the names a
        hand-off to this replica's next waiters on it touches."""
        names = [*self.keys.of_key(key), *self._queued_names(key)]
        if owner is not None:
            names.append(self.keys.pull(*owner))
        known = self._known.get(key)
        if known is not None:  # its holder's index, if a release drops it
            holder = known[1]
            index = self.keys.pull(holder.project.repo_full_name, holder.pull.num)
            if owner is None or index != names[-1]:  # (the owner's, named just above)
                names.append(index)
        return names

    def _lean(self, key: str, rules: policies.PolicyRules) -> bool:
        """Whether an acquire or release of ``key`` (one that fits a lean path otherwise) is
        sent to its lean function first: no rules, no waiter of this replica on the key, and
        the key not found busy since the full scripts last found it free (:attr:`_busy`).
        A lean function that cannot serve the call writes nothing and the call is sent in
        full: a round trip more, which this guess keeps off the keys that are contended."""
        return key not in self._busy and not self._compiled(rules) and not self._queued_names(key)

    def _busy_now(self, key: str, busy: bool) -> None:
        """What a call found of ``key``: busy (a lean function turned it away) or free (a full
        script's lean path served it)."""
        marks = self._busy
        if not busy:
            marks.pop(key, None)
        elif key not in marks:
            if len(marks) >= _KNOWN:
                del marks[next(iter(marks))]  # the oldest
            marks[key] = None

    def _head(self, call_id: str,
              lean: bool = False) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """What a call sends before its own arguments, in two parts: ``ARGV[1..7]`` of every
        script, then ``call_id`` (``ARGV[8]``) and ``ARGV[9..10]``; with ``lean`` the lean
        functions' ``ARGV[1]``, then nothing. The parts around the call id are made again
        only when the policy or the store's incarnation changes."""
        policy, incarnation = self._policy, self.incarnation
        heads = self._heads
        if heads is None or heads.policy is not policy or heads.incarnation != incarnation:
            quarantine = _duration_ms(self.quarantine)
            heads = self._heads = _Heads(
                policy=policy, incarnation=incarnation,
                before=(self.keys.base, int(policy.priority), policy.threshold_ms,
                        policy.max_boost, policy.max_size, self.replica_id, incarnation),
                after=(quarantine, self._compiled(policy.rules)),
                lean=(incarnation,))
        return (heads.lean, ()) if lean else (heads.before, (call_id, *heads.after))

    def _compiled(self, rules: policies.PolicyRules) -> str:
        """The rules as the scripts read them (compiled once per rules object)."""
        if self._rules[0] is not rules:
            text = json.dumps(policies.compile_rules(rules), separators=(",", ":")) if (
                rules.freezes or rules.concurrency) else ""
            self._rules = (rules, text)
        return self._rules[1]

    def _incarnation_changed(self, refused: redis_replies.Refusal, *, key: str | None) -> None:
        """A script refused to act: learn the store's incarnation, or report the quarantine."""
        kind, incarnation, until, now = (refused.kind, refused.incarnation, refused.until,
                                         refused.now)
        if refused.replaced:
            log.warning("redis %s: the store's incarnation record %s was %s (written over by "
                        "something else?); a new incarnation started, whose new fencing "
                        "counters continue from the clock", self.connection.where,
                        self.keys.incarnation, refused.replaced)
        lost = kind == "incarnation" and self.incarnation not in ("", incarnation) and until > now
        if lost:
            log.error("redis %s came back without its data: the locks held before are unknown; "
                      "grants resume at %s (enhanced-locking-redis-restart-quarantine)",
                      self.connection.where, _at(until).isoformat())
        self.incarnation = incarnation
        if until > now:
            raise BackendUnavailable(
                f"redis {self.connection.where} lost its data (restarted without persistence?); "
                f"grants resume in {(until - now) / 1000:.1f}s, when locks held before can no "
                "longer be in use (enhanced-locking-redis-restart-quarantine)", key=key)

    # --- decoding ------------------------------------------------------------------------
    def _lock(self, row: LockRow, candidate: Candidate | None = None) -> Lock:
        """A lock as the scripts answer it; its JSON not a lock: ``LockUnreadable`` (set
        aside). The scripts decide on the hash's own fields, so such a key stays held.

        The locks this backend made last are kept by key (:attr:`_known`): a row with the same
        stored JSON is not parsed again, and one with the same JSON, token, grant time and
        lease end is that same (frozen) lock. An acquire's answer is its ``candidate`` granted
        with Redis's stamp when Redis stored the JSON the candidate was encoded to."""
        if row.unreadable:
            # Not even the hash the scripts keep (another Redis type at the key, a shared
            # holder's record that does not decode): set aside like a JSON that is not a lock.
            found = codec.unreadable(row.key, row.data, None, side=self.namespace,
                                     reason=row.unreadable)
            self.unreadable.found(found)
            raise LockUnreadable(found)
        return self._made(row.key, row.data, row.token, row.at, row.exp, candidate)

    def _made(self, key: str, data: str, token: str, at: str, exp: str,
              candidate: Candidate | None = None) -> Lock:
        """The lock of ``key`` stored as ``data`` with what Redis stamped on it (``_lock``;
        the lean paths' answers carry only these).

        A grant's lock is made by its candidate (``Candidate.granted``, as the lock whose
        JSON was sent), not copied from that lock by pydantic's ``model_copy`` (a copy of
        its dicts and sets, then the update, in Python): 3 µs less a grant by ``timeit``."""
        stamp = (data, token, at, exp)
        known = self._known.get(key)
        if known is not None and known[0] == stamp:
            self.unreadable.readable(key)
            return known[1]
        if candidate is not None:
            lock = candidate.granted(acquired_at=_at(at),
                                     expires_at=_at(exp) if int(exp) else None,
                                     fencing_token=int(token))
        else:
            if known is not None and known[0][0] == data:
                base = known[1]
                self.unreadable.readable(key)
            else:
                try:
                    base = codec.read(data, key=key, side=self.namespace)
                except LockUnreadable as error:
                    self.unreadable.found(error.found)
                    raise
                self.unreadable.readable(key)
            lock = base.model_copy(update={
                "fencing_token": int(token),
                "acquired_at": _at(at),
                "expires_at": _at(exp) if int(exp) else None,
            })
        known_locks = self._known
        if len(known_locks) >= _KNOWN and key not in known_locks:
            del known_locks[next(iter(known_locks))]  # the oldest
        known_locks[key] = (stamp, lock)
        return lock

    def _maybe_lock(self, row: LockRow | None) -> Lock | None:
        return self._lock(row) if row is not None else None

    def _readable(self, rows: Sequence[LockRow], *, every: bool = False,
                  deleted: bool = False) -> Locks:
        """The locks of a many-key answer in key order, skipping the unreadable ones (set
        aside; with ``deleted``, the call deleted them, so their entries go). ``every``: a scan
        of every key, so keys set aside before and not found again are gone."""
        locks: Locks = []
        bad: list[UnreadableLock] = []
        for row in rows:
            try:
                locks.append(self._lock(row))
            except LockUnreadable as error:
                bad.append(error.found)
        if deleted:
            for entry in bad:
                self.unreadable.cleared(entry.key)
        elif every:
            self.unreadable.scanned(bad)
        return sorted(locks, key=lambda lock: lock.key)

    @staticmethod
    def _waiter(rec: WaiterRecord) -> Waiter:
        keys = json.loads(rec["keys"]) or []
        ttl = int(rec["ttl"])
        return Waiter(
            id=rec["id"],
            candidates=tuple(Candidate.of_lock(codec.decode(rec["d:" + k], key=k)) for k in keys),
            ttl=timedelta(milliseconds=ttl) if ttl else None,
            enqueued_at=_at(rec["enq"]),
            deadline=_at(rec["deadline"]),
            seq=int(rec["seq"]),
            request_id=rec.get("rid") or None,
            caller=rec.get("caller", ""),
        )

    def _grants(self, rows: Sequence[GrantRow]) -> tuple[Grant, ...]:
        """The waiters a script served (``fx.granted`` in ``lib.lua``), each with its locks;
        ``kept`` not said: nothing gives back from a hand-off (:class:`GrantRow`)."""
        return tuple(Grant(waiter=self._waiter(g.waiter),
                           locks=tuple(self._lock(row) for row in g.locks), fresh=g.fresh,
                           kept=None)
                     for g in rows)

    def _handoff(self, served: Served, *, released: Lock | None = None,
                 upgrades_kept: tuple[Lock, ...] = ()) -> Handoff:
        return Handoff(
            released=released if released is not None else self._maybe_lock(served.released),
            granted=self._grants(served.granted),
            timed_out=tuple(self._waiter(rec) for rec in served.dropped),
            also_released=tuple(self._readable(served.others, deleted=True)),
            upgrades_kept=upgrades_kept)

    def _waiter_names(self, candidates: Sequence[Candidate],
                      waiter_id: str) -> tuple[str, ...]:
        """Every key a grant to (or the drop of) a waiter for ``candidates`` touches."""
        first = candidates[0]
        return (*self.keys.of_waiter(waiter_id),
                self.keys.pull(first.project.repo_full_name, first.pull.num),
                self.keys.waits(first.project.repo_full_name, first.pull.num),
                *(name for c in candidates for name in self.keys.of_key(c.key)))

    def _acquire_names(self, candidates: Sequence[Candidate], wait: Wait | None) -> list[str]:
        """What an acquire declares: each key's keys, the requester's index and waiter, and
        the names a hand-off to this replica's next waiters on its keys touches."""
        first = candidates[0]
        names = [*self.keys.of_key(first.key), *self._queued_names(first.key)] if (
            len(candidates) == 1) else [*(n for c in candidates for n in self.keys.of_key(c.key)),
                                        *(n for c in candidates for n in self._queued_names(c.key))]
        names.append(self.keys.pull(first.project.repo_full_name, first.pull.num))
        if wait is not None:
            names.extend(self.keys.of_waiter(wait.id))
            names += [self.keys.by_pull_mark,
                      self.keys.waits(first.project.repo_full_name, first.pull.num)]
        return names

    # --- the Backend protocol --------------------------------------------------------------
    async def now(self) -> datetime:
        async with unavailable(self.connection, "time"):
            seconds, micros = await self.connection.client.time()
        return _EPOCH + timedelta(seconds=int(seconds), microseconds=int(micros))

    async def acquire(self, lock: Lock) -> tuple[bool, Lock]:
        ttl = lock.expires_at - lock.acquired_at if lock.expires_at else None
        outcome = await self.acquire_or_enqueue(Candidate.of_lock(lock), ttl=ttl, wait=None,
                                                policy=self._policy)
        if outcome.status is Status.GRANTED:
            return True, outcome.locks[0]
        assert outcome.holder is not None
        return False, outcome.holder

    async def release(
        self, key: str, *, owner: Owner | None = None, policy: QueuePolicy | None = None
    ) -> Lock | None:
        return (await self.release_and_handoff(key, owner=owner, policy=policy)).released

    async def get(self, key: str) -> Lock | None:
        answer = await self._run("GET", key, keys=self.keys.of_key(key)[:2], key=key)
        return self._maybe_lock(redis_replies.maybe_lock(answer))

    async def holders(self, key: str) -> Locks:
        answer = await self._run("HOLDERS", key, keys=self.keys.of_key(key)[:2], key=key)
        return [self._lock(row) for row in redis_replies.locks(answer)]

    async def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        by_pull = repo is not None and pull is not None
        answer = await self._run(
            "LIST", repo if by_pull else "", pull if by_pull else "",
            repo or "", "" if pull is None else pull,
            keys=[self.keys.pull(repo, pull)] if repo is not None and pull is not None else (),
            hint=f"LIST {repo}#{pull}" if by_pull else None,
        )
        return self._readable(redis_replies.locks(answer), every=repo is None and pull is None)

    async def release_by_pull(
        self, repo: str, pull: int, *, policy: QueuePolicy | None = None
    ) -> Locks:
        return list((await self.release_pull(repo, pull, policy=policy)).released)

    async def release_pull(
        self, repo: str, pull: int, *, policy: QueuePolicy | None = None
    ) -> PullRelease:
        answer = redis_replies.release_by_pull(
            await self._run("RELEASE_BY_PULL", repo, pull, keys=[self.keys.pull(repo, pull)],
                            policy=policy, hint=f"RELEASE_BY_PULL {repo}#{pull}"))
        # The hash keeps its owner beside the JSON: the pull's unreadable locks went too.
        return PullRelease(released=tuple(self._readable(answer.released, deleted=True)),
                           expired=tuple(self._readable(answer.expired, deleted=True)),
                           granted=self._handoff(answer.served).granted,
                           holders=None if answer.holders is None
                           else tuple(self._readable(answer.holders)))

    async def refresh(self, key: str, owner: Owner, ttl: timedelta) -> Lock:
        answer = redis_replies.refresh(await self._run(
            "REFRESH", key, *owner, _duration_ms(ttl), keys=self.keys.of_key(key), key=key))
        if answer.lock is None:
            raise LockNotHeld(key)
        lock = self._lock(answer.lock)
        if answer.status == "not_owned":
            raise LockNotOwned(key, lock)
        return lock

    async def export(self) -> tuple[Locks, dict[str, int]]:
        locks = await self.list()
        client = self.connection.client
        async with unavailable(self.connection, "export"):
            found = await client.type(self.keys.fenced)
        kind = found.decode() if isinstance(found, bytes) else str(found)
        if kind not in ("set", "none"):
            await self._rebuild_index(self.keys.fenced, f"not a set (Redis type {kind})")
        async with unavailable(self.connection, "export"):
            keys = sorted(str(k) for k in await client.smembers(self.keys.fenced))
            values = await client.mget([self.keys.fence(k) for k in keys]) if keys else []
            tokens = {k: int(v) for k, v in zip(keys, values, strict=True)
                      if v is not None and str(v).isascii() and str(v).isdigit()}
            damaged = [k for k in keys if k not in tokens
                       and await client.exists(self.keys.fence(k))]
        if damaged:
            # Counters that are not numbers (written over): unknown, so the clock's floor, as
            # a force-unlock restarts them, above any token they handed out.
            floor = clock_floor(await self.now())
            log.warning("redis %s: the fencing counters of %s are not numbers; exported as %d",
                        self.connection.where, ", ".join(damaged), floor)
            tokens.update(dict.fromkeys(damaged, floor))
        return locks, tokens

    async def adopt(self, locks: Locks, tokens: dict[str, int]) -> Locks:
        conflicts: Locks = []
        for key, token in tokens.items():
            await self._run("RAISE_TOKEN", key, token, keys=self.keys.of_key(key), key=key)
        for lock in locks:
            if await self._run_given("ADOPT", lock) == 0:
                conflicts.append(lock)
        return conflicts

    async def replace(self, lock: Lock) -> bool:
        """Put ``lock`` in place of what is stored under its key, in one script (REPLACE)."""
        return bool(await self._run_given("REPLACE", lock) == 1)

    async def _run_given(self, name: str, lock: Lock) -> Any:
        """Run ``name`` (ADOPT or REPLACE) on ``lock`` as given: its token, times and mode."""
        return await self._run(
            name, lock.key, lock.project.repo_full_name, lock.pull.num,
            codec.encode(lock), lock.fencing_token, _ms(lock.acquired_at),
            _ms(lock.expires_at) if lock.expires_at else 0, lock.mode, lock.project.path,
            lock.workspace, keys=self._key_names(
                lock.key, (lock.project.repo_full_name, lock.pull.num)), key=lock.key,
        )

    async def ping(self) -> None:
        """Redis answers, and still has what this replica knew (else: the quarantine)."""
        await self._run("PING")
        self.connection.answered = True
        await self.connection.open_subscription()

    async def close(self) -> None:
        """Withdraw this replica's waiters (they are told ``unavailable``), send the owed
        give-backs once more, and disconnect."""
        if self._giving is not None:
            self._giving.cancel()
            await asyncio.gather(self._giving, return_exceptions=True)
        for entry in list(self._owed.values()):
            try:
                self.gave_back(await self._give_back(entry))
            except LockingError:
                break
            del self._owed[entry.call_id]
        for entry in self._owed.values():
            log.warning("redis %s: closed before Redis answered the give-back of the acquire "
                        "of %s by %s#%d whose caller was not told its answer: what it may "
                        "have granted stays held", self.connection.where, ", ".join(entry.keys),
                        entry.repo, entry.pull)
        pending = self._notifier.pending()
        for waiter_id in pending:
            try:
                await self._run("CANCEL", waiter_id, Reason.UNAVAILABLE.value,
                                keys=self._own_names(waiter_id))
            except LockingError:
                break  # Redis is gone: their deadlines and our missing heartbeat drop them
        for waiter_id in pending:
            self.grants.deliver(waiter_id, Notice(reason=Reason.UNAVAILABLE))
        await self._listener.close()
        await self.connection.close()

    # --- the QueueBackend protocol ---------------------------------------------------------
    def acquire_or_enqueue(
        self, candidate: Candidate, *, ttl: timedelta | None, wait: Wait | None,
        policy: QueuePolicy,
    ) -> Coroutine[Any, Any, Outcome]:
        # acquire_batch's coroutine itself, not one that awaits it: one frame less an acquire.
        return self.acquire_batch((candidate,), ttl=ttl, wait=wait, policy=policy)

    async def acquire_batch(
        self,
        candidates: Sequence[Candidate],
        *,
        ttl: timedelta | None,
        wait: Wait | None,
        policy: QueuePolicy,
    ) -> Outcome:
        # (One candidate, nearly every call, is told apart first: each comprehension below is
        # a frame of its own in Python 3.11.)
        one = len(candidates) == 1
        if not one and (not candidates or len({c.key for c in candidates}) != len(candidates)):
            raise ValueError("a batch needs at least one key and no key twice")
        if wait is not None:
            await self._listener.ensure()
        first = candidates[0]
        # The lock each candidate is stored as: the scripts keep its JSON and stamp the grant
        # (token, times) beside it, so its own stamps are placeholders.
        placed = utcnow()
        if one:
            sent = {first.key: codec.encode(first.granted(acquired_at=placed, expires_at=None,
                                                          fencing_token=0))}
        else:
            sent = {c.key: codec.encode(c.granted(acquired_at=placed, expires_at=None,
                                                  fencing_token=0)) for c in candidates}
        if (wait is None and one and first.mode == "exclusive"
                and self._lean(first.key, policy.rules)):
            keys, repo, pull = self.keys, first.project.repo_full_name, first.pull.num
            lean_id = _new_call_id()
            try:
                lean = await self._run(
                    "LEAN_ACQUIRE", _duration_ms(ttl), first.key, sent[first.key], repo, pull,
                    first.project.path, first.workspace,
                    keys=(keys.lock(first.key), keys.shared(first.key), keys.fence(first.key),
                          keys.pull(repo, pull)),
                    policy=policy, key=first.key, hint="LEAN_ACQUIRE", changing=2,
                    call_id=lean_id)
            except BackendUnavailable as error:
                self._owe(lean_id, candidates, error)
                raise
            except asyncio.CancelledError:  # its caller went: Redis may run it all the same
                self._owe(lean_id, candidates, None)
                raise
            if not redis_replies.full(lean):
                took = redis_replies.acquire(lean)
                assert isinstance(took, redis_replies.Took)
                return Outcome(status=Status.GRANTED, fresh=True, locks=(self._made(
                    first.key, sent[first.key], took.token, took.at, took.exp, first),),
                    kept=frozenset())
            self._busy_now(first.key, True)
        quads = [item for c in candidates
                 for item in (c.key, sent[c.key], c.project.path, c.workspace)]
        # (A call is given back if its caller is told Redis did not answer, or goes away as it
        # is on its way: ``_owe``. One that may wait too: granted at once, it queued no waiter
        # for the caller's withdrawal to find.)
        owed = _new_call_id()
        try:
            answer = redis_replies.acquire(await self._run(
                "ACQUIRE", _duration_ms(ttl), wait.id if wait else "",
                _duration_ms(wait.timeout) if wait else 0,
                (wait.request_id or "") if wait else "", first.project.repo_full_name,
                first.pull.num, first.priority.level, first.mode, first.pull.head_commit,
                wait.caller if wait else "", *quads,
                keys=self._acquire_names(candidates, wait), policy=policy, key=first.key,
                call_id=owed,
            ))
        except BackendUnavailable as error:
            self._owe(owed, candidates, error)
            raise
        except asyncio.CancelledError:
            self._owe(owed, candidates, None)
            raise
        if isinstance(answer, redis_replies.Took):  # the lean path: as sent, plus the stamp
            self._busy_now(first.key, False)
            return Outcome(status=Status.GRANTED, fresh=True, locks=(self._made(
                first.key, sent[first.key], answer.token, answer.at, answer.exp, first),),
                kept=frozenset())
        if isinstance(answer, redis_replies.Acquired):
            asked = {c.key: c for c in candidates}
            locks = tuple(
                self._lock(row, asked[row.key] if row.data == sent[row.key] else None)
                for row in answer.locks)
            # The keys its pull held already, as the script's grant says them (a retry may be
            # answered with the grant a first call of its request was made, and its record
            # says them too; not one written by an older replica: ``None``).
            return Outcome(status=Status.GRANTED, locks=locks, fresh=answer.fresh,
                           expired=tuple(self._readable(answer.expired, deleted=True)),
                           handed=self._grants(answer.handed), kept=answer.kept_keys,
                           upgraded=answer.upgraded)
        messages = {f.name: f.message for f in policy.rules.freezes}
        if isinstance(answer, redis_replies.Refused):
            return Outcome(status=Status(answer.status), key=answer.key,
                           holder=self._maybe_lock(answer.holder),
                           message=messages.get(answer.freeze) if answer.freeze else None,
                           superseded=tuple(self._waiter(rec) for rec in answer.superseded),
                           expired=tuple(self._readable(answer.expired, deleted=True)),
                           handed=self._grants(answer.handed))
        assert wait is not None
        self._enqueued.add(wait.id)
        names = self._waiter_names(candidates, wait.id)
        for c in candidates:
            self._waiting_on.setdefault(c.key, {})[wait.id] = names
        self._enqueues += 1
        if self._enqueues % 1024 == 0:  # drop those whose end this replica never heard of
            self._forget_unheard()
        return Outcome(status=Status.QUEUED, waiter=self._waiter(answer.waiter),
                       key=answer.key, holder=self._maybe_lock(answer.holder),
                       position=answer.position, message=messages.get(answer.freeze),
                       superseded=tuple(self._waiter(rec) for rec in answer.superseded),
                       expired=tuple(self._readable(answer.expired, deleted=True)),
                       handed=self._grants(answer.handed))

    async def release_and_handoff(
        self, key: str, *, owner: Owner | None = None, policy: QueuePolicy | None = None,
        token: int | None = None, checked: frozenset[int] | None = None,
        unless_told: bool = False,
    ) -> Handoff:
        repo, pull = owner if owner is not None else ("", 0)
        answer: redis_replies.Dropped | redis_replies.Release | None = None
        if (owner is not None and token is None
                and self._lean(key, (policy or self._policy).rules)):
            keys = self.keys
            # The key's lock as this replica last read or made it (``_known``), named by its
            # token and grant time: its data is what Redis need not send back (nor keep under
            # the call id) when that lock is what is stored.
            known = self._known.get(key)
            believed, stamp = ("", "") if known is None else (
                known[0][0], f"{known[0][1]}:{known[0][2]}")
            lean = await self._run(
                "LEAN_RELEASE", key, repo, pull, stamp,
                keys=(keys.lock(key), keys.shared(key), keys.pull(repo, pull)),
                policy=policy, key=key, hint="LEAN_RELEASE", changing=3)
            if redis_replies.full(lean):
                self._busy_now(key, True)
            else:
                answer = redis_replies.release(lean, sent=believed)
        if answer is None:
            # Only that hold of the owner's; a force-unlock's checked holds, by their tokens.
            # (A give-back leaves a lock an answer told its pull it holds: release.lua.)
            held = ((token, "unless_told") if token is not None and unless_told
                    else (token,) if token is not None
                    else (",".join(map(str, sorted(checked))),) if checked is not None
                    and owner is None else ())
            answer = redis_replies.release(await self._run(
                "RELEASE", key, repo, pull, *held, keys=self._key_names(key, owner),
                policy=policy, key=key))
            if isinstance(answer, redis_replies.Dropped):
                self._busy_now(key, False)
        if isinstance(answer, redis_replies.Dropped):  # the lean path: nobody waited
            try:
                gone = self._made(key, answer.data, answer.token, answer.at, answer.exp)
            except LockUnreadable:
                self.unreadable.cleared(key)  # deleted unread, as below
                return Handoff()
            # Its entry in ``_known`` stays: a release sent again under the same call id says
            # again what it believed stored, and its kept answer (without the data) is read
            # against that; the key's next grant or read replaces the entry.
            return Handoff(released=gone)
        if answer.owner is not None:
            raise LockNotOwned(key, self._lock(answer.owner))
        if answer.ahead:  # the next hand-off of this key declares what it will touch
            self._hint(key, [name for waiter in answer.ahead for name in self._ahead(waiter)])
        served = answer.served
        released = None
        if served.released is not None:
            try:
                released = self._lock(served.released)
            except LockUnreadable:
                # Deleted unread (a force-unlock, or its owner fields matched): nothing to
                # answer as released, and its entry goes.
                self.unreadable.cleared(key)
                served = served._replace(released=None)
            else:
                self._known.pop(key, None)  # it is gone; its next holder's lock is new
        handoff = self._handoff(served, released=released)
        if answer.expired:
            handoff.expired = tuple(self._readable(answer.expired, deleted=True))
        return handoff

    async def force_unlock(self, key: str, *, policy: QueuePolicy | None = None,
                           checked: frozenset[int] | None = None) -> Handoff:
        handoff = await self.release_and_handoff(key, policy=policy, checked=checked)
        # Whatever was wrong with the key (its lock, its fencing counter, a queue) is gone.
        self.unreadable.cleared(key)
        return handoff

    async def expire(self, key: str, *, policy: QueuePolicy | None = None) -> Expiry:
        answer = redis_replies.expiry(await self._run(
            "EXPIRE", key, keys=self._key_names(key), policy=policy, key=key))
        return Expiry.of(self._handoff(answer.served),
                         holders=tuple(self._lock(row) for row in answer.holders),
                         now=_at(answer.now))

    async def wake(self, *, policy: QueuePolicy) -> Handoff:
        return self._handoff(redis_replies.served(await self._run("WAKE", policy=policy)))

    async def cancel(
        self, key: str, waiter_id: str, *, reason: Reason = Reason.CANCELLED, caller: str = "",
        policy: QueuePolicy | None = None,
    ) -> Cancelled:
        answer = redis_replies.cancel(
            await self._run("CANCEL", waiter_id, reason.value, caller,
                            keys=[*self._own_names(waiter_id), *self._key_names(key)],
                            policy=policy, key=key))
        if answer.waiter is None:
            return Cancelled()
        return Cancelled(removed=answer.status == "removed", waiter=self._waiter(answer.waiter),
                         granted=tuple(self._lock(row) for row in answer.locks),
                         fresh=answer.fresh, kept=answer.kept_keys,
                         upgraded=answer.upgraded, handed=self._grants(answer.handed))

    async def queue(self, key: str, *, policy: QueuePolicy | None = None,
                    limit: int | None = None) -> Waiters:
        # (the first ``limit`` are read as a hand-off reads the head of the line: O(limit log
        # n) in Redis, where the whole queue is O(n))
        answer = redis_replies.queue(await self._run(
            "QUEUE", key, *(() if limit is None else (limit,)), keys=self.keys.of_key(key),
            policy=policy, key=key))
        if answer.damaged:  # one of its queues is another Redis type: set aside, like a lock
            found = codec.unreadable(key, "", None, side=self.namespace, reason=answer.damaged)
            self.unreadable.found(found)
            raise LockUnreadable(found)
        return service_order([self._waiter(rec) for rec in answer.waiters], now=_at(answer.now),
                             policy=policy or self._policy)

    async def wait_graph(self, *, policy: QueuePolicy | None = None) -> KeyWaitsList:
        return self._key_waits(redis_replies.wait_graph(await self._run("WAIT_GRAPH",
                                                                        policy=policy)), policy)

    async def wait_graph_from(self, waiter: Waiter, *,
                              policy: QueuePolicy | None = None) -> KeyWaitsList:
        # The walk declares the start's own names (its index, its record, its keys), so its
        # first steps ask for nothing. A walk that meets more than _WALK_BOUND queue entries
        # reads the whole graph instead. Untrusted indexes (an enqueue of a release that keeps
        # none) are made whole once and walked again; if they are untrusted again at once (that
        # release still queueing), the whole graph is read.
        if (policy or self._policy).limits:
            # A group's waiter waits for every holder of the group, of any key: the walk
            # follows keys, so the whole graph is read, with the held keys of the groups.
            return self._key_waits(redis_replies.wait_graph(await self._run(
                "WAIT_GRAPH", "1", policy=policy)), policy)
        repo, pull = waiter.owner
        keys = [self.keys.by_pull_mark, self.keys.waits(repo, pull),
                self.keys.waiter(waiter.id), *(n for k in waiter.keys for n in self.keys.of_key(k))]
        for reindexed in (False, True):
            graph = redis_replies.wait_graph_from(await self._run(
                "WAIT_GRAPH_FROM", repo, pull, _WALK_BOUND, keys=keys, policy=policy,
                hint=f"WAIT_GRAPH_FROM {repo}#{pull}"))
            if not isinstance(graph, str):
                return self._key_waits(graph, policy)
            if graph == "whole":
                break
            if not reindexed:
                listed = await self._run("REINDEX_WAITS", keys=[self.keys.by_pull_mark],
                                         policy=policy)
                log.info("redis %s: the indexes of waits were made whole again from the queues "
                         "(%s waiters; an enqueue of a release that keeps none came since)",
                         self.connection.where, listed)
        return await self.wait_graph(policy=policy)

    def _key_waits(self, graph: redis_replies.WaitGraph,
                   policy: QueuePolicy | None) -> KeyWaitsList:
        waiters = {w.id: w for w in (self._waiter(rec) for rec in graph.waiters)}
        now = _at(graph.now)
        result: KeyWaitsList = []
        held = {h.key: h for h in graph.held}
        for entry in graph.entries:
            holders = tuple((repo, int(pull)) for repo, pull in entry.owners)
            grouped = held.pop(entry.key, None)
            result.append(KeyWaits(
                key=entry.key,
                holder=holders[0] if holders else None,
                holders=holders,
                waiters=tuple(service_order(
                    [waiters[i] for i in entry.waiter_ids if i in waiters], now=now,
                    policy=policy or self._policy)),
                shared=entry.shared,
                parts=_parts(grouped) if grouped is not None else None,
            ))
        for grouped in held.values():
            holders = tuple((repo, int(pull)) for repo, pull in grouped.owners)
            result.append(KeyWaits(key=grouped.key, holder=holders[0] if holders else None,
                                   holders=holders, waiters=(), shared=grouped.shared,
                                   parts=_parts(grouped)))
        return result

    # --- giving back an acquire whose caller was not told its answer ------------------------
    def _owe(self, call_id: str, candidates: Sequence[Candidate],
             error: BackendUnavailable | None) -> None:
        """The acquire ``call_id`` of ``candidates``, whose caller is told Redis did not
        answer (``error``), or went away as the call was on its way (``None``: its task
        cancelled, the answer never read): Redis may still run it (a frozen or slow Redis runs
        what it took when it wakes, however late) and grant the pull a lock its caller never
        heard of, held for good without a lease (and, after a router's fall-back, held on
        legacy as well). Its give-back is sent until Redis answers (``_give_back_owed``), and
        what it released is told (``gave_back``). A call that may wait is owed one too: what
        it granted at once has no waiter for its caller's withdrawal to find (a waiter it
        queued is withdrawn by its id, and its kept answer, ``queued``, gives nothing back).
        A call never sent (``StoreBusy``: no connection was free) owes nothing."""
        if isinstance(error, StoreBusy):
            return
        owed = self._owed
        if len(owed) >= _OWED:
            oldest = owed.pop(next(iter(owed)))
            log.warning("redis %s: more than %d acquires whose callers were not told their "
                        "answers wait to be given back; %s of %s#%d let go (what it may have "
                        "granted stays held)",
                        self.connection.where, _OWED, ", ".join(oldest.keys), oldest.repo,
                        oldest.pull)
        first = candidates[0]
        owed[call_id] = _GiveBack(call_id, first.project.repo_full_name, first.pull.num,
                                  tuple(c.key for c in candidates))
        if self._giving is None or self._giving.done():
            self._giving = asyncio.create_task(self._give_back_owed(),
                                               name="redis give-backs")

    @property
    def owed(self) -> int:
        """Give-backs Redis has not answered yet (``_owe``)."""
        return len(self._owed)

    async def _give_back_owed(self) -> None:
        """Send each owed give-back, oldest first, until Redis answers it."""
        owed = self._owed
        while owed:
            entry = next(iter(owed.values()))
            try:
                handoff = await self._give_back(entry)
            except BackendUnavailable:
                await asyncio.sleep(_GIVE_BACK_PAUSE)
                continue
            except Exception as error:  # (an answer it cannot use: not sent again)
                log.warning("redis %s: could not give back the acquire of %s by %s#%d "
                            "whose caller never had its answer: %s", self.connection.where,
                            ", ".join(entry.keys), entry.repo, entry.pull,
                            self.connection.scrub(str(error) or type(error).__name__))
            else:
                self.gave_back(handoff)
            owed.pop(entry.call_id, None)

    async def _give_back(self, entry: _GiveBack) -> Handoff:
        """Undo what the acquire ``entry`` granted, if it ran and nothing later relied on it
        (``lua/give_back.lua``); if it has not run yet, it will write nothing when it does.
        An upgrade it made of its pull's shared hold stays, answered in ``upgrades_kept``
        while it is still held (nobody heard of it: the locker announces it)."""
        keys = self.keys
        op = keys.op(entry.call_id)
        answer = redis_replies.give_back(await self._run(
            "GIVE_BACK", entry.repo, entry.pull, *entry.keys,
            keys=[op, *(name for k in entry.keys for name in keys.of_key(k)),
                  keys.pull(entry.repo, entry.pull)],
            key=entry.keys[0]))
        served = answer.release.served
        gone = [row for row in (served.released, *served.others) if row is not None]
        for row in gone:
            self._known.pop(row.key, None)
            log.warning("redis %s: gave back %s, granted to %s#%d by an acquire whose caller "
                        "never had its answer (told Redis did not answer, or gone as the call "
                        "was on its way)", self.connection.where, row.key, entry.repo,
                        entry.pull)
        return self._handoff(served, upgrades_kept=tuple(self._readable(answer.upgrades_kept)))

    # --- notifications ---------------------------------------------------------------------
    async def _notified(self, kind: str, waiter_id: str) -> None:
        """A message on this replica's channel: confirm a grant, or pass the reason on.

        Each message is handled at once in a task of its own (a grant's confirmation is a
        call to Redis, and many can be on their way together), but a caller is told only after
        the callers of the earlier messages about waiters on its keys: one hand-off that lets
        several shared waiters in publishes their grants in the order of their tokens, and
        their confirmations can answer in any order. Waiters on other keys never wait for
        each other (a confirmation held up by a master that is down holds up only its keys).
        """
        self._enqueued.discard(waiter_id)
        if waiter_id not in self._notifier.pending():
            return  # nobody waits here for it (any more): a grant lapses after its claim
        keys, ahead = self._take_turn(waiter_id)  # before any await: in the messages' order
        try:
            if kind != "granted":
                try:
                    reason = Reason(kind)
                except ValueError:
                    reason = Reason.UNAVAILABLE
                if ahead:
                    await asyncio.wait(ahead)
                self.grants.deliver(waiter_id, Notice(reason=reason))
                return
            answer = await self._confirm(waiter_id)
            held = tuple(self._lock(row) for row in answer.locks)
            if ahead:
                await asyncio.wait(ahead)
            if answer.granted:
                self.grants.deliver(waiter_id, Notice(locks=held, fresh=answer.fresh,
                                                      kept=answer.kept_keys,
                                                      upgraded=answer.upgraded,
                                                      caller=answer.caller))
                return
            # A claim lapsed before we could confirm (we were cut off for CLAIM_MS): a batch
            # is all or nothing, so give back what is left of its grant (not a lock its pull
            # held already: CONFIRM leaves those out) and tell the caller. Each by its token:
            # a hold its pull took of the key since is not this grant's.
            for lock in held:
                with contextlib.suppress(LockNotOwned):
                    await self.release_and_handoff(
                        lock.key, owner=(lock.project.repo_full_name, lock.pull.num),
                        token=lock.fencing_token, unless_told=True)
            self.grants.deliver(waiter_id, Notice(reason=Reason.UNAVAILABLE))
        finally:
            me = asyncio.current_task()
            for key in keys:
                if self._telling.get(key) is me:
                    del self._telling[key]

    def _take_turn(self, waiter_id: str,
                   ) -> tuple[tuple[str, ...], tuple[asyncio.Task[Any], ...]]:
        """The keys of one of this replica's waiters, and the handlers still running of earlier
        messages about waiters on them; the running task becomes the latest on each key."""
        me = asyncio.current_task()
        if me is None:
            return (), ()
        keys = tuple(key for key, waiting in self._waiting_on.items() if waiter_id in waiting)
        ahead: dict[asyncio.Task[Any], None] = {}
        for key in keys:
            last = self._telling.get(key)
            if last is not None and not last.done():
                ahead[last] = None
            self._telling[key] = me
        return keys, tuple(ahead)

    async def _confirm(self, waiter_id: str) -> redis_replies.Confirm:
        """CONFIRM, tried again while Redis is briefly away (a restart): the grant is ours
        until its claim lapses, and the caller is waiting for it.

        On the reserved connection, as the heartbeat: the claim lapses 5 s after the grant
        (``CLAIM_MS``, Redis's clock), and under a flood larger than the pool a call waits
        for a pooled connection behind every call that came before it, up to the pool's 4 s
        bound, and then again at the back. A confirmation that waited there past the claim
        found its grant lapsed, and the waiter was told ``unavailable`` while Redis answered
        all along."""
        delay = 0.05
        while True:
            try:
                return redis_replies.confirm(await self._run(
                    "CONFIRM", waiter_id, keys=self._own_names(waiter_id), reserved=True))
            except BackendUnavailable:
                if waiter_id not in self._notifier.pending():
                    raise  # the caller gave up; its cancel took (or gave back) the grant
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _heartbeat(self) -> None:
        # On its own connection: a flood that keeps every pooled connection busy must not
        # make this replica's waiters look like a dead replica's.
        await self._run("HEARTBEAT", reserved=True)

    async def _recheck(self, waiter_ids: Sequence[str]) -> None:
        """After a reconnect: act on what happened to our waiters while we were away.

        A waiter with neither record nor outcome (``gone``) was lost with the store's data
        only if its ``ACQUIRE`` had answered ``queued`` before we asked. Otherwise its enqueue
        is still on its way (waiting for this very subscription, or retried after the broken
        connection): that call's own answer decides, and telling it ``unavailable`` here would
        answer the caller while the enqueue then queues a waiter nobody waits for, which is
        granted and blocks its key until the claim lapses."""
        self._enqueued.intersection_update(self._notifier.pending())
        if not waiter_ids:
            return
        enqueued = self._enqueued.intersection(waiter_ids)
        kinds = await self._run("STATUS", *waiter_ids, keys=[
            name for waiter_id in waiter_ids for name in self.keys.of_waiter(waiter_id)])
        await asyncio.gather(*(
            self._notified("unavailable" if kind == "gone" else str(kind), waiter_id)
            for waiter_id, kind in zip(waiter_ids, kinds, strict=True)
            if kind != "queued" and (kind != "gone" or waiter_id in enqueued)
        ))


def _untold(handoff: Handoff) -> None:
    """``RedisBackend.gave_back`` until a locker takes it: nobody to tell."""


def _parts(held: redis_replies.GroupHeld) -> policies.KeyParts:
    """What the rules see of a held key of a concurrency group."""
    return policies.KeyParts(key=held.key, repo=held.repo, path=held.path,
                             workspace=held.workspace)
