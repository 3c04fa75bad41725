"""Watch a real redis-server run scripts, and find every key a script touched undeclared.

Redis Cluster's rule is that a script touches only the keys its call passes in ``KEYS``. Redis
7.0 enforces it only across slots, and every key of one namespace shares one slot, so a slip
would go unnoticed on one server and on a cluster alike. :class:`KeyWatch` runs ``redis-cli
monitor`` beside the server: Redis shows each script call (``EVALSHA``/``EVAL``/``FCALL`` with
its ``KEYS``) and, right after it, every command the script ran (from the client ``lua``).
:meth:`KeyWatch.stop` reads that log and reports each command whose key was not declared by
its call, and each call that was asked again with more keys (the same call id, ``KEYS[2]``)
after it had written: a script that asks for keys must have written nothing. (A call sent
again with the keys it had is no ask: its connection broke, or the store's incarnation
changed under it.)
"""

from __future__ import annotations

import hashlib
import itertools
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tests.support.redis_server import LOOPBACK, RedisServer

from enhanced_locking.backends.redis_events import APPEND_EVENTS

__all__ = ["KeyWatch", "Watched", "check_log"]

_SCRIPT_CALLS = {"evalsha", "eval", "fcall", "evalsha_ro", "eval_ro", "fcall_ro"}
_KEYS_ALL = {"del", "exists", "unlink", "mget", "touch"}
_NO_KEYS = {"time", "publish", "spublish"}
_WRITES = {"set", "incr", "incrby", "hset", "hdel", "sadd", "srem", "zadd", "zrem",
           "zremrangebyscore", "pexpireat", "pexpire", "persist", "del", "unlink", "xadd",
           "expire", "getdel", "hincrby"}
_MARKERS = itertools.count(1)
_NO_CALL_ID = {hashlib.sha1(APPEND_EVENTS.encode()).hexdigest()}
"""Scripts whose ``KEYS[2]`` is no call id (the events' append: its process's writer key, the
same for each of its writes)."""
_LINE = re.compile(r"^\+?(?P<at>[\d.]+) \[(?P<db>\d+) (?P<client>[^\]]+)\] (?P<args>.*)$")
_TOKEN = re.compile(r'"([^"\\]*(?:\\.[^"\\]*)*)"')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", '"': '"', "\\": "\\"}


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)


def _unescaped(match: re.Match[str]) -> str:
    escaped = match.group(1)
    if len(escaped) == 3:  # \xHH
        return chr(int(escaped[1:], 16))
    return _ESCAPES.get(escaped, escaped)


def _unquote(text: str) -> str:
    """A token of a ``MONITOR`` line as Redis wrote it (its quotes gone), escapes undone."""
    return _ESCAPE.sub(_unescaped, text) if "\\" in text else text


@dataclass
class _Call:
    line: int
    script: str
    keys: list[str]
    commands: list[tuple[int, list[str]]] = field(default_factory=list)


@dataclass
class Watched:
    """What the log showed."""

    calls: int = 0
    """Script calls seen."""
    scripts: Counter[str] = field(default_factory=Counter)
    """Calls by script (the SHA of an EVALSHA, the function of an FCALL)."""
    commands: int = 0
    """Commands those scripts ran."""
    asked_again: int = 0
    """Calls made again under the same call id (a script asked for keys, or a refusal)."""
    undeclared: list[str] = field(default_factory=list)
    """``command key (line n)`` of each key a script touched that its call did not declare."""
    wrote_then_asked: list[str] = field(default_factory=list)
    """Calls that wrote (besides the store's incarnation) and then ran again under the same
    call id (a script that asks for keys must have written nothing)."""
    lost: str | None = None
    """Why the watch stopped watching before it was stopped, while the server ran on (its
    connection cut: the calls after that were not watched); None when it watched to the end
    (through each restart of a server it follows)."""


def _words(text: str, count: int | None = None) -> list[str]:
    """The first ``count`` words (None: all) of a ``MONITOR`` line's command, unquoted."""
    return [_unquote(found.group(1))
            for found in itertools.islice(_TOKEN.finditer(text), count)]


def _touched(command: list[str]) -> list[str]:
    name = command[0].lower()
    if name in _NO_KEYS or len(command) < 2:
        return []
    if name in _KEYS_ALL:
        return command[1:]
    return [command[1]]


