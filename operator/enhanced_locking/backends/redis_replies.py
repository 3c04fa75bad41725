"""The Redis scripts' replies as typed values: one decoding function per reply shape.

A Lua script answers with nested arrays whose meaning is positional (see the ``returns`` lines
at the top of each ``lua/*.lua`` file); a lean function's answer is the JSON text of such an
array, the text it keeps under the call id. Each shape is decoded here, once, into a named tuple,
right after the call; nothing else in the backend reads a reply by position. A reply shape
that changes in a script changes in the function named in its ``returns`` comment, and only
there.

The values stay what Redis sent (text, with the scripts' ``false`` as ``None``): turning them
into :class:`~enhanced_locking.types.Lock` and :class:`~.waiting.Waiter` needs the codec and
the backend's state, which stay in :mod:`redis_store`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "Acquired",
    "Ahead",
    "Cancel",
    "Confirm",
    "Dropped",
    "Expired",
    "GiveBack",
    "GrantRow",
    "GroupHeld",
    "LockRow",
    "PullReleased",
    "QueueReply",
    "Queued",
    "Refresh",
    "Refusal",
    "Refused",
    "Release",
    "Served",
    "Took",
    "WaitEntry",
    "WaitGraph",
    "WaiterRecord",
    "acquire",
    "broken_index",
    "cancel",
    "confirm",
    "expiry",
    "full",
    "give_back",
    "lock",
    "locks",
    "maybe_lock",
    "need",
    "queue",
    "refresh",
    "refusal",
    "release",
    "release_by_pull",
    "served",
    "spoiled_answer",
    "wait_graph",
    "wait_graph_from",
    "waiter",
]

WaiterRecord = dict[str, str]
"""A waiter's hash (``waiter:W``) by field name: ``id``, ``keys`` (JSON), ``d:K``, ..."""


class LockRow(NamedTuple):
    """A lock as the library's ``read_lock`` / ``stamp`` answer it (``lib.lua``)."""

    key: str
    data: str
    """Atlantis's JSON of the lock, as stored."""
    token: str
    at: str
    """Grant time, server ms."""
    exp: str
    """End of the lease (or of a pending claim), server ms; ``0`` for none."""
    repo: str
    pull: str
    claim: str | None
    """The waiter id while a grant from the queue awaits confirmation."""
    lease: str | None
    mode: str
    path: str
    ws: str
    unreadable: str | None = None
    """Why the stored holder is not a lock (another Redis type at the key, a hash missing its
    fields, a shared holder's record that does not decode); ``data`` is then the bytes found
    (often none). Absent from rows stored before it existed (a shared holder's record)."""


class Refusal(NamedTuple):
    """A write refused by ``guard`` (``lib.lua``): the store's incarnation moved, or
    quarantine."""

    kind: str
    """``incarnation`` (a new one, or one the caller did not know) or ``quarantine``."""
    incarnation: str
    until: int
    now: int
    replaced: str = ""
    """Why the incarnation's record was replaced (another Redis type stood there), or ''."""


class GrantRow(NamedTuple):
    """A waiter served from the queue with its locks (``fx.granted`` in ``lib.lua``).

    It carries no ``kept`` (the keys its pull held already), on purpose: nothing gives back
    from a hand-off row. Its readers, the locker's steps told of the hand-offs a call made
    (a release, an acquire that served a queue, a cancel, a release by pull), count it, name
    the waiter in its keys' events and arm the lease timers of its locks. What is given back
    of a grant is decided on the waiter's own answer: CONFIRM's (:class:`Confirm`), CANCEL's
    (:class:`Cancel`) or a retry's (:class:`Acquired`), each read from the waiter's outcome,
    which says key by key (``kept_keys``). The :class:`~enhanced_locking.backends.waiting.Grant`
    made of it says so: ``kept`` not said (``None``)."""

    waiter: WaiterRecord
    locks: tuple[LockRow, ...]
    fresh: bool


class Served(NamedTuple):
    """What serving queues did: ``expire.lua``, ``wake.lua`` (``released`` is none there),
    ``release.lua``."""

    released: LockRow | None
    granted: tuple[GrantRow, ...]
    dropped: tuple[WaiterRecord, ...]
    others: tuple[LockRow, ...] = ()


