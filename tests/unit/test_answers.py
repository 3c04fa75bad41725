"""The hot path's answers, written out field by field, are the models the general way makes."""

from __future__ import annotations

import dataclasses
import typing
from datetime import UTC, datetime, timedelta

import pytest

from enhanced_locking.backends.etcd_store import _replaced, _resolve, _shape
from enhanced_locking.backends.waiting import (
    Cancelled,
    Grant,
    Handoff,
    Notice,
    Outcome,
    Status,
    Waiter,
)
from enhanced_locking.types import (
    AcquireResult,
    AuditEntry,
    Candidate,
    Event,
    Lock,
    LockRequest,
    Moment,
    Priority,
    Project,
    Pull,
    User,
    built,
    replaced,
)


def a_lock() -> Lock:
    return Lock(key="acme/infra/envs/prod/default/", workspace="default",
                project=Project(repo_full_name="acme/infra", path="envs/prod"),
                pull=Pull(num=12, url="https://github.com/acme/infra/pull/12"),
                user=User(username="alice", teams=["platform"]),
                acquired_at=datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC),
                fencing_token=41)


@pytest.mark.parametrize("fresh", [True, False])
def test_a_grants_answer_is_the_model_built_from_its_fields(fresh: bool) -> None:
    # AcquireResult.granted writes its fields out instead of asking built(): the two agree
    # in every field, in which fields count as set, in the private flag and in the JSON.
    lock = a_lock()
    written = AcquireResult.granted(lock, fresh=fresh)
    general = built(AcquireResult, acquired=True, lock_key=lock.key, lock=lock)
    general.__pydantic_private__["_fresh"] = fresh  # type: ignore[index]
    assert written == general
    assert list(written.__dict__) == list(general.__dict__)
    assert written.model_fields_set == general.model_fields_set
    assert written.__pydantic_private__ == general.__pydantic_private__
    assert written.fresh is fresh
    assert written.model_dump_json() == general.model_dump_json()
    assert written.model_dump(exclude_unset=True) == general.model_dump(exclude_unset=True)
    # Each answer has dicts and a set of its own: a change to one never reaches another.
    other = AcquireResult.granted(lock, fresh=fresh)
    assert other.__dict__ is not written.__dict__
    assert other.model_fields_set is not written.model_fields_set
    assert other.__pydantic_private__ is not written.__pydantic_private__


def test_a_free_keys_outcome_and_a_plain_releases_handoff_are_the_ones_their_classes_make(
) -> None:
    # Outcome.of_grant and Handoff.of_release set every slot themselves: equal (every field
    # compared) to what the generated __init__ makes, and a field added to either class
    # without a value here leaves its slot unset, which the comparison meets and fails on.
    lock = a_lock()
    granted = Outcome.of_grant(lock)
    assert granted == Outcome(status=Status.GRANTED, locks=(lock,), fresh=True,
                             kept=frozenset())
    assert granted.locks[0] is lock
    for released in (lock, None):
        handoff = Handoff.of_release(released)
        assert handoff == Handoff(released=released)
        assert handoff.released is released


@pytest.mark.parametrize(("repo", "with_lock", "details"), [
    ("acme/infra", True, {}), ("acme/other", False, {"waiterId": "w1", "handedTo": ()})])
