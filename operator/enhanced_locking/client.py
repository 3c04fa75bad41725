"""A small Python client for the lock service's HTTP API (used by the CLI and by scripts).

With access control on, the clients send ``Authorization: Bearer TOKEN``: the ``token``
argument, else the ``ENHANCED_LOCKING_TOKEN`` environment variable. An ``https://`` URL is
verified against ``ENHANCED_LOCKING_CA_FILE`` when set (else the system's CAs).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx
from pydantic import ValidationError

from enhanced_locking.durations import DEFAULT_MAX_TIMEOUT, parse_duration
from enhanced_locking.events import FOLLOWING_COMMENT, KEEPALIVE_SECONDS, STREAM_SILENCE_SECONDS
from enhanced_locking.service_address import (
    DEFAULT_URL,
    TOKEN_ENV,
    URL_ENV,
    service_url,
    shown_url,
    token_problem,
)
from enhanced_locking.types import (
    GRANT_HEADER,
    GRANT_UPGRADED,
    NEW_GRANT,
    AcquireResult,
    BatchLockRequest,
    BatchResult,
    Event,
    Lock,
    LockRequest,
    Locks,
    LocksUnreadable,
    PartlyListed,
    SidesUnanswered,
    UnreadableLock,
    kept_by_grant,
    upgraded_by_grant,
)

__all__ = ["DEFAULT_URL", "TOKEN_ENV", "URL_ENV", "AsyncClient", "Client", "Listing",
           "PullRelease", "ServiceError", "StreamCut", "parse_sse", "service_url", "shown_url",
           "token_problem"]

_FOLLOWING_LINE = f": {FOLLOWING_COMMENT}"
"""The event stream's line saying the service follows the events for it."""
CA_FILE_ENV = "ENHANCED_LOCKING_CA_FILE"


def _auth_headers(token: str | None) -> dict[str, str]:
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if token and (problem := token_problem(token)) is not None:
        raise ValueError(f"the bearer token is {problem}")
    return {"Authorization": f"Bearer {token.strip()}"} if token and token.strip() else {}


def _verify() -> ssl.SSLContext | bool:
    ca_file = os.environ.get(CA_FILE_ENV)
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


class ServiceError(Exception):
    """The service answered with an error (``status`` 4xx/5xx) or could not be reached (0)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def _dumped(locks: Locks) -> list[Any]:
    return [lock.model_dump(mode="json", by_alias=True) for lock in locks]


@dataclass(frozen=True)
class Listing:
    """``GET /v1/locks``: the locks read; the sides whose store did not answer (their locks
    are not among them); the stored locks set aside as unreadable (never among them)."""

    locks: Locks
    unavailable: tuple[str, ...] = ()
    unreadable: tuple[UnreadableLock, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The answer as the service gave it (``unavailable``, ``unreadable`` when not empty)."""
        return {"locks": _dumped(self.locks),
                **({"unavailable": list(self.unavailable)} if self.unavailable else {}),
                **({"unreadable": [entry.model_dump(mode="json", by_alias=True)
                                   for entry in self.unreadable]} if self.unreadable else {})}