class Acquired(NamedTuple):
    """``acquire.lua``: ``granted``."""

    locks: tuple[LockRow, ...]
    fresh: bool
    kept_keys: frozenset[str] | None
    """The keys of those its pull held already (answered unchanged); ``None``: the grant a
    retry took over does not say (an older replica's)."""
    upgraded: frozenset[str]
    """The keys of ``kept_keys`` whose shared hold of its pull it upgraded to exclusive."""
    expired: tuple[LockRow, ...] = ()
    """The locks whose lease had run out, dropped by the call before it decided."""
    handed: tuple[GrantRow, ...] = ()
    """The waiters the call served before it decided."""


class Took(NamedTuple):
    """``acquire.lua``: ``took``, a grant by the lean path (one key, nobody else there): what
    Redis added to the lock the caller sent."""

    token: str
    at: str
    """Grant time, server ms."""
    exp: str
    """End of the lease, server ms; ``0`` for none."""


class Dropped(NamedTuple):
    """``release.lua``: ``dropped``, a release by the lean path (the owner's own lock, nobody
    waiting): the lock as it was stored (its key and owner are the caller's)."""

    data: str
    """Atlantis's JSON of the lock, as stored (``lean_release.lua`` answers nil when the lock
    stored is the one the caller said it believed stored, named by its token and grant time in
    its ``ARGV[5]``: then the caller's own data, :func:`release`'s ``sent``)."""
    token: str
    at: str
    exp: str


class Refused(NamedTuple):
    """``acquire.lua``: ``held``, ``limited``, ``frozen`` or ``queue_full``."""

    status: str
    key: str
    holder: LockRow | None
    freeze: str = ""
    superseded: tuple[WaiterRecord, ...] = ()
    expired: tuple[LockRow, ...] = ()
    """The locks whose lease had run out, dropped by the call before it decided."""
    handed: tuple[GrantRow, ...] = ()
    """The waiters the call served before it decided."""


class Queued(NamedTuple):
    """``acquire.lua``: ``queued``."""

    waiter: WaiterRecord
    key: str
    holder: LockRow | None
    position: int
    freeze: str
    superseded: tuple[WaiterRecord, ...]
    expired: tuple[LockRow, ...] = ()
    """The locks whose lease had run out, dropped by the call before it decided."""
    handed: tuple[GrantRow, ...] = ()
    """The waiters the call served before it decided."""


class Release(NamedTuple):
    """``release.lua``: ``not_owned`` (``owner`` is the holder; nothing changed) or
    ``released``."""

    owned: bool
    owner: LockRow | None
    served: Served
    ahead: tuple[Ahead, ...] = ()
    """The key's next waiters after the hand-off (``lib.lua``'s ``ahead``)."""
    expired: tuple[LockRow, ...] = ()
    """The key's locks whose lease had run out, dropped by the call before it released."""


class GiveBack(NamedTuple):
    """``give_back.lua``: what it released and handed on (as ``release.lua``), and the
    upgrades of its pull's shared holds that the call it gave back made, left held (each
    still that upgrade: same owner, same token, live)."""

    release: Release
    upgrades_kept: tuple[LockRow, ...] = ()


class Ahead(NamedTuple):
    """A waiter next in a key's queue: what a grant to it will touch, as far as known."""

    id: str
    repo: str
    """Its owner's repository, ``''`` when its record was not read."""
    pull: str
    keys: tuple[str, ...]


class PullReleased(NamedTuple):
    """``release_by_pull.lua``."""

    released: tuple[LockRow, ...]
    served: Served
    expired: tuple[LockRow, ...] = ()
    """The pull's locks whose lease had run out, freed by the same call."""
    holders: tuple[LockRow, ...] | None = None
    """Every live holder of the keys it freed, after it served them (``None``: not said)."""


class Cancel(NamedTuple):
    """``cancel.lua``: ``removed`` (``handed``: the waiters its leaving served), ``kept``,
    ``none`` or ``granted`` (``locks``, ``fresh``, ``kept_keys``)."""

    status: str
    waiter: WaiterRecord | None
    locks: tuple[LockRow, ...] = ()
    fresh: bool = True
    handed: tuple[GrantRow, ...] = ()
    kept_keys: frozenset[str] | None = None
    """With ``granted``: the keys of those its pull held already when it was granted;
    ``None``: the grant does not say (an older replica's)."""
    upgraded: frozenset[str] = frozenset()
    """With ``granted``: the keys of ``kept_keys`` whose shared hold the grant upgraded."""


