"""Talking to etcd: the client, its settings, and what a failed call means to callers.

The client is ``etcd3aio`` (asyncio over ``grpc.aio``, typed, maintained): it takes several
endpoints and balances across them, speaks TLS with client certificates, keeps an auth token
fresh. ``docs/09-etcd.md`` says why it was chosen over the other asyncio clients. Watches are
driven here over its ``Watch`` stub (:class:`Watch`), not through its own watch, which resumed
a broken stream past history it had not delivered.

Every failure of a call is turned into :class:`~enhanced_locking.types.BackendUnavailable`
naming the endpoints (never the password), which ``/readyz`` reports and the router's
fallback acts on.

A lock step's transaction (every acquire and release) is the one call made on the lock's
path; :class:`TxnCall` sends it through the client's own channel, below grpc.aio's per-call
objects where the installed grpcio is one it was checked against (see its docstring).

**Transactions go to the leader.** The client balances its calls over the members, and a
member that is not the leader forwards a write to the leader and answers only once it has
applied the entry itself: two more hops between members per call than the leader's own
answer. So when there are several endpoints, :class:`EtcdConnection` finds the leader
(``Status`` on each endpoint) and sends the steps' transactions to it alone; everything else
(watches, leases, reads of the event bus) stays on the balanced channel. Any member gives the
same answers (etcd's writes and reads are linearizable on every member), so the route is only
a matter of speed: a call that fails on it drops the route (a read is sent again on the
balanced channel, a write's step runs again), and an answer from a newer raft term looks for
the leader again.

**A frozen member costs a read an attempt, not the call.** The balanced channel's round
keeps a frozen member (its connections stay open); so with several endpoints each attempt of
a read there has its own deadline (``ATTEMPT_TIMEOUT``) and the read is sent again, to the
round's next member, within the call's ``CALL_TIMEOUT`` (:func:`leader_first`,
:meth:`EtcdConnection.transact`). A write (a transaction that writes, a lease grant) is not cut
into short attempts: it keeps the call's whole deadline on the balanced channel, and while the
connection is looking for the leader it waits for the route (``LEADER_WAIT``) rather than be
sent by the round to a member that may be frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import etcd3aio
import grpc
from etcd3aio._protobuf import (
    AuthenticateRequest,
    StatusRequest,
    WatchCreateRequest,
    WatchRequest,
    WatchResponse,
)

from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.types import BackendUnavailable

__all__ = ["ATTEMPT_TIMEOUT", "CALL_TIMEOUT", "DOWN", "MAX_RECEIVE", "RIDE_OPS",
           "WATCH_CHECK",
           "EtcdConnection", "EtcdSettings", "Landing", "LoginRefused", "Passenger", "TxnCall",
           "Watch",
           "WatchCanceled", "WatchEnded", "kv_calls", "leader_first", "refused_watch",
           "stale_token", "unary", "unavailable", "unreachable", "watching"]

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
"""Seconds one call may take, retries included (an election takes about one second)."""
ATTEMPT_TIMEOUT = 1.0
"""Seconds one attempt of a *read* on the balanced channel may take when there are other
members (a frozen process keeps its connections open and answers nothing, and the client's
keepalive does not take it out of the channel's round): the read is then sent again, and the
round gives it to the next member, while the next attempt can end within the call's
``CALL_TIMEOUT`` (:func:`leader_first`, :meth:`EtcdConnection.transact`). A member that was
only slow costs a read more. Writes are never cut so: an attempt whose answer is lost may have
been applied, and a step that ran again would meet its own write."""
LEADER_WAIT = 3.0
"""Seconds a write with no route waits for the leader search under way (after the route was
dropped: an election takes about one second) before it goes on the balanced channel."""
ROUTE_TIMEOUT = 2.0
"""Seconds a call sent to the leader may take before the leader counts as gone: the route is
dropped, a read is sent again on the balanced channel and a write's step runs again (etcd
elects a new leader within about its election timeout, one second by default). Longer than
a read's attempt on the balanced channel: by then a new leader is elected, and two attempts
there still fit in the call's time, the second on another member than the first."""
WATCH_CHECK = 2.0
"""Seconds between the reads that back a watch (a watch is one stream to one member, and a
frozen member sends nothing while its stream stays open): the waiters' notices and the keys
they wait on (``EtcdBackend._follow``, ``EtcdBackend._unserved``), the events key
(``EtcdEventBus._checked``). What such a read finds that its watch has not brought by the
next one starts the watch again."""
WATCH_PAUSE = 0.05
WATCH_PAUSE_MAX = 2.0
"""Seconds a broken watch waits before its stream is opened again on the next member: the
first, after a stream that brought writes; doubled after each stream that broke before it
brought one, up to the second (every member down, or a stream that fails every time)."""
CLOSED = "the connection was closed"
"""The details of the ``CANCELLED`` error a call under way gets when its connection closes."""
AGAIN_PAUSE = 0.1
"""Seconds between the attempts of a call after a refusal (no leader yet, say)."""
STATUS_TIMEOUT = 1.0
"""Seconds a member may take to answer ``Status``: whether it leads (looking for the
leader), and which member it is (a watch's move, :meth:`EtcdConnection.turn_besides`)."""
STATUS_PREFER = 0.1
"""Seconds a watch's move, once an endpoint later in turn has answered that it can take the
watch, still waits for the endpoints before it in turn that have not answered yet (every
endpoint is asked at once, :meth:`EtcdConnection.turn_besides`): a member that answers
``Status`` this much later than another (on loopback a live member answers within a few
milliseconds) is passed over as a frozen one is, rather than cost the move its
``STATUS_TIMEOUT``. The search for the leader, which also asks every endpoint at once, waits
this much after the first claim to lead for the endpoints that have not answered yet
(:meth:`EtcdConnection._find_leader`)."""
REQUIRE_LEADER = ("hasleader", "true")
"""The gRPC metadata (etcd's ``rpctypes.MetadataRequireLeaderKey`` and ``MetadataHasLeader``,
what its Go client's ``WithRequireLeader`` sends) with which a member refuses a watch while it
has no leader, and ends a watch under way once it has had none for three of its election
timeouts in a row (``no leader``, gRPC's ``UNAVAILABLE``): a member cut off from the others
keeps serving a watch that can bring nothing, as a frozen one does, but ends it so."""
LEADER_LOOKS = 20
LEADER_PAUSE = 0.25
"""Looking for the leader: up to ``LEADER_LOOKS`` rounds over the endpoints, this many seconds
apart (an election on loopback takes about half a second; past that the balanced channel
serves until the next answer from a new term)."""


T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class EtcdSettings:
    """Where etcd is and how to log in (the password is never part of ``repr``)."""

    endpoints: tuple[str, ...]
    username: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig) -> EtcdSettings:
        return cls(
            endpoints=tuple(config.etcd_endpoints),
            username=config.etcd_username,
            password=config.etcd_password.get_secret_value(),
            tls=config.etcd_tls,
            ca_file=config.etcd_tls_ca_file,
            cert_file=config.etcd_tls_cert_file,
            key_file=config.etcd_tls_key_file,
        )

    @property
    def where(self) -> str:
        return ",".join(self.endpoints)


class Landing(enum.Enum):
    """What became of a transaction a :class:`Passenger` rode in."""

    APPLIED = "applied"
    """Applied: the passenger's own transaction in it answered (``Passenger.landed``)."""
    REFUSED = "refused"
    """Not applied (its guards failed, or etcd refused it): nothing of it was written."""
    UNKNOWN = "unknown"
    """Its answer was lost: it may have been applied, or may still be."""


RIDE_OPS = 2
"""The most operations a passenger's own transaction has in any of its lists (compares,
success, failure): etcd takes a nested transaction only within what the outer one leaves of
its ``--max-txn-ops``, so a transaction boards passengers only while that much is left."""


