"""The service's keys and stored locks, checked with Atlantis v0.47.1's own model code.

``tests/atlantis_models`` (Go, Atlantis from the module proxy) cleans paths with
``models.NewProject`` and decodes our stored JSON into ``models.ProjectLock``. What Atlantis
then sees must be what it would have written itself: the same path, the pull-status key
``{host}::{repo}::{num}`` its unlock marks as discarded, the VCS type whose client comments on
the pull, the owner and name as it splits them, and the user's teams.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.atlantis_models import AtlantisModels, build_models
from tests.support.gobuild import GoBuildError

from enhanced_locking.backends import codec
from enhanced_locking.types import Lock, LockRequest, clean_path, utcnow


@pytest.fixture(scope="module")
def atlantis() -> AtlantisModels:
    try:
        return build_models()
    except GoBuildError as error:
        pytest.fail(str(error), pytrace=False)


SEGMENTS = st.sampled_from(["", ".", "..", "...", "a", "b", "envs", "net", " x", "a.b"])
PATHS = st.lists(SEGMENTS, max_size=7).map("/".join) | st.text("/.ab", max_size=12)


def test_paths_are_cleaned_exactly_as_atlantis_cleans_them(atlantis: AtlantisModels) -> None:
    samples: list[str] = []

    @settings(max_examples=400, database=None)
    @given(PATHS)
    def collect(path: str) -> None:
        samples.append(path)

    collect()
    samples += ["envs/net/", "./envs/net", "envs/net", "/", "", "/../..", "../../a/./b//"]
    expected = atlantis.clean(samples)
    ours = [clean_path(path) for path in samples]
    mismatches = [(p, o, e) for p, o, e in zip(samples, ours, expected, strict=True) if o != e]
    assert mismatches == []


def _stored(request: dict[str, object]) -> str:
    parsed = LockRequest.model_validate(request)
    return codec.encode(Lock.for_request(parsed, now=utcnow(), token=3, backend="enhanced"))


def test_atlantis_finds_the_pull_of_a_lock_we_wrote(atlantis: AtlantisModels) -> None:
    stored = _stored({
        "project": {"repoFullName": "acme/infra", "path": "./envs/net/", "projectName": "net"},
        "pull": {"num": 12, "url": "https://github.com/acme/infra/pull/12", "author": "alice"},
        "user": {"username": "alice", "teams": ["platform", "sre"]},
    })
    [seen] = atlantis.read_locks([stored])
    assert seen["pullKey"] == "github.com::acme/infra::12"
    assert seen["hasBaseRepo"] is True and seen["vcsType"] == "Github"
    assert (seen["path"], seen["pullNum"], seen["author"]) == ("envs/net", 12, "alice")
    assert (seen["username"], seen["teams"]) == ("alice", ["platform", "sre"])


@pytest.mark.parametrize(("pull", "key", "vcs", "owner"), [
    # Derived from the pull's address: GitLab subgroups, a self-hosted Gitea.
    ({"num": 5, "url": "https://gitlab.example/gl/grp/sub/proj/-/merge_requests/5"},
     "gitlab.example::gl/grp/sub/proj::5", "Gitlab", "gl/grp/sub"),
    ({"num": 5, "url": "https://git.example:3000/gl/grp/sub/proj/pulls/5"},
     "git.example::gl/grp/sub/proj::5", "Gitea", "gl/grp/sub"),
    # Named by the request (what the Go adapter sends from Atlantis's own BaseRepo).
    ({"num": 5, "vcsHost": {"hostname": "ghe.example", "type": "Github"}},
     "ghe.example::gl/grp/sub/proj::5", "Github", "gl/grp/sub"),
])
def test_the_vcs_host_comes_from_the_request_or_the_pull_address(
    atlantis: AtlantisModels, pull: dict[str, object], key: str, vcs: str, owner: str
) -> None:
    stored = _stored({"project": {"repoFullName": "gl/grp/sub/proj"}, "pull": pull})
    [seen] = atlantis.read_locks([stored])
    assert (seen["pullKey"], seen["vcsType"], seen["owner"], seen["name"]) == (
        key, vcs, owner, "proj")


def test_no_credentials_reach_what_atlantis_reads(atlantis: AtlantisModels) -> None:
    stored = _stored({"project": {"repoFullName": "acme/infra"},
                      "pull": {"num": 1, "url": "https://bot:ghp_t0ken@github.com/acme/infra/pull/1"}})
    assert "ghp_t0ken" not in stored
    [seen] = atlantis.read_locks([stored])
    assert seen["pullKey"] == "github.com::acme/infra::1"
    assert json.loads(stored)["Pull"]["BaseRepo"]["CloneURL"] == ""