def test_an_event_recorded_is_the_model_built_from_its_fields(
        repo: str, with_lock: bool, details: dict[str, object]) -> None:
    # Event.recorded writes its fields out instead of asking built(): the two agree in every
    # field, in which fields count as set, in the private attributes and in the JSON.
    lock = a_lock() if with_lock else None
    values: dict[str, typing.Any] = {
        "id": "1714551630123-4", "type": "released", "key": "acme/infra/envs/prod/default/",
        "time": datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC), "repo": repo,
        "lock": lock, "details": details}
    written = Event.recorded(**values)
    general = built(Event, **values)
    assert written == general
    assert list(written.__dict__) == list(general.__dict__)
    assert written.model_fields_set == general.model_fields_set
    assert written.__pydantic_private__ == general.__pydantic_private__
    assert written.model_dump_json() == general.model_dump_json()
    assert written.model_dump(exclude_unset=True) == general.model_dump(exclude_unset=True)
    assert written.model_fields_set is not Event.recorded(**values).model_fields_set


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_a_requests_candidate_granted_is_the_model_built_from_its_fields(mode: str) -> None:
    # A candidate is the request's parts as a record; the lock a store grants of it is
    # written out field by field instead of asking built(): the two agree in every field, in
    # which count as set, and in the JSON.
    request = LockRequest(project=Project(repo_full_name="acme/infra", path="envs/prod",
                                          project_name="prod"),
                          workspace="staging", pull=Pull(num=12), mode=mode,
                          user=User(username="alice", teams=["platform"]))
    now = datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    candidate = Candidate.of_request(request, priority=Priority.HIGH)
    assert (candidate.key, candidate.project, candidate.workspace, candidate.pull,
            candidate.user, candidate.priority, candidate.mode, candidate.backend) == (
        request.key, request.project, request.workspace, request.pull, request.user,
        Priority.HIGH, request.mode, "enhanced")
    assert candidate.owner == ("acme/infra", 12)
    written = candidate.granted(acquired_at=now, expires_at=None, fencing_token=0)
    general = built(
        Lock, key=request.key, project=request.project, workspace=request.workspace,
        pull=request.pull, user=request.user, priority=Priority.HIGH, acquired_at=now,
        expires_at=None, fencing_token=0, backend="enhanced", mode=request.mode)
    assert written == general
    assert list(written.__dict__) == list(general.__dict__)
    assert written.model_fields_set == general.model_fields_set
    assert written.__pydantic_private__ == general.__pydantic_private__
    assert written.__pydantic_extra__ == general.__pydantic_extra__
    assert written.key == "acme/infra/envs/prod/staging/prod"
    assert written.model_dump_json() == general.model_dump_json()
    assert written.model_fields_set is not candidate.granted(
        acquired_at=now, expires_at=None, fencing_token=0).model_fields_set  # each its own set


@pytest.mark.parametrize("values", [
    {"identity": "alice", "groups": ("sre",), "method": "bearer", "verb": "lock",
     "action": "acquire", "key": "acme/infra/envs/prod/default/", "repo": "acme/infra",
     "pull": 12, "outcome": "acquired", "status": 200, "reason": None,
     "peer": "10.0.0.7:5123", "request_id": "r-1"},
    {"identity": "anonymous", "groups": (), "method": "none", "verb": "release-any",
     "action": "release-any", "key": None, "repo": None, "pull": None,
     "outcome": "denied", "status": 403, "reason": "why", "peer": "", "request_id": None},
])
def test_an_audit_entry_and_its_stored_copy_are_the_models_built_from_their_fields(
    values: dict[str, object],
) -> None:
    # AuditEntry.recorded (without an id, or with the one its store handed out) and with_id
    # write their fields out instead of asking built() and replaced(): the models agree in
    # every field, in which count as set, and in the JSON.
    time = datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    written = AuditEntry.recorded(time=time, **values)  # type: ignore[arg-type]
    with_its_id = AuditEntry.recorded(id="41", time=time, **values)  # type: ignore[arg-type]
    general = built(AuditEntry, time=time, **values)
    for ours, theirs in ((written, general),
                         (written.with_id("41"), replaced(general, id="41")),
                         (with_its_id, replaced(general, id="41"))):
        assert ours == theirs
        assert list(ours.__dict__) == list(theirs.__dict__)
        assert ours.model_fields_set == theirs.model_fields_set
        assert ours.__pydantic_private__ == theirs.__pydantic_private__
        assert ours.__pydantic_extra__ == theirs.__pydantic_extra__
        assert ours.model_dump_json() == theirs.model_dump_json()
    assert written.id == "" and written.with_id("41").id == "41"  # the entry itself unchanged
    assert written.model_fields_set is not AuditEntry.recorded(
        time=time, **values).model_fields_set  # type: ignore[arg-type]  # each its own set