class Passenger(Protocol):
    """A write behind (the events' outbox) that can ride in a transaction the store sends
    anyway, instead of costing a consensus write of its own (``EtcdBackend.carry``)."""

    def board(self, success: Any) -> bool:
        """Whether the passenger took a seat: a ``TxnRequest`` of its own, added last to
        ``success`` (the success branch of the transaction about to be sent) and filled there
        (it guards itself: the step's guards are the step's; at most ``RIDE_OPS`` operations
        in each of its lists); nothing added when it has nothing to write."""
        ...

    def landed(self, landing: Landing, *, succeeded: bool = False) -> None:
        """Once per boarding: what became of that transaction, and when it was applied whether
        the passenger's nested transaction ``succeeded`` (its own guards held)."""
        ...


def _resolve(endpoints: Sequence[str]) -> tuple[list[str], str | None]:
    """IPv4 ``host:port`` targets (the client balances over addresses, not names), and the
    name the server certificates carry when the endpoints were given by name.

    A name that does not resolve is left out (logged) while another endpoint gives an
    address: a member that is down may have none (a Kubernetes headless Service publishes
    no address for a pod that is not ready), and the others serve. Before, that one name
    failed every connect. The connect fails, naming each endpoint, only when none resolves."""
    targets: list[str] = []
    name: str | None = None
    unresolved: list[str] = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.IPv4Address(host)
            targets.append(endpoint)
            continue
        except ValueError:
            pass
        name = name or host
        try:
            infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        except OSError as error:
            unresolved.append(f"{endpoint}: {error.strerror}")
            continue
        targets.extend(sorted({f"{info[4][0]}:{port}" for info in infos}))
    if unresolved and not targets:
        raise BackendUnavailable(f"etcd endpoint {'; '.join(unresolved)}")
    for failed in unresolved:
        log.warning("etcd endpoint %s; connecting to the others", failed)
    return targets, name


def _tls_files(settings: EtcdSettings) -> dict[str, Any]:
    """The CA and client certificate as the client takes them (read once, at connect)."""
    files: dict[str, Any] = {
        "ca_cert": Path(settings.ca_file).read_bytes() if settings.ca_file else b""}
    if settings.cert_file:
        files["cert_chain"] = Path(settings.cert_file).read_bytes()
        files["cert_key"] = Path(settings.key_file).read_bytes()
    return files


MAX_RECEIVE = 2**31 - 1
"""Bytes of one answer the client takes: etcd's own Go client's default
(``MaxCallRecvMsgSize``, ``math.MaxInt32``), since a range's answer can be far larger than
what etcd takes in a request. gRPC's default, 4 MiB, failed every read of a namespace's whole
lock range (a list, an export, a release by pull) past about 7,000 locks of 600 bytes
(``RESOURCE_EXHAUSTED``, answered unavailable), for good."""


def _new_client(targets: Sequence[str], *, tls_server_name: str | None,
                **tls: Any) -> etcd3aio.Etcd3Client:
    """A client of ``targets`` whose channel takes answers of up to ``MAX_RECEIVE`` bytes
    (the library has no setting for it: its channel options are added to, before
    ``connect`` makes the channel)."""
    client = etcd3aio.Etcd3Client(targets, tls_server_name=tls_server_name, **tls)
    client._manager.grpc_options.append(("grpc.max_receive_message_length", MAX_RECEIVE))
    return client


_DIRECT_GRPC = ("1.85.",)
"""grpcio versions whose asyncio call internals :class:`TxnCall` was checked against (its
direct path reads them); on any other version it takes grpc.aio's public call."""


class TxnCall:
    """``KV.Txn`` of one client: the library's gRPC method, with its channel and its auth
    token (read at every call: the token refresher replaces it), bounded by a gRPC deadline
    of ``CALL_TIMEOUT`` (``ROUTE_TIMEOUT`` on the route to the leader); failures are gRPC's
    own errors (``DOWN``).

    Sent directly, as grpc.aio's call does it (one call on the channel's Cython layer,
    awaited in the caller's task), without grpc.aio's call object, the task it starts for
    each call and the channel's registry of ongoing calls: about 25 µs of the event loop's
    time per call, a tenth of a call's own cost on loopback. Those are private parts of
    grpcio, taken only on the versions in ``_DIRECT_GRPC`` and only for a method without
    interceptors; otherwise (``direct`` is false) the call goes through the method's public
    multicallable. A cancelled caller cancels the call, as grpc.aio's does.

    A direct call is not in the channel's registry, so closing the channel would not end it
    (it would run to its deadline): it is kept in ``flying`` while it runs, and the
    connection's :meth:`EtcdConnection.close` cancels what is there. Its caller then gets
    gRPC's ``CANCELLED`` (a ``DOWN`` error: the step answers ``unavailable``). grpc.aio's
    public call, cancelled by its closing channel, raises ``asyncio.CancelledError`` in a
    caller nobody cancelled: the public path turns that into the same ``CANCELLED`` error
    (a caller that was itself cancelled still gets ``CancelledError``)."""

    __slots__ = ("_call", "_channel", "_decode", "_encode", "_flying", "_handle", "_kv",
                 "_method", "client", "direct", "timeout", "via")

    def __init__(self, client: etcd3aio.Etcd3Client, *,
                 via: etcd3aio.Etcd3Client | None = None, flying: set[Any] | None = None,
                 timeout: float | None = None) -> None:
        """``via``: a client on one member (the leader) whose channel carries the call;
        the auth token is still ``client``'s (etcd's tokens are good on every member).
        ``flying``: where the direct calls under way are kept (the connection's).
        ``timeout``: the call's deadline (default ``ROUTE_TIMEOUT`` on a route,
        ``CALL_TIMEOUT`` else)."""
        self.client = client
        self.via = via
        self._flying: set[Any] = set() if flying is None else flying
        self.timeout = timeout if timeout is not None else (
            CALL_TIMEOUT if via is None else ROUTE_TIMEOUT)
        """The call's gRPC deadline, in seconds."""
        kv = client.kv
        assert kv is not None
        self._kv = kv
        carrier = (via or client).kv
        assert carrier is not None
        self._call: Any = carrier._stub.Txn
        self.direct = False
        try:
            from grpc._cython import cygrpc

            call = self._call
            self._channel = call._channel
            self._method = call._method
            self._handle = call._registered_call_handle
            self._encode = call._request_serializer
            self._decode = call._response_deserializer
            self.direct = (grpc.__version__.startswith(_DIRECT_GRPC)
                           and isinstance(call, grpc.aio.UnaryUnaryMultiCallable)
                           and not call._interceptors and _create_rpc_error is not None
                           and self._encode is not None and self._decode is not None
                           and hasattr(cygrpc._AioCall, "unary_unary"))
        except (ImportError, AttributeError):
            self.direct = False

    def __call__(self, request: Any, timeout: float | None = None) -> Awaitable[Any]:
        """``request`` with the call's deadline, or ``timeout`` seconds if given."""
        metadata: tuple[tuple[str, str], ...] = self._kv._metadata
        deadline = self.timeout if timeout is None else timeout
        if self.direct:
            return self._direct(request, metadata, deadline)
        return self._public(request, metadata, deadline)

    async def _public(self, request: Any, metadata: tuple[tuple[str, str], ...],
                      seconds: float) -> Any:
        try:
            return await self._call(request, metadata=metadata or None, timeout=seconds)
        except asyncio.CancelledError:
            if _cancelled():
                raise  # the caller itself was cancelled
            # Its channel was closed under it (grpc.aio cancels the call): what the direct
            # path answers then, so the caller sees "unavailable" on both paths.
            raise _closed() from None

    async def _direct(self, request: Any, metadata: tuple[tuple[str, str], ...],
                      seconds: float) -> Any:
        call = self._channel.call(self._method, time.time() + seconds, None, None,
                                  self._handle)
        flying = self._flying
        flying.add(call)
        try:
            answer = await call.unary_unary(self._encode(request), metadata, _CENSUS())
        except asyncio.CancelledError:
            if not call.done():
                call.cancel("Locally cancelled by application!")
            raise
        finally:
            flying.discard(call)
        if call.is_ok():
            return self._decode(answer)
        assert _create_rpc_error is not None
        raise _create_rpc_error(call._initial_metadata, call._status)