@dataclass(frozen=True)
class PullRelease:
    """``DELETE /v1/locks/by-pull``: the locks released; the pull's queued requests dropped
    (by waiter id); the sides whose store did not answer (the pull's locks there stay)."""

    released: Locks
    cancelled: tuple[str, ...] = ()
    unavailable: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The answer as the service gave it (``unavailable`` when not empty)."""
        return {"released": _dumped(self.released), "cancelled": list(self.cancelled),
                **({"unavailable": list(self.unavailable)} if self.unavailable else {})}


_T = TypeVar("_T")
_P = ParamSpec("_P")


def _as_service(method: Callable[Concatenate[Client, _P], _T]
                ) -> Callable[Concatenate[Client, _P], _T]:
    """A call of :class:`Client` whose answer, a JSON object (:func:`_answer`), is not of the
    shape the service answers (another API at the URL) fails as any answer not the lock
    service's does: :class:`ServiceError` status 0, not the decoding's own error."""
    @functools.wraps(method)
    def call(self: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(self, *args, **kwargs)
        except (ValidationError, KeyError):
            raise ServiceError(0, f"{shown_url(self._http.base_url)} did not answer as the lock "
                                  f"service: its answer to {method.__name__} is not of the "
                                  "service's shape (is the URL the service's?)") from None
    return call


class Client:
    """Blocking client; ``with Client(url) as client: client.acquire(...)``.

    ``timeout`` bounds each call that does not wait in a queue; ``connect_timeout`` (default:
    ``timeout``) is how long a call whose connection a restart refuses is sent again before it
    fails (:class:`_ConnectRetry`; 0: once)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 10.0,
                 transport: httpx.BaseTransport | None = None,
                 token: str | None = None, connect_timeout: float | None = None) -> None:
        self._connect_time = timeout if connect_timeout is None else connect_timeout
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                  headers=_auth_headers(token), verify=_verify())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,),
              timeout: float | httpx.Timeout | None = None, absent: str | None = None,
              **kwargs: Any) -> tuple[int, Any]:
        if timeout is not None:
            kwargs["timeout"] = timeout
        return _answer(self._request(method, path, **kwargs), ok, absent=absent)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retry = _ConnectRetry(self._connect_time)
        while True:
            try:
                return self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                if not _restarting(error) or (pause := retry.pause()) is None:
                    raise _unreached(self._http.base_url, error) from None
            except httpx.ReadTimeout as error:
                raise ServiceError(0, _no_answer(self._http.base_url, error)) from None
            except httpx.HTTPError as error:
                raise _unreached(self._http.base_url, error) from None
            time.sleep(pause)

    def _default_wait(self, request: LockRequest | BatchLockRequest) -> float | None:
        """For a request that waits without a duration, the service's default timeout in
        seconds (:func:`_default_wait_of`); else None."""
        if request.wait is not True:
            return None
        return _default_wait_of(*self._call("GET", "/v1/config", ok=_CONFIG_ANSWERS))

    @_as_service
    def acquire(self, request: LockRequest) -> AcquireResult:
        """Acquire (waiting if ``request.wait`` says so); refusals come back as results. A
        grant is ``fresh`` only when the service said this call granted it (its
        ``Lock-Grant: new``)."""
        return _acquire_result(self._request(
            "POST", "/v1/locks", timeout=_read_timeout(request, self._default_wait(request)),
            json=_body(request)))

    @_as_service
    def acquire_batch(self, request: BatchLockRequest) -> BatchResult:
        """Acquire several locks all or nothing; refusals come back as results. A grant's
        :attr:`~BatchResult.kept` is what the service said lock by lock (its ``Lock-Grant``):
        the keys the pull held already, not this call's to give back or to renew."""
        response = self._request("POST", "/v1/locks/batch", json=_body(request),
                                 timeout=_read_timeout(request, self._default_wait(request)))
        result = BatchResult.model_validate(
            _acquire_answer(*_answer(response, _ACQUIRE_ANSWERS)))
        if not result.acquired:
            return result
        header = response.headers.get(GRANT_HEADER)
        return BatchResult.granted(result.locks, kept=kept_by_grant(result.locks, header),
                                   upgraded=upgraded_by_grant(result.locks, header))

    @_as_service
    def release_batch(self, keys: Iterable[str], *, pull: int | None = None,
                      repo: str | None = None) -> Locks:
        """With ``pull``, only if that pull holds every held key; with ``repo``, only if each
        held key is that repository's (a lock of another repository's project whose key is
        the same: 409, nothing released)."""
        params: dict[str, Any] = {"key": list(keys)}
        if pull is not None:
            params["pull"] = pull
        if repo is not None:
            params["repo"] = repo
        _, body = self._call("DELETE", "/v1/locks/batch", params=params)
        return [Lock.model_validate(item) for item in body["released"]]

    @_as_service
    def refresh(self, key: str, *, pull: int, ttl: str | None = None,
                repo: str | None = None) -> Lock | None:
        """With ``repo``, only a lock of that repository (another's of the same key: 409)."""
        payload: dict[str, Any] = {"key": key, "pull": pull}
        if repo is not None:
            payload["repo"] = repo
        if ttl is not None:
            payload["ttl"] = ttl
        status, body = self._call("POST", "/v1/locks/refresh", ok=(200, 404), absent=key,
                                  json=payload)
        return Lock.model_validate(body["lock"]) if status == 200 else None

    def audit(self, **filters: Any) -> dict[str, Any]:
        """One page of the audit trail, newest first: ``{"entries": [...], "next": cursor}``."""
        params = {_camel(name): value for name, value in filters.items() if value is not None}
        _, body = self._call("GET", "/v1/audit", params=params)
        return dict(body)

    def queue(self, key: str) -> dict[str, Any]:
        """``{"key", "holder", "waiters": [...]}``: the waiters in service order."""
        _, body = self._call("GET", "/v1/queue", params={"key": key})
        return dict(body)

    def cancel_waiter(self, key: str, waiter_id: str, *, pull: int | None = None) -> bool:
        """Cancel a queued request by waiter id or request id; with ``pull``, that pull's
        (its own: the ``lock`` right is enough), else whoever's (``release-any``)."""
        params: dict[str, Any] = {"key": key, "id": waiter_id}
        if pull is not None:
            params["pull"] = pull
        status, _ = self._call("DELETE", "/v1/queue", ok=(200, 404), absent=key, params=params)
        return status == 200

    @_as_service
    def force_unlock(
        self, key: str, *, reason: str | None = None
    ) -> Lock | UnreadableLock | None:
        """The lock freed; what was stored when it could not be read (cleared); or ``None``
        when nothing was held."""
        params = {"key": key, **({"reason": reason} if reason else {})}
        status, body = self._call("POST", "/v1/admin/force-unlock", ok=(200, 404),
                                  absent=key, params=params)
        if status != 200:
            return None
        if body.get("lock") is None and body.get("unreadable") is not None:
            return UnreadableLock.model_validate(body["unreadable"])
        return Lock.model_validate(body["lock"])

    def events(self, *, repo: str | None = None, key_prefix: str | None = None,
               types: Iterable[str] = (), last_event_id: str | None = None,
               on_open: Callable[[], None] | None = None,
               silence: float | None = None) -> Iterator[Event]:
        """Follow ``GET /v1/events`` (blocking; stop by leaving the loop); ``on_open`` runs
        once the service follows the events for this stream (its ``: following`` comment).
        A stream that sends nothing for ``silence`` seconds (default
        :data:`STREAM_SILENCE_SECONDS`, a few of its keep-alives) is given up:
        :class:`ServiceError` 0."""
        params, headers = _event_params(repo, key_prefix, types, last_event_id)
        silence = STREAM_SILENCE_SECONDS if silence is None else silence
        retry = _ConnectRetry(self._connect_time)
        try:
            while True:
                try:
                    response = self._http.send(self._http.build_request(
                        "GET", "/v1/events", params=params, headers=headers,
                        timeout=httpx.Timeout(10.0, read=silence)), stream=True)
                    break
                except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                    if not _restarting(error) or (pause := retry.pause()) is None:
                        raise
                time.sleep(pause)
            with contextlib.closing(response):
                if response.status_code != 200:
                    response.read()
                    raise ServiceError(response.status_code, _error_of(response), None)
                _event_stream(response)

                def lines() -> Iterator[str]:
                    for line in response.iter_lines():
                        if line == _FOLLOWING_LINE and on_open is not None:
                            on_open()
                        yield line

                yield from (e for e in parse_sse(lines()) if e is not None)
        except httpx.ReadTimeout:
            raise ServiceError(0, _silent(self._http.base_url, silence)) from None
        except (httpx.HTTPError, StreamCut) as error:
            raise ServiceError(0, f"lost the event stream of "
                                  f"{shown_url(self._http.base_url)}: {error}") from None

    @_as_service
    def get(self, key: str) -> Lock | None:
        status, body = self._call("GET", "/v1/locks/by-key", ok=(200, 404), absent=key,
                                  params={"key": key})
        return Lock.model_validate(body["lock"]) if status == 200 else None

    @_as_service
    def release(self, key: str, *, pull: int | None = None,
                repo: str | None = None) -> Lock | None:
        """Release ``key``; with ``pull`` and/or ``repo`` only if that pull/repository holds it
        (else :class:`ServiceError` 409)."""
        params: dict[str, Any] = {"key": key}
        if pull is not None:
            params["pull"] = pull
        if repo is not None:
            params["repo"] = repo
        status, body = self._call("DELETE", "/v1/locks/by-key", ok=(200, 404), absent=key,
                                  params=params)
        return Lock.model_validate(body["lock"]) if status == 200 else None

    def list(self, *, repo: str | None = None, pull: int | None = None) -> Locks:
        """The locks held. When a store did not answer (the service listed the others' locks
        and said so), :class:`PartlyListed` (a ``BackendUnavailable``): its ``locks`` the
        locks read, its ``unavailable`` the stores whose locks are not among them, its
        ``unreadable`` the stored locks found that cannot be read. Else, when
        it found stored locks it cannot read (their keys held, by whom not known),
        :class:`LocksUnreadable`: its ``locks`` the locks read, its ``unreadable`` the others.
        :meth:`listing` returns the whole answer (``unavailable``, ``unreadable``), partial or
        not."""
        answer = self.listing(repo=repo, pull=pull)
        if answer.unavailable:
            stores = " and ".join(answer.unavailable)
            raise PartlyListed(f"the {stores} lock store did not answer: its locks are not "
                               f"among the {len(answer.locks)} listed", locks=answer.locks,
                               unavailable=answer.unavailable, unreadable=answer.unreadable)
        if answer.unreadable:
            raise LocksUnreadable(answer.locks, answer.unreadable)
        return answer.locks

    @_as_service
    def listing(self, *, repo: str | None = None, pull: int | None = None) -> Listing:
        params = {k: v for k, v in {"repo": repo, "pull": pull}.items() if v is not None}
        _, body = self._call("GET", "/v1/locks", params=params)
        return Listing(locks=[Lock.model_validate(item) for item in body["locks"]],
                       unavailable=tuple(body.get("unavailable", ())),
                       unreadable=tuple(UnreadableLock.model_validate(entry)
                                        for entry in body.get("unreadable", ())))

    def unlock_pull(self, repo: str, pull: int) -> Locks:
        """The locks released: all the pull held. When a store did not answer (the service
        released the pull's locks on the others and said so), :class:`SidesUnanswered` (a
        ``BackendUnavailable``): its ``released`` the locks freed, its ``unavailable`` the
        stores whose locks of the pull stay held; call again once they answer.
        :meth:`release_pull` returns the whole answer instead, partial or not."""
        answer = self.release_pull(repo, pull)
        if answer.unavailable:
            raise SidesUnanswered(_not_released(repo, pull, answer), released=answer.released,
                                  unavailable=answer.unavailable)
        return answer.released

    @_as_service
    def release_pull(self, repo: str, pull: int) -> PullRelease:
        _, body = self._call("DELETE", "/v1/locks/by-pull", params={"repo": repo, "pull": pull})
        return PullRelease(released=[Lock.model_validate(item) for item in body["released"]],
                           cancelled=tuple(body.get("cancelled", ())),
                           unavailable=tuple(body.get("unavailable", ())))

    def config(self) -> dict[str, Any]:
        _, body = self._call("GET", "/v1/config")
        return dict(body)