class Confirm(NamedTuple):
    """``confirm.lua``: ``granted`` (with ``fresh``, and the ``caller`` that owned the waiter
    when it was granted) or ``lost`` (locks to give back)."""

    granted: bool
    locks: tuple[LockRow, ...]
    fresh: bool
    caller: str = ""
    kept_keys: frozenset[str] | None = None
    """With ``granted``: the keys of those its pull held already when it was granted;
    ``None``: the grant does not say (an older replica's)."""
    upgraded: frozenset[str] = frozenset()
    """With ``granted``: the keys of ``kept_keys`` whose shared hold the grant upgraded."""


class Refresh(NamedTuple):
    """``refresh.lua``: ``refreshed``, ``not_held`` or ``not_owned`` (``lock`` its holder)."""

    status: str
    lock: LockRow | None


class QueueReply(NamedTuple):
    """``queue.lua``: the server time and the key's waiters (in no particular order), and
    why the queue cannot be read ('' when it can: one of its sets is another Redis type)."""

    now: int
    waiters: tuple[WaiterRecord, ...]
    damaged: str = ""


class WaitEntry(NamedTuple):
    """One key of ``wait_graph.lua``."""

    key: str
    owners: tuple[tuple[str, str], ...]
    """``(repo, pull)`` of every live holder, the first holder first."""
    waiter_ids: tuple[str, ...]
    shared: bool = False
    """Every holder holds the key shared."""


class GroupHeld(NamedTuple):
    """One held key of a concurrency group (``wait_graph.lua`` asked for them)."""

    key: str
    owners: tuple[tuple[str, str], ...]
    """``(repo, pull)`` of every live holder, the first holder first."""
    shared: bool
    repo: str
    path: str
    workspace: str
    """What the rules see of the key's holders (of its first)."""


class WaitGraph(NamedTuple):
    """``wait_graph.lua``."""

    now: int
    entries: tuple[WaitEntry, ...]
    waiters: tuple[WaiterRecord, ...]
    held: tuple[GroupHeld, ...] = ()
    """With concurrency rules, when asked for: every held key of a group."""


# --- the decoding functions, one per shape ----------------------------------------------------
def refusal(answer: Any) -> Refusal | None:
    """A guard's refusal, or ``None`` when ``answer`` is the script's own reply."""
    if isinstance(answer, list) and answer and answer[0] in ("incarnation", "quarantine"):
        kind, incarnation, until, now, *replaced = answer
        return Refusal(str(kind), str(incarnation), int(until), int(now),
                       str(replaced[0]) if replaced else "")
    return None


def broken_index(answer: Any) -> tuple[str, str] | None:
    """An index set of another Redis type met before any write (``{'index', name, why}``,
    ``lua/lib.lua``'s ``members``): its name and why; ``None`` when ``answer`` is the reply."""
    if isinstance(answer, list) and len(answer) == 3 and answer[0] == "index":
        return str(answer[1]), str(answer[2])
    return None


def spoiled_answer(answer: Any) -> str | None:
    """Why what stands under the call's id is not an answer the call kept
    (``{'spoiled_answer', why}``, ``lua/lib.lua``'s ``guard``; nothing was written), or
    ``None`` when ``answer`` is the script's reply."""
    if isinstance(answer, list) and len(answer) == 2 and answer[0] == "spoiled_answer":
        return str(answer[1])
    return None


def need(answer: Any) -> tuple[str, ...] | None:
    """The names of keys a script needs declared before it can act (``{'need', names}``,
    ``lua/lib.lua``'s ``run``; it wrote nothing), or ``None`` when ``answer`` is its reply."""
    if isinstance(answer, list) and len(answer) == 2 and answer[0] == "need":
        return tuple(str(name) for name in answer[1])
    return None


def full(answer: Any) -> bool:
    """A lean function's ``{'full'}`` (``lean_acquire.lua``, ``lean_release.lua``): it could
    not serve the call and wrote nothing; the call goes to the full script."""
    return isinstance(answer, list) and len(answer) == 1 and answer[0] == "full"


def lock(v: Sequence[Any]) -> LockRow:
    return LockRow(*v)


def maybe_lock(v: Sequence[Any]) -> LockRow | None:
    """A lock, or ``None`` for the scripts' ``{}`` (no lock)."""
    return LockRow(*v) if v else None


def locks(answer: Sequence[Any]) -> tuple[LockRow, ...]:
    return tuple(LockRow(*v) for v in answer)