try:
    from grpc._cython.cygrpc import build_census_context as _census_context
    from grpc.aio._call import _create_rpc_error
except ImportError:  # another grpcio: TxnCall takes the public call
    _create_rpc_error = None
    _census_context = None
_CENSUS: Callable[[], Any] = _census_context or (lambda: None)


class EtcdConnection:
    """One client (one gRPC channel, balanced over the endpoints) to an etcd cluster, opened
    on first use, and the route of the steps' transactions to the leader (see above)."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.where = settings.where
        self._client: etcd3aio.Etcd3Client | None = None
        self._auth: contextlib.AsyncExitStack | None = None
        self.txn: TxnCall | None = None
        """The client's ``KV.Txn`` (set with the client), through the leader once known."""
        self.leader: str | None = None
        """The endpoint (address) the transactions go to; ``None``: the balanced channel."""
        self.leader_changes = 0
        """Routes taken to a leader (tests and the bench read it)."""
        self._targets: list[str] = []
        self._tls: dict[str, Any] = {}
        self._name: str | None = None
        self._members: dict[str, etcd3aio.Etcd3Client] = {}
        """A client per endpoint, to ask it whether it leads and to carry the route."""
        self._term = 0
        """The raft term in which the leader was found (or last heard, without one), in the
        cluster ``_cluster_id``."""
        self._cluster_id = 0
        """The id of the cluster whose answers gave ``_term`` (0: none heard since the
        connection was made or closed)."""
        self._looking: asyncio.Task[None] | None = None
        self._flying: dict[etcd3aio.Etcd3Client, set[Any]] = {}
        """The direct transaction calls under way (``TxnCall``) on each client's channel: the
        current client's, and a client's whose :meth:`close` runs, which that close ends."""
        self._connecting: set[etcd3aio.Etcd3Client] = set()
        """Clients whose connect is under way (the balanced one in :meth:`client`, a
        member's in :meth:`_member`), which :meth:`close` closes."""
        self._closes = 0
        """How many times :meth:`close` ran (a connect under way tells a close by it)."""
        self._login: Callable[[], Awaitable[None]] | None = None
        """A login of the client that replaces its token (with a user; :meth:`renewed`)."""
        self._renewing: asyncio.Task[bool] | None = None
        """The login under way because etcd refused a token (:meth:`renewed`)."""

    async def client(self) -> etcd3aio.Etcd3Client:
        """The client (the balanced channel), connected on first use: with a user, logged in
        and its token kept fresh (the token refresher).

        The client under way is kept in ``_connecting`` while it connects (the login waits
        for etcd's answer), so a :meth:`close` that runs then closes it; the connect, ending
        after that close, keeps nothing (its refresher stopped, its client closed) and fails
        as a closed connection's calls do (``BackendUnavailable``). Before, the close found no
        client, and the connect stored its client and refresher in the closed connection,
        both running for good. Of two connects at once the first to end is kept; the other
        closes what it made."""
        if self._client is not None:
            return self._client
        s = self.settings
        closes = self._closes
        async with unavailable(self, "connect"):
            targets, name = _resolve(s.endpoints)
            tls = _tls_files(s) if s.tls else {}
            client = _new_client(targets, tls_server_name=name if s.tls else None, **tls)
            stack = contextlib.AsyncExitStack()
            self._connecting.add(client)
            try:
                await client.connect()
                if s.username:
                    await stack.enter_async_context(
                        _logged_in(self, client, several=len(targets) > 1))
            except BaseException as error:
                await _shut(client)
                if isinstance(error, asyncio.CancelledError) and not _cancelled():
                    # Its channel was closed under the login (close()), which grpc.aio's call
                    # raises as a cancel of a caller nobody cancelled.
                    raise etcd3aio.EtcdConnectionError(CLOSED) from None
                raise
            finally:
                self._connecting.discard(client)
            if self._closes != closes or self._client is not None:
                with contextlib.suppress(Exception):
                    await stack.aclose()
                await _shut(client)
                kept = self._client
                if self._closes != closes or kept is None:
                    raise etcd3aio.EtcdConnectionError(CLOSED)
                return kept  # another connect ended first
            if s.username:
                self._auth = stack
                self._login = functools.partial(_renew_token, self, client,
                                                several=len(targets) > 1)
            self._targets, self._tls, self._name = targets, tls, name if s.tls else None
            self._flying[client] = set()
            self._client = client
            self.txn = self._balanced(client)
        return client

    async def renewed(self, error: BaseException) -> bool:
        """Whether ``error`` is etcd refusing a call's auth token (:func:`stale_token`) and a
        login has since given the client a new one: the call, which etcd did not apply, may
        then be sent again once. The calls refused together share one login."""
        task = self.renew_token(error)
        if task is None:
            return False
        return await asyncio.shield(task)

    def renew_token(self, error: BaseException) -> asyncio.Task[bool] | None:
        """The login started (or under way) because etcd refused a call with ``error`` for its
        auth token, or ``None`` (another error, no user, closed).

        etcd drops a simple token idle for its ``--auth-token-ttl`` (5 minutes by default),
        a JWT token ends at its own ``ttl``, and a token from before a change of users or
        roles may be refused as from an old auth revision: before, every call was refused
        (503) until the next refresh, up to ``TOKEN_REFRESH`` later."""
        login = self._login
        if login is None or not stale_token(error):
            return None
        task = self._renewing
        if task is None or task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: closing
                task = self._renewing = asyncio.ensure_future(_relogin(self, login))
        return task

    @property
    def several_members(self) -> bool:
        """Whether the balanced channel spans several members (known once connected)."""
        return len(self._targets) > 1

    def _balanced(self, client: etcd3aio.Etcd3Client) -> TxnCall:
        """``KV.Txn`` on the balanced channel, with the call's whole ``CALL_TIMEOUT`` (a
        read there with other members to ask is sent in attempts of ``ATTEMPT_TIMEOUT``)."""
        return TxnCall(client, flying=self._flights(client))

    def _flights(self, client: etcd3aio.Etcd3Client) -> set[Any]:
        """Where the direct calls on ``client``'s channel are kept while they run: the set its
        close ends (a new one, kept by nobody, once that close is over: its channel is closed,
        and a call on it fails at once)."""
        flying = self._flying.get(client)
        return set() if flying is None else flying

    def transact(self, client: etcd3aio.Etcd3Client, request: Any, *,
                 read: bool = False) -> Awaitable[Any]:
        """``request`` (a ``TxnRequest``) through :attr:`txn`: to the leader when known.
        ``read``: it writes nothing (it may be sent again, see :meth:`_routed`)."""
        txn = self.txn
        if txn is None or txn.client is not client:  # the connection was closed meanwhile
            txn = self._balanced(client)
        if txn.via is None and len(self._targets) < 2:
            return txn(request)  # one endpoint: nothing to route, nobody else to ask
        return self._routed(txn, request, read)

    async def _routed(self, txn: TxnCall, request: Any, read: bool) -> Any:
        """The first answer (its term is new) starts looking for the leader: a connection
        that sends no transactions (the event bus's) never looks.

        A read whose attempt fails (no answer within its deadline: a frozen member; or
        refused) is sent again while the next attempt can end within ``CALL_TIMEOUT``: on the
        balanced channel, whose round gives it to the next member. A write is sent once: to
        the leader when the route is known or found within ``LEADER_WAIT`` (a search under
        way), else on the balanced channel with the whole ``CALL_TIMEOUT``. If it fails, the
        route is dropped when it failed there and the step runs again on fresh reads (its
        transaction is guarded by what it read, so a write whose answer was lost never
        applies twice)."""
        if read:
            attempt = ATTEMPT_TIMEOUT if txn.via is None else txn.timeout
        else:
            if txn.via is None:
                txn = await self._route_for_write(txn)
            attempt = txn.timeout
        try:
            answer = await txn(request, attempt)
        except DOWN as error:
            if not read:
                self.route_failed(txn)
                raise
            txn, answer = await self._again(txn, request, error, attempt)
        self._heard(answer.header)
        term = answer.header.raft_term
        if term != self._term:
            if txn.via is None or term > self._term:
                self._look_for_leader()  # a new term may have a new leader
            self._term = max(self._term, term)
        return answer

    def _heard(self, header: Any) -> None:
        """An answer's ``header`` from a cluster other than the one the known term is from
        (restored, or made anew, at the same endpoints: its terms count from its own start)
        makes its terms the ones known, from none: before, the known term only rose, and
        every claim to lead in the new cluster's lower terms was passed over as a former
        leader's, for good (the transactions on the balanced channel)."""
        if int(header.cluster_id) != self._cluster_id:
            self._cluster_id, self._term = int(header.cluster_id), 0

    async def _again(self, txn: TxnCall, request: Any, error: BaseException,
                     attempt: float) -> tuple[TxnCall, Any]:
        """The read ``request`` failed on ``txn`` with ``error`` (an attempt of ``attempt``
        seconds): sent again (see :meth:`_routed`) while an attempt of ``ATTEMPT_TIMEOUT``
        can still end within ``CALL_TIMEOUT`` of the first one's start; the call that
        answered, and its answer. An attempt on a route found meanwhile (a new leader) has
        ``ROUTE_TIMEOUT`` or what is left of the call, the less: before, it had to fit the
        whole ``ROUTE_TIMEOUT``, so a read whose attempt on the balanced channel went to the
        frozen former leader failed 3 s into its 5 s with the new leader known."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CALL_TIMEOUT - (attempt if _timed_out(error) else 0.0)
        while True:
            self.route_failed(txn)
            timed_out = _timed_out(error)
            current = self.txn
            if (not (timed_out or _refused(error)) or current is None
                    or current.client is not txn.client  # closed meanwhile
                    or loop.time() + AGAIN_PAUSE + ATTEMPT_TIMEOUT > give_up):
                raise error
            if not timed_out:
                await asyncio.sleep(AGAIN_PAUSE)
            attempt = (ATTEMPT_TIMEOUT if current.via is None
                       else min(current.timeout, give_up - loop.time()))
            txn = current
            try:
                return txn, await txn(request, attempt)
            except DOWN as again:
                error = again

    async def _route_for_write(self, txn: TxnCall) -> TxnCall:
        """``txn`` (the balanced channel), or the route to the leader if the search under way
        finds it within ``LEADER_WAIT``: a write is not left to the round, which may give it
        to a frozen member for the whole ``CALL_TIMEOUT``."""
        looking = self._looking
        if looking is None or looking.done():
            return txn
        # (asyncio.wait neither cancels the search at the timeout nor raises what ended it:
        # the connection closing cancels it)
        await asyncio.wait((looking,), timeout=LEADER_WAIT)
        current = self.txn
        return current if current is not None and current.client is txn.client else txn

    def route_failed(self, txn: TxnCall) -> None:
        """A call on ``txn`` failed: if it was the route to the leader (still), the leader
        went away or is cut off: back to the balanced channel while the new one is found."""
        if txn.via is not None and self.txn is txn:
            self._unroute()
            self._look_for_leader()

    def carrier(self, member: etcd3aio.Etcd3Client) -> etcd3aio.Etcd3Client:
        """``member`` (the route's client, a watch's) with the current auth token on its
        key-value, lease and watch calls (etcd's tokens are good on every member; the
        refresher renews the balanced client's). A watch applies it at each start: a token
        copied once runs out, and etcd answers a watch opened with it canceled."""
        client = self._client
        if client is not None and client.kv is not None:
            token = client.kv._metadata
            for service in (member.kv, member.lease, member.watch):
                if service is not None:
                    service._metadata = token
        return member

    async def watcher(self, turn: int) -> etcd3aio.Etcd3Client:
        """The client a watch started again goes through at turn ``turn`` (it broke, or was
        behind: its member may be frozen; a move's turn, from :meth:`turn_besides`, skips
        the member it left): the endpoint ``turn`` (counting round them), with the current
        auth token; with one endpoint, the balanced client. Not the balanced channel: its
        round gives a watch the member it gives it, and a watch started again after the same
        number of other calls (a check's reads) went to the same frozen member each time.
        Taken in turn, the members reach one that answers within two turns while two of
        three do."""
        client = await self.client()
        if not self.several_members:
            return client
        async with unavailable(self, "connect"):
            member = await self._member(self._targets[turn % len(self._targets)])
        return self.carrier(member)

    async def turn_besides(self, turn: int, member_id: int) -> int:
        """The first turn from ``turn`` on (see :meth:`watcher`) whose endpoint says it is a
        member other than ``member_id`` (from the answers' headers: the member a watch broke
        on, or is behind on) and that it has a leader; ``turn`` itself with one endpoint, or
        when ``member_id`` is not known (0).

        Every endpoint is asked at once at every move (``Status``, ``STATUS_TIMEOUT`` each;
        moves are rare), and the answers are taken in turn order: the first endpoint in turn
        that can take the watch is taken as soon as every endpoint before it has answered or
        failed, or ``STATUS_PREFER`` after its answer came while one of them has not answered
        yet (frozen, or a host that drops packets: before, each such endpoint cost the move
        its whole ``STATUS_TIMEOUT``, one after the other). The asks still out are then
        cancelled and awaited. An endpoint that does not answer (down, frozen) is passed
        over; a member replaced at the same endpoint (a new id) is told apart from the one
        it replaced; a member without a leader would refuse the stream (``REQUIRE_LEADER``),
        so when no endpoint can take the watch the first other member is taken even so,
        else ``turn``. So a watch that broke is not given the member it broke on again, as
        the turns alone could, when its stream was on the balanced channel (whose member it
        did not pick)."""
        if not member_id or not self.several_members:
            return turn
        count = len(self._targets)
        async with self._asking([self._targets[(turn + step) % count]
                                 for step in range(count)]) as asks:
            step = await _first_in_turn(
                asks, lambda status: _other(status, member_id) and bool(status.leader))
            if step is None:  # every ask ended: none has a leader (an election), or none other
                step = next((step for step, ask in enumerate(asks)
                             if _other(ask.result(), member_id)), 0)
        return turn + step

    @contextlib.asynccontextmanager
    async def _asking(self, targets: Sequence[str]) -> AsyncIterator[list[asyncio.Task[Any]]]:
        """``Status`` asked of every endpoint of ``targets`` at once (:meth:`_answer`, in
        that order); the asks still out at the end are cancelled and awaited, so none is left
        pending (a search or move cancelled by :meth:`close` ends them too)."""
        asks = [asyncio.ensure_future(self._answer(target)) for target in targets]
        try:
            yield asks
        finally:
            for ask in asks:
                ask.cancel()
            await asyncio.wait(asks)

    async def _answer(self, target: str) -> Any | None:
        """``Status`` of endpoint ``target``, or ``None`` if it does not answer (down,
        frozen: ``STATUS_TIMEOUT``) or the connection was closed."""
        try:
            return await self._status(target)
        except DOWN:
            return None

    async def _status(self, target: str) -> Any | None:
        """``Status`` of endpoint ``target`` (with the current token); ``None`` when the
        connection was closed. Fails as calls do."""
        client = self._client
        if client is None or client.kv is None:
            return None  # (before any member client is made: close() would not close it)
        member = await self._member(target)
        if member.maintenance is None:
            return None
        member.maintenance._metadata = client.kv._metadata  # the current token
        return await unary(_maintenance_calls, "Status", _STATUS)(member, STATUS_TIMEOUT)

    def _unroute(self) -> None:
        if self._client is not None:
            self.txn = self._balanced(self._client)
        self.leader = None

    def _look_for_leader(self) -> None:
        if self._client is not None and (self._looking is None or self._looking.done()):
            with contextlib.suppress(RuntimeError):  # no running loop: closing
                self._looking = asyncio.ensure_future(self._find_leader())

    async def _find_leader(self) -> None:
        """Ask every endpoint at once whether it leads; route the transactions to the one
        that does.

        A claim counts when the member says it leads (``status.leader`` is its own
        ``header.member_id``) in a raft term no older than the one already known
        (``_term``): a former leader cut off from the others may still say it leads, in its
        old term, while the others have elected a new one. A claim from a cluster other than
        the known term's (``header.cluster_id``: a cluster restored or made anew at the same
        endpoints) counts in any term, and its term becomes the known one (:meth:`_heard`);
        :meth:`close` forgets the known term too. The claims are taken once every
        ask has answered or failed, or ``STATUS_PREFER`` after the first claim came while an
        ask is still out (a frozen member, a host that drops packets: before, the endpoints
        were asked one after the other, and each such endpoint listed before the leader cost
        the round its whole ``STATUS_TIMEOUT`` while the transactions stayed on the balanced
        channel); of those, the one in the highest term is routed to (two claims in one
        term cannot both be true; the first in endpoint order is taken). The asks still out
        are then cancelled and awaited. Without a claim, up to ``LEADER_LOOKS`` rounds,
        ``LEADER_PAUSE`` apart."""
        for attempt in range(LEADER_LOOKS):
            client = self._client
            if client is None:
                return
            targets = list(self._targets)
            claims = functools.partial(_leads, term=self._term, cluster_id=self._cluster_id)
            async with self._asking(targets) as asks:
                if await _first_in_turn(asks, claims, in_turn=False) is not None:
                    claimed = [step for step, ask in enumerate(asks)
                               if ask.done() and claims(ask.result())]
                    step = max(claimed, key=lambda step: int(asks[step].result().header.raft_term))
                    header = asks[step].result().header
                    member = self._members.get(targets[step])
                    if self._client is client and member is not None:
                        if self.leader != targets[step]:
                            self.leader_changes += 1
                        self.txn, self.leader = TxnCall(
                            client, via=member, flying=self._flights(client)), targets[step]
                        self._heard(header)
                        self._term = max(self._term, int(header.raft_term))
                    return
            if self._client is not client:
                return  # closed meanwhile
            if attempt + 1 < LEADER_LOOKS:
                await asyncio.sleep(LEADER_PAUSE)

    async def _member(self, target: str) -> etcd3aio.Etcd3Client:
        """The client of endpoint ``target``, made on first use; :meth:`close` closes it.

        A client whose ``connect()`` is under way is kept in ``_connecting`` meanwhile, so a
        :meth:`close` that runs then closes it too; the connect, ending after that close (or
        failing, or cancelled: a move's asks still out), keeps nothing: it closes what it
        made and fails as a closed connection's calls do (``EtcdConnectionError``). Before, it
        stored its client among the members of the closed connection, open for good. Two
        connects to one endpoint at once keep the first client stored."""
        member = self._members.get(target)
        if member is not None:
            return member
        client = self._client
        if client is None:
            raise etcd3aio.EtcdConnectionError(CLOSED)
        member = _new_client([target], tls_server_name=self._name, **self._tls)
        self._connecting.add(member)
        try:
            await member.connect()
        except BaseException:
            await _shut(member)
            raise
        finally:
            self._connecting.discard(member)
        if self._client is not client:  # closed (or opened again) while it connected
            await _shut(member)
            raise etcd3aio.EtcdConnectionError(CLOSED)
        kept = self._members.setdefault(target, member)
        if kept is not member:
            await _shut(member)
        return kept

    async def close(self) -> None:
        """Close the client, its token refresher, the leader search and every member's client,
        and end the direct calls under way on the client's channel. The known raft term and
        cluster id are forgotten: the next connect may reach a cluster made anew at the same
        endpoints with the same id, its terms lower (see :meth:`_find_leader`).

        Everything it closes is taken from the connection before its first wait: a
        :meth:`client` called while the close waits (for the search to end, for the
        refresher, for a channel) connects anew, and what that connect stores (its client,
        its token refresher, its calls, its members' clients) is the open connection's, which
        this close leaves alone. Before, the close read the auth stack after waiting for the
        search: it stopped the new client's refresher and cleared its token (etcd refused its
        calls), and the old client's refresher was stopped by nobody (only the garbage
        collector's close of its dropped stack ended it)."""
        self._closes += 1
        client, self._client, self.txn, self.leader = self._client, None, None, None
        self._term, self._cluster_id = 0, 0  # the next connect may reach another cluster
        auth, self._auth = self._auth, None
        self._login = None
        renewing, self._renewing = self._renewing, None
        if renewing is not None:
            renewing.cancel()
        looking, self._looking = self._looking, None
        members, self._members = list(self._members.values()), {}
        connecting, self._connecting = list(self._connecting), set()
        flying = self._flying.get(client, set()) if client is not None else set()
        _cancel(flying)
        if looking is not None:
            looking.cancel()
            with contextlib.suppress(BaseException):
                await looking
        if auth is not None:
            with contextlib.suppress(Exception):
                await auth.aclose()
        # A step holding the client may have begun a call while the lookup or the token's
        # refresher was ending: end those too, before and after the channel closes.
        _cancel(flying)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        _cancel(flying)
        if client is not None:
            self._flying.pop(client, None)
        for member in [*members, *connecting]:
            await _shut(member)


def _cancel(flying: set[Any]) -> None:
    """End the direct calls under way in ``flying``, as closing a channel ends grpc.aio's
    own."""
    for call in list(flying):
        if not call.done():
            call.cancel(CLOSED)


def _cancelled() -> bool:
    """Whether the running task itself is being cancelled (not a call cancelled under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


TOKEN_REFRESH = 240.0
"""Seconds between the logins that keep the auth token fresh (etcd's simple tokens last five
minutes unless told otherwise)."""
TOKEN_RETRY = 1.0
TOKEN_RETRY_MAX = 30.0
"""Seconds after a failed refresh before the next login: the first, doubled after each login
that fails again, up to the second (well under the minute an idle token has left when its
refresh is due), until one succeeds and the refreshes are ``TOKEN_REFRESH`` apart again."""


@contextlib.asynccontextmanager
async def _logged_in(connection: EtcdConnection, client: etcd3aio.Etcd3Client, *,
                     several: bool) -> AsyncIterator[None]:
    """``client`` logged in as the settings' user for the block, its token renewed every
    ``TOKEN_REFRESH`` seconds by a task (``token-refresher``), then cleared. etcd3aio's own
    refresher sends ``Authenticate`` with no deadline: the first login, inside
    :meth:`EtcdConnection.client`, landing on a frozen member left the connect waiting for
    ever. Each login here is sent as a read is (:func:`_login`).

    A refresh that fails is tried again ``TOKEN_RETRY`` seconds later, then after twice as
    long each time it fails again, up to ``TOKEN_RETRY_MAX``; once a login succeeds the next
    is ``TOKEN_REFRESH`` later again. Before, the next try after a failure was a whole
    ``TOKEN_REFRESH`` later, past the life of an idle token (etcd's simple token: five
    minutes after its last use): after one failed refresh, a client idle for a minute had
    its calls refused until that next try."""
    client.set_token(await _login(connection, client, several=several))

    async def refresh() -> None:
        pause = TOKEN_REFRESH
        retry = TOKEN_RETRY  # the pause after the next failed login
        while True:
            await asyncio.sleep(pause)
            try:
                client.set_token(await _login(connection, client, several=several))
            except DOWN as error:  # an idle token has a minute left: try again soon
                pause, retry = retry, min(retry * 2, TOKEN_RETRY_MAX)
                log.warning("etcd %s: token refresh failed (%s); trying again in %gs",
                            connection.where, _reason(error), pause)
            else:
                pause, retry = TOKEN_REFRESH, TOKEN_RETRY

    refresher = asyncio.create_task(refresh(), name="token-refresher")
    try:
        yield
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        client.set_token(None)


async def _renew_token(connection: EtcdConnection, client: etcd3aio.Etcd3Client, *,
                       several: bool) -> None:
    """A login of ``client`` now, its token replaced (:meth:`EtcdConnection.renewed`)."""
    client.set_token(await _login(connection, client, several=several))


async def _relogin(connection: EtcdConnection, login: Callable[[], Awaitable[None]]) -> bool:
    """``login`` run because etcd refused a token: whether it gave the client a new one."""
    try:
        await login()
    except DOWN as error:
        log.warning("etcd %s: etcd refused the auth token and a new login failed (%s)",
                    connection.where, _reason(error))
        return False
    log.info("etcd %s: etcd refused the auth token; logged in again", connection.where)
    return True


def stale_token(error: BaseException) -> bool:
    """Whether etcd refused a call for its auth token, not for its user: a token it no
    longer has (``invalid auth token``: idle past ``--auth-token-ttl``, or ended) or one
    from before a change of users or roles (``revision of auth store is old``). etcd checks
    the token before it proposes a write and the auth revision before it applies it, so such
    a call was not applied. A refused watch says it in its cancel reason."""
    texts = [str(error)]
    if isinstance(error, grpc.aio.AioRpcError):
        texts.append(error.details() or "")
    if error.__cause__ is not None:
        texts.append(str(error.__cause__))
    return any(_STALE_TOKEN in text or _OLD_AUTH in text for text in texts)


_STALE_TOKEN = "invalid auth token"
_OLD_AUTH = "revision of auth store is old"
"""etcd's words (``rpctypes.ErrInvalidAuthToken``, ``ErrAuthOldRevision``) for a token it
refuses (:func:`stale_token`)."""


async def _login(connection: EtcdConnection, client: etcd3aio.Etcd3Client, *,
                 several: bool) -> str:
    """A token for the settings' user, within the call's ``CALL_TIMEOUT``. With ``several``
    members a login (which writes nothing that matters: each one hands out a token) is sent
    in attempts of ``ATTEMPT_TIMEOUT``, and one that timed out or was refused is sent again,
    the round giving it to the next member, as a read is (:func:`leader_first`); with one
    endpoint, one attempt of ``CALL_TIMEOUT``. A refused password is not sent again.

    Each attempt is bounded by its gRPC deadline alone (:func:`unary`). The library's call
    added a timer on the loop: a login answered while the loop stalled past it was lost, and
    with one endpoint the connect failed."""
    settings = connection.settings
    login = unary(_auth_calls, "Authenticate", AuthenticateRequest(
        name=settings.username, password=settings.password))
    loop = asyncio.get_running_loop()
    give_up = loop.time() + CALL_TIMEOUT
    while True:
        left = max(give_up - loop.time(), 0.1)
        try:
            answer = await login(client, min(ATTEMPT_TIMEOUT if several else CALL_TIMEOUT,
                                             left))
            return str(answer.token)
        except DOWN as error:
            timed_out = _timed_out(error)
            if (not several or not (timed_out or _refused(error))
                    or loop.time() + AGAIN_PAUSE + ATTEMPT_TIMEOUT > give_up):
                raise
            if not timed_out:
                await asyncio.sleep(AGAIN_PAUSE)


async def _shut(client: etcd3aio.Etcd3Client) -> None:
    """``client`` closed, whatever its close raises (a closed client closes again quietly)."""
    with contextlib.suppress(Exception):
        await client.close()


@contextlib.asynccontextmanager
async def unavailable(
    connection: EtcdConnection, action: str, *, key: str | None = None
) -> AsyncIterator[None]:
    """Turn any failure of the calls inside into ``BackendUnavailable`` naming the cluster."""
    try:
        yield
    except BackendUnavailable:
        raise
    except DOWN as error:
        raise unreachable(connection, action, error, key=key) from None


DOWN = (etcd3aio.EtcdError, grpc.RpcError, OSError, TimeoutError)
"""What a call to etcd raises when etcd cannot answer it (the library's errors and gRPC's)."""


class LoginRefused(BackendUnavailable):
    """etcd refused the settings' user: a login with a user it lacks or a wrong password, or a
    call without a user where its auth is on. ``setting`` and ``detail``: the setting at fault
    and what etcd said, for a store's first ping to tell the user (``UnusableSetting``);
    elsewhere an outage like any other."""

    def __init__(self, message: str, *, setting: str, detail: str,
                 key: str | None = None) -> None:
        super().__init__(message, key=key)
        self.setting = setting
        self.detail = detail


_LOGIN_FAILED = "authentication failed"
_NO_USER = "user name is empty"
"""etcd's words (``rpctypes.ErrAuthFailed``, ``ErrUserEmpty``) for a login it refused and
for a call without a user while its auth is on."""


def unreachable(connection: EtcdConnection, action: str, error: BaseException, *,
                key: str | None = None) -> BackendUnavailable:
    """The ``BackendUnavailable`` a failed call becomes, naming the cluster and the action
    (``unavailable`` without its context manager, for the calls of every step). A call
    refused for its auth token starts a new login (:meth:`EtcdConnection.renew_token`), so
    the next call has a token etcd takes. A refused user is :class:`LoginRefused`."""
    connection.renew_token(error)
    reason = _reason(error)
    message = f"etcd {connection.where}: {action} failed ({reason})"
    if reason.startswith("INVALID_ARGUMENT") and _LOGIN_FAILED in reason:
        user = connection.settings.username
        return LoginRefused(message, setting="enhanced-locking-etcd-password", key=key,
                            detail=f"etcd {connection.where} refused the login of user "
                            f"{user!r} (enhanced-locking-etcd-username) with this password "
                            f"({reason})")
    if reason.startswith("INVALID_ARGUMENT") and _NO_USER in reason:
        return LoginRefused(message, setting="enhanced-locking-etcd-username", key=key,
                            detail=f"etcd {connection.where} has auth on and needs a user and "
                            f"its password ({reason})")
    return BackendUnavailable(message, key=key)


def _reason(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details() or ''}".rstrip(": ")
    if isinstance(error, TimeoutError):
        return f"no answer within {CALL_TIMEOUT:g}s"
    text = str(error) or type(error).__name__
    return text.splitlines()[0]


def _closed() -> grpc.aio.AioRpcError:
    """A call ended by the close of its connection: gRPC's ``CANCELLED``, a ``DOWN`` error."""
    return grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), details=CLOSED)


