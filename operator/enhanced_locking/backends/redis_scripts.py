"""The Lua scripts of the Redis backend: every check-and-change runs inside Redis, atomically.

Each script is a file of its own in ``lua/`` (``acquire.lua``, ``release.lua``, ...) with its
contract at the top (``KEYS``, ``ARGV``, what it returns); ``lua/lib.lua`` is the library they
share, after one generated line with the time constants below. The files are read once,
by :func:`~enhanced_locking.backends.redis_lua.source` (package data, through
:mod:`importlib.resources`), and assembled into one Redis 7
**function library** (:data:`FUNCTIONS`): the library, then each script as a function of it
(:func:`function_name`) whose call runs ``begin`` and then the script's file. Redis compiles
and sets up the library once, at ``FUNCTION LOAD``; a call (``FCALL``) runs only its script,
not the library's setup as an ``EVALSHA`` of library plus script did (about 40 µs of server
CPU per call). The library's name carries :data:`VERSION`, a digest of its text, and so do
its functions' names: replicas of two releases (a rolling upgrade) each call their own, side
by side on one Redis. :class:`~enhanced_locking.backends.redis_store.RedisBackend` loads the
library when a call finds its function missing (a new Redis, or one restarted without
persistence: the equivalent of ``NOSCRIPT``) and calls it again, once; on a Redis Cluster the
library is loaded on every master (replicas receive it from their master, so a promoted
replica has it). A Redis older than 7.0 (no functions) gets each script as before, the
library then the script (:func:`script`), by ``EVALSHA``. ``make lint`` checks the assembled
library with ``luacheck`` (``hack/lint_lua.py``).

**Arguments every script takes**: ``ARGV[1]`` is ``base`` (``{key-prefix}{namespace}:``),
``ARGV[2..5]`` the queue policy (priority flag 0/1, starvation threshold in ms, max boost, max
queue size), ``ARGV[6]`` the calling replica's id, ``ARGV[7..9]`` the store's incarnation the
caller knows, a fresh id to use if a new incarnation must be started, and the restart
quarantine in ms; ``ARGV[10]`` the policy rules compiled by
:func:`enhanced_locking.policies.compile_rules` (JSON, ``''`` for none). Script-specific
arguments start at ``ARGV[11]``. ``KEYS`` name the namespace's own keys, then every other key
the script touches: the caller declares those it knows, and a script that finds it needs more
answers ``{'need', names}`` before writing anything and is called again with them
(``docs/03-redis.md``, "Keys found while a script runs"). Everything about one lock key
carries the key as a hash tag (``{K}``); on a Redis Cluster ``base`` carries the namespace's
tag instead. The lean functions (:data:`LEAN`) take a shorter layout, only what their code
reads: ``KEYS[1..5]`` (incarnation, call id's key, held, fenced, queued) and ``ARGV[1]`` the
incarnation known (no base: they form no name; the call id is the end of ``KEYS[2]``; no
quarantine: a store that lost its data is left to the full scripts); their own arguments start
at ``ARGV[2]`` (``begin_lean`` in ``lua/lib.lua``).

**Keys** (``K`` a lock key, ``W`` a waiter id, ``R`` a replica id)::

    lock:{K}        hash: data (Atlantis JSON), token, at, exp, repo, pull, path, ws
                    [, claim, lease]: the exclusive holder
    shared:{K}      hash: "repo#pull" -> the JSON of a shared holder's lock tuple
    fence:{K}       the key's fencing counter (INCR; never lowered)
    queue0..3:{K}   sorted sets, one per base priority: member "%016d(seq):W"
                    (RedisKeys.queue_member), score enqueue ms
    bypull:{K}      sorted set, all scores 0: member "repo#pull\\nW" for each entry of K's
                    queues ("\\nW": its record gone), so a pull's own are one ZRANGEBYLEX range;
                    first, "\\t<gen>", the generation it was made whole in
    bypull          hash: seq (the enqueue counter as the last enqueue that kept its entries
                    left it), gen (the indexes' generation; moves on when seq is not the
                    counter: a release that keeps no index queued a waiter)
    waiter:W        hash: id, keys (JSON), repo, pull, level, enq, seq, deadline, ttl,
                    replica (the replica id R of its caller), rid, and "d:K" = the Atlantis
                    JSON to store for each key K
    outcome:W       hash, kept a few minutes: kind (granted/timeout/...), waiter, locks
                    ([key, token, held] each: held 1 when its pull held it already)
    held, fenced, queued          sets of keys (held, with a counter, with waiters)
    pull:{repo#num} set of the keys a pull may hold
    waits:{repo#num} set of the ids of a pull's waiters (the deadlock check's walk); trusted
                    while the mark ``bypull``'s field ``waits`` is the enqueue counter
    replicas        the liveness set (RedisKeys.liveness): R scored by the server time until
                    which R's waiters count as alive; "" (in a set made anew over another
                    type) until when a replica not in the set counts as alive
    seq             the enqueue counter (FIFO tie-break across keys)
    epoch           the incarnation (RedisKeys.incarnation), a hash: id, base (first fencing
                    token - 1 of new counters), until, since
    op:C            a write's answer under its call id C (kept OP_MS, for a retried call);
                    ["given_back"] once a give-back of C ran (GIVE_BACK)
    notify:R        pub/sub channel: "kind:W" when one of R's waiters is granted or dropped

**Incarnations.** Every script that changes something first checks the store's incarnation
(``guard``). The keys ``epoch``, ``replicas`` and the waiter field ``replica`` keep the names
they were stored under (renaming them would need a migration of stored data); the scripts
call them the incarnation, the liveness set and the replica id.
A Redis that comes back without its data (restarted without persistence) has no incarnation; the
first replica that notices starts a new one whose fencing counters continue from the server
clock (``ms * 1000``, above any token handed out before) and whose grants wait out the
restart quarantine, so a lock granted before the loss is not granted again at once. A new
store (no replica knew an incarnation) starts at 0 without quarantine; a replica that knew
another one and finds such a store starts the quarantine then (the first call after the loss
came from a replica that knew nothing), and counters continue from the clock.

**Time** is the server's (``TIME``), read once per call. A lock is held while ``exp`` is 0
or in the future; the hash itself is given a Redis expiry a grace period after ``exp`` so it
is collected even if no caller ever looks at it again, but every decision is made on ``exp``
(so an expiry can be reported with the lock that expired).

**Service order** mirrors :func:`enhanced_locking.backends.waiting.service_order` exactly:
effective level ``min(3, base + min(boost, floor(waited / threshold)))`` (0 for everybody when
the priority flag is off), highest first, then enqueue time, then ``seq``. Within one base
priority the FIFO order *is* the service order (an earlier waiter has waited longer, so its
level is at least as high), so the next waiter is the best of the four queue heads: a hand-off
reads a handful of entries, not the whole queue. Computing a waiter's position walks the queue
up to it (bounded by ``max-queue-size``).

**Rules and modes.** The grant step (``verdict`` in the library) mirrors
:func:`enhanced_locking.policies.verdict` line by line, the way the service order is mirrored:
Python compiles the rules once per change into ``ARGV[10]`` (globs as anchored Lua patterns,
times in ms) and the script decides with Redis's own state, so a grant in a release's hand-off
follows the same rules as a new request, on whichever replica runs it. We chose this over
deciding in Python under a per-key guard: a guard would cost a round trip per decision and
could not cover a hand-off across the keys of a concurrency group in one atomic step. The
unit tests of ``tests/unit/test_policy_rules.py`` run the same table against every store.
Concurrency counts scan the held set (cost: one read per held lock, only when a limit
applies).

**Hand-off and claims.** A release frees the key and, in the same script, grants it to the
first waiter in service order that can take it: its deadline has not passed, its replica is
alive (heartbeat in ``replicas``), and each of its other keys (a batch) is free or its own.
Waiters failing the first two tests are dropped and told why. The grant is *claimed*: its
``exp`` is at most ``CLAIM_MS`` away until the waiter's replica confirms it (``CONFIRM``), so a
grant made to a replica that died a moment ago lapses and moves on instead of staying held by
nobody. The waiter's replica learns of the grant through ``PUBLISH notify:R``. A lock the
waiter's pull held already, answered unchanged, may carry another waiter's claim (a request of
the same pull granted from the queue, unconfirmed): it ends when a caller of this waiter hears
the grant, and stays the other waiter's when the grant is given back (``settle_heard``).
"""

