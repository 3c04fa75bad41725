"""Where a Redis stream's entries start for a reader (``stream_floor``), from ``XINFO STREAM``
answers as redis-py gives them. Redis 6.2 (still served, through ``EVALSHA``) says nothing of
entries added or deleted: there a reader whose cursor is before the first entry was cut off
while the stream was trimmed past it, and gets a gap. (No 6.2 server runs here: its answer's
shape is written out, as its documentation and redis-py's parser give it.)"""

from __future__ import annotations

from typing import Any

from enhanced_locking.backends.redis_events import stream_floor


def redis_6_2(first: str | None, last: str, length: int) -> dict[str, Any]:
    return {"length": length, "radix-tree-keys": 1, "radix-tree-nodes": 2,
            "last-generated-id": last, "groups": 0,
            "first-entry": (first, {"e": "{}"}) if first else None,
            "last-entry": (last, {"e": "{}"}) if first else None}


def test_on_redis_6_2_a_cursor_before_the_first_entry_gives_a_floor_just_before_it() -> None:
    # Before, no "entries-added" meant 0-0 whatever the cursor: no gap for entries lost.
    info = redis_6_2("1700000000500-3", "1700000000900-0", 20)
    assert stream_floor(info, (1700000000100, 0)) == (1700000000500, 2)
    seq_0 = redis_6_2("1700000000500-0", "1700000000900-0", 20)
    assert stream_floor(seq_0, (1700000000100, 0))[0] == 1700000000499
    assert stream_floor(seq_0, (1700000000100, 0)) > (1700000000499, 10**9)
    as_bytes = redis_6_2("1700000000500-3", "1700000000900-0", 20)
    as_bytes["first-entry"] = (b"1700000000500-3", {b"e": b"{}"})
    assert stream_floor(as_bytes, (1700000000100, 0)) == (1700000000500, 2)


def test_on_redis_6_2_nothing_is_taken_for_lost_without_a_cursor_or_past_it() -> None:
    info = redis_6_2("1700000000500-3", "1700000000900-0", 20)
    assert stream_floor(info) == (0, 0)  # a reader that has read nothing yet: it loads
    assert stream_floor(info, (1700000000500, 3)) == (0, 0)  # at the first entry
    assert stream_floor(info, (1700000000700, 0)) == (0, 0)  # past it
    assert stream_floor(redis_6_2(None, "1700000000900-0", 0), (1700000000100, 0)) == (0, 0)


def test_on_redis_7_the_counts_say_it_whatever_the_cursor() -> None:
    trimmed = {"length": 20, "entries-added": 50, "max-deleted-entry-id": "0-0",
               "recorded-first-entry-id": "1700000000500-3",
               "last-generated-id": "1700000000900-0"}
    assert stream_floor(trimmed) == stream_floor(trimmed, (1700000000800, 0)) == (
        1700000000500, 2)
    whole = {**trimmed, "entries-added": 20}
    assert stream_floor(whole, (1700000000100, 0)) == (0, 0)