def _timed_out(error: BaseException) -> bool:
    return (isinstance(error, TimeoutError | etcd3aio.EtcdTransientError)
            or (isinstance(error, grpc.aio.AioRpcError)
                and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED))


def _refused(error: BaseException) -> bool:
    """A member could not serve the call now (cut off, no leader yet, going away)."""
    return (isinstance(error, etcd3aio.EtcdConnectionError)
            or (isinstance(error, grpc.aio.AioRpcError)
                and error.code() is grpc.StatusCode.UNAVAILABLE))


class WatchCanceled(Exception):
    """etcd answered a watch canceled (an auth token it no longer takes, a permission): the
    stream stays open and brings nothing more, so the watch is broken as if it had failed."""


def refused_watch(answer: Any) -> None:
    """Raise ``WatchCanceled`` (with etcd's reason) when ``answer`` cancels its watch."""
    if answer.canceled:
        raise WatchCanceled(str(answer.cancel_reason) or "canceled by etcd")


async def watching(watch: Awaitable[None],
                   check: Callable[[asyncio.Future[None]], Awaitable[T]]) -> T:
    """``check(watch)``'s answer, with ``watch`` (the watch it backs, see ``WATCH_CHECK``)
    running meanwhile: started first, then cancelled and awaited, whatever ``check`` did.

    A cancel of the caller arriving while the watch winds down is the caller's own: it is
    raised (the watch still ends on its own), not taken for the watch's end."""
    running = asyncio.ensure_future(watch)
    try:
        return await check(running)
    finally:
        running.cancel()
        await asyncio.wait([running])
        if not running.cancelled():
            running.exception()  # the watch's own failure is its end, not the caller's


