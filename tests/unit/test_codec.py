"""Stored locks are Atlantis's JSON: the same Go field names, readable both ways, no secrets."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from enhanced_locking.backends import codec
from enhanced_locking.types import (
    Lock,
    LockUnreadable,
    Priority,
    Project,
    Pull,
    User,
    VcsHost,
    replaced,
    strip_credentials,
)

TOKEN = "ghp_s3cretT0ken"

# What Atlantis (Go, models.ProjectLock through encoding/json) writes for a lock: field order,
# nanosecond time with a zone offset, a clone URL that carries the bot's token.
ATLANTIS_JSON = json.dumps({
    "Project": {"ProjectName": "prod", "RepoFullName": "acme/infra", "Path": "envs/prod"},
    "Pull": {
        "Num": 12,
        "HeadCommit": "4f2a9c",
        "URL": "https://github.com/acme/infra/pull/12",
        "HeadBranch": "feature",
        "BaseBranch": "main",
        "Author": "alice",
        "State": 0,
        "BaseRepo": {
            "FullName": "acme/infra",
            "Owner": "acme",
            "Name": "infra",
            "CloneURL": f"https://atlantis-bot:{TOKEN}@github.com/acme/infra.git",
            "SanitizedCloneURL": "https://atlantis-bot:<redacted>@github.com/acme/infra.git",
            "VCSHost": {"Hostname": "github.com", "Type": 0},
        },
        "UpdatedAt": "0001-01-01T00:00:00Z",
    },
    "User": {"Username": "alice", "Teams": ["platform"]},
    "Workspace": "staging",
    "Time": "2024-05-01T10:20:30.123456789+02:00",
})


def a_lock(**changes: object) -> Lock:
    lock = Lock(
        key="acme/infra/envs/prod/default/prod",
        project=Project(repo_full_name="acme/infra", path="envs/prod", project_name="prod"),
        workspace="default",
        pull=Pull(num=12, url="https://github.com/acme/infra/pull/12", author="alice",
                  head_branch="feature", base_branch="main", head_commit="4f2a9c"),
        user=User(username="alice", teams=["platform", "sre"]),
        priority=Priority.HIGH,
        acquired_at=datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC),
        expires_at=datetime(2024, 5, 1, 9, 20, 30, tzinfo=UTC),
        fencing_token=41,
        backend="enhanced",
    )
    return lock.model_copy(update=changes)


def test_a_lock_is_written_with_atlantiss_go_field_names() -> None:
    data = json.loads(codec.encode(a_lock()))
    assert set(data) == {"Project", "Workspace", "Pull", "User", "Time", "Enhanced"}
    assert data["Project"] == {"ProjectName": "prod", "RepoFullName": "acme/infra",
                               "Path": "envs/prod"}
    assert data["Workspace"] == "default"
    assert data["Pull"] == {
        "Num": 12, "HeadCommit": "4f2a9c", "URL": "https://github.com/acme/infra/pull/12",
        "HeadBranch": "feature", "BaseBranch": "main", "Author": "alice", "State": 0,
        "BaseRepo": {"FullName": "acme/infra", "Owner": "acme", "Name": "infra",
                     "CloneURL": "", "SanitizedCloneURL": "",
                     "VCSHost": {"Hostname": "github.com", "Type": 0}},
    }
    # Teams where Atlantis reads them (models.User.Teams), not only under Enhanced.
    assert data["User"] == {"Username": "alice", "Teams": ["platform", "sre"]}
    assert data["Time"] == "2024-05-01T08:20:30.123456Z"


def test_our_additions_live_under_enhanced_which_atlantis_ignores() -> None:
    extra = json.loads(codec.encode(a_lock()))["Enhanced"]
    assert extra == {"Priority": "high", "ExpiresAt": "2024-05-01T09:20:30Z", "FencingToken": 41,
                     "Backend": "enhanced", "Mode": "exclusive"}
    assert json.loads(codec.encode(a_lock(expires_at=None)))["Enhanced"]["ExpiresAt"] is None


def test_a_closed_pull_is_state_one_as_in_go() -> None:
    lock = a_lock(pull=a_lock().pull.model_copy(update={"state": "closed"}))
    assert json.loads(codec.encode(lock))["Pull"]["State"] == 1
    assert codec.decode(codec.encode(lock)).pull.state == "closed"


@pytest.mark.parametrize("lock", [
    a_lock(),
    a_lock(expires_at=None, user=User(username="bob")),
    a_lock(project=Project(repo_full_name="acme/infra"), workspace="default"),
    a_lock(mode="shared"),
], ids=["everything", "no-expiry", "defaults", "shared"])
def test_what_we_write_reads_back_the_same(lock: Lock) -> None:
    assert codec.decode(codec.encode(lock), key=lock.key) == lock


def test_json_as_atlantis_writes_it_is_read() -> None:
    lock = codec.decode(ATLANTIS_JSON)
    assert lock.key == "acme/infra/envs/prod/staging/prod"
    assert lock.project == Project(repo_full_name="acme/infra", path="envs/prod",
                                   project_name="prod")
    assert lock.workspace == "staging"
    assert (lock.pull.num, lock.pull.author, lock.pull.head_branch, lock.pull.base_branch,
            lock.pull.head_commit, lock.pull.state) == (12, "alice", "feature", "main",
                                                        "4f2a9c", "open")
    assert lock.user == User(username="alice", teams=["platform"])
    # Go writes nanoseconds and any zone; we keep microseconds in UTC.
    assert lock.acquired_at == datetime(2024, 5, 1, 8, 20, 30, 123456, tzinfo=UTC)
    assert lock.acquired_at.utcoffset() == timedelta(0)
    # A lock Atlantis wrote is a legacy lock without our additions.
    assert (lock.backend, lock.fencing_token, lock.priority, lock.expires_at) == (
        "legacy", 0, Priority.NORMAL, None)


def test_a_negative_pull_atlantis_wrote_for_a_run_without_a_pull_is_read() -> None:
    # Atlantis's /api/plan, /api/apply and drift runs number their "pull" below zero.
    written = json.loads(ATLANTIS_JSON)
    written["Pull"]["Num"] = -536870977
    lock = codec.decode(json.dumps(written))
    assert lock.pull.num == -536870977
    assert json.loads(codec.encode(lock))["Pull"]["Num"] == -536870977
    assert codec.decode(codec.encode(lock), key=lock.key) == lock


def test_the_key_given_by_the_store_wins_over_the_one_derived_from_the_json() -> None:
    assert codec.decode(ATLANTIS_JSON, key="stored/key").key == "stored/key"


@pytest.mark.parametrize("time", ["2024-05-01T08:20:30Z", "2024-05-01T08:20:30.1Z",
                                  "2024-05-01T10:20:30+02:00", "2024-05-01T08:20:30"])
def test_go_time_forms_are_read_as_utc(time: str) -> None:
    data = json.loads(ATLANTIS_JSON)
    data["Time"] = time
    parsed = codec.decode(json.dumps(data)).acquired_at
    assert parsed.replace(microsecond=0) == datetime(2024, 5, 1, 8, 20, 30, tzinfo=UTC)


def test_the_sanitized_clone_url_is_kept_without_its_user() -> None:
    # Atlantis's Bitbucket Server client reads the project key from it (to comment on a pull
    # whose lock was deleted from the UI); Atlantis writes it with "user:<redacted>@".
    lock = codec.decode(ATLANTIS_JSON)
    assert lock.pull.sanitized_clone_url == "https://github.com/acme/infra.git"
    written = json.loads(codec.encode(lock))["Pull"]["BaseRepo"]
    assert written["SanitizedCloneURL"] == "https://github.com/acme/infra.git"
    assert written["CloneURL"] == "" and "atlantis-bot" not in codec.encode(lock)
    assert codec.decode(codec.encode(lock), key=lock.key) == lock


def test_credentials_never_reach_the_store() -> None:
    # Atlantis's own JSON carries the bot's token in CloneURL; re-encoding drops it.
    assert TOKEN not in codec.encode(codec.decode(ATLANTIS_JSON))
    data = json.loads(ATLANTIS_JSON)
    data["Pull"]["URL"] = f"https://atlantis-bot:{TOKEN}@github.com/acme/infra/pull/12"
    lock = codec.decode(json.dumps(data))
    assert lock.pull.url == "https://github.com/acme/infra/pull/12"
    assert TOKEN not in codec.encode(lock)


@pytest.mark.parametrize(("url", "clean"), [
    (f"https://bot:{TOKEN}@github.com/acme/infra.git", "https://github.com/acme/infra.git"),
    (f"https://{TOKEN}@gitlab.example:8443/a/b?x=1#top", "https://gitlab.example:8443/a/b?x=1#top"),
    (f"https://bot:{TOKEN}@[2001:db8::1]:8080/a", "https://[2001:db8::1]:8080/a"),
    ("https://github.com/acme/infra/pull/12", "https://github.com/acme/infra/pull/12"),
    ("git@github.com:acme/infra.git", "git@github.com:acme/infra.git"),
    ("", ""),
])
def test_user_and_token_are_stripped_from_urls(url: str, clean: str) -> None:
    assert strip_credentials(url) == clean
    assert Pull(num=1, url=url).url == clean


def test_json_as_atlantis_writes_it_keeps_its_vcs_host() -> None:
    lock = codec.decode(ATLANTIS_JSON)
    assert lock.pull.vcs_host == VcsHost(hostname="github.com", type="Github")
    again = json.loads(codec.encode(lock))["Pull"]["BaseRepo"]
    assert again["VCSHost"] == {"Hostname": "github.com", "Type": 0}


def test_teams_written_under_enhanced_before_are_still_read() -> None:
    data = json.loads(ATLANTIS_JSON)
    data["User"] = {"Username": "alice"}
    data["Enhanced"] = {"Teams": ["old-place"]}
    assert codec.decode(json.dumps(data)).user.teams == ["old-place"]


@pytest.mark.parametrize(("repo", "host", "owner", "name", "kind"), [
    ("acme/infra", VcsHost(hostname="github.com"), "acme", "infra", 0),
    # A GitLab subgroup: the owner is everything before the last slash, as Atlantis splits it.
    ("gl/grp/sub/proj", VcsHost(hostname="gitlab.example", type="Gitlab"), "gl/grp/sub", "proj", 1),
    ("org/app", VcsHost(hostname="gitea.example", type="Gitea"), "org", "app", 5),
])
def test_base_repo_carries_owner_name_and_vcs_host_as_atlantis_splits_them(
    repo: str, host: VcsHost, owner: str, name: str, kind: int
) -> None:
    lock = a_lock(project=Project(repo_full_name=repo), pull=Pull(num=3, vcs_host=host))
    base = json.loads(codec.encode(lock))["Pull"]["BaseRepo"]
    assert (base["FullName"], base["Owner"], base["Name"]) == (repo, owner, name)
    assert base["VCSHost"] == {"Hostname": host.hostname, "Type": kind}
    assert codec.decode(codec.encode(lock)).pull.vcs_host == host


def test_a_stored_path_that_was_not_cleaned_reads_back_clean_under_its_stored_key() -> None:
    data = json.loads(ATLANTIS_JSON)
    data["Project"]["Path"] = "./envs/prod/"
    assert codec.decode(json.dumps(data)).key == "acme/infra/envs/prod/staging/prod"
    stored = codec.decode(json.dumps(data), key="acme/infra/./envs/prod//staging/prod")
    assert stored.project.path == "envs/prod"
    assert stored.key == "acme/infra/./envs/prod//staging/prod"


# Text a field may hold, with what JSON must escape (quotes, backslashes, control characters)
# and text beyond ASCII.
_field_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
_times = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1),
                      timezones=st.just(UTC))


@st.composite
def _locks(draw: st.DrawFn) -> Lock:
    return a_lock(
        project=Project.model_construct(repo_full_name=draw(_field_text) or "r",
                                        path=draw(_field_text) or ".",
                                        project_name=draw(_field_text)),
        workspace=draw(_field_text),
        pull=Pull.model_construct(
            num=draw(st.integers(min_value=-(2**31), max_value=2**31 - 1)), url=draw(_field_text),
            author=draw(_field_text), head_branch=draw(_field_text),
            base_branch=draw(_field_text), head_commit=draw(_field_text),
            state=draw(st.sampled_from(["open", "closed"])),
            vcs_host=draw(st.none() | st.builds(VcsHost, hostname=_field_text,
                                                type=st.sampled_from(["Github", "Gitea"]))),
            sanitized_clone_url=draw(_field_text)),
        user=User.model_construct(username=draw(_field_text),
                                  teams=draw(st.lists(_field_text, max_size=3))),
        priority=draw(st.sampled_from(list(Priority))),
        mode=draw(st.sampled_from(["shared", "exclusive"])),
        backend=draw(st.sampled_from(["legacy", "enhanced"])),
    )


@given(lock=_locks(), grants=st.lists(
    st.tuples(_times, st.none() | _times, st.integers(min_value=0, max_value=2**62)),
    min_size=1, max_size=3))
def test_a_lock_is_written_as_the_json_encoder_writes_its_atlantis_form(
    lock: Lock, grants: list[tuple[datetime, datetime | None, int]]
) -> None:
    # The same lock granted again (its kept template) and with other times and tokens writes
    # exactly what the JSON encoder makes of the whole Atlantis object, byte for byte.
    for acquired, expires, token in grants:
        granted = replaced(lock, acquired_at=acquired, expires_at=expires, fencing_token=token)
        written = codec.encode(granted)
        assert written == orjson.dumps(codec.atlantis_dict(granted)).decode()
        assert json.loads(written)["Enhanced"]["FencingToken"] == token


def test_locks_that_differ_in_any_written_part_are_written_apart() -> None:
    # Each differs from the first in one part that a grant does not change: none may be
    # written from another's template.
    first = a_lock()
    others = [
        a_lock(workspace="staging"),
        a_lock(project=Project(repo_full_name="acme/infra", path="envs/prod")),
        a_lock(pull=first.pull.model_copy(update={"head_commit": "5e3b0d"})),
        a_lock(pull=first.pull.model_copy(update={"vcs_host": VcsHost(hostname="gitlab.com",
                                                                      type="Gitlab")})),
        a_lock(pull=first.pull.model_copy(update={
            "sanitized_clone_url": "https://github.com/acme/infra.git"})),
        a_lock(user=User(username="alice", teams=["platform"])),
        a_lock(user=User(username="alice", teams=["platform", "sre", "ops"])),
        a_lock(priority=Priority.LOW),
        a_lock(mode="shared"),
        a_lock(backend="legacy"),
    ]
    for lock in [first, *others, first]:
        assert codec.encode(lock) == orjson.dumps(codec.atlantis_dict(lock)).decode()
    assert len({codec.encode(lock) for lock in [first, *others]}) == len(others) + 1


@given(time=st.datetimes(timezones=st.just(UTC)) | st.datetimes(timezones=st.just(UTC)).map(
    lambda time: time.replace(microsecond=0)))
def test_a_time_is_written_as_isoformat_writes_it_with_z_for_the_zone(time: datetime) -> None:
    # The text up to the second is kept per second: whatever was kept before, the time
    # reads as isoformat writes it (no fraction when it has none, as isoformat).
    assert codec._go_time(time) == time.isoformat().replace("+00:00", "Z")
    assert codec._go_time(time.replace(microsecond=7)) == time.replace(
        microsecond=7).isoformat().replace("+00:00", "Z")


def test_locks_of_one_pull_share_its_pull_and_user_and_read_as_each_was_written() -> None:
    # A pull and a user are read once per value: the locks of one pull share them (fewer
    # models to validate, fewer objects for the collector), and each lock reads back as it was
    # written, whatever was read before it.
    first = a_lock()
    second = a_lock(key="acme/infra/envs/dev/default/dev",
                    project=Project(repo_full_name="acme/infra", path="envs/dev",
                                    project_name="dev"))
    other_pull = a_lock(pull=first.pull.model_copy(update={"num": 13}))
    other_user = a_lock(user=User(username="bob", teams=["platform"]))
    read = [codec.decode(codec.encode(lock), key=lock.key)
            for lock in (first, second, other_pull, other_user, first)]
    assert read == [first, second, other_pull, other_user, first]
    assert read[0].pull is read[1].pull and read[0].user is read[1].user
    assert read[2].pull != read[0].pull and read[3].user != read[0].user


@pytest.mark.parametrize(("first", "then", "kind"), [
    (1, 1.0, "Github"), (1.0, 1, "Gitlab"), (1, True, "Gitlab"), (0, False, "Github")])
def test_stored_values_that_compare_equal_but_differ_in_type_are_read_as_their_own(
    first: object, then: object, kind: str,
) -> None:
    # 1 == 1.0 == True in Python: a pull kept by the values it was read from must not answer
    # for values of another type, which the codec reads otherwise (a VCS type is a whole
    # number; 1.0 is not one).
    data = json.loads(ATLANTIS_JSON)
    data["Pull"]["BaseRepo"]["VCSHost"]["Type"] = first
    codec.decode(json.dumps(data))
    data["Pull"]["BaseRepo"]["VCSHost"]["Type"] = then
    host = codec.decode(json.dumps(data)).pull.vcs_host
    assert host is not None and host.type == kind


@pytest.mark.parametrize(("part", "field", "value"), [
    ("User", "Teams", {"platform": 1}), ("User", "Teams", [["platform"]]),
    ("User", "Username", ["alice"]), ("Pull", "URL", {"x": 1}), ("Pull", "Author", 7)])
def test_a_part_of_a_value_no_model_takes_is_still_unreadable(
    part: str, field: str, value: object,
) -> None:
    # Values that cannot key the kept pulls and users (a list, a dict) and values of the wrong
    # type are validated as before, and refused.
    data = json.loads(ATLANTIS_JSON)
    data[part][field] = value
    with pytest.raises(LockUnreadable) as refused:
        codec.read(json.dumps(data), key="acme/infra/envs/prod/staging/prod", side="legacy")
    assert field.lower() in refused.value.found.reason.replace("_", "")


@given(time=_times, digits=st.integers(min_value=0, max_value=9),
       zone=st.sampled_from(["Z", "+00:00", "+02:00", "-07:30"]))
def test_a_stored_time_reads_as_the_instant_it_names_in_utc(
    time: datetime, digits: int, zone: str,
) -> None:
    # RFC 3339 as Go writes it: up to nine digits of fraction (Python keeps six), any zone.
    fraction = f"{time.microsecond:06d}000"[:digits]
    text = time.strftime("%Y-%m-%dT%H:%M:%S") + ("." + fraction if digits else "") + zone
    offset = {"Z": timedelta(0), "+00:00": timedelta(0), "+02:00": timedelta(hours=2),
              "-07:30": -timedelta(hours=7, minutes=30)}[zone]
    expected = time.replace(microsecond=int(fraction[:6].ljust(6, "0")) if digits else 0)
    parsed = codec._parse_time(text)
    assert parsed == expected - offset and parsed.tzinfo is UTC