class AsyncClient:
    """The few calls that are naturally concurrent (a wait watched by an event stream)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 10.0,
                 token: str | None = None, connect_timeout: float | None = None) -> None:
        self._connect_time = timeout if connect_timeout is None else connect_timeout
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                       headers=_auth_headers(token), verify=_verify())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, *, ok: tuple[int, ...] = (200,),
                    absent: str | None = None, **kwargs: Any) -> tuple[int, Any]:
        return _answer(await self._request(method, path, **kwargs), ok, absent=absent)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retry = _ConnectRetry(self._connect_time)
        while True:
            try:
                return await self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                if not _restarting(error) or (pause := retry.pause()) is None:
                    raise _unreached(self._http.base_url, error) from None
            except httpx.ReadTimeout as error:
                raise ServiceError(0, _no_answer(self._http.base_url, error)) from None
            except httpx.HTTPError as error:
                raise _unreached(self._http.base_url, error) from None
            await asyncio.sleep(pause)

    async def acquire(self, request: LockRequest) -> AcquireResult:
        default_wait = None
        if request.wait is True:  # see Client._default_wait
            default_wait = _default_wait_of(
                *await self._call("GET", "/v1/config", ok=_CONFIG_ANSWERS))
        return _acquire_result(await self._request(
            "POST", "/v1/locks", json=_body(request),
            timeout=_read_timeout(request, default_wait)))

    async def queue(self, key: str) -> dict[str, Any]:
        _, body = await self._call("GET", "/v1/queue", params={"key": key})
        return dict(body)

    async def waiter(self, key: str, waiter_id: str) -> dict[str, Any] | None:
        """Where one queued request stands (``GET /v1/queue/waiter``: position, holders, who
        is ahead, ``estimateSeconds``); ``None`` when it is not queued (any more)."""
        status, body = await self._call("GET", "/v1/queue/waiter", ok=(200, 404), absent=key,
                                        params={"key": key, "id": waiter_id})
        return dict(body) if status == 200 else None

    async def events(
        self, *, repo: str | None = None, key_prefix: str | None = None,
        types: Iterable[str] = (), on_open: Callable[[], Awaitable[None]] | None = None,
        silence: float | None = None,
    ) -> AsyncIterator[Event]:
        """Follow ``GET /v1/events``; ``on_open`` runs once the service follows the events for
        this stream (its ``: following`` comment): every event published after that is
        yielded, so state read in ``on_open`` misses no change. A stream silent for
        ``silence`` seconds is given up, as :meth:`Client.events` gives it up."""
        params, headers = _event_params(repo, key_prefix, types, None)
        silence = STREAM_SILENCE_SECONDS if silence is None else silence
        retry = _ConnectRetry(self._connect_time)
        try:
            while True:
                try:
                    response = await self._http.send(self._http.build_request(
                        "GET", "/v1/events", params=params, headers=headers,
                        timeout=httpx.Timeout(10.0, read=silence)), stream=True)
                    break
                except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                    if not _restarting(error) or (pause := retry.pause()) is None:
                        raise
                await asyncio.sleep(pause)
            async with contextlib.aclosing(response):
                if response.status_code != 200:
                    await response.aread()
                    raise ServiceError(response.status_code, _error_of(response), None)
                _event_stream(response)
                lines: list[str] = []
                async for line in response.aiter_lines():
                    if line == _FOLLOWING_LINE and on_open is not None:
                        await on_open()
                        continue
                    lines.append(line)
                    if line == "":
                        for event in parse_sse(lines):
                            if event is not None:
                                yield event
                        lines = []
                for _ in parse_sse(lines):  # what is left is no whole event: StreamCut, if any
                    pass
        except httpx.ReadTimeout:
            raise ServiceError(0, _silent(self._http.base_url, silence)) from None
        except (httpx.HTTPError, StreamCut) as error:
            raise ServiceError(0, f"lost the event stream of "
                                  f"{shown_url(self._http.base_url)}: {error}") from None


def _not_released(repo: str, pull: int, answer: PullRelease) -> str:
    """The message of a release by pull that a store did not answer."""
    stores = " and ".join(answer.unavailable)
    return (f"released {len(answer.released)} lock(s) of pull #{pull} of {repo}, but the "
            f"{stores} lock store did not answer: the pull's locks there stay held (release "
            "it again once the store answers)")


CONNECT_BACKOFF = 0.1
"""Seconds, the first bound of the random pause before a call is sent again when no connection
could be made; it doubles after each attempt up to :data:`CONNECT_BACKOFF_MAX`."""

CONNECT_BACKOFF_MAX = 2.0


class _ConnectRetry:
    """The pauses of one call sent again while no connection to the service can be made (its
    port refuses, the address does not answer: nothing reached the service, so the next attempt
    is the first it sees, whatever the call; :func:`_restarting` says which failures). A
    restart or a rollout of the service closes its port for a few seconds; a step run then
    waits for it instead of failing. Any other failure (a connection lost once the request was
    sent, no answer in time, an error answer) is not retried: the service may have acted on
    it. Full jitter, as the Go client's: a random pause
    up to a bound that doubles; no pause that would end past ``within`` seconds from the first
    attempt (the client's ``connect_timeout``), so the call gives up within its time."""

    def __init__(self, within: float) -> None:
        self._until = time.monotonic() + within
        self._bound = CONNECT_BACKOFF

    def pause(self) -> float | None:
        """The seconds to wait before the next attempt; None: give up."""
        pause = random.uniform(0.0, self._bound)
        if time.monotonic() + pause > self._until:
            return None
        self._bound = min(2 * self._bound, CONNECT_BACKOFF_MAX)
        return pause


_RESTART_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET})
"""What a connect fails with while the service restarts: its port refuses, or resets the
connection being made."""