def waiter(flat: Sequence[Any]) -> WaiterRecord:
    """A waiter's hash from its flat ``HGETALL`` (field, value, field, value, ...)."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def _waiters(answer: Sequence[Any]) -> tuple[WaiterRecord, ...]:
    return tuple(waiter(flat) for flat in answer)


def _grants(answer: Sequence[Any]) -> tuple[GrantRow, ...]:
    return tuple(GrantRow(waiter(flat), locks(held), bool(fresh))
                 for flat, held, fresh in answer)


def served(answer: Sequence[Any]) -> Served:
    """``{released or expired lock or {}, granted, dropped}`` (``wake.lua``), and the other
    expired locks after them, if given."""
    released, granted, dropped, *others = answer
    return Served(maybe_lock(released), _grants(granted), _waiters(dropped),
                  locks(others[0]) if others else ())


class Expired(NamedTuple):
    """``expire.lua``: what serving the key did, and what the same step left: every live
    holder of the key and the server's time then (ms)."""

    served: Served
    holders: tuple[LockRow, ...]
    now: int


def expiry(answer: Sequence[Any]) -> Expired:
    """``{expired lock or {}, granted, dropped, the other expired locks, holders, now}``."""
    released, granted, dropped, others, holders, now = answer
    return Expired(Served(maybe_lock(released), _grants(granted), _waiters(dropped),
                          locks(others)), locks(holders), int(now))


# (typeshed does not list the decoder's scanner, which every JSONDecoder sets in __init__)
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
"""JSON's own C scanner, called directly: ``json.loads`` wraps it in three Python calls and a
pattern match, about 10k instructions, more than the decoding itself for so short a text."""


def _kept(answer: Any) -> Any:
    """A lean function's answer, which is the JSON text it keeps under the call id (one
    string: ``lean_acquire.lua``, ``lean_release.lua``), as the list the scripts answer.

    The scanner reads one value from the start and stops: text it cannot start on (leading
    whitespace, not JSON) or with more after the value (text written under the call id by
    something else passes the scripts' guard if it is JSON) goes to ``json.loads``, which
    decodes it or raises its ``JSONDecodeError``, as it would have for the whole text."""
    if not isinstance(answer, str):
        return answer
    try:
        value, end = _scan(answer, 0)
    except StopIteration:
        return json.loads(answer)
    return value if end == len(answer) else json.loads(answer)


def acquire(answer: Any) -> Took | Acquired | Refused | Queued:
    answer = _kept(answer)
    status = answer[0]
    if status == "took":
        _, token, at, exp = answer
        return Took(str(token), str(at), str(exp))
    # Each answer but ``took`` may end with the locks whose lease had run out (``expired``),
    # and after them the waiters it served before it decided (``_handed``).
    if status == "granted":
        _, held, fresh, kept, upgraded, *expired = answer
        return Acquired(locks(held), bool(fresh), _keys(kept), _upgraded(upgraded),
                        _expired(expired), _handed(expired))
    if status == "queued":
        _, record, key, holder, position, freeze, superseded, *expired = answer
        return Queued(waiter(record), str(key), maybe_lock(holder), int(position), str(freeze),
                      _waiters(superseded), _expired(expired), _handed(expired))
    if status == "frozen":
        _, key, holder, freeze, *expired = answer
        return Refused(str(status), str(key), maybe_lock(holder), freeze=str(freeze),
                       expired=_expired(expired), handed=_handed(expired))
    if status == "queue_full":
        _, key, holder, superseded, *expired = answer
        return Refused(str(status), str(key), maybe_lock(holder),
                       superseded=_waiters(superseded), expired=_expired(expired),
                       handed=_handed(expired))
    _, key, holder, *expired = answer  # held, limited
    return Refused(str(status), str(key), maybe_lock(holder), expired=_expired(expired),
                   handed=_handed(expired))


def _keys(kept: Any) -> frozenset[str] | None:
    """A grant's keys its pull held already (``lib.lua``'s ``kept_keys``): the scripts'
    ``false`` (``None`` from Redis, ``False`` from JSON text) when the grant does not say."""
    if kept is None or kept is False:
        return None
    return frozenset(str(key) for key in kept)


def _upgraded(keys: Any) -> frozenset[str]:
    """A grant's keys whose shared hold of its pull it upgraded (``lib.lua``'s
    ``kept_keys``, its second answer; an empty list may come back from JSON text as an empty
    object)."""
    return frozenset(str(key) for key in keys) if keys else frozenset()