from __future__ import annotations

import hashlib

from enhanced_locking.backends.redis_lua import source

__all__ = [
    "CLAIM_MS",
    "FUNCTIONS",
    "FUNCTION_NAMES",
    "GRACE_MS",
    "LEAN",
    "LIBRARY",
    "LIBRARY_NAME",
    "NAMES",
    "OP_MS",
    "OUTCOME_MS",
    "REPLICA_MS",
    "VERSION",
    "function_body",
    "function_name",
    "script",
]

CLAIM_MS = 5_000
"""How long a grant from the queue waits for its waiter's replica to confirm it."""

GRACE_MS = 60_000
"""How long after ``exp`` Redis keeps an expired lock's hash (decisions use ``exp``)."""

OUTCOME_MS = 300_000
"""How long a waiter's outcome is kept (for a cancel that lost the race, or a reconnect)."""

REPLICA_MS = 5_000
"""A replica counts as alive this long after its last heartbeat (it beats every second)."""

OP_MS = 10_000
"""How long a write's answer is kept for a retry of the same call (retries come at once; the
answers of a busy store, about 1 KB each, should not pile up)."""


_TIMES = (("CLAIM_MS", CLAIM_MS), ("GRACE_MS", GRACE_MS), ("OUTCOME_MS", OUTCOME_MS),
          ("REPLICA_MS", REPLICA_MS), ("OP_MS", OP_MS))