@pytest.mark.parametrize("expires", [None, datetime(2024, 5, 1, 9, 0, tzinfo=UTC)])
def test_a_granted_lock_is_the_model_replaced_makes_of_its_candidate(
    expires: datetime | None,
) -> None:
    # Candidate.granted writes the granted lock out instead of asking replaced() of the
    # candidate as a model (every field set): the two agree in every field, in which fields
    # count as set, and in the JSON, whether the candidate came from a request or from a lock
    # (a lock to store, a waiter read back); the lock it came from is unchanged.
    request = LockRequest(project=Project(repo_full_name="acme/infra", path="envs/prod"),
                          pull=Pull(num=12), user=User(username="alice"))
    now = datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    at = datetime(2024, 5, 1, 8, 20, 31, tzinfo=UTC)
    source = Lock.for_request(request, now=now, token=0, backend="enhanced")
    for candidate in (Candidate.of_request(request, priority=Priority.NORMAL),
                      Candidate.of_lock(source)):
        as_model = built(Lock, **candidate._asdict(), acquired_at=now, expires_at=None,
                         fencing_token=0)
        written = candidate.granted(acquired_at=at, expires_at=expires, fencing_token=7)
        general = replaced(as_model, acquired_at=at, expires_at=expires, fencing_token=7)
        assert written == general
        assert list(written.__dict__) == list(general.__dict__)
        assert written.model_fields_set == general.model_fields_set
        assert written.model_fields_set is not as_model.model_fields_set
        assert written.__pydantic_private__ == general.__pydantic_private__
        assert written.__pydantic_extra__ == general.__pydantic_extra__
        assert written.model_dump_json() == general.model_dump_json()
        assert (source.acquired_at, source.fencing_token) == (now, 0)
    assert Candidate.of_lock(replaced(source, backend="legacy", mode="shared")) == (
        Candidate.of_request(request, priority=Priority.NORMAL)._replace(
            backend="legacy", mode="shared"))


def test_a_candidate_has_every_field_of_a_lock_but_the_stamps_of_its_grant() -> None:
    # Candidate repeats the parts of Lock that a grant does not change (a record beside the
    # model, for speed): the two lists must not drift apart, in names, types or defaults.
    stamps = {"acquired_at", "expires_at", "fencing_token"}
    lock_fields = {name: field for name, field in Lock.model_fields.items()
                   if name not in stamps}
    assert set(Candidate._fields) == set(lock_fields)
    hints = typing.get_type_hints(Candidate)
    lock_hints = typing.get_type_hints(Lock)
    for name, field in lock_fields.items():
        assert hints[name] == lock_hints[name], name
        if not field.is_required():
            assert Candidate._field_defaults[name] == field.default, name
        else:
            assert name not in Candidate._field_defaults, name


def test_a_lock_lapses_as_it_expires_and_one_without_a_lease_never_reads_the_clock() -> None:
    ends = datetime(2024, 5, 1, 9, tzinfo=UTC)
    leased = replaced(a_lock(), expires_at=ends)
    reads: list[datetime] = []

    def clock(at: datetime) -> typing.Callable[[], datetime]:
        def read() -> datetime:
            reads.append(at)
            return at
        return read

    for at in (ends - timedelta(microseconds=1), ends, ends + timedelta(hours=1)):
        assert leased.lapsed(clock(at)) is leased.expired(at)
    assert len(reads) == 3
    assert a_lock().lapsed(clock(datetime(2999, 1, 1, tzinfo=UTC))) is False
    assert len(reads) == 3  # no lease: the clock was not read


def test_a_moment_reads_its_clock_once_and_only_when_asked() -> None:
    reads: list[int] = []

    def clock() -> datetime:
        reads.append(1)
        return datetime(2024, 5, 1, 9, len(reads), tzinfo=UTC)

    moment = Moment(clock)
    assert reads == []
    first = moment()
    assert moment() is first and reads == [1]


@dataclasses.dataclass(frozen=True)
class _Checked:
    token: int

    def __post_init__(self) -> None:
        if self.token == 0:
            raise ValueError("no token")