def _restarting(error: httpx.ConnectError | httpx.ConnectTimeout) -> bool:
    """Whether a connection that could not be made failed as a restart makes it fail (refused,
    reset while connecting, no answer in time), read from the error's causes down to the
    socket's. A certificate the client does not trust or a host name that does not resolve
    also fails the connect, but no restart mends it: it is shown at once, in its own words."""
    if isinstance(error, httpx.ConnectTimeout):
        return True
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (ssl.SSLError, socket.gaierror)):
            return False
        if isinstance(cause, OSError) and cause.errno in _RESTART_ERRNOS:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _body(request: LockRequest | BatchLockRequest) -> Any:
    return request.model_dump(mode="json", by_alias=True, exclude_none=True)


WAIT_MARGIN = 30.0
"""Seconds an acquire's answer may take past its wait in the queue: the service's own work."""

_DEFAULT_TIMEOUT = "enhanced-locking-default-timeout"
"""The setting, in ``GET /v1/config``'s ``config``, that a wait without a duration waits."""

_CONFIG_ANSWERS = (200, 401, 403)
"""``GET /v1/config``'s statuses a waiting acquire goes on after (see :func:`_default_wait_of`)."""


def _default_wait_of(status: int, body: dict[str, Any]) -> float:
    """How long a request that waits without a duration (``wait: true``) waits, in seconds:
    the service's ``enhanced-locking-default-timeout``, from its ``GET /v1/config`` answer.
    Only the service knows it. A caller that may not read the configuration (401, 403: a
    Role narrowed to its repositories), or a service that does not say, is given the longest
    wait of a service with default settings, its ``enhanced-locking-max-timeout``: a longer
    default needs the wait's duration written out."""
    config = body.get("config") if status == 200 else None
    said = config.get(_DEFAULT_TIMEOUT) if isinstance(config, dict) else None
    if isinstance(said, str):
        with contextlib.suppress(ValueError):
            return parse_duration(said).total_seconds()
    return DEFAULT_MAX_TIMEOUT.total_seconds()


