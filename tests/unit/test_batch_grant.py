"""A batch's ``Lock-Grant``: one word a lock, written by the service and read by the client."""

from __future__ import annotations

import pytest
from tests.support.locks import lock_for, request_for

from enhanced_locking.types import batch_grant, kept_by_grant, upgraded_by_grant

LOCKS = [lock_for(request_for(path=path, pull=7)) for path in ("a", "b", "c")]


def test_what_the_service_writes_reads_back_as_the_keys_its_pull_held() -> None:
    for kept in (frozenset[str](), frozenset({LOCKS[1].key}),
                 frozenset(lock.key for lock in LOCKS)):
        header = batch_grant(LOCKS, kept)
        assert kept_by_grant(LOCKS, header) == kept, header
    assert batch_grant(LOCKS, {LOCKS[1].key}) == "new, again, new"
    assert kept_by_grant(LOCKS, "again,new ,  again") == frozenset({LOCKS[0].key,
                                                                   LOCKS[2].key})


def test_an_upgrade_reads_back_as_kept_and_upgraded() -> None:
    """A key whose shared hold the batch made exclusive is ``upgraded``: not the batch's to
    give back (kept), and said apart from a lock held already."""
    header = batch_grant(LOCKS, {LOCKS[0].key, LOCKS[2].key}, {LOCKS[2].key})
    assert header == "again, new, upgraded"
    assert kept_by_grant(LOCKS, header) == frozenset({LOCKS[0].key, LOCKS[2].key})
    assert upgraded_by_grant(LOCKS, header) == frozenset({LOCKS[2].key})
    assert upgraded_by_grant(LOCKS, "new, upgraded") == frozenset()  # not one word a lock


@pytest.mark.parametrize("header", [None, "", "new", "new, again", "new, again, new, new",
                                    "new, kept, new", "new,, new"])
def test_a_header_that_does_not_say_it_lock_by_lock_says_nothing(header: str | None) -> None:
    """No header (an older service, a proxy that drops it), or one whose words are not one
    known word a lock: not said (None), never read as every key granted anew."""
    assert kept_by_grant(LOCKS, header) is None
