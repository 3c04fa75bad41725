"""The lock routes' answers written from a template are pydantic's, byte for byte.

A grant's and a release's answer carry a lock; its JSON is written from a kept template of the
lock's shape with its times and fencing token filled in (``api/responses.py``). Whatever the
lock holds — quotes, backslashes and control characters in its texts, a VCS host or none,
teams, a lease or none, any side and mode — and whichever template was kept before, the bytes
must be what ``model_json`` writes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from enhanced_locking.api.responses import lock_json, model_json, result_json
from enhanced_locking.types import (
    AcquireResult,
    Lock,
    Priority,
    Project,
    Pull,
    Reason,
    User,
    VcsHost,
    lock_key,
)

NAME = st.text(min_size=1, max_size=30)
TEXT = st.text(max_size=30)
UTC_TIMES = st.datetimes(timezones=st.just(UTC)) | st.datetimes(
    timezones=st.just(UTC)).map(lambda time: time.replace(microsecond=0))

# Through a lambda: st.builds would also fill the models' required fields by their aliases.
PROJECTS = st.builds(lambda **fields: Project(**fields), repo_full_name=NAME, path=NAME,
                     project_name=TEXT)
PULLS = st.builds(
    lambda **fields: Pull(**fields), num=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    url=TEXT, author=TEXT, head_branch=TEXT, base_branch=TEXT, head_commit=TEXT,
    state=st.sampled_from(["open", "closed"]),
    vcs_host=st.none() | st.builds(lambda **fields: VcsHost(**fields), hostname=TEXT,
                                   type=st.sampled_from(["Github", "Gitlab", "Gitea"])),
    sanitized_clone_url=TEXT)
USERS = st.builds(lambda **fields: User(**fields), username=TEXT, teams=st.lists(TEXT, max_size=3))


@st.composite
def locks(draw: st.DrawFn, times: st.SearchStrategy[datetime] = UTC_TIMES) -> Lock:
    project, workspace = draw(PROJECTS), draw(NAME)
    return Lock(
        key=draw(st.just(lock_key(project, workspace)) | TEXT), project=project,
        workspace=workspace, pull=draw(PULLS), user=draw(USERS),
        priority=draw(st.sampled_from(list(Priority))), acquired_at=draw(times),
        expires_at=draw(st.none() | times),
        fencing_token=draw(st.integers(min_value=0, max_value=2**62)),
        backend=draw(st.sampled_from(["enhanced", "legacy"])),
        mode=draw(st.sampled_from(["exclusive", "shared"])))


@given(lock=locks())
def test_a_lock_is_answered_as_pydantic_writes_it(lock: Lock) -> None:
    assert lock_json(lock) == model_json(lock)
    # The same shape again, other times and token: the kept template is filled in anew.
    later = lock.model_copy(update={"acquired_at": lock.acquired_at.replace(microsecond=7),
                                    "fencing_token": lock.fencing_token + 1,
                                    "expires_at": None})
    assert lock_json(later) == model_json(later)


@given(lock=locks(st.datetimes(timezones=st.just(timezone(timedelta(hours=-3))))))
def test_a_lock_of_another_zone_is_answered_as_pydantic_writes_it(lock: Lock) -> None:
    assert lock_json(lock) == model_json(lock)


@given(lock=locks(), fresh=st.booleans())
def test_a_grant_is_answered_as_pydantic_writes_it(lock: Lock, fresh: bool) -> None:
    granted = AcquireResult.granted(lock, fresh=fresh)
    assert result_json(granted) == model_json(granted)
    validated = AcquireResult(acquired=True, lock_key=lock.key, lock=lock)
    assert result_json(validated) == model_json(validated)


@given(lock=locks())
def test_every_other_answer_is_pydantics(lock: Lock) -> None:
    for result in (
        AcquireResult.refused(lock.key, Reason.HELD, lock),
        AcquireResult.refused(lock.key, Reason.TIMEOUT),
        AcquireResult(acquired=True, lock_key=lock.key, lock=lock, queue_position=0),
        AcquireResult(acquired=True, lock_key=lock.key + "/other", lock=lock),
        AcquireResult(acquired=False, lock_key=lock.key, lock=lock),
    ):
        assert result_json(result) == model_json(result)


def test_the_template_knows_every_field_of_a_lock() -> None:
    # lock_json's shape names every field a grant does not change; a new field must join it
    # (the tests above would catch one only if they drew it).
    assert (list(Lock.model_fields), list(Project.model_fields), list(Pull.model_fields),
            list(User.model_fields), list(VcsHost.model_fields)) == (
        ["key", "project", "workspace", "pull", "user", "priority", "acquired_at",
         "expires_at", "fencing_token", "backend", "mode"],
        ["repo_full_name", "path", "project_name"],
        ["num", "url", "author", "head_branch", "base_branch", "head_commit", "state",
         "vcs_host", "sanitized_clone_url"],
        ["username", "teams"],
        ["hostname", "type"])


@given(lock=locks(), count=st.integers(min_value=1, max_value=600))
def test_a_lock_answered_again_is_answered_as_pydantic_writes_it(lock: Lock, count: int) -> None:
    # A release answers the lock its grant answered: the text kept for that very lock object
    # is written again, also after other locks (more than are kept) were written between.
    assert lock_json(lock) == model_json(lock)
    others = [lock.model_copy(update={"fencing_token": token, "workspace": f"w{token % 3}"})
              for token in range(lock.fencing_token + 1, lock.fencing_token + 1 + count)]
    for other in others:
        assert lock_json(other) == model_json(other)
    assert lock_json(lock) == model_json(lock)
    assert [lock_json(other) for other in others] == [model_json(other) for other in others]