def _read_timeout(request: LockRequest | BatchLockRequest,
                  default_wait: float | None = None) -> httpx.Timeout:
    """As long as the request may wait in the queue, plus :data:`WAIT_MARGIN`; a wait without
    a duration waits ``default_wait`` (the service's, :func:`_default_wait_of`)."""
    wait = request.wait
    if wait is True:
        seconds = default_wait if default_wait is not None else DEFAULT_MAX_TIMEOUT.total_seconds()
    else:
        seconds = wait.total_seconds() if isinstance(wait, timedelta) else 0.0
    return httpx.Timeout(10.0, read=seconds + WAIT_MARGIN)


def _unreached(base_url: httpx.URL, error: httpx.HTTPError) -> ServiceError:
    """The error of a call that reached no service (no connection, or one lost), no status."""
    return ServiceError(0, f"cannot reach the lock service at {shown_url(base_url)}: {error}")


def _no_answer(base_url: httpx.URL, error: httpx.ReadTimeout) -> str:
    """The message of a call whose answer did not come within its read timeout."""
    try:
        read = error.request.extensions.get("timeout", {}).get("read")
    except RuntimeError:  # no request on the error
        read = None
    within = f" within {read:g}s" if isinstance(read, int | float) else ""
    return (f"the lock service at {shown_url(base_url)} did not answer{within}: given up (it, "
            "or a proxy between, took the call and sent nothing back)")


