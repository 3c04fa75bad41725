"""Connecting to Redis from the settings, and turning its failures into ``BackendUnavailable``.

One asyncio client per backend, over a bounded pool (``redis-pool-size``) that waits for a free
connection instead of failing. The client speaks RESP through hiredis, both ways: hiredis parses
the replies, and packs the commands too (redis-py's asyncio connection packs them in Python, a
script call's 30-odd arguments one by one, which cost several times the parse). A Redis
Cluster's client builds its connections itself and keeps redis-py's packing.
Settings: ``redis-addr`` or Sentinel (``redis-sentinel-addrs`` + ``redis-sentinel-master``),
or a Redis Cluster (``redis-cluster``: ``redis-addr`` names any node, redis-py's asyncio
``RedisCluster`` finds the others and follows slot moves), ``redis-db``, ``redis-username``
+ ``redis-password`` (ACL or ``requirepass``), and TLS (CA, client certificate, skip-verify).

redis-py's own retries are switched off: a lock operation is not blindly repeatable, and this
service has its own retry policy (the ``retries`` flag) that knows which answers are definite.
On a cluster, redis-py may try a call again a few times, because that is how it follows a slot
that moved (``MOVED``, a failover): the scripts' writes are kept under their call id, so a
repeated script call answers what the first one did and writes nothing twice.

The password never leaves this module: it is not part of :attr:`RedisConnection.where`, it is
masked in every error message we build (even if a library put it there), and the client's
``repr`` shows only host, port and db.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import re
import ssl
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from time import monotonic
from types import TracebackType
from typing import Any, Literal, TypeGuard, TypeVar

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis._parsers import AsyncCommandsParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPubSub, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.utils import is_os_level_timeout

from enhanced_locking.backends import redis_lua
from enhanced_locking.config import SECRET_MASK, EnhancedLockingConfig
from enhanced_locking.types import BackendUnavailable, StoreBusy, UnusableSetting

__all__ = [
    "COMMAND_TIMEOUT",
    "CONNECT_TIMEOUT",
    "REPLACE_WRITTEN_OVER",
    "RETRYABLE",
    "SENTINEL_WAIT",
    "CallCount",
    "Client",
    "HiredisConnection",
    "HiredisSSLConnection",
    "RedisConnection",
    "again_if_written_over",
    "connect",
    "down",
    "is_retryable",
    "key_beside",
    "pool_exhausted",
    "refused_login",
    "resp_body",
    "unavailable",
    "will_not_serve",
    "within_limit",
    "wrong_type",
]

CONNECT_TIMEOUT = 2.0
"""Seconds to open a connection; a stopped Redis is refused at once, a lost one times out."""

COMMAND_TIMEOUT = 5.0
"""Seconds one call may take; our scripts take microseconds. Enforced around each call by a
timer of the event loop that the calls' limits share (:func:`within_limit`;
:class:`unavailable` around redis-py's own commands) rather than as redis-py's socket
timeout, which wraps every send in a task of its own (``asyncio.wait_for``) and cost more than
the script."""

SENTINEL_WAIT = 1.0
"""Seconds a Sentinel has to take a connection, and again to answer where the master is
(microseconds of its work), before the next Sentinel is asked. Asked as a connection to the
master opens, inside a call's ``COMMAND_TIMEOUT``: at 2 s and 5 s (the calls' own bounds) a
first-listed Sentinel that was stopped (a hung host) used up the call's limit before the next
was asked, so every call that opened a connection was told Redis did not answer, for as long
as that Sentinel hung, while the master and the other Sentinels answered."""

POOL_WAIT = 4.0
"""Seconds a call waits for a free pooled connection; past it the call is answered
``StoreBusy`` (the service is overloaded: every connection is busy with other calls, Redis
itself answers). Shorter than ``COMMAND_TIMEOUT``, which counts from the call's start, the wait
for a connection included: at 5 s each the call's own limit ran out first, and a flood larger
than the pool was told the store did not answer (``unavailable``: a router fell back to
legacy)."""

POOL_EXHAUSTED = "No connection available."
"""redis-py's text when a waiting pool's ``timeout`` ran out (its ``ConnectionError``)."""

GRACE_TURNS = 3
"""Turns of the event loop a bound that came due (a call's limit, a wait for a pooled
connection or a cluster's turn) lets pass before it gives its call up. After the loop stalled
past the bound (a flood on a loaded machine), the answer Redis sent meanwhile and the bound's
timer come due in one turn, and the answer reaches its caller only turns later: the next for a
call that reads its own answer, the third for a cluster's pipeline (read in a task per node,
gathered, then its caller). The caller then hands its connection (or turn) over to the oldest
waiter in the same step. Given up in the timer's own turn, a call was told Redis did not
answer with its answer read, and a waiter was answered ``overloaded`` while the connection it
waited for was on its way to it."""

# What "Redis is not there (or will not serve us)" looks like. ResponseErrors that are our
# own mistakes (a script bug) are not in the list: they must surface, not look like an outage.
# (Refusals redis-py has no class for are told by their text: ``will_not_serve``.)
DOWN: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # also AuthenticationError, MasterNotFoundError
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.ReadOnlyError,  # writing to a replica during a failover
    rexc.NoPermissionError,  # an ACL user without the rights we need
    rexc.AuthenticationWrongNumberOfArgsError,
    rexc.ClusterError,  # a cluster that cannot serve the slot (down, moving, no quorum)
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.MovedError,
    rexc.InvalidResponse,  # an address that answers, but not as Redis (another service's port)
    TimeoutError,
    OSError,
)


_T = TypeVar("_T")

Client = aioredis.Redis | RedisCluster
"""A client of one Redis (direct or through Sentinel), or of a Redis Cluster."""

_ONE_REDIS: dict[type, bool] = {}
"""By a client's class: whether it is a client of one Redis (:func:`one_redis`)."""


def one_redis(client: Client) -> TypeGuard[aioredis.Redis]:
    """Whether ``client`` is a client of one Redis, not of a cluster: ``isinstance(client,
    aioredis.Redis)``, found once per class and remembered.

    Every call to Redis asks which client it has (each call, and each connection it takes
    or gives back). redis-py's clients derive from a ``typing.Protocol``: the isinstance of
    one of our subclasses of its ``Redis`` (``_CountedRedis``) runs typing's and abc's checks
    in Python, 0.4 to 0.9 µs, and of it against ``RedisCluster`` 2 to 3.4 µs; a look-up by
    its class, 0.1 µs. (Which class an object is an instance of depends on its class alone.)"""
    kind = type(client)
    found = _ONE_REDIS.get(kind)
    if found is None:
        found = _ONE_REDIS[kind] = isinstance(client, aioredis.Redis)
    return found