class WatchEnded(Exception):
    """A member ended a watch's stream without an error (it is going away): a break."""


class Watch:
    """One watch of a key, or of the keys from ``key`` up to ``range_end``, driven here over
    etcd's ``Watch`` RPC: one stream at a time, to one member, opened at ``next``.

    The client library's own watch resumed a broken stream inside itself, from the revision
    in its last answer's header, plus one, and on the same channel. While a watch catches up
    on history etcd sends the old writes in batches (1,000 revisions each, about 100 ms
    apart) whose header carries the cluster's current revision: a stream broken after the
    first batch resumed past the rest of the history (a watch from revision 2 over 3,000
    writes, its member restarted after the first answer, brought 1,000 of them). And a
    watch on a member's own client (one started again because it was behind) retried that
    member for good when it was down: nothing ended it but the check behind it.

    Here ``next`` is one past the newest revision delivered (an answer's events, never its
    header), and a stream that fails, ends, or is answered canceled (a token etcd no longer
    takes: :func:`refused_watch`) is a break: after ``WATCH_PAUSE`` (doubled while streams
    break before they bring a write) the stream is opened again from ``next`` on the next
    member in turn that is not the one it broke on (``member_id``, from the answers' headers)
    and has a leader, every endpoint asked at once, a frozen one passed over within
    ``STATUS_PREFER`` (:meth:`EtcdConnection.turn_besides`, :meth:`EtcdConnection.watcher`,
    with the current auth token). So every write is delivered once, in order, across
    breaks, and a watch whose member goes down is on another member as soon as its stream
    fails (on loopback, a killed member's streams fail at once, and a member that is down
    refuses the stream at once). A compaction of
    what the watch asked for is delivered (its ``compact_revision``) and the stream opened
    again from that revision, the oldest etcd keeps (its write is kept), on the same
    member. The stream's member may also be frozen (its connections stay open, it sends
    nothing): the check that backs each watch (``WATCH_CHECK``) finds that, and its caller
    moves the watch on with :meth:`moved`.

    Every stream asks for etcd's "require leader" (``REQUIRE_LEADER``): a member cut off from
    the others (its leader lost: the other two down or out of reach) ends the stream within
    a few of its election timeouts (``no leader``), and refuses a new one while it has no
    leader, instead of keeping a stream open that brings nothing until the check notices a
    write it missed. That end is a break like any other.

    An answer too large for one gRPC message (4 MiB on the client: a catch-up batch of 1,000
    revisions of large values) failed its stream at every start. The watch asks etcd to
    split such an answer (``fragment``: parts of up to the server's request limit, 1.5 MiB by
    default, the last one not marked); the parts are joined before the answer is delivered,
    so ``next`` never stops inside a revision's writes, and a break between them has the
    whole answer sent again."""

    def __init__(self, connection: EtcdConnection, what: str, key: bytes,
                 range_end: bytes = b"", *, start: int, prev_kv: bool = False,
                 filters: Sequence[etcd3aio.WatchFilter] = ()) -> None:
        self.connection = connection
        self.what = what
        """What is watched, for the logs (``events``, ``lock deletions``...)."""
        self.key = key
        self.range_end = range_end
        self.prev_kv = prev_kv
        self.filters = tuple(int(f) for f in filters)
        self.next = start
        """The revision the stream (re)starts at: one past the newest one delivered."""
        self.turn = 0
        """The turn of the member the stream goes to (:meth:`moved`)."""
        self.member_id = 0
        """The id of the member whose answers the stream brought last; 0 before the first."""
        self.breaks = 0
        """Streams that broke (tests read it)."""

    async def follow(self, client: etcd3aio.Etcd3Client,
                     deliver: Callable[[Any], None]) -> None:
        """Call ``deliver`` with each answer of the watch from ``next`` on, for good (until
        cancelled): the first stream through ``client``, after a break on the next member.
        ``next`` is already past an answer's events when it is delivered; an answer with
        a ``compact_revision`` is delivered too. A failure of ``deliver`` is a break: a
        ``deliver`` hands the writes on through :meth:`each`, which skips only a write that
        fails."""
        pause = WATCH_PAUSE
        while True:
            try:
                call = await self._open(client)
                try:
                    parts: list[Any] = []  # the fragments of an answer, so far
                    while True:
                        answer = await call.read()
                        if answer is grpc.aio.EOF:
                            raise WatchEnded("the member ended the watch's stream")
                        self.member_id = int(answer.header.member_id)
                        if answer.fragment:
                            parts.append(answer)
                            continue
                        if parts:
                            answer, parts = _joined([*parts, answer]), []
                        if answer.compact_revision:  # (etcd cancels such a watch too)
                            # etcd still keeps the write at the compaction revision itself.
                            self.next = max(self.next, int(answer.compact_revision))
                            deliver(answer)
                            break  # opened again at the compaction revision
                        refused_watch(answer)
                        if answer.events:  # it brought writes: a break later is mended at once
                            pause = WATCH_PAUSE
                        for event in answer.events:
                            self.next = max(self.next, int(event.kv.mod_revision) + 1)
                        deliver(answer)
                finally:
                    call.cancel()
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.breaks += 1
                self.connection.renew_token(error)  # a token etcd refused: a new one
                reason = f": {error}" if isinstance(error, WatchCanceled) else (
                    f": {_reason(error)}" if isinstance(error, grpc.aio.AioRpcError) else "")
                log.warning("etcd %s: the %s watch broke (%s%s); watching again from revision "
                            "%d on the next member", self.connection.where, self.what,
                            type(error).__name__, reason, self.next)
            await asyncio.sleep(pause)
            pause = min(WATCH_PAUSE_MAX, pause * 2)
            with contextlib.suppress(BackendUnavailable):  # (else the same client again)
                client = await self.moved()

    def each(self, answer: Any, take: Callable[[Any], None]) -> None:
        """``take`` each write (event) of ``answer``, in order. A write ``take`` fails on, for
        any reason, is logged with its revision and the error's type only (no key, no value)
        and skipped, and the rest are taken: ``next`` is already past the whole answer, so a
        failure let out of the delivery (a break) would lose every write after it in the
        answer (up to 1,000 revisions in a catch-up)."""
        for event in answer.events:
            try:
                take(event)
            except Exception as error:
                log.warning("etcd %s: the %s watch skipped the write at revision %d that it "
                            "could not read (%s)", self.connection.where, self.what,
                            event.kv.mod_revision, type(error).__name__)

    async def moved(self) -> etcd3aio.Etcd3Client:
        """The client the watch goes through next: the next member in turn that is not the
        one whose answers it brought last (it broke there, or is behind there)."""
        self.turn = await self.connection.turn_besides(self.turn + 1, self.member_id)
        return await self.connection.watcher(self.turn)

    async def _open(self, client: etcd3aio.Etcd3Client) -> Any:
        """A stream through ``client``, with the current auth token, asked for the watch."""
        watch = self.connection.carrier(client).watch
        if watch is None:
            raise etcd3aio.EtcdConnectionError("the client is not connected")
        call = watch._stub.Watch(metadata=(*watch._metadata, REQUIRE_LEADER))
        try:
            await call.write(WatchRequest(create_request=WatchCreateRequest(
                key=self.key, range_end=self.range_end, start_revision=self.next,
                prev_kv=self.prev_kv, filters=self.filters, fragment=True)))
        except BaseException:
            call.cancel()
            raise
        return call


