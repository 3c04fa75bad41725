"""A Redis call's id is drawn in bulk from the system's randomness, and never used twice:
not by two calls of a process, nor by a process and one forked from it (a retry finds its
call's kept answer by the id, so two calls under one id would read each other's)."""

from __future__ import annotations

import os

from enhanced_locking.backends import redis_store


def test_call_ids_are_each_new_hex_of_their_size() -> None:
    drawn = [redis_store._new_call_id() for _ in range(3 * redis_store._CALL_IDS_DRAWN)]
    assert len(set(drawn)) == len(drawn)
    assert all(len(d) == 2 * redis_store._CALL_ID_BYTES and int(d, 16) >= 0 for d in drawn)


def test_a_forked_process_draws_none_of_its_parents_call_ids() -> None:
    redis_store._new_call_id()  # the parent has ids drawn and not used
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its next id, to the parent
        try:
            os.write(writing, redis_store._new_call_id().encode())
        finally:
            os._exit(0)
    os.close(writing)
    try:
        theirs = os.read(reading, 64).decode()
    finally:
        os.close(reading)
        os.waitpid(child, 0)
    ours = [redis_store._new_call_id() for _ in range(redis_store._CALL_IDS_DRAWN)]
    assert len(theirs) == 2 * redis_store._CALL_ID_BYTES
    assert theirs not in ours