NAMES = (
    "ACQUIRE",
    "RELEASE",
    "EXPIRE",
    "RELEASE_BY_PULL",
    "CANCEL",
    "CONFIRM",
    "STATUS",
    "GET",
    "LIST",
    "REFRESH",
    "QUEUE",
    "WAIT_GRAPH",
    "WAIT_GRAPH_FROM",
    "REINDEX_WAITS",
    "HOLDERS",
    "WAKE",
    "PING",
    "HEARTBEAT",
    "RAISE_TOKEN",
    "ADOPT",
    "REPLACE",
    "REINDEX",
    "LEAN_ACQUIRE",
    "LEAN_RELEASE",
    "GIVE_BACK",
)
"""The scripts, by the name of their constant; each is ``lua/<name in lower case>.lua``."""


# One line before the library: Lua reads the time constants from here, not a copy of them.
_PREAMBLE = ("-- luacheck: push ignore 211\n"  # not every script uses each of them
             "local " + ", ".join(name for name, _ in _TIMES) + "\n"
             "  = " + ", ".join(str(value) for _, value in _TIMES) + "\n"
             "-- luacheck: pop\n")

LIBRARY = _PREAMBLE + source("lib.lua")
"""What the function library starts with: the time constants, then ``lua/lib.lua``."""


LEAN = ("LEAN_ACQUIRE", "LEAN_RELEASE")
"""The scripts whose calls take the lean layout (``begin_lean`` in ``lua/lib.lua``): only the
namespace's first five keys and one of the common arguments."""


def _begin(name: str) -> str:
    return "begin_lean" if name in LEAN else "begin"


def function_body(name: str) -> str:
    """The function that runs script ``name`` (one of :data:`NAMES`) in :data:`FUNCTIONS`,
    without its name: it sets up the call (``begin``, or ``begin_lean`` for :data:`LEAN`),
    then runs ``lua/<name>.lua``."""
    return (f"function(call_keys, call_args)\n  {_begin(name)}(call_keys, call_args)\n"
            + source(f"{name.lower()}.lua") + "end")


def _digest() -> str:
    text = LIBRARY + "".join(function_body(name) for name in NAMES)
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()[:12]


VERSION = _digest()
"""A digest of the library's text: a changed script is a library of another name."""

LIBRARY_NAME = f"enhanced_locking_{VERSION}"
"""The name the library is loaded under (``FUNCTION LIST LIBRARYNAME enhanced_locking_``)."""


def function_name(name: str) -> str:
    """The name ``FCALL`` calls script ``name`` by (function names are global in Redis, so
    each carries the library's version too)."""
    return f"el_{VERSION}_{name.lower()}"


FUNCTION_NAMES = {name: function_name(name) for name in NAMES}
"""Each script's function name, by the name of the script."""

_HEADER = f"#!lua name={LIBRARY_NAME}\n"

FUNCTIONS = _HEADER + LIBRARY + "".join(
    f"redis.register_function('{FUNCTION_NAMES[name]}', {function_body(name)})\n"
    for name in NAMES)
"""The function library ``FUNCTION LOAD`` receives: the library, then one function a script."""


def script(name: str) -> str:
    """Script ``name`` as one text for ``EVAL`` (the library, then the script), for a Redis
    older than 7.0, which has no functions: the library is then set up on every call. The
    script runs in a function of its own, as in :data:`FUNCTIONS` (:func:`function_body`), so
    that its locals are not counted with the library's against the 200 locals Lua allows a
    function (the library alone is near them)."""
    return ("local call_keys, call_args = KEYS, ARGV\n" + LIBRARY
            + f"return ({function_body(name)})(call_keys, call_args)\n")