def _joined(parts: list[Any]) -> Any:
    """The answer etcd split into ``parts`` (its fragments, the last one not marked so)."""
    whole = WatchResponse()
    whole.CopyFrom(parts[-1])
    del whole.events[:]
    for part in parts:
        whole.events.extend(part.events)
    return whole


def _other(status: Any | None, member_id: int) -> bool:
    """Whether ``status`` (an endpoint's answer, ``None``: none) is from a member other than
    ``member_id``."""
    return status is not None and int(status.header.member_id) not in (0, member_id)


def _leads(status: Any | None, *, term: int, cluster_id: int) -> bool:
    """Whether ``status`` (an endpoint's answer, ``None``: none) says its member leads, in a
    raft term no older than ``term``; in any term when it is from a cluster other than
    ``cluster_id``, the known term's (0: none known), see
    :meth:`EtcdConnection._find_leader`."""
    return (status is not None and bool(status.leader)
            and status.leader == status.header.member_id
            and (int(status.header.raft_term) >= term
                 or cluster_id not in (0, int(status.header.cluster_id))))


async def _first_in_turn(asks: Sequence[asyncio.Future[Any]],
                         good: Callable[[Any], bool], *, in_turn: bool = True) -> int | None:
    """The index of the first of ``asks`` (in turn order) whose answer is ``good``: once
    every ask before it has ended, or ``STATUS_PREFER`` seconds after such an answer came
    while one before it has not; ``None`` once every ask has ended and none is ``good``.
    Not ``in_turn`` (the leader search, which weighs every good answer): once every ask has
    ended, or ``STATUS_PREFER`` after the first good answer came. Cancels none of them."""
    loop = asyncio.get_running_loop()
    until: float | None = None  # when a good answer stops waiting for those before it
    while True:
        first = next((step for step, ask in enumerate(asks)
                      if ask.done() and good(ask.result())), None)
        if first is not None:
            if all(ask.done() for ask in (asks[:first] if in_turn else asks)):
                return first
            if until is None:
                until = loop.time() + STATUS_PREFER
            elif loop.time() >= until:
                return first
        out = [ask for ask in asks if not ask.done()]
        if not out:
            return None
        await asyncio.wait(out, timeout=None if until is None else max(until - loop.time(), 0),
                           return_when=asyncio.FIRST_COMPLETED)