def _answer(response: httpx.Response, ok: tuple[int, ...], *,
            absent: str | None = None) -> tuple[int, Any]:
    """The status and the JSON object of an answer whose status is in ``ok``; else
    :class:`ServiceError`: with the answer's ``error`` and its body (its JSON, else its text:
    a proxy's error page, say), or, for an answer in ``ok`` that is not a JSON object (a
    sign-in page), status 0: what answered is not the lock service.

    ``absent``: the key whose 404 means nothing is there. Only the service's own 404 for it
    (naming it as ``lockKey``) is that answer; another 404 (a base URL whose path is not the
    service's, a proxy's) says nothing of the lock and is status 0 as well."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if response.status_code not in ok:
        raise ServiceError(response.status_code, _error_of(response), body)
    if not isinstance(body, dict):  # every answer of the service is a JSON object
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        raise ServiceError(0, f"{shown_url(response.request.url)} did not answer as the lock "
                              f"service: HTTP {response.status_code} {kind}, not a JSON object")
    if absent is not None and response.status_code == 404 and body.get("lockKey") != absent:
        raise ServiceError(0, f"{shown_url(response.request.url)} did not answer as the lock "
                              f"service: HTTP 404 that is not its answer for {absent} (is the "
                              "URL's path the service's?)")
    return response.status_code, body


def _event_stream(response: httpx.Response) -> None:
    """Nothing if ``response`` (a 200) is an event stream; else :class:`ServiceError` 0, as
    for any answer that is not the lock service's (a sign-in page would otherwise be read as
    a stream without events until it ends)."""
    kind = response.headers.get("content-type", "no content type").split(";")[0].strip()
    if kind != "text/event-stream":
        raise ServiceError(0, f"{shown_url(response.request.url)} did not answer as the lock "
                              f"service: HTTP {response.status_code} {kind}, not an event "
                              "stream")


_ACQUIRE_ANSWERS = (200, 409, 503)
"""The statuses whose body is an acquire's answer: granted, refused by the locks' state, and
refused because a store did not answer (503 with reason ``unavailable``, the acquire's answer;
the service's other 503, ``overloaded``, is not one: :func:`_acquire_answer`)."""


def _acquire_result(response: httpx.Response) -> AcquireResult:
    """An acquire's answer; a grant is ``fresh`` (granted by this call) only when the service
    said so (``Lock-Grant: new``): one it did not say of may be the lock its pull held. One
    it said is its pull's shared hold made exclusive (``upgraded``) is
    :attr:`~AcquireResult.upgraded`."""
    result = AcquireResult.model_validate(
        _acquire_answer(*_answer(response, _ACQUIRE_ANSWERS)))
    grant = response.headers.get(GRANT_HEADER)
    if result.acquired and result.lock is not None and grant != NEW_GRANT:
        return AcquireResult.granted(result.lock, fresh=False, upgraded=grant == GRANT_UPGRADED)
    return result


def _acquire_answer(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """``body``, an acquire's answer (see :data:`_ACQUIRE_ANSWERS`); a 503 that is not one
    (``overloaded``, nothing done) is :class:`ServiceError`, as any other error answer."""
    if status == 503 and "acquired" not in body:
        raise ServiceError(503, str(body.get("error") or "HTTP 503"), body)
    return body


def _silent(base_url: httpx.URL, silence: float) -> str:
    """The message of an event stream given up for its silence."""
    return (f"the event stream of {shown_url(base_url)} sent nothing for {silence:g}s, not even "
            f"the keep-alive the service sends every {KEEPALIVE_SECONDS}s: given up (the "
            "service or a proxy between stopped sending without closing it)")


def _error_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    message = body.get("error") if isinstance(body, dict) else None
    return str(message or f"HTTP {response.status_code}")


def _event_params(repo: str | None, key_prefix: str | None, types: Iterable[str],
                  last_event_id: str | None) -> tuple[dict[str, str], dict[str, str]]:
    params = {k: v for k, v in {"repo": repo, "keyPrefix": key_prefix}.items() if v}
    if kinds := ",".join(types):
        params["type"] = kinds
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    return params, headers


def parse_sse(lines: Iterable[str]) -> Iterator[Event | None]:
    """Events of a Server-Sent Events text stream (keep-alive comments yield nothing).

    A ``gap`` event (the server's ring no longer holds everything after ``Last-Event-ID``)
    comes out as an :class:`Event` of type ``gap``; a store switch's gap has the id of the
    new event bus to resume from (``Last-Event-ID`` from then on), others none.

    An event is whole only once the blank line after it has come: a stream that ends before
    it (the connection cut part way through an event) raises :class:`StreamCut`, and the part
    is not read as an event (its JSON may stop half way; whole, it was still not sent whole).
    """
    fields: dict[str, str] = {}
    for raw in lines:
        line = raw.rstrip("\r")
        if line == "":
            if "data" in fields:
                yield _event(fields)
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        fields[name] = fields[name] + "\n" + value if name in fields else value
    if fields:
        raise StreamCut("it ended in the middle of an event")


class StreamCut(ValueError):
    """An event stream ended part way through an event (:func:`parse_sse`)."""


def _event(fields: dict[str, str]) -> Event | None:
    data = json.loads(fields["data"])
    if fields.get("event") == "gap":
        return Event.model_validate({"id": fields.get("id", ""), "type": "gap",
                                     "time": "1970-01-01T00:00:00Z", "details": data})
    return Event.model_validate(data)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