@pytest.mark.parametrize("kind", [Outcome, Handoff, Grant, Notice, Cancelled, Waiter])
def test_the_etcd_stores_copy_of_its_answers_is_what_dataclasses_replace_makes(
        kind: type) -> None:
    # _resolve copies an answer whose tokens its commit resolved by setting the fields itself
    # (dataclasses.replace binds each as a keyword of __init__): equal, of the same class, a
    # new object; a class whose __init__ does more than set its fields goes through replace.
    lock, resolved = a_lock(), replaced(a_lock(), fencing_token=57)
    waiter = Waiter(id="w1", candidates=(Candidate.of_lock(lock),), ttl=None,
                    enqueued_at=lock.acquired_at, deadline=lock.acquired_at, seq=3)
    cases: dict[type, tuple[typing.Any, dict[str, typing.Any]]] = {
        Outcome: (Outcome(status=Status.GRANTED, locks=(lock,)), {"locks": (resolved,)}),
        Handoff: (Handoff(released=lock), {"released": resolved}),
        Grant: (Grant(waiter=waiter, locks=(lock,)), {"locks": (resolved,)}),
        Notice: (Notice(locks=(lock,), fresh=False), {"locks": (resolved,)}),
        Cancelled: (Cancelled(removed=True, granted=(lock,)), {"granted": (resolved,)}),
        Waiter: (waiter, {"seq": 9}),
    }
    value, changes = cases[kind]
    shape = _shape(kind)
    assert shape is not None and shape.direct
    copy = _replaced(value, changes, shape)
    assert copy == dataclasses.replace(value, **changes)
    assert type(copy) is kind and copy is not value
    assert all(getattr(copy, name) is getattr(value, name)
               for name in shape.names if name not in changes)
    checked = _shape(_Checked)
    assert checked is not None and not checked.direct
    with pytest.raises(ValueError, match="no token"):
        _replaced(_Checked(token=1), {"token": 0}, checked)
    assert _shape(Lock) is None and _shape(Status) is None


@dataclasses.dataclass(frozen=True)
class _One:
    seq: int


@dataclasses.dataclass(slots=True)
class _Slotted:
    a: int
    b: str = "b"
    c: tuple[int, ...] = ()


@pytest.mark.parametrize("value, changes", [
    (_One(seq=1), {"seq": 2}),
    (_Slotted(a=1, c=(1,)), {"a": 5}),
    (_Slotted(a=1), {"a": 5, "c": (2, 3)}),
])
def test_a_copy_of_one_field_or_of_slots_is_what_dataclasses_replace_makes(
        value: typing.Any, changes: dict[str, typing.Any]) -> None:
    # _replaced reads every field in one call (a class of one field too) and sets the changes
    # after: the copy is replace's, frozen or slotted, and the value copied stays as it was.
    before = dataclasses.replace(value)
    kind: type = type(value)
    shape = _shape(kind)
    assert shape is not None and shape.direct
    copy = _replaced(value, changes, shape)
    assert copy == dataclasses.replace(value, **changes)
    assert type(copy) is type(value) and copy is not value and value == before


def test_a_grant_resolved_by_its_commit_is_the_answer_with_the_grants_token() -> None:
    # The acquire's answer carries the pending token -(floor+1) until its commit's revision
    # is known; resolved, it is the same answer with revision + floor, and an answer with
    # nothing pending is returned as it is.
    pending = replaced(a_lock(), fencing_token=-3)
    granted = Outcome.of_grant(pending)
    answer = _resolve(granted, 100)
    assert answer == Outcome.of_grant(replaced(pending, fencing_token=102))
    assert answer.locks[0].fencing_token == 102
    assert granted.locks[0].fencing_token == -3  # the step's own answer is not changed
    settled = Outcome.of_grant(a_lock())
    assert _resolve(settled, 100) is settled
    both = (pending, [pending, a_lock()])
    resolved = _resolve(both, 100)
    assert type(resolved) is tuple and type(resolved[1]) is list
    assert [lock.fencing_token for lock in (resolved[0], *resolved[1])] == [102, 102, 41]
    assert _resolve(both, 0) is both
