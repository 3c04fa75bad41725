"""What a replica knows of the keys its one-key steps read (``_Known``): what a commit wrote
over what it read, bounded, the oldest forgotten first."""

from __future__ import annotations

import pytest

from enhanced_locking.backends.etcd_store import _KV, _Known, _Reads


def reads_of(keys: dict[bytes, _KV], ranges: dict[bytes, tuple[int, dict[bytes, _KV]]],
             ) -> _Reads:
    read = _Reads()
    read.keys.update(keys)
    read.ranges.update(ranges)
    return read


def test_a_commit_is_learnt_over_what_it_read() -> None:
    known = _Known()
    read = reads_of({b"/l/a": _KV(None), b"/f/a": _KV(b"3", 7, 2)},
                    {b"/q/a/": (9, {b"/q/a/w1": _KV(b"w", 8, 8)})})
    known.learn(read, {b"/l/a": (b"lock", 0), b"/q/a/w1": None, b"/q/a/w2": (b"v", 5)}, 10)
    guess = known.guess({b"/l/a", b"/f/a", b"/l/b"}, {b"/q/a/", b"/q/b/"})
    assert guess.keys == {b"/l/a": _KV(b"lock", 10, 10, 0), b"/f/a": _KV(b"3", 7, 2),
                          b"/l/b": _KV(None)}
    assert guess.ranges == {b"/q/a/": (10, {b"/q/a/w2": _KV(b"v", 10, 10, 5)}),
                            b"/q/b/": (0, {})}
    assert read.ranges[b"/q/a/"] == (9, {b"/q/a/w1": _KV(b"w", 8, 8)})  # (not changed)


@pytest.mark.parametrize("per_learn", [1, 3])
def test_the_oldest_keys_are_forgotten_past_the_limit(
        monkeypatch: pytest.MonkeyPatch, per_learn: int) -> None:
    monkeypatch.setattr(_Known, "LIMIT", 4)
    known = _Known()
    names = [f"/l/{i}".encode() for i in range(7)]
    for start in range(0, 6, per_learn):
        part = names[start:start + per_learn]
        known.learn(reads_of({k: _KV(k, 1) for k in part},
                             {k + b"/": (1, {}) for k in part}))
    known.learn(reads_of({names[2]: _KV(b"again", 2)}, {}))  # seen again: newest
    assert list(known.keys) == [names[3], names[4], names[5], names[2]]
    assert list(known.ranges) == [k + b"/" for k in names[2:6]]
