"""A commit's guards and failure branch, copied from a template of the names a step read and
its revisions filled in, make the request built guard by guard: the same guards in the same
order, the same reads when they fail (etcd answers the failure branch in its order)."""

from __future__ import annotations

from typing import Any

import pytest
from etcd3aio._protobuf import Compare, TxnRequest

from enhanced_locking.backends.etcd_store import (
    _KV,
    _entry_guards,
    _guarded,
    _prefix_end,
    _read_ops_of,
    _Reads,
)

LOCK, FENCE, WAITER = b"/p/lock/k", b"/p/fence/k", b"/p/waiter/w1"
QUEUE, SHARED = b"/p/queue/k/", b"/p/shared/k/"


def built_guard_by_guard(read: _Reads, writes: dict[bytes, tuple[bytes, int] | None]) -> Any:
    """The request as a commit built it before it had templates."""
    request = TxnRequest()
    guard = request.compare.add
    for k, kv in read.keys.items():
        guard(result=Compare.EQUAL, target=Compare.MOD, key=k, mod_revision=kv.mod)
    for prefix, (revision, _) in read.ranges.items():
        guard(result=Compare.LESS, target=Compare.MOD, key=prefix,
              range_end=_prefix_end(prefix), mod_revision=revision + 1)
    for k, kv in _entry_guards(read, writes):
        guard(result=Compare.EQUAL, target=Compare.MOD, key=k, mod_revision=kv.mod)
    request.failure.extend(_read_ops_of(tuple(read.keys), tuple(read.ranges)).ops)
    return request


def reads(keys: dict[bytes, _KV], ranges: dict[bytes, tuple[int, dict[bytes, _KV]]]) -> _Reads:
    read = _Reads()
    read.keys.update(keys)
    read.ranges.update(ranges)
    return read


CASES = {
    "a free key (its lock absent, its queue empty)": reads(
        {LOCK: _KV(None), FENCE: _KV(b"7", 12, 3)}, {QUEUE: (40, {}), SHARED: (40, {})}),
    "a held key": reads(
        {LOCK: _KV(b"{}", 41, 41), FENCE: _KV(b"7", 12, 3)}, {QUEUE: (41, {}), SHARED: (41, {})}),
    "the same names read in another order": reads(
        {FENCE: _KV(b"7", 12, 3), LOCK: _KV(b"{}", 41, 41)}, {SHARED: (41, {}), QUEUE: (41, {})}),
    "a queue with waiters (each entry guarded)": reads(
        {LOCK: _KV(b"{}", 50, 45), FENCE: _KV(None), WAITER: _KV(b"w", 48, 48)},
        {QUEUE: (52, {QUEUE + b"a": _KV(b"x", 46, 46), QUEUE + b"b": _KV(b"y", 51, 47)}),
         SHARED: (52, {})}),
    "a revision past one varint byte and past 2**32": reads(
        {LOCK: _KV(b"{}", 2**33 + 5, 2**33), FENCE: _KV(b"1", 300, 300)},
        {QUEUE: (2**33 + 7, {})}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_commit_copied_from_its_template_is_the_request_built_guard_by_guard(name: str) -> None:
    read = CASES[name]
    writes: dict[bytes, tuple[bytes, int] | None] = {LOCK: None, QUEUE + b"a": None}
    for _ in range(2):  # the template made, then taken again
        request, shape = _guarded(read, writes)
        expected = built_guard_by_guard(read, writes)
        assert request == expected
        assert request.SerializeToString() == expected.SerializeToString()
        assert (shape.keys, shape.prefixes) == (tuple(sorted(read.keys)),
                                                 tuple(sorted(read.ranges)))


def test_a_request_filled_in_leaves_its_template_as_it_was() -> None:
    """Two commits over the same names, one after the other, each with its own revisions."""
    first, second = CASES["a held key"], reads(
        {LOCK: _KV(b"{}", 90, 90), FENCE: _KV(b"8", 80, 3)}, {QUEUE: (95, {}), SHARED: (95, {})})
    one, _ = _guarded(first, {})
    two, _ = _guarded(second, {})
    assert one == built_guard_by_guard(first, {})
    assert two == built_guard_by_guard(second, {})
    again, _ = _guarded(first, {})
    assert again == one