class _HiredisPacking:
    """Commands packed by hiredis in one C call (redis-py's synchronous client does the same;
    its asyncio connection packs them in Python). The bytes are the same."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if (isinstance(name, str) and " " in name) or (isinstance(name, bytes) and b" " in name):
            args = (*name.split(), *args[1:])  # "CONFIG GET": its words are sent apart
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass
        # hiredis takes str, bytes, int, float and memoryview; redis-py's encoder also other
        # buffers (a bytearray).
        buffers: Any = tuple(bytes(a) if isinstance(a, bytearray) else a for a in args)
        try:
            return [hiredis.pack_command(buffers)]
        except TypeError as error:  # what redis-py's encoder says of None, a dict, ...
            raise rexc.DataError(str(error)) from None


class HiredisConnection(_HiredisPacking, aioredis.Connection):
    """A plain TCP connection whose commands hiredis packs."""


class HiredisSSLConnection(_HiredisPacking, aioredis.SSLConnection):
    """A TLS connection whose commands hiredis packs."""


class _SentinelAsking:
    """A connection to a Sentinel (asked where the master is) whose answer is waited for as a
    call's is (:func:`within_limit`: its ``socket_timeout`` and then :data:`GRACE_TURNS`
    turns of the event loop), not under redis-py's ``asyncio.timeout``. That timeout cancelled
    the read in the turn it came due: after the loop stalled past it (a flood on a loaded
    machine), a Sentinel's answer read in that same turn was dropped as a timeout, and with no
    Sentinel left to ask, a connection to the master was refused as Redis not answering
    (``MasterNotFoundError``) while the master and the Sentinels answered. Past the limit the
    read still fails as redis-py's (``TimeoutError``, the connection closed), so the next
    Sentinel is asked."""

    socket_timeout: float | None

    async def read_response(  # (redis-py's signature, its timeout included)
        self, disable_decoding: bool = False, timeout: float | None = None,  # noqa: ASYNC109
        **options: Any,
    ) -> Any:
        seconds = self.socket_timeout
        read = super().read_response  # type: ignore[misc]
        if timeout is not None or seconds is None:  # (a caller's own timeout: redis-py's)
            return await read(disable_decoding, timeout, **options)
        try:
            return await within_limit(read(disable_decoding, math.inf, **options), seconds)
        except TimeoutError:
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            where = self._host_error()  # type: ignore[attr-defined]
            raise rexc.TimeoutError(f"Timeout reading from {where}") from None


class _SentinelConnection(_SentinelAsking, aioredis.Connection):
    """A connection to a Sentinel."""


class _SentinelSSLConnection(_SentinelAsking, aioredis.SSLConnection):
    """The same over TLS."""


class _HiredisSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    """A connection to the master Sentinel names, whose commands hiredis packs."""


class _HiredisSentinelSSLConnection(_HiredisPacking, SentinelManagedSSLConnection):
    """The same over TLS."""


def resp_body(values: Sequence[Any]) -> bytes:
    """``values`` as RESP bulk strings, one after the other, without the array header that
    counts them: the middle of a command whose other parts its caller packs (the bytes
    ``hiredis.pack_command`` makes of them inside a command)."""
    if not values:
        return b""
    whole: tuple[Any, ...] = tuple(values)  # str, bytes, int (what hiredis packs)
    packed: bytes = hiredis.pack_command(whole)
    return packed[packed.index(b"\r\n") + 2:]


def _packed(connection: aioredis.Connection, commands: Sequence[tuple[Any, ...]]) -> bytes:
    """``commands`` in RESP, in one buffer: each packed by hiredis at once when it can (a
    one-word name; str, bytes, int and float arguments), else as the connection packs it."""
    pack = hiredis.pack_command
    parts: list[bytes] = []
    for command in commands:
        name = command[0]
        if isinstance(name, str) and " " not in name:
            try:
                parts.append(pack(command))
                continue
            except TypeError:
                pass
        parts.extend(connection.pack_command(*command))
    return b"".join(parts)


async def _send(connection: aioredis.Connection, packed: bytes) -> None:
    """``packed`` (commands in RESP) written on ``connection``, failing as redis-py's
    ``send_packed_command(packed, check_health=False)`` does (the same errors, the connection
    closed after any), without its two coroutines and checks on the way to the stream (the
    command's shapes, a socket timeout, which our connections do not set) and the stream's
    ``writelines``, which makes a list of the one buffer and joins it again (counted under
    callgrind, docs/03-redis.md). A connection not open yet, or one with a socket timeout, is
    sent through redis-py as before (it opens it, or bounds the write)."""
    writer = connection._writer
    if writer is None or connection._reader is None or connection.socket_timeout:
        await connection.send_packed_command(packed, check_health=False)
        return
    try:
        if writer.transport.is_closing():
            raise rexc.ConnectionError("Connection closed by the server before write")
        try:
            writer.write(packed)
            await writer.drain()
        except (TypeError, AttributeError) as error:  # (as redis-py: a transport closing)
            if writer.transport.is_closing():
                raise rexc.ConnectionError(
                    "Connection closed by the server while writing") from error
            raise
    except TimeoutError as error:  # (an OSError: only the OS's, with its errno, here)
        await connection.disconnect(nowait=True)
        if is_os_level_timeout(error):
            raise rexc.ConnectionError(
                f"Error {error.errno} while writing to socket. {error.strerror}.") from error
        raise rexc.TimeoutError("Timeout writing to socket") from None
    except OSError as error:
        await connection.disconnect(nowait=True)
        number, text = (("UNKNOWN", error.args[0]) if len(error.args) == 1
                        else (error.args[0], error.args[1]))
        raise rexc.ConnectionError(
            f"Error {number} while writing to socket. {text}.") from error
    except BaseException:
        await connection.disconnect(nowait=True)
        raise


async def _answers(connection: aioredis.Connection, count: int) -> list[Any]:
    """The next ``count`` answers on ``connection``, taken from its hiredis reader as they
    come (as many per socket read as have arrived); an error reply is in the list as its
    ``ResponseError``. Failing as redis-py's ``read_response`` does: a closed connection, a
    socket error or an error reply of redis-py's ``ConnectionError`` kinds (``LOADING``,
    ``NOAUTH``) is raised."""
    parser = connection._parser
    assert isinstance(parser, _AsyncHiredisParser)
    gets = parser._reader.gets  # type: ignore[attr-defined]
    answers: list[Any] = []
    for _ in range(count):
        answer = gets()
        while answer is NOT_ENOUGH_DATA:
            if not parser._connected:
                raise rexc.ConnectionError("Connection closed by server.")
            try:
                await parser.read_from_socket()  # type: ignore[no-untyped-call]
            except OSError as error:
                raise rexc.ConnectionError(
                    f"Error while reading from {connection.host}:{connection.port} : "
                    f"{error.args}") from error
            answer = gets()
        # As read_response: an error reply that means the connection is not usable (LOADING,
        # NOAUTH: redis-py's ConnectionError kinds) is raised, not answered, and the caller
        # discards the connection with the answers still unread on it.
        if isinstance(answer, rexc.ConnectionError):
            raise answer
        if isinstance(answer, list) and answer and isinstance(answer[0], rexc.ConnectionError):
            raise answer[0]
        answers.append(answer)
    return answers


_COMMAND_TABLES: dict[str, tuple[Any, Any]] = {}
"""By cluster address: the command table its first client read, and what redis-py compiled
from it (see :class:`_SharedCommands`)."""


class _SharedCommands(AsyncCommandsParser):
    """Where each command's keys are: Redis's command table, read once per cluster address in a
    process and shared by every client of that address.

    redis-py's cluster client reads the table (``COMMAND``: every command with its flags and key
    specs) when it first connects, to find a command's keys and so its slot. Read per client,
    it cost about a third of a client's first call (4 of 12 ms of CPU) and left 3,400 Python
    objects in reference cycles when the client closed (300 when shared), freed only by the
    garbage collector's slow passes. A process that opens many clients on one cluster (one per
    namespace, a test suite's backends) paid that each time; on a starved machine one client's
    first call, with the collections it set off, ran past the call's 5 s limit. The table
    describes the server, not one client: a client that meets a command missing from it reads
    it again from its own node, as redis-py always does.
    """

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    async def initialize(self, node: ClusterNode | None = None) -> None:
        shared = _COMMAND_TABLES.get(self.address)
        if node is None or shared is None:  # the first client, or a command it did not know
            await super().initialize(node)
            _COMMAND_TABLES[self.address] = (self.commands, self._movablekeys_specs)
            return
        self.node = node
        self.commands, self._movablekeys_specs = shared  # read, never changed in place
        self._encoder = node.get_encoder()


@dataclass(slots=True)
class CallCount:
    """The calls one client sent to Redis, by every path (the store's kept connections,
    redis-py's own commands: the audit trail, the replica registry; a cluster's calls), and
    what came of them: answered (an error reply is an answer) or failed otherwise (cut off,
    the connection broke); the rest are under way.

    A call that found no connection (or, on a cluster, no turn) free within ``POOL_WAIT`` is
    the replica's overload (``StoreBusy``) only while Redis answers. When calls were under way
    and Redis answered none of them while it waited, the connections are held by calls Redis
    does not answer (it is stopped, frozen or cut off): an outage, told as a call Redis did not
    answer (:meth:`stuck`; a router falls back to legacy for it, as for any other)."""

    sent: int = 0
    answers: int = 0
    failed: int = 0
    answered_at: float = 0.0
    """When (``time.monotonic``) the latest answer was read (see :class:`_Limit`)."""

    async def of(self, call: Coroutine[Any, Any, _T]) -> _T:
        """``await call``, counted: sent, then answered (an error reply too) or failed."""
        self.sent += 1
        try:
            answer = await call
        except rexc.ResponseError:
            self.answers += 1
            self.answered_at = monotonic()
            raise
        except BaseException:
            self.failed += 1
            raise
        self.answers += 1
        self.answered_at = monotonic()
        return answer

    def stuck(self, answers: int, failed: int) -> TimeoutError | None:
        """The outage a wait for a connection ran into, ``answers`` and ``failed`` being
        :attr:`answers` and :attr:`failed` when it began (None: Redis answered meanwhile, or
        nothing was under way or failed). Calls that failed meanwhile, none answered, count as
        calls Redis did not answer: a Redis frozen through the wait had the calls holding the
        connections cut off at their limit, and the connections, given to calls that had not
        been sent yet, left none under way as the wait ended (told overloaded, no fall-back)."""
        under_way = self.sent - self.answers - self.failed
        cut = self.failed - failed
        if (under_way or cut) and self.answers == answers:
            return TimeoutError(f"no connection free within {POOL_WAIT:g} s, and none of the "
                                f"{under_way + cut} calls under way on them answered meanwhile")
        return None


class _CountedRedis(aioredis.Redis):
    """The client of one Redis (direct or through Sentinel) whose own commands (redis-py's
    ``execute_command``: the audit trail, the replica registry, the store's reads outside its
    scripts) are counted (:class:`CallCount`), so that a wait for a connection behind calls a
    frozen Redis does not answer is told as an outage, not as an overload."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counted = CallCount()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        answers, failed = self.counted.answers, self.counted.failed
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except rexc.ConnectionError as error:
            stuck = self.counted.stuck(answers, failed) if pool_exhausted(error) else None
            if stuck is None:
                raise
            raise stuck from None

    async def _send_command_parse_response(self, conn: aioredis.Connection, command_name: str,
                                           *args: Any, **options: Any) -> Any:
        # (redis-py's step once the command has a connection: a command still waiting for
        # one is not under way)
        return await self.counted.of(super()._send_command_parse_response(  # type: ignore[no-untyped-call]
            conn, command_name, *args, **options))


