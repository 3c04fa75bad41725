"""The hot path's answers, written out field by field, are the models the general way makes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from enhanced_locking.types import (
    AcquireResult,
    AuditEntry,
    Lock,
    LockRequest,
    Priority,
    Project,
    Pull,
    User,
    built,
    replaced,
    stamped,
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


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_a_requests_candidate_lock_is_the_model_built_from_its_fields(mode: str) -> None:
    request = LockRequest(project=Project(repo_full_name="acme/infra", path="envs/prod",
                                          project_name="prod"),
                          workspace="staging", pull=Pull(num=12), mode=mode,
                          user=User(username="alice", teams=["platform"]))
    now = datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    written = Lock.candidate(request, now=now, priority=Priority.HIGH)
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
    assert written.model_fields_set is not Lock.candidate(
        request, now=now, priority=Priority.HIGH).model_fields_set  # each its own set


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
    # AuditEntry.recorded and with_id write their fields out instead of asking built() and
    # replaced(): the models agree in every field, in which count as set, and in the JSON.
    time = datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    written = AuditEntry.recorded(time=time, **values)  # type: ignore[arg-type]
    general = built(AuditEntry, time=time, **values)
    for ours, theirs in ((written, general),
                         (written.with_id("41"), replaced(general, id="41"))):
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
def test_a_stamped_grant_is_the_model_replaced_makes(expires: datetime | None) -> None:
    # stamped() writes the granted lock out instead of asking replaced(): the two agree in
    # every field, in which fields count as set, and in the JSON; the candidate is unchanged.
    request = LockRequest(project=Project(repo_full_name="acme/infra", path="envs/prod"),
                          pull=Pull(num=12), user=User(username="alice"))
    now = datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    at = datetime(2024, 5, 1, 8, 20, 31, tzinfo=UTC)
    for candidate in (Lock.candidate(request, now=now, priority=Priority.NORMAL),
                      Lock.for_request(request, now=now, token=0, backend="enhanced")):
        written = stamped(candidate, acquired_at=at, expires_at=expires, fencing_token=7)
        general = replaced(candidate, acquired_at=at, expires_at=expires, fencing_token=7)
        assert written == general
        assert list(written.__dict__) == list(general.__dict__)
        assert written.model_fields_set == general.model_fields_set
        assert written.model_fields_set is not candidate.model_fields_set
        assert written.__pydantic_private__ == general.__pydantic_private__
        assert written.__pydantic_extra__ == general.__pydantic_extra__
        assert written.model_dump_json() == general.model_dump_json()
        assert (candidate.acquired_at, candidate.fencing_token) == (now, 0)