def kv_calls(client: etcd3aio.Etcd3Client) -> Any:
    """The client's key-value calls; a client not connected (closed meanwhile) fails as a call
    that cannot reach etcd does (``EtcdConnectionError``: the caller's ``unavailable``)."""
    if client.kv is None:
        raise etcd3aio.EtcdConnectionError("the client is not connected")
    return client.kv


def _auth_calls(client: etcd3aio.Etcd3Client) -> Any:
    """The client's auth calls (``Authenticate``); see :func:`kv_calls`."""
    if client.auth is None:
        raise etcd3aio.EtcdConnectionError("the client is not connected")
    return client.auth


def _maintenance_calls(client: etcd3aio.Etcd3Client) -> Any:
    """The client's maintenance calls (``Status``); see :func:`kv_calls`."""
    if client.maintenance is None:
        raise etcd3aio.EtcdConnectionError("the client is not connected")
    return client.maintenance


_STATUS = StatusRequest()


def unary(calls: Callable[[etcd3aio.Etcd3Client], Any], method: str,
          request: Any) -> Callable[[etcd3aio.Etcd3Client, float], Awaitable[Any]]:
    """``request`` to the gRPC ``method`` of a client's service (``calls(client)``:
    :func:`kv_calls`...), as a call :func:`leader_first` sends (``call(client, deadline)``):
    the library's own method (its stub on the client's channel, with the service's auth
    token), bounded by the call's gRPC deadline alone.

    gRPC's core keeps that deadline off the event loop: an answer that came within it is
    taken however late the loop reads it. The library's calls add a timer on the loop
    (``asyncio.timeout``): after the loop stalled past it (a loaded machine), the timer and
    the answer came due in one turn and the answer was lost. A read on the route to the
    leader then dropped the route (for a leader that never went) and failed, or was sent
    again; a member's ``Status`` was taken for no answer. Failures are gRPC's own errors
    (``DOWN``; :func:`unreachable` maps them as it maps the library's)."""

    def call(client: etcd3aio.Etcd3Client, deadline: float) -> Awaitable[Any]:
        service = calls(client)
        send = getattr(service._stub, method)
        return send(request, metadata=service._metadata or None,  # type: ignore[no-any-return]
                    timeout=deadline)

    return call


