"""The text the audit trail keeps of an entry is pydantic's, written without pydantic.

Each audited call writes an entry's JSON (the stored row's ``data``, the stdout line, the etcd
value, the Redis stream field) and its ``time`` column; both are written by hand on the hot
path and must stay byte for byte what ``model_dump_json(by_alias=True)`` and ``isoformat``
write, or a reader (a log shipper, the trail's own reads and pruning) would see two forms.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enhanced_locking.backends.audit_store import Retention, SqliteAuditStore, entry_json
from enhanced_locking.types import AuditEntry, built, utc_text

TEXT = st.text(max_size=40)  # every code point but surrogates: quotes, backslashes, controls
UTC_TIMES = st.datetimes(timezones=st.just(UTC)) | st.datetimes(
    timezones=st.just(UTC)).map(lambda time: time.replace(microsecond=0))
OTHER_TIMES = st.datetimes(timezones=st.sampled_from(
    [timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]))

ENTRIES = st.builds(
    AuditEntry, id=TEXT, time=UTC_TIMES | OTHER_TIMES, identity=TEXT,
    groups=st.lists(TEXT, max_size=3).map(tuple), method=TEXT, verb=TEXT, action=TEXT,
    key=st.none() | TEXT, repo=st.none() | TEXT,
    pull=st.none() | st.integers(min_value=0, max_value=2**31 - 1), outcome=TEXT,
    status=st.integers(min_value=100, max_value=599), reason=st.none() | TEXT, peer=TEXT,
    request_id=st.none() | TEXT)


@given(entry=ENTRIES)
def test_an_entry_is_written_as_pydantic_writes_it(entry: AuditEntry) -> None:
    assert entry_json(entry) == entry.model_dump_json(by_alias=True)


def test_an_entry_built_on_the_hot_path_is_written_as_pydantic_writes_it() -> None:
    # As the API's audit block builds it (not validated again), with its values' own types.
    entry = built(AuditEntry, time=datetime(2026, 3, 1, 12, 0, 5, 120, UTC), identity="alice",
                  groups=("sre", "dév"), method="bearer", verb="lock", action="acquire",
                  key='acme/"infra"/envs/prod/default/', repo="acme/infra", pull=12,
                  outcome="acquired", status=200, reason=None, peer="10.0.0.7:5123",
                  request_id="r\n1")
    assert entry_json(entry) == entry.model_dump_json(by_alias=True)


KEYS_IN_VALUES = {"id": ',"time":"1999', "identity": '"request_id":', "reason": '"time":"',
                  "request_id": '","request_id":"x'}
"""Values that hold the text of the JSON's keys, quotes and all (the entry's JSON is written
from orjson's text of its fields, its alias and time found in that text)."""


def test_values_that_hold_the_texts_of_keys_are_written_as_pydantic_writes_them() -> None:
    entry = built(AuditEntry, time=datetime(2026, 3, 1, 12, 0, 5, 120, UTC), groups=(),
                  method="bearer", verb="lock", action="acquire", key=None, repo=None,
                  pull=None, outcome="acquired", status=200, peer="", **KEYS_IN_VALUES)
    assert entry_json(entry) == entry.model_dump_json(by_alias=True)


async def test_values_that_hold_the_texts_of_keys_leave_the_time_column_isoformats(
    tmp_path: Path,
) -> None:
    time = datetime(2026, 3, 1, 12, 0, 5, 7, tzinfo=UTC)
    store = SqliteAuditStore(tmp_path / "locks.db", Retention(timedelta(days=3650), 1000))
    values = {name: value for name, value in KEYS_IN_VALUES.items() if name != "id"}
    stored = await store.append(AuditEntry(time=time, method="bearer", verb="lock",
                                           action="acquire", outcome="acquired", status=200,
                                           **values))
    await store.close()
    with sqlite3.connect(tmp_path / "locks.db") as db:
        row = db.execute("SELECT id, time, data FROM audit").fetchone()
    assert row == (int(stored.id), time.isoformat(), stored.model_dump_json(by_alias=True))


@given(time=UTC_TIMES)
def test_a_utc_time_is_written_as_isoformat_writes_it(time: datetime) -> None:
    # The text up to the second is kept per second: whatever was kept before, the time reads
    # as isoformat writes it (no fraction when it has none), with the zone asked for.
    assert utc_text(time, zone="+00:00") == time.isoformat()
    assert utc_text(time) == time.isoformat().replace("+00:00", "Z")
    later = time.replace(microsecond=7)
    assert utc_text(later, zone="+00:00") == later.isoformat()


@pytest.mark.parametrize("time", [
    datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC),
    datetime(2026, 3, 1, 12, 0, 5, 7, tzinfo=UTC),
    datetime(2026, 3, 1, 14, 0, 5, 120, tzinfo=timezone(timedelta(hours=2))),
], ids=["utc", "utc-fraction", "other-zone"])
async def test_the_stored_row_keeps_isoformats_time_and_pydantics_json(
    tmp_path: Path, time: datetime,
) -> None:
    store = SqliteAuditStore(tmp_path / "locks.db", Retention(timedelta(days=3650), 1000))
    stored = await store.append(AuditEntry(time=time, identity="alice", method="bearer",
                                           verb="lock", action="acquire", outcome="acquired",
                                           status=200))
    await store.close()
    with sqlite3.connect(tmp_path / "locks.db") as db:
        row = db.execute("SELECT id, time, data FROM audit").fetchone()
    assert row == (int(stored.id), time.isoformat(), stored.model_dump_json(by_alias=True))
