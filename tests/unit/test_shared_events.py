"""A shared bus's events on their way to the store: the publish makes no JSON; the write
makes each event's once, in the order published, and a write sent again sends the same bytes."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest
from tests.support.locks import request_for

from enhanced_locking.backends import shared_events
from enhanced_locking.backends.etcd_events import _BATCH_JSON, batch_json
from enhanced_locking.backends.shared_events import Outgoing, Published, SharedEventBus
from enhanced_locking.types import Candidate, Event, Lock, Priority


class Bus(SharedEventBus):
    """A shared bus whose store is a list of the writes' bytes; its first ``refuse`` writes
    fail as a store that is away does."""

    name = "test"
    down: ClassVar[tuple[type[BaseException], ...]] = (OSError,)
    coalesce = 0.005

    def __init__(self, *, refuse: int = 0) -> None:
        super().__init__(where="here", capacity=1000)
        self.refuse = refuse
        self.sent: list[tuple[bytes, list[bytes]]] = []
        """Every write's tag and bytes, refused ones included."""

    async def _write(self, batch: list[Outgoing]) -> None:
        await self._once(batch, self._put)

    async def _put(self, batch: list[Outgoing], tag: bytes) -> None:
        self.sent.append((tag, [item.json() for item in batch]))
        if self.refuse:
            self.refuse -= 1
            raise OSError("away")

    async def _disconnect(self) -> None:
        pass


class Serializations:
    """Calls of the event serializer the shared bus uses (the real one runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = shared_events._json

        def counted(event: Published, **options: Any) -> bytes:
            self.count += 1
            return real(event, **options)
        monkeypatch.setattr(shared_events, "_json", counted)


def lock_of(pull: int) -> Lock:
    candidate = Candidate.of_request(request_for(pull=pull), priority=Priority.NORMAL)
    return candidate.granted(acquired_at=datetime.now(UTC), expires_at=None, fencing_token=pull)


async def test_a_burst_is_written_in_order_as_each_event_was_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 40 events published with no turn of the loop between them, 10 more after one: the
    # publish makes no JSON (subscribers get the model at once); the store gets each one's
    # JSON, in the order published, each made once, by the write.
    serialized = Serializations(monkeypatch)
    bus = Bus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    try:
        for pull in range(1, 41):
            bus.publish("acquired", lock=lock_of(pull))
        assert serialized.count == 0 and len(seen) == 40
        await asyncio.sleep(0)
        for n in range(10):
            bus.publish("fallback", key=f"k{n}", action="legacy", error="test")
        await bus._outbox.drained(5)
        written = [data for _, batch in bus.sent for data in batch]
        assert written == [event.model_dump_json().encode() for event in seen]
        assert len(written) == 50 and serialized.count == 50
    finally:
        await bus.close()


async def test_an_event_nobody_subscribed_to_is_made_with_the_time_of_its_publish() -> None:
    # With no subscriber the write makes the JSON from the fields published, no model; its
    # time is still the publish's, and its fields are what was published.
    bus = Bus()
    try:
        before = datetime.now(UTC)
        bus.publish("fallback", key="k", repo="acme/app", action="legacy", error="test")
        after = datetime.now(UTC)
        await asyncio.sleep(0.05)  # its JSON is made by the write, later
        await bus._outbox.drained(5)
        [(_, [data])] = bus.sent
        event = Event.model_validate_json(data)
        assert before <= event.time <= after
        assert (event.type, event.key, event.repo, event.details) == (
            "fallback", "k", "acme/app", {"action": "legacy", "error": "test"})
    finally:
        await bus.close()


async def test_a_write_that_failed_is_sent_again_with_the_same_bytes_and_tag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serialized = Serializations(monkeypatch)
    bus = Bus(refuse=1)
    try:
        bus.publish("acquired", lock=lock_of(1))
        bus.publish("released", lock=lock_of(1))
        await bus._outbox.drained(5)
        first, again = bus.sent
        assert again == first and len(first[1]) == 2
        assert all(a is b for a, b in zip(first[1], again[1], strict=True))  # made once
        assert serialized.count == 2
    finally:
        await bus.close()


def test_an_etcd_writes_value_is_the_json_list_of_its_events() -> None:
    # batch_json joins each event's JSON; the readers parse it as the list adapter's JSON.
    items = [Outgoing(Published(type="acquired", time=datetime.now(UTC), key="k",
                                repo="acme/app", lock=lock_of(pull), details={}))
             for pull in (1, 2)]
    items.append(Outgoing(Published(type="fallback", time=datetime.now(UTC), key="k", repo=None,
                                    lock=None, details={"action": "legacy", "error": "x"})))
    events = [item.event for item in items]
    assert batch_json(items) == _BATCH_JSON.dump_json(events)
    assert _BATCH_JSON.validate_json(batch_json(items)) == events
    assert batch_json(items[:1]) == _BATCH_JSON.dump_json(events[:1])



def test_an_event_is_published_with_the_fields_of_the_events_model() -> None:
    # The JSON written is made from the fields published, not from the model: the same names
    # in the same order, so the same bytes.
    assert [field.name for field in dataclasses.fields(Published)] == list(Event.model_fields)


@pytest.mark.parametrize("published", [
    Published(type="acquired", time=datetime.now(UTC), key="k", repo="acme/app", lock=lock_of(7),
              details={}),
    Published(type="released", time=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), key="k",
              repo=None, lock=lock_of(8), details={"how": "released", "handedTo": [1, None]}),
    Published(type="fallback", time=datetime.now(UTC), key=None, repo=None, lock=None,
              details={"action": "legacy", "error": 'quote " and \\ and \n and é ✓',
                       "nested": {"a": [1.5, True, {"b": None}]}}),
])
async def test_an_events_json_made_without_its_model_is_the_models(
    published: Published, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nobody subscribed: the write makes no model, and what it writes is the model's JSON.
    made: list[Event] = []
    real = Event.recorded

    def counted(**fields: Any) -> Event:
        made.append(real(**fields))
        return made[-1]
    monkeypatch.setattr(Event, "recorded", counted)
    bus = Bus()
    try:
        bus._outbox.put(Outgoing(published))
        await bus._outbox.drained(5)
        [(_, [data])] = bus.sent
        assert made == []
        event = Outgoing(published).event
        assert data == event.model_dump_json().encode()
        assert Event.model_validate_json(data) == event
    finally:
        await bus.close()


def _odd_lock(*, expires: bool) -> Lock:
    """A lock whose words need JSON's escapes (a quote, a backslash, a control character,
    letters beyond ASCII), with a lease or without."""
    ask = request_for(repo='ac"me\\/inf\tra-é', path="envs/pr✓d", project='p"1', user="zoë",
                      pull=9)
    candidate = Candidate.of_request(ask, priority=Priority.HIGH)
    granted = datetime(2026, 1, 2, 3, 4, 5, 60, tzinfo=UTC)
    return candidate.granted(acquired_at=granted, fencing_token=2**40,
                             expires_at=granted.replace(microsecond=0) if expires else None)


def _about(lock: Lock, type: Any = "released", **details: Any) -> Published:
    """An event about ``lock`` as the locker publishes one: its key and repository the lock's."""
    return Published(type=type, time=datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC), key=lock.key,
                      repo=lock.project.repo_full_name, lock=lock, details=details)