def _expired(after: list[Any]) -> tuple[LockRow, ...]:
    """The locks an answer lists after its own fields, if it does (none: none expired)."""
    return locks(after[0]) if after else ()


def _handed(after: list[Any]) -> tuple[GrantRow, ...]:
    """The waiters an acquire's answer lists after its expired locks, if it does."""
    return _grants(after[1]) if len(after) > 1 else ()


def release(answer: Any, *, sent: str = "") -> Dropped | Release:
    """``sent``: the data of the lock a lean release said it believed stored, which its answer
    leaves out when that lock is stored (``false``: ``None`` in a list Redis answered,
    ``False`` in JSON text)."""
    answer = _kept(answer)
    if answer[0] == "dropped":
        _, data, token, at, exp = answer
        return Dropped(sent if data is None or data is False else str(data), str(token),
                       str(at), str(exp))
    if answer[0] == "not_owned":
        return Release(False, lock(answer[1]), Served(None, (), ()))
    _, released, granted, dropped, others, ahead, *expired = answer
    return Release(True, None, Served(maybe_lock(released), _grants(granted), _waiters(dropped),
                                      locks(others)),
                   tuple(Ahead(str(i), str(repo), str(pull), tuple(json.loads(keys or "[]")))
                         for i, repo, pull, keys in ahead), _expired(expired))


def give_back(answer: Sequence[Any]) -> GiveBack:
    """``give_back.lua``'s answer: ``release.lua``'s, then the upgrades it kept."""
    released = release(answer)
    assert isinstance(released, Release)  # (a give-back is never a lean release)
    return GiveBack(released, locks(answer[7]) if len(answer) > 7 else ())


def release_by_pull(answer: Sequence[Any]) -> PullReleased:
    released, granted, dropped, *after = answer
    return PullReleased(locks(released), Served(None, _grants(granted), _waiters(dropped)),
                        _expired(after), locks(after[1]) if len(after) > 1 else None)


def cancel(answer: Sequence[Any]) -> Cancel:
    status = str(answer[0])
    if status == "granted":
        _, record, held, fresh, kept, upgraded = answer
        return Cancel(status, waiter(record), locks(held), bool(fresh), kept_keys=_keys(kept),
                      upgraded=_upgraded(upgraded))
    if status == "removed":
        return Cancel(status, waiter(answer[1]),
                      handed=_grants(answer[2]) if len(answer) > 2 else ())
    if status == "kept":
        return Cancel(status, waiter(answer[1]))
    return Cancel(status, None)


def confirm(answer: Sequence[Any]) -> Confirm:
    if answer[0] == "granted":
        _, held, fresh, caller, kept, upgraded = answer
        return Confirm(True, locks(held), bool(fresh), str(caller), _keys(kept),
                       _upgraded(upgraded))
    return Confirm(False, locks(answer[1]), True)


def refresh(answer: Sequence[Any]) -> Refresh:
    status = str(answer[0])
    return Refresh(status, lock(answer[1]) if len(answer) > 1 else None)


def queue(answer: Sequence[Any]) -> QueueReply:
    now, records, *damaged = answer
    return QueueReply(int(now), _waiters(records), str(damaged[0]) if damaged else "")


def wait_graph(answer: Sequence[Any]) -> WaitGraph:
    now, entries, records, *held = answer
    return WaitGraph(
        int(now),
        tuple(WaitEntry(str(key), tuple((str(r), str(p)) for r, p in owners),
                        tuple(str(i) for i in ids), int(shared) == 1)
              for key, _repo, _pull, ids, owners, shared in entries),
        _waiters(records),
        tuple(GroupHeld(str(key), tuple((str(r), str(p)) for r, p in owners), int(shared) == 1,
                        str(repo), str(path), str(ws))
              for key, owners, shared, repo, path, ws in (held[0] if held else ())),
    )


def wait_graph_from(answer: Sequence[Any]) -> WaitGraph | str:
    """``wait_graph_from.lua``: the part of the graph reached, or why the whole graph is to be
    read instead: ``untrusted`` (the indexes of waits it walks may miss a waiter) or ``whole``
    (the walk met more queue entries than its bound)."""
    if len(answer) == 1 and answer[0] in ("untrusted", "whole"):
        return str(answer[0])
    return wait_graph(answer)