async def leader_first(connection: EtcdConnection,
                       call: Callable[[etcd3aio.Etcd3Client, float], Awaitable[T]], *,
                       write: bool = False) -> T:
    """``call(client, deadline)``, a unary call bounded by its gRPC deadline alone
    (:func:`unary`), sent as the steps' transactions are: to the leader
    when the route to it is known (a frozen follower is never asked, and a write is served
    without the hops a follower adds), else on the balanced channel. An attempt on the route
    has ``ROUTE_TIMEOUT`` (a failed one drops the route, as a transaction's does). On the
    balanced channel a read's attempt has ``ATTEMPT_TIMEOUT`` (the round gives the next one
    to the next member); a ``write`` (a lease grant) first waits for a leader search under way
    (``LEADER_WAIT``) and then has the rest of the call's time in one attempt, as before
    there was a route. Attempts go on while the next can end within ``CALL_TIMEOUT``. With
    one endpoint, one attempt of ``CALL_TIMEOUT``."""
    client = await connection.client()
    if not connection.several_members:
        try:
            return await call(client, CALL_TIMEOUT)
        except DOWN as error:
            if not await connection.renewed(error):
                raise
        return await call(client, CALL_TIMEOUT)  # with the new token
    loop = asyncio.get_running_loop()
    give_up = loop.time() + CALL_TIMEOUT
    renewed = False  # sent again once after etcd refused its token and a login renewed it
    while True:
        txn = connection.txn
        if txn is not None and txn.client is not client:
            txn = None  # closed meanwhile
        if write and txn is not None and txn.via is None:
            txn = await connection._route_for_write(txn)
        via = txn.via if txn is not None else None
        left = max(give_up - loop.time(), 0.1)
        if via is not None:
            timeout = ROUTE_TIMEOUT
        else:
            timeout = left if write else ATTEMPT_TIMEOUT
        try:
            return await call(client if via is None else connection.carrier(via),
                              min(timeout, left))
        except DOWN as error:
            if not renewed and await connection.renewed(error):
                renewed = True
                continue
            if txn is not None and via is not None:
                connection.route_failed(txn)
            timed_out = _timed_out(error)
            if (not (timed_out or _refused(error)) or connection.txn is None
                    or (write and via is None)  # it had the whole call
                    or loop.time() + AGAIN_PAUSE + ATTEMPT_TIMEOUT > give_up):
                raise
            if not timed_out:
                await asyncio.sleep(AGAIN_PAUSE)