def test_an_events_json_written_around_its_locks_text_is_pydantics() -> None:
    # An event about a lock is written around the lock's kept text (LockText), not by
    # pydantic: the same bytes, for words that need escapes, a lease or none, details or none,
    # a second event of the same lock (its text kept), an id, and times not in UTC (pydantic's).
    odd, leased = _odd_lock(expires=False), _odd_lock(expires=True)
    other_zone = leased.model_copy(update={"acquired_at": datetime(
        2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1)))})
    cases = [
        _about(odd, "acquired"),
        _about(odd, how="released", handedTo=("w1", "w\"2")),  # its text kept by the first
        _about(leased, how="expired", handedTo=(), waitedMs=1.5, nested={"a": [None, True]}),
        dataclasses.replace(_about(leased, "acquired"), id="1767322800000-3"),
        dataclasses.replace(_about(leased, "acquired"),
                            time=datetime(2026, 1, 2, 3, 4, 6, tzinfo=timezone(timedelta(0)))),
        dataclasses.replace(_about(leased, "acquired"), time=datetime(2026, 1, 2, 4, 4, 6)),
        _about(other_zone, "acquired"),
        dataclasses.replace(_about(lock_of(5), "granted-from-queue"), key="x"),
        dataclasses.replace(_about(lock_of(5), "granted-from-queue"), repo="acme/other"),
        dataclasses.replace(_about(lock_of(5), "granted-from-queue"), repo=None),
    ]
    for published in cases:
        written = shared_events._json(published, by_alias=False)
        assert written == shared_events._model_json(published, by_alias=False), published
        if not published.id:  # (the model of a publish has none: the store gives it)
            assert written == Outgoing(published).event.model_dump_json().encode()