def check_log(text: str) -> Watched:
    """Read a ``MONITOR`` log and check every script call in it."""
    watched = Watched()
    calls: list[_Call] = []
    current: _Call | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        match = _LINE.match(raw.strip())
        if match is None:
            continue
        # Only the words the checks read are unquoted (a call's values and a library's load
        # are long): a script's command's name and keys, a call's script and keys.
        said = match.group("args")
        if match.group("client") == "lua":
            command = _words(said, 2)
            if not command:
                continue
            if current is not None:
                if command[0].lower() in _KEYS_ALL:
                    command = _words(said)
                current.commands.append((number, command))
            continue
        head = _words(said, 3)
        if not head:
            continue
        current = None
        if head[0].lower() in _SCRIPT_CALLS and len(head) >= 3:
            count = int(head[2])
            current = _Call(number, head[1], _words(said, 3 + count)[3:])
            calls.append(current)
    by_id: dict[str, list[_Call]] = {}
    for call in calls:
        watched.calls += 1
        watched.scripts[call.script] += 1
        declared = set(call.keys)
        for number, command in call.commands:
            watched.commands += 1
            for key in _touched(command):
                if key not in declared:
                    watched.undeclared.append(f"{command[0]} {key} (line {number})")
        if len(call.keys) >= 2 and call.script not in _NO_CALL_ID:
            by_id.setdefault(call.keys[1], []).append(call)
    for same in by_id.values():
        for earlier, later in itertools.pairwise(same):
            watched.asked_again += 1
            incarnation = earlier.keys[0]
            writes = [c for _, c in earlier.commands
                      if c[0].lower() in _WRITES and _touched(c) != [incarnation]]
            # A call made again with the keys it had is the same call sent again (its
            # connection broke: answered from its call id, or run again by a script that keeps
            # no answer, the heartbeat; or the store's incarnation changed under it). One made
            # again with more keys had asked for them.
            if writes and len(later.keys) > len(earlier.keys):
                watched.wrote_then_asked.append(
                    f"line {earlier.line}: {' '.join(writes[0][:2])} before its call was made "
                    "again")
    return watched


class KeyWatch:
    """``redis-cli monitor`` against one loopback server, its log kept in ``log``.

    A restart of the server ends the monitor (its connection goes with the server): a watch
    made by :meth:`following` starts another as the server comes back (before ``start``
    returns), the same log going on. A monitor that ended otherwise while the server ran on
    is :attr:`Watched.lost`: the test it watched did not run watched to its end."""

    def __init__(self, host: str, port: int, log: Path, *, password: str | None = None) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed: install Debian's redis-tools "
                               "(make redis)")
        self.log = log
        self._cli = cli
        self._server = (host, port, password)
        self._lost: str | None = None
        self._out = log.open("wb")
        self._process = self._monitor()

    @classmethod
    def following(cls, server: RedisServer, log: Path) -> KeyWatch:
        """A watch of ``server`` that watches again each time the server starts again (with
        the password it has then)."""
        watch = cls(LOOPBACK, server.port, log, password=server.password)
        server.on_start.append(lambda: watch.watch_again(password=server.password))
        return watch

    def _monitor(self) -> subprocess.Popen[bytes]:
        """A ``redis-cli monitor`` writing on at the log's end, once it watches ("OK", at most
        5 s)."""
        host, port, password = self._server
        command = [self._cli, "-h", host, "-p", str(port)]
        if password is not None:
            command += ["--no-auth-warning", "-a", password]
        start = self.log.stat().st_size
        process = subprocess.Popen([*command, "monitor"], stdout=self._out,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while (self.log.stat().st_size == start and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
        return process

    def watch_again(self, *, password: str | None) -> None:
        """The server started again: the old monitor's connection was of the server before
        (ended, or ending); a new one watches this one (none once the watch is stopped)."""
        if self._out.closed:
            return
        self._process.terminate()
        self._process.wait(timeout=5)
        host, port, _ = self._server
        self._server = (host, port, password)
        self._process = self._monitor()

    def stop(self) -> Watched:
        """Stop watching; what the log shows."""
        self._drain()
        self._process.terminate()
        self._process.wait(timeout=5)
        self._out.close()
        watched = check_log(self.log.read_text(encoding="utf-8", errors="replace"))
        watched.lost = self._lost
        return watched

    def _drain(self) -> None:
        """Wait until the lines on their way are in the log: a marker sent to the server now
        is shown after them (at most 5 s). A server that does not answer it (stopped, or its
        password changed): a moment instead. A ``redis-cli monitor`` that has ended while the
        server answers (its connection cut: the test killed its clients, or restarted a server
        the watch does not follow) has written all it will, and is noted as lost."""
        host, port, password = self._server
        marker = f"key-watch-end-{next(_MARKERS)}".encode()
        start = self.log.stat().st_size
        try:
            # One try: redis-py's default retries a refused connection three times with
            # backoff, which held every test that stopped its server some 4.5 s in teardown.
            with redis.Redis(host=host, port=port, password=password, socket_timeout=1,
                             socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)) as client:
                client.echo(marker)
        except redis.RedisError:
            time.sleep(0.1)
            return
        deadline = time.monotonic() + 5
        with self.log.open("rb") as log:
            log.seek(start)
            seen = b""
            while time.monotonic() < deadline:
                ended = self._process.poll() is not None  # before the read: nothing after it
                seen = seen[-len(marker):] + log.read()
                if marker in seen:
                    return
                if ended:
                    self._lost = (f"the watch of {host}:{port} (redis-cli monitor) ended while "
                                  "the server ran on (its connection cut: the test killed its "
                                  "clients?); the script calls after that were not watched")
                    return
                time.sleep(0.005)