class _Cluster(RedisCluster):
    """A cluster client that finds an ``FCALL``'s slot from its first key, as redis-py does for
    ``EVALSHA``; otherwise it asks a node with ``COMMAND GETKEYS`` first (``FCALL``'s keys are
    "movable"), a round trip more per call. Its command table is shared
    (:class:`_SharedCommands`)."""

    def __init__(self, *, host: str, port: int, calls: int, **kwargs: Any) -> None:
        # A node's pool holds the subscription's connection and the call out of turn's
        # (:meth:`out_of_turn`) besides the calls' (a client subscribes at most once at a
        # time): the calls, at most ``calls`` at once and each on one connection of a node,
        # never find a node's connections all in use.
        super().__init__(host=host, port=port, max_connections=calls + 2, **kwargs)
        self.commands_parser = _SharedCommands(f"{host}:{port}")
        self.calls = _Turns(calls)
        """The calls under way at once; one beyond waits for its turn (redis-py's cluster
        nodes have no waiting pool: a node whose connections are all in use refuses a call
        at once, ``MaxConnectionsError``, which read as the store being away)."""
        self.counted = CallCount()
        """Every call taken and what came of it (a turn waited for too long behind calls no
        node answered is an outage: :meth:`take_turn`)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.in_turn(super().execute_command(*args, **kwargs))

    async def in_turn(self, call: Coroutine[Any, Any, _T]) -> _T:
        """``await call`` in a turn of its own (:meth:`take_turn`), counted
        (:attr:`counted`)."""
        try:
            await self.take_turn()
        except BaseException:
            call.close()  # (never started)
            raise
        try:
            return await self.counted.of(call)
        finally:
            self.calls.release()

    async def out_of_turn(self, *args: Any) -> Any:
        """A command sent at once, without a turn (counted, :attr:`counted`), for the calls
        that must not wait behind a flood of others (the waiter heartbeat: see
        :meth:`RedisConnection.call_reserved`). One at a time (its caller's lock): a node
        keeps a connection for it (``max_connections``)."""
        return await self.counted.of(super().execute_command(*args))

    async def take_turn(self) -> None:
        """A place among the calls under way (given back by ``calls.release()``): taken at
        once when one is free and no call waits; else waited for, in the order the calls came,
        up to ``POOL_WAIT`` (past it the pool's own ``ConnectionError``, as a waiting pool of
        one Redis raises; or, when none of the calls under way was answered meanwhile, the
        outage :meth:`CallCount.stuck` says). The wait's timer is armed only for a wait: an
        ``asyncio.timeout`` (and a context manager of its own) around every call cost about
        46k instructions a call, 55.7k against 9.3k."""
        calls = self.calls
        if not calls.locked():
            calls.take()
            return
        answers, failed = self.counted.answers, self.counted.failed
        try:
            await calls.wait()
        except rexc.ConnectionError as error:
            stuck = self.counted.stuck(answers, failed) if pool_exhausted(error) else None
            if stuck is not None:
                raise stuck from None
            raise
        _sent_now()

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if command.upper() in ("FCALL", "FCALL_RO") and len(args) > 2 and int(args[1]) > 0:
            return self.keyslot(args[2])  # every key of a call shares one slot
        return await super()._determine_slot(command, *args)


def _no_turn(turn: asyncio.Future[Any]) -> None:
    if not turn.done():
        turn.set_exception(rexc.ConnectionError(POOL_EXHAUSTED))


def _next_waiting(turns: collections.deque[asyncio.Future[_T]]) -> asyncio.Future[_T] | None:
    """The oldest turn of ``turns`` still waiting, taken out (those given up are dropped)."""
    while turns:
        turn = turns.popleft()
        if not turn.done():
            return turn
    return None


class _Bound:
    """``callback(*args)`` once ``seconds`` have passed and then :data:`GRACE_TURNS` turns of
    the event loop, unless cancelled first: the bound of a wait for a turn, so that a turn
    handed over in the turns after a stalled loop's timer is taken, not given up."""

    __slots__ = ("handle",)

    def __init__(self, seconds: float, callback: Callable[..., None], *args: Any) -> None:
        self.handle: asyncio.TimerHandle | asyncio.Handle = asyncio.get_running_loop().call_later(
            seconds, self._turn, GRACE_TURNS, callback, args)

    def _turn(self, turns: int, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        if turns:
            self.handle = asyncio.get_running_loop().call_soon(self._turn, turns - 1,
                                                               callback, args)
        else:
            callback(*args)

    def cancel(self) -> None:
        self.handle.cancel()


class _Turns:
    """The calls of a Redis Cluster's client under way at once: at most ``count``; one beyond
    waits its turn, after those that came before it, for a place given back (handed to it,
    so no caller arriving meanwhile takes it), up to ``POOL_WAIT`` (:class:`_Bound`). Read
    as an ``asyncio.Semaphore`` (``locked``, ``acquire``, ``release``), whose waiter, given up
    by its ``asyncio.timeout`` in the turn a stalled loop ran it, passed on a place handed to
    it in the turns after."""

    __slots__ = ("_turns", "free")

    def __init__(self, count: int) -> None:
        self.free = count
        """Places no call holds and no turn was handed."""
        self._turns: collections.deque[asyncio.Future[None]] = collections.deque()

    def locked(self) -> bool:
        """Whether a call would wait for its turn."""
        return self.free <= 0 or bool(self._turns)

    def take(self) -> None:
        """Take a free place (:meth:`locked` being False)."""
        self.free -= 1

    async def acquire(self) -> None:
        """A place: taken at once when :meth:`take` may, else waited for (:meth:`wait`)."""
        if self.locked():
            await self.wait()
        else:
            self.take()

    async def wait(self) -> None:
        """A place handed over, after the turns before this one; past ``POOL_WAIT`` (and
        :data:`GRACE_TURNS`) the pool's ``ConnectionError`` (``POOL_EXHAUSTED``)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._turns.append(turn)
        bound = _Bound(POOL_WAIT, _no_turn, turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.release()  # handed the place, and its caller is gone
            else:
                turn.cancel()  # (left in the queue, passed over)
            raise
        finally:
            bound.cancel()

    def release(self) -> None:
        """A place given back: handed to the oldest turn waiting, else free."""
        turn = _next_waiting(self._turns)
        if turn is None:
            self.free += 1
        else:
            turn.set_result(None)


class _TurnsPool(aioredis.BlockingConnectionPool):
    """A waiting pool whose callers are served in the order they came.

    redis-py's waiting pool wakes one waiter when a connection comes back, and a caller
    arriving meanwhile takes the connection first; the woken waiter finds none and waits
    again, at the back. Under a flood larger than the pool, new callers kept passing the old
    ones, which waited out the pool's bound and were answered ``overloaded`` while the pool
    served others. Here a caller that finds no free connection, or others waiting before
    it, takes a turn (a future, in a queue), and is served when its turn comes:

    * with the connection a call of the client finished with (:meth:`hand_over`: clean,
      connected, passed on as it is, at no cost; the scripts' calls give theirs so), or
    * with a free place: a connection given back to the pool (or never opened), promised to
      it, which no caller after it may take; it takes it as redis-py does (its checks, its
      counts), at once.

    :attr:`waiting` is told when a caller has to wait: the connections the client keeps
    between calls (:attr:`RedisConnection._idle`) are handed to the turns then."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns: collections.deque[asyncio.Future[aioredis.Connection | None]] = (
            collections.deque())
        self._promised = 0
        """Free places promised to callers that have not taken them yet."""
        self.waiting: Callable[[], None] | None = None
        self._giving_back: set[asyncio.Task[None]] = set()
        """Connections being given back for callers that went away before they took them."""

    def _free(self) -> int:
        """Places a caller may take now: connections given back or never opened, less those
        promised."""
        return self.max_connections - len(self._in_use_connections) - self._promised

    @property
    def queued(self) -> bool:
        """Whether a caller waits for its turn."""
        return bool(self._turns)

    @property
    def full(self) -> bool:
        """Whether no place is free (a caller now waits for its turn)."""
        return self._free() <= 0

    async def get_connection(self, command_name: Any = None, *keys: Any,
                             **options: Any) -> Any:
        if self._turns or self._free() <= 0:
            handed = await self._turn()
            if handed is not None:
                return handed
        else:
            self._promised += 1
        try:
            # (one is free and promised to this caller: redis-py's own waiting does not wait)
            return await super().get_connection()  # type: ignore[no-untyped-call]
        finally:
            self._promised -= 1
            if self._turns:
                self._serve()

    async def _turn(self) -> aioredis.Connection | None:
        """Wait, after the callers that came before, for a connection handed over (returned)
        or a free place promised (None); past ``timeout`` (and :data:`GRACE_TURNS`) the pool's
        ``ConnectionError`` (``POOL_EXHAUSTED``)."""
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[aioredis.Connection | None] = loop.create_future()
        self._turns.append(turn)
        timer = None if self.timeout is None else _Bound(self.timeout, _no_turn, turn)
        if self.waiting is not None:
            self.waiting()
        self._serve()  # (a place may be free: a turn before this one was given up)
        try:
            return await turn
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._pass_on(turn.result())  # served, and its caller is gone
            else:
                turn.cancel()  # (left in the queue, passed over)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _serve(self) -> None:
        """Promise the free places to the oldest turns still waiting."""
        while self._turns and self._free() > 0:
            turn = _next_waiting(self._turns)
            if turn is None:
                return
            self._promised += 1
            turn.set_result(None)

    def hand_over(self, connection: aioredis.Connection) -> bool:
        """Give ``connection`` (connected, every answer on it read) to the oldest caller
        waiting for its turn, as it is; False when none waits."""
        turn = _next_waiting(self._turns)
        if turn is None:
            return False
        turn.set_result(connection)
        return True

    def _pass_on(self, served: aioredis.Connection | None) -> None:
        """What a turn whose caller went away was served with goes to the next turn."""
        if served is None:
            self._promised -= 1
            self._serve()
        elif not self.hand_over(served):
            task = asyncio.get_running_loop().create_task(self.release(served))
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            self._serve()


class _SubscriptionPool(aioredis.ConnectionPool):
    """Where a subscription takes its connection: made as the calls' pool makes them (its
    address, login and TLS; through Sentinel, to the master Sentinel names), never one of
    theirs. Sharing the calls' pool, the subscription held one of its connections for good,
    and one made again after a cut waited behind every call of a flood."""

    def __init__(self, calls: aioredis.ConnectionPool) -> None:
        super().__init__(connection_class=calls.connection_class, **calls.connection_kwargs)
        self._calls = calls

    def make_connection(self) -> Any:
        return self._calls.make_connection()  # type: ignore[no-untyped-call]


class _WaitingSentinelPool(SentinelConnectionPool, _TurnsPool):
    """The pool of the master Sentinel names, which waits for a free connection (up to
    ``timeout``) as the pool of one Redis does; redis-py's own refuses a call at once when
    its connections are all in use (``MaxConnectionsError``), which read as the store being
    away."""


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class RedisConnection:
    """An asyncio client plus what it is safe to say about it in messages.

    :meth:`call` is how the scripts are called: on one Redis (direct or through Sentinel) it
    sends the command on a connection of the client's pool that it keeps between calls
    (:attr:`_idle`), without redis-py's ``execute_command`` around it. Taking a connection
    from the pool and giving it back (a condition, a lock, a look for unread data, the pool's
    metrics) and the wrappers around the command (its retry object, its timing) cost about
    50 µs of CPU a call, more than sending it and reading the answer; a lock pair makes two.
    """

    client: Client
    where: str
    secret: str
    sentinels: list[aioredis.Redis] = field(default_factory=list)
    username: str = ""
    """The ACL user it logs in as (``enhanced-locking-redis-username``; empty: ``default``)."""
    _reserved: aioredis.Connection | None = field(default=None, init=False, repr=False)
    """The connection of :meth:`call_reserved`, made by the pool's connection class but
    never in the pool (so no flood of other calls can take it)."""
    _reserving: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    answered: bool = field(default=False, init=False)
    """Whether a ping of its store was answered: from then it serves, and a refusal of its
    database is the server changing under it, not the setting (see :func:`unusable_db`)."""
    _idle: list[aioredis.Connection] = field(default_factory=list, init=False, repr=False)
    """Connections taken from the pool by :meth:`call` and kept for its next calls: each
    has read every answer to what was sent on it (a call that fails any other way than by
    Redis's own error reply closes its connection and gives it back to the pool). At most
    half the pool (:meth:`_keep`), so other users of the client always find connections."""
    counted: CallCount = field(init=False, repr=False)
    """The calls sent on a kept connection and what came of them, counted with the client's
    own commands (see :meth:`_take`)."""
    _subscriptions: _SubscriptionPool | None = field(default=None, init=False, repr=False)
    """Where :meth:`pubsub`'s subscriptions take their connections (one Redis)."""

    def __post_init__(self) -> None:
        client = self.client
        self.counted = (client.counted if isinstance(client, _CountedRedis | _Cluster)
                        else CallCount())
        pool = self._pool()
        if pool is not None:
            pool.waiting = self._give_idle_back

    def _pool(self) -> _TurnsPool | None:
        """The waiting pool of one Redis (direct or through Sentinel)."""
        client = self.client
        if isinstance(client, aioredis.Redis) and isinstance(client.connection_pool, _TurnsPool):
            return client.connection_pool
        return None

    def _give_idle_back(self) -> None:
        """A caller waits for a pooled connection: the kept ones are handed to the callers
        waiting, oldest first, rather than wait idle for this client's next call."""
        pool = self._pool()
        idle = self._idle
        while idle and pool is not None and pool.hand_over(idle[-1]):
            idle.pop()

    @property
    def cluster(self) -> bool:
        """Whether this is a Redis Cluster (keys a call touches must share one slot)."""
        return not one_redis(self.client)

    async def call(self, *args: Any) -> Any:
        """One command and its answer (decoded as the client's commands are; an error reply
        raises ``ResponseError``), on a kept connection (see the class)."""
        client = self.client
        if not one_redis(client):
            return await client.execute_command(*args)
        idle = self._idle
        connection = idle.pop() if idle else await self._take(client)
        try:
            packed = _packed(connection, (args,))
        except BaseException:
            await self._discard(connection)
            raise
        return await self._one(connection, packed)

    async def call_reserved(self, *args: Any) -> Any:
        """:meth:`call` on a connection of its own, outside the pool, for the calls that
        must not wait behind a flood of others (the waiter heartbeat: a replica whose
        heartbeat waited out the pool's bound for 5 s had its own waiters passed over as a
        dead replica's; a waiter's confirmation of its grant, which lapses 5 s after it is
        made). On a cluster, sent without a turn (:meth:`_Cluster.out_of_turn`): taking one,
        the heartbeat waited out ``POOL_WAIT`` behind the flood every second, and after 5 s
        the replica's waiters were passed over."""
        client = self.client
        if not one_redis(client):  # (asked first: a waiter's confirmation of its grant)
            if isinstance(client, _Cluster):
                async with self._reserving:
                    return await client.out_of_turn(*args)
            return await client.execute_command(*args)
        async with self._reserving:
            connection = self._reserved
            if connection is None:
                connection = self._reserved = (
                    client.connection_pool.make_connection())  # type: ignore[no-untyped-call]
            try:
                if not connection.is_connected:
                    await connection.connect()
                await _send(connection, _packed(connection, (args,)))
                answer = (await _answers(connection, 1))[0]
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            if isinstance(answer, rexc.ResponseError):
                # (a refusal such as READONLY, from a master that became a replica: the next
                # call connects anew, to wherever the address or Sentinel leads now)
                await connection.disconnect(nowait=True)
                raise answer
        return answer

    async def call_packed(self, packed: bytes) -> Any:
        """:meth:`call` of a command its caller packed in RESP (``hiredis.pack_command``'s
        bytes; see :func:`resp_body`). One Redis only: a cluster's client finds a command's
        node from its arguments, so there it is :meth:`call`."""
        client = self.client
        assert one_redis(client)
        idle = self._idle
        connection = idle.pop() if idle else await self._take(client)
        return await self._one(connection, packed)

    async def _one(self, connection: aioredis.Connection, packed: bytes) -> Any:
        """Send ``packed`` (one command) on ``connection``, taken from :attr:`_idle` or the
        pool, and read its answer; the connection is kept or given back (see :meth:`call`)."""
        counted = self.counted
        counted.sent += 1
        try:
            await _send(connection, packed)
            answer = (await _answers(connection, 1))[0]
        except BaseException:
            counted.failed += 1
            await self._discard(connection)
            raise
        counted.answers += 1
        counted.answered_at = monotonic()
        await self._done(connection)
        if isinstance(answer, rexc.ResponseError):  # Redis answered: the connection is good
            raise answer
        return answer

    async def call_all(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Several commands sent at once and their answers, in order (a pipeline, on a kept
        connection like :meth:`call`'s); an error reply raises once every answer is read.

        On one Redis the commands are packed by hiredis into one buffer, sent in one write,
        and their answers taken from the connection's hiredis reader as they come, one socket
        read for as many answers as it holds: redis-py's ``read_response`` per answer (two
        coroutines, its timeout and error wrapping, a check for a push message) cost about
        as much again as packing and parsing them. On a Redis Cluster, redis-py's pipeline
        (it finds each command's node and follows a slot that moved)."""
        client = self.client
        if isinstance(client, _Cluster):
            return await client.in_turn(self._pipelined(client, commands))
        assert one_redis(client)
        idle = self._idle
        connection = idle.pop() if idle else await self._take(client)
        counted = self.counted
        counted.sent += 1
        try:
            await _send(connection, _packed(connection, commands))
            answers = await _answers(connection, len(commands))
        except BaseException:
            counted.failed += 1
            await self._discard(connection)
            raise
        counted.answers += 1
        counted.answered_at = monotonic()
        await self._done(connection)
        for answer in answers:
            if isinstance(answer, rexc.ResponseError):
                raise answer
        return answers

    @staticmethod
    async def _pipelined(client: RedisCluster, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute()

    async def _take(self, client: aioredis.Redis) -> aioredis.Connection:
        """A connection from the pool (waiting for one, up to the pool's own limit).

        No connection free within ``POOL_WAIT`` is the replica's overload (``StoreBusy``, see
        :func:`down`) only while Redis answers: see :class:`CallCount` (the calls on kept
        connections and the client's own commands are counted together)."""
        pool = client.connection_pool
        answers, failed = self.counted.answers, self.counted.failed
        waits = isinstance(pool, _TurnsPool) and (pool.queued or pool.full)
        try:
            taken: aioredis.Connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            if waits:
                _sent_now()
        except rexc.ConnectionError as error:
            stuck = self.counted.stuck(answers, failed) if pool_exhausted(error) else None
            if stuck is not None:
                raise stuck from None
            raise
        return taken

    async def _done(self, connection: aioredis.Connection) -> None:
        """Hand ``connection`` to the oldest caller waiting in the pool, if one waits; else
        keep it for the next call, or give it back (as many kept already as :meth:`_keep`
        allows)."""
        assert one_redis(self.client)
        pool = self.client.connection_pool
        if isinstance(pool, _TurnsPool) and pool.hand_over(connection):
            return
        if len(self._idle) < self._keep():
            self._idle.append(connection)
        else:
            await pool.release(connection)

    async def _discard(self, connection: aioredis.Connection) -> None:
        """A call was cut off (cancelled, timed out, the connection broke): an answer may
        still be on its way, so the connection is closed before the pool sees it again."""
        await connection.disconnect(nowait=True)
        assert one_redis(self.client)
        await self.client.connection_pool.release(connection)

    def _keep(self) -> int:
        """How many connections :meth:`call` keeps: half the pool (none with a pool of 1)."""
        assert one_redis(self.client)
        return int(self.client.connection_pool.max_connections) // 2

    async def _release_idle(self) -> None:
        """Give the kept connections back to the pool."""
        idle, self._idle = self._idle, []
        if idle:
            assert one_redis(self.client)
            for connection in idle:
                await self.client.connection_pool.release(connection)

    async def drop_idle(self) -> None:
        """Close the idle pooled connections (after a failure they are likely all stale)."""
        if isinstance(self.client, RedisCluster):
            for node in self.client.get_nodes():
                await node.disconnect_free_connections()
            return
        await self._release_idle()
        pool = self.client.connection_pool
        await pool.disconnect(inuse_connections=False)

    async def pubsub(self, channel: str) -> PubSub | ClusterPubSub:
        """A pub/sub connection that hears ``channel``. On a cluster, classic pub/sub is
        cluster-wide (a ``PUBLISH`` on any node reaches subscribers on every node); the
        subscription goes to the node of the channel's slot, which the client knows once it
        has asked the cluster for its slots (a replica whose first call waits subscribes
        before any other command)."""
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()  # at once when it has the slots already
            return self.client.pubsub(node=self.client.get_node_from_key(channel))
        # On one Redis, on a connection of its own, beside the pool (see _SubscriptionPool).
        return PubSub(self._subscription_pool())

    def _subscription_pool(self) -> _SubscriptionPool:
        assert one_redis(self.client)
        if self._subscriptions is None:
            self._subscriptions = _SubscriptionPool(self.client.connection_pool)
        return self._subscriptions

    async def open_subscription(self) -> None:
        """Open the subscription's connection ahead of the first waiter (one Redis; once):
        opened by the first waiter of a flood, its handshake waited behind the flood's
        requests on the event loop and could run past ``CONNECT_TIMEOUT``. Best effort:
        one that fails to open is opened again when it is needed."""
        if isinstance(self.client, RedisCluster) or self._subscriptions is not None:
            return
        pool = self._subscription_pool()
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        except DOWN:
            return
        await pool.release(connection)

    def scrub(self, text: str) -> str:
        """``text`` with the password masked (belt and braces: libraries should not echo it)."""
        return text.replace(self.secret, SECRET_MASK) if self.secret else text

    async def close(self) -> None:
        if isinstance(self.client, RedisCluster):
            await self.client.aclose()
        else:
            await self._release_idle()
            if self._reserved is not None:
                await self._reserved.disconnect()
            if self._subscriptions is not None:
                await self._subscriptions.disconnect()
            await self.client.aclose(close_connection_pool=True)
        for sentinel in self.sentinels:
            await sentinel.aclose(close_connection_pool=True)


RETRYABLE: tuple[type[BaseException], ...] = (rexc.ConnectionError, rexc.TimeoutError)
"""A broken or stale connection: worth one more try on a fresh one (not a refusal)."""


def will_not_serve(error: BaseException | None) -> bool:
    """Redis answered the call with a refusal that is about Redis, not about the call: out of
    memory under ``maxmemory`` (``OOM``), busy with a script past its time limit (``BUSY``), a
    master short of replicas under ``min-replicas-to-write`` (``NOREPLICAS``), or an ACL user
    denied a command or key a script touches (Redis 7.0 answers a script's denied command with
    "The user executing the script can't ..." rather than ``NOPERM``, which is in
    :data:`DOWN`). Like :data:`DOWN`, an outage (``BackendUnavailable``), not retried: raised
    as the bare ``ResponseError`` it would be a 500. A refusal a script met and raised again
    (``lua/lib.lua``'s ``run``) reaches us as ``ERR`` followed by Redis's own code (``ERR OOM
    command not allowed ...``, on Redis 6.2, where a script's first write can be refused so):
    redis-py then names no class of its own, and the code is found at the start of the text."""
    if isinstance(error, rexc.OutOfMemoryError):
        return True
    if not isinstance(error, rexc.ResponseError):
        return False
    text = str(error)
    return text.startswith(_REFUSALS) or _SCRIPT_ACL in text


_REFUSALS = ("BUSY ", "NOREPLICAS ", "OOM ", "READONLY ", "NOPERM ", "MASTERDOWN ", "LOADING ")
"""Redis's codes of a refusal about itself, as the text of a plain ``ResponseError``."""


_SCRIPT_ACL = "The user executing the script can't"
"""How Redis 7.0 begins its refusal of a command or key an ACL denies inside a script."""


def wrong_type(error: rexc.ResponseError) -> bool:
    """Redis refused a command on a key of another type than the command's (``WRONGTYPE``):
    something else wrote there."""
    return "WRONGTYPE" in str(error)


def key_beside(stream: str, kind: str, name: str) -> str:
    """A key that goes with ``stream`` (a writer key of the events, the audit trail's list of
    refusals): it starts with the stream's name (so with the key prefix, which ACL key
    patterns name) and is in the stream's hash slot (a script's keys must share one on a
    Redis Cluster): ``{stream}-{kind}:{name}`` when the name has a hash tag (the same tag),
    else ``{stream}-{kind}:{{stream}}:{name}`` (the whole name as its tag: the slot is the
    whole name's); a name that allows neither (a brace in it but no tag) gets a number after
    ``name``, the first that gives the slot."""
    slot = key_slot(stream.encode())
    for key in (f"{stream}-{kind}:{name}", f"{stream}-{kind}:{{{stream}}}:{name}"):
        if key_slot(key.encode()) == slot:
            return key
    return next(key for n in itertools.count()
                if key_slot((key := f"{stream}-{kind}:{name}:{n}").encode()) == slot)


REPLACE_WRITTEN_OVER = redis_lua.standalone("replace_written_over")
"""Run (``register_script``) after a ``WRONGTYPE`` at a key of the service's own, so that
the next write there makes it anew; the check and the delete are one step, so a key another
replica has just made anew is kept (``lua/standalone/replace_written_over.lua``)."""




async def again_if_written_over(replace: AsyncScript, key: str, kind: str,
                                call: Callable[[], Awaitable[_T]],
                                replaced: Callable[[str], None]) -> _T:
    """``call``, made once more when Redis refused it for ``key`` holding another Redis type
    than ``kind`` (written over by something else): ``replace`` (the registered
    :data:`REPLACE_WRITTEN_OVER`) deletes what stands there first, and ``replaced`` is told
    the type it deleted (not when another replica replaced it first). A second such refusal
    is raised (``wrong_type``), as is any other error."""
    try:
        return await call()
    except rexc.ResponseError as error:
        if not wrong_type(error):
            raise
    found = str(await replace(keys=[key], args=[kind]))
    if found:
        replaced(found)
    return await call()


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, RETRYABLE) and not isinstance(
        error, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError,
    ) and not pool_exhausted(error)


def pool_exhausted(error: BaseException) -> bool:
    """Whether ``error`` is the pool's: no connection was free within ``POOL_WAIT`` (the call
    was never sent; nothing is wrong with a connection, so none is dropped or tried again)."""
    return type(error) is rexc.ConnectionError and str(error) == POOL_EXHAUSTED


class _Sent:
    """When a call under :func:`within_limit` that waited for a pooled connection was sent
    (:attr:`at`, the loop's time; None once the call ended), and whether its limit was armed
    again from then (:attr:`rearmed`)."""

    __slots__ = ("at", "rearmed")

    def __init__(self, at: float) -> None:
        self.at: float | None = at
        self.rearmed = False


_SENT: dict[asyncio.Task[Any], _Sent] = {}
"""By task: its call's :class:`_Sent` (see :func:`_sent_now`). Only tasks whose calls waited
are here, until they end."""

BUSY_LIMIT = 3 * COMMAND_TIMEOUT
"""Seconds, from its send, a call waits for its answer while Redis answers the client's other
calls (:class:`_Limit`): Redis is there and busy (or this process's event loop is), not
stopped. Past it the call is given up as one Redis did not answer."""


class _Limit:
    """The limit of one call under :func:`within_limit` (or of the calls of an
    :class:`unavailable` block): the timer armed now, whether it ran
    out (:attr:`expired`), and how it tells a Redis that does not answer from one that is slow.

    When the ``seconds`` run out the call is not given up at once: first the loop turns
    :data:`GRACE_TURNS` times (an answer read in the turn that ran the timer reaches the call
    only in a later one: after an event loop stalled past the limit, by a flood of requests on
    a loaded machine, the answer and the timer come due together, and the call was told Redis
    did not answer though its answer lay read); then, if Redis answered any of the client's
    calls (:class:`CallCount`) since the limit was armed, and its latest answer is less than
    ``seconds`` old, it is armed again to ``seconds`` after that answer, up to
    :data:`BUSY_LIMIT` from the send. A Redis
    that answers nothing for ``seconds`` (stopped, frozen, cut off) ends the call ``seconds``
    after its last answer (at the call's ``seconds`` when that came before the send), not a
    second ``seconds`` later because an answer came while the call was under way."""

    __slots__ = ("answers", "counted", "due", "expired", "queue", "since", "timer")

    def __init__(self, counted: CallCount | None, since: float) -> None:
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None
        """The timer or turn of the loop armed for it once its first ``seconds`` ran out (a
        turn of grace, a wait armed again); None before (:attr:`queue`) and once it ended."""
        self.queue: _Due | None = None
        """The line of limits it waits in for its first ``seconds`` (:class:`_Due`); None once
        they ran out or the call ended."""
        self.due = 0.0
        """The loop's time its first ``seconds`` run out."""
        self.expired = False
        self.counted = counted
        self.answers = counted.answers if counted is not None else 0
        self.since = since
        """The loop's time the call counts from (its send)."""


def _expire(task: asyncio.Task[Any], limit: _Limit, seconds: float) -> None:
    loop = task.get_loop()
    sent = _SENT.get(task)
    if sent is not None and sent.at is not None and not sent.rearmed:
        sent.rearmed = True
        due = sent.at + seconds
        if due > loop.time():  # it waited for a connection: its limit counts from the send
            limit.since = sent.at
            limit.timer = loop.call_at(due, _expire, task, limit, seconds)
            return
    _after_turn(task, limit, seconds)


def _after_turn(task: asyncio.Task[Any], limit: _Limit, seconds: float,
                turns: int = GRACE_TURNS) -> None:
    # (answers read in the turn that ran the timer reach their calls, and are counted by
    # them, in the turns after it)
    limit.timer = task.get_loop().call_soon(_expire_after_turn, task, limit, seconds, turns - 1)


def _expire_after_turn(task: asyncio.Task[Any], limit: _Limit, seconds: float,
                       turns: int) -> None:
    if turns:
        _after_turn(task, limit, seconds, turns)
        return
    counted = limit.counted
    if counted is not None and counted.answers != limit.answers:
        now = task.get_loop().time()
        most = limit.since + BUSY_LIMIT
        quiet = monotonic() - counted.answered_at  # since Redis last answered any call
        if now < most and quiet < seconds:
            # Redis answers other calls: it is there, this one is behind them. Waited for
            # until Redis has answered nothing for ``seconds``: an answer that came just
            # before Redis stopped buys this call no second ``seconds``.
            limit.answers = counted.answers
            limit.timer = task.get_loop().call_at(min(now + seconds - quiet, most),
                                                  _after_turn, task, limit, seconds)
            return
    limit.timer = None
    limit.expired = True
    task.cancel()


def _sent_now() -> None:
    """The call under :func:`within_limit` waited for a pooled connection and is sent now:
    its limit counts from here. The wait has its own bound (``POOL_WAIT``, an overload);
    counted inside the call's limit, a call that waited most of it was left too little for
    Redis's answer on an event loop a flood keeps busy, and was told Redis did not answer
    (``unavailable``: a router fell back to legacy) while Redis answered every call."""
    task = asyncio.current_task()
    if task is None:
        return
    sent = _SENT.get(task)
    if sent is None:  # (kept, cleared, while the task lives; gone with it)
        task.add_done_callback(_forget_sent)
        _SENT[task] = _Sent(task.get_loop().time())
    else:
        sent.at, sent.rearmed = task.get_loop().time(), False


def _forget_sent(task: asyncio.Task[Any]) -> None:
    _SENT.pop(task, None)


def _unsent(task: asyncio.Task[Any]) -> None:
    sent = _SENT.get(task)
    if sent is not None:
        sent.at = None


async def within_limit(call: Coroutine[Any, Any, _T], seconds: float = COMMAND_TIMEOUT, *,
                       counted: CallCount | None = None) -> _T:
    """``await call`` within ``seconds``, else ``TimeoutError``: what
    ``asyncio.timeout`` does (a timer on the loop cancels the task; that cancellation, and
    only that one, comes out as ``TimeoutError``; a caller's own stays a cancellation), with
    the limit's entry in its loop's line (:class:`_Due`, one timer of the loop for all of
    them) instead of its ``Timeout`` object, states and timer handle: 35k client instructions
    a call, then 17k with a timer handle of its own (2,000 of each around
    ``asyncio.sleep(0)``, less the loop without them), now about 10k fewer; every call of the
    store's scripts takes one. A call that waited for
    a pooled connection has its ``seconds`` counted from when it was sent (:func:`_sent_now`).
    Given the client's ``counted`` calls, a call whose Redis answers others is waited for
    longer (:class:`_Limit`). The calls through redis-py's own commands take the same limit
    as a block (:class:`unavailable`)."""
    task = asyncio.current_task()
    assert task is not None
    limit = _armed(task, seconds, counted)
    cancelling = task.cancelling()
    try:
        answer = await call
    except BaseException as error:
        if _ended(task, limit, cancelling, error):
            raise TimeoutError from error
        raise
    _ended(task, limit, cancelling, None)  # (answered in its turn of grace: taken back)
    return answer


class _Due:
    """The limits of ``seconds`` armed on one event loop and not yet ended, in the order they
    come due, behind one timer of the loop: a limit armed is an entry put in, one ended an
    entry taken out, each a dict's step, where a timer of its own each was a ``TimerHandle``
    made, pushed on the loop's heap (its comparisons in Python), cancelled, and popped again
    when it came to the head; about 10k client instructions a call (counted under callgrind,
    docs/03-redis.md). Limits of one length armed one after the other come due in the order
    they were armed (the loop's clock does not go back), so the timer is armed at the first
    one's time; when it runs, every limit whose time came is handed to :func:`_expire` as its
    own timer would have been, in that order, and the timer is armed at the next one's."""

    __slots__ = ("__weakref__", "limits", "loop", "seconds", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop = weakref.ref(loop)
        self.seconds = seconds
        self.limits: dict[_Limit, asyncio.Task[Any]] = {}
        self.timer: asyncio.TimerHandle | None = None
        """Armed at the time of the first limit (or earlier) while there is one."""

    def put(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any],
            limit: _Limit) -> None:
        limit.queue = self
        self.limits[limit] = task
        if self.timer is None:
            self.timer = loop.call_at(limit.due, self._come_due)

    def _come_due(self) -> None:
        self.timer = None
        loop = self.loop()
        if loop is None:
            return
        now, limits = loop.time(), self.limits
        while limits:
            limit = next(iter(limits))
            if limit.due > now:
                self.timer = loop.call_at(limit.due, self._come_due)
                return
            task = limits.pop(limit)
            limit.queue = None
            _expire(task, limit, self.seconds)


_DUE: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, _Due]] = (
    weakref.WeakKeyDictionary())
"""Each event loop's lines of limits (:class:`_Due`), by their length in seconds."""

_LAST_DUE: list[_Due] = []
"""The line the last limit was armed in: the next is nearly always armed in it too (one loop,
:data:`COMMAND_TIMEOUT`), found without a look-up by loop."""


def _due(loop: asyncio.AbstractEventLoop, seconds: float) -> _Due:
    """The line of limits of ``seconds`` on ``loop``."""
    if _LAST_DUE:
        last = _LAST_DUE[0]
        if last.seconds == seconds and last.loop() is loop:
            return last
    lines = _DUE.get(loop)
    if lines is None:
        lines = _DUE[loop] = {}
    line = lines.get(seconds)
    if line is None:
        line = lines[seconds] = _Due(loop, seconds)
    _LAST_DUE[:] = [line]
    return line


def _armed(task: asyncio.Task[Any], seconds: float, counted: CallCount | None) -> _Limit:
    """The limit of a call of ``task`` starting now (see :class:`_Limit`), armed."""
    loop = task.get_loop()
    now = loop.time()
    limit = _Limit(counted, now)
    limit.due = now + seconds
    _due(loop, seconds).put(loop, task, limit)
    return limit


def _ended(task: asyncio.Task[Any], limit: _Limit, cancelling: int,
           error: BaseException | None) -> bool:
    """``limit`` disarmed, its call of ``task`` ended (raising ``error``; None: answered),
    ``cancelling`` being the task's count of cancellations when it was armed: whether
    ``error`` is the limit's own cancellation (the call did not end in time: to be raised as
    ``TimeoutError``). A cancellation of the limit's that the call did not end on is taken
    back, as ``asyncio.timeout`` does."""
    _end(task, limit)
    if not limit.expired:
        return False
    return task.uncancel() <= cancelling and isinstance(error, asyncio.CancelledError)


def _end(task: asyncio.Task[Any], limit: _Limit) -> None:
    queue = limit.queue
    if queue is not None:
        limit.queue = None
        del queue.limits[limit]
    elif limit.timer is not None:
        limit.timer.cancel()
    if _SENT:
        _unsent(task)


_SENTINEL_CLIENT = re.compile(r"<redis\.asyncio\.client\.Redis\((.*?)\)> - (?:network:)?")
_ADDRESS = re.compile(r"[(,]host=([^,]*),port=([0-9]+),")


def _named_sentinel(match: re.Match[str]) -> str:
    address = _ADDRESS.search(match.group(1))
    return f"sentinel {address.group(1)}:{address.group(2)}: " if address else "sentinel: "


def _named_sentinels(detail: str) -> str:
    """``detail`` with each Sentinel that failed named by its address: redis-py's
    ``MasterNotFoundError`` shows the whole client of each (its pool and its settings, some
    1,500 characters) before what went wrong with it."""
    return _SENTINEL_CLIENT.sub(_named_sentinel, detail)


def down(
    connection: RedisConnection, action: str, error: BaseException, *, key: str | None = None,
    seconds: float = COMMAND_TIMEOUT,
) -> BackendUnavailable:
    """The ``BackendUnavailable`` that says what failed, without the password.

    A call cut off by its own limit (``asyncio.timeout`` of ``seconds``, or
    :func:`within_limit`'s: a bare ``TimeoutError``) says so, rather than a
    bare timeout: Redis took the call and never answered (stopped, or far too busy), which
    is not a refused connection. The pool's wait for a free connection past ``POOL_WAIT`` is
    ``StoreBusy``: the service is overloaded, Redis answers."""
    if pool_exhausted(error):
        return StoreBusy(
            f"redis {connection.where}: no free connection within {POOL_WAIT:g} s (all "
            "enhanced-locking-redis-pool-size connections are busy with other calls); retry "
            "after the Retry-After seconds", key=key)
    if type(error) is TimeoutError and not error.args:
        return BackendUnavailable(
            f"redis {connection.where} did not answer ({action}): no answer within the "
            f"call's {seconds:g} s limit", key=key)
    detail = _named_sentinels(connection.scrub(str(error) or type(error).__name__))
    # (an ACL's refusal inside a script is named as redis-py names one outside: see
    # ``will_not_serve``)
    kind = "NoPermissionError" if _SCRIPT_ACL in detail else type(error).__name__
    return BackendUnavailable(
        f"redis {connection.where} did not answer ({action}): {kind}: {detail}",
        key=key,
    )


def unusable_db(connection: RedisConnection, error: BaseException | None, *,
                key: str | None = None) -> UnusableSetting | BackendUnavailable | None:
    """A Redis that refuses the configured database number (its ``SELECT`` when a connection
    opens); None for any other error. Before the connection was ever answered (a start, a
    config applied, an import) it is the user's enhanced-locking-redis-db: ``UnusableSetting``
    (exit 2). Once it was (:attr:`RedisConnection.answered`), the server changed under the
    running service (restarted with fewer databases): the store is unusable as configured, an
    outage like any other, ``BackendUnavailable`` (the fall-back to legacy, else 503)."""
    if not (isinstance(error, rexc.ResponseError) and str(error).startswith(
            "DB index is out of range")):
        return None
    if connection.answered:
        return BackendUnavailable(
            f"redis {connection.where} refused enhanced-locking-redis-db: the server has no "
            "such database any more (DB index is out of range: restarted with fewer "
            "databases?)", key=key)
    return UnusableSetting(
        "enhanced-locking-redis-db", f"redis {connection.where}: the server has no such "
        "database (DB index is out of range; its databases setting says how many it has)")


def refused_login(connection: RedisConnection,
                  error: BaseException | None) -> UnusableSetting | None:
    """Redis refusing the login of a connection as it opens (its ``AUTH``/``HELLO``: a wrong
    password, a user it lacks or has disabled, a password it needs and was not given) before
    the connection was ever answered (a start, a config applied, an import): the user's
    ``enhanced-locking-redis-password`` (and ``-username``), ``UnusableSetting`` (exit 2),
    never with the password's value. None for any other error, and once the connection was
    answered (:attr:`RedisConnection.answered`): a password changed under the running service
    is an outage like any other (``down``)."""
    if connection.answered or not isinstance(
            error, rexc.AuthenticationError | rexc.AuthenticationWrongNumberOfArgsError):
        return None
    reason = connection.scrub(str(error) or type(error).__name__)
    if connection.username:
        login = (f"the login of user {connection.username!r} "
                 "(enhanced-locking-redis-username) with this password")
    else:
        login = "this password" if connection.secret else "a login without a password"
    return UnusableSetting("enhanced-locking-redis-password",
                           f"redis {connection.where} refused {login}: {reason}")


class unavailable:  # used like contextlib.suppress
    """Redis unreachable, slow, loading, read-only or refusing us: ``BackendUnavailable``.

    ``async with unavailable(connection, "acquire", key=k):`` also bounds the calls inside to
    ``seconds`` (connections have no socket timeout of their own, see ``COMMAND_TIMEOUT``),
    as :func:`within_limit` bounds a script's call: an answer read in the turn the limit came
    due is taken, and while Redis answers the client's other calls the block is waited for
    up to ``BUSY_LIMIT`` (:class:`_Limit`); plain ``with`` only translates the errors.
    """

    def __init__(self, connection: RedisConnection, action: str, *, key: str | None = None,
                 seconds: float = COMMAND_TIMEOUT, login: bool = False) -> None:
        """``login``: the call is a store's first (its ping), where a refused login is the
        user's setting (:func:`refused_login`)."""
        self.connection = connection
        self.login = login
        self.action = action
        self.key = key
        self.seconds = seconds
        self._task: asyncio.Task[Any] | None = None
        self._limit: _Limit | None = None
        self._cancelling = 0

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> Literal[False]:
        if self.login and (refused := refused_login(self.connection, error)) is not None:
            raise refused from None
        if error is not None and (isinstance(error, DOWN) or will_not_serve(error)):
            raise down(self.connection, self.action, error, key=self.key,
                       seconds=self.seconds) from None
        if (unusable := unusable_db(self.connection, error, key=self.key)) is not None:
            raise unusable from None
        return False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task, self._cancelling = task, task.cancelling()
        self._limit = _armed(task, self.seconds, self.connection.counted)

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> Literal[False]:
        assert self._task is not None and self._limit is not None
        if _ended(self._task, self._limit, self._cancelling, error):
            error = TimeoutError()  # the limit passed: the calls were cut off
        return self.__exit__(kind, error, trace)


def _tls_kwargs(config: EnhancedLockingConfig) -> dict[str, Any]:
    if not config.redis_tls:
        return {}
    kwargs: dict[str, Any] = {"ssl": True}
    if config.redis_tls_skip_verify:
        kwargs.update(ssl_cert_reqs=ssl.CERT_NONE, ssl_check_hostname=False)
    if config.redis_tls_ca_file:
        kwargs["ssl_ca_certs"] = config.redis_tls_ca_file
    if config.redis_tls_cert_file:
        kwargs.update(ssl_certfile=config.redis_tls_cert_file,
                      ssl_keyfile=config.redis_tls_key_file)
    return kwargs


def connection_kwargs(config: EnhancedLockingConfig) -> dict[str, Any]:
    """What every connection to a data node is opened with."""
    password = config.redis_password.get_secret_value()
    return {
        "db": config.redis_db,
        "username": config.redis_username or None,
        "password": password or None,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": None,  # see COMMAND_TIMEOUT
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": True,
        "client_name": "enhanced-locking",
        **_tls_kwargs(config),
    }


def connect(config: EnhancedLockingConfig) -> RedisConnection:
    """A client for the configured Redis (nothing is sent until the first command)."""
    kwargs = connection_kwargs(config)
    secret = config.redis_password.get_secret_value()
    if config.redis_sentinel_addrs:
        # Sentinels are asked with the same TLS settings but no credentials: the password and
        # ACL user are the data nodes'. Sentinels that require a password are not supported.
        # Untyped before redis 8.2, typed from it: either version passes.
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            [_host_port(addr) for addr in config.redis_sentinel_addrs],
            sentinel_kwargs={
                "socket_connect_timeout": SENTINEL_WAIT,
                "socket_timeout": SENTINEL_WAIT,
                "retry": Retry(NoBackoff(), 0),
                **_tls_kwargs(config),
            },
            **kwargs,
        )
        for asked in sentinel.sentinels:
            asked.connection_pool.connection_class = (
                _SentinelSSLConnection if config.redis_tls else _SentinelConnection)
        client = sentinel.master_for(
            config.redis_sentinel_master, redis_class=_CountedRedis,
            connection_pool_class=_WaitingSentinelPool,
            max_connections=config.redis_pool_size, timeout=POOL_WAIT,
            connection_class=_HiredisSentinelSSLConnection if config.redis_tls
            else _HiredisSentinelConnection,
        )
        where = (f"master {config.redis_sentinel_master!r} via sentinels "
                 f"{','.join(config.redis_sentinel_addrs)} db {config.redis_db}")
        return RedisConnection(client, where, secret, sentinels=list(sentinel.sentinels),
                               username=config.redis_username)
    host, port = _host_port(config.redis_addr)
    if config.redis_cluster:
        # Nodes are found from this one (CLUSTER SLOTS); a MOVED answer updates the slot map.
        # Only db 0 exists on a cluster (the config refuses another).
        cluster = _Cluster(
            host=host, port=port, calls=config.redis_pool_size,
            **{k: v for k, v in kwargs.items() if k not in ("db", "retry")},
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        )
        return RedisConnection(cluster, f"cluster via {config.redis_addr}", secret,
                               username=config.redis_username)
    pool = _TurnsPool(
        host=host, port=port, max_connections=config.redis_pool_size, timeout=POOL_WAIT,
        connection_class=HiredisSSLConnection if config.redis_tls else HiredisConnection,
        **{k: v for k, v in kwargs.items() if k != "ssl"},
    )
    client = _CountedRedis(connection_pool=pool)
    return RedisConnection(client, f"{config.redis_addr} db {config.redis_db}", secret,
                           username=config.redis_username)
