"""Locks as Atlantis stores them: JSON with Atlantis's Go field names.

Atlantis (``models.ProjectLock``) writes ``Project``, ``Workspace``, ``Pull``, ``User`` and
``Time``. We write every field of those that Atlantis reads, so Atlantis can read our locks and
we can read its, and put our additions (priority, expiry, fencing token, side) under
``Enhanced``, which Go's decoder ignores. What Atlantis reads, and why:

* ``Project`` (name, repository, cleaned path) and ``Workspace``: the lock's identity.
* ``Pull.Num``, ``URL``, ``Author``: its lock pages and ``GET /api/locks``.
* ``Pull.BaseRepo`` (``FullName``, ``Owner``, ``Name``, ``SanitizedCloneURL``,
  ``VCSHost{Hostname, Type}``): an unlock from its UI marks the pull's plans discarded under
  ``{Hostname}::{FullName}::{Num}``, deletes the plan from the pull's working directory and
  comments on the pull through the client of ``VCSHost.Type`` (Bitbucket Server's finds the
  project key in ``SanitizedCloneURL``). With an empty ``BaseRepo`` it skips all three.
* ``User.Username`` and ``User.Teams``.

Credentials never reach the store: URLs lose their ``user:token@`` (``SanitizedCloneURL`` its
``user:<redacted>@``), and Atlantis's ``CloneURL`` (which carries its VCS token) is never
copied; ours is written empty.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import pydantic

from enhanced_locking.types import (
    Lock,
    LockUnreadable,
    Priority,
    Project,
    Pull,
    UnreadableLock,
    User,
    VcsHost,
    VcsHostType,
    lock_key,
    lock_shape,
    strip_credentials,
    utc_text,
)

__all__ = [
    "atlantis_dict", "decode", "encode", "from_atlantis_dict", "read", "split_repo_full_name",
    "unreadable",
]

_PULL_STATES = {"open": 0, "closed": 1}

# Atlantis's models.VCSHostType: the Go constants in order (iota).
_VCS_TYPES: tuple[VcsHostType, ...] = (
    "Github", "Gitlab", "BitbucketCloud", "BitbucketServer", "AzureDevops", "Gitea",
)


_NO_HOST = VcsHost()
"""A pull without a known VCS host (built once: the encoder runs on every write)."""


def split_repo_full_name(repo: str) -> tuple[str, str]:
    """Atlantis's ``models.SplitRepoFullName``: owner is everything before the last ``/``
    (GitLab subgroups keep theirs), or two empty strings for a malformed name."""
    owner, slash, name = repo.rpartition("/")
    return (owner, name) if slash and name else ("", "")


def _base_repo(lock: Lock) -> dict[str, Any]:
    repo = lock.project.repo_full_name
    owner, name = split_repo_full_name(repo)
    host = lock.pull.vcs_host or _NO_HOST
    return {
        "FullName": repo, "Owner": owner, "Name": name, "CloneURL": "",
        "SanitizedCloneURL": lock.pull.sanitized_clone_url,
        "VCSHost": {"Hostname": host.hostname, "Type": _VCS_TYPES.index(host.type)},
    }


def _vcs_host(pull: dict[str, Any]) -> tuple[Any, VcsHostType] | None:
    """The pull's VCS host as :class:`VcsHost`'s two arguments (hostname as stored, type by
    Atlantis's number), or ``None`` without one."""
    base = pull.get("BaseRepo")
    host = base.get("VCSHost") if isinstance(base, dict) else None
    if not isinstance(host, dict) or not host.get("Hostname"):
        return None  # written before the host was kept: derived from the URL again
    kind = host.get("Type", 0)
    return host["Hostname"], (_VCS_TYPES[kind] if isinstance(kind, int) and 0 <= kind < 6
                              else "Github")


def _sanitized_clone_url(pull: dict[str, Any]) -> Any:
    """The pull's ``BaseRepo.SanitizedCloneURL`` ("" without one); its ``user:<redacted>@``
    is stripped by the model (:data:`~enhanced_locking.types.Url`)."""
    base = pull.get("BaseRepo")
    return base.get("SanitizedCloneURL", "") if isinstance(base, dict) else ""


def _go_time(value: datetime) -> str:
    """``value`` in UTC as ``isoformat`` writes it, with ``Z`` for the zone."""
    if value.tzinfo is not UTC:  # ours always are UTC: no conversion
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return utc_text(value)


def _parse_time(value: str) -> datetime:
    try:  # what we and Atlantis write: RFC 3339 in UTC, which fromisoformat reads as it is
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        pass
    else:
        if parsed.tzinfo is UTC:
            return parsed
    text = value.replace("Z", "+00:00")
    # Go writes nanoseconds; Python keeps microseconds.
    if "." in text:
        head, _, tail = text.partition(".")
        # Only the fraction's digits: the zone after it (``+02:00``) has digits too.
        digits = "".join(itertools.takewhile(str.isdigit, tail))
        zone = tail[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    parsed = datetime.fromisoformat(text)
    # Go keeps the writer's zone; we answer in UTC (the API promises RFC 3339 UTC).
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def atlantis_dict(lock: Lock) -> dict[str, Any]:
    """The lock as Atlantis's ``ProjectLock`` JSON object (plus our ``Enhanced`` part).

    :func:`encode` writes its parts in this order (``Time``, then ``Enhanced``'s
    ``ExpiresAt`` and ``FencingToken`` cut out of a template): a test holds the two together."""
    project, pull, expires = lock.project, lock.pull, lock.expires_at  # read once: every write
    return {
        "Project": {
            "ProjectName": project.project_name,
            "RepoFullName": project.repo_full_name,
            "Path": project.path,
        },
        "Workspace": lock.workspace,
        "Pull": {
            "Num": pull.num,
            "HeadCommit": pull.head_commit,
            "URL": strip_credentials(pull.url),
            "HeadBranch": pull.head_branch,
            "BaseBranch": pull.base_branch,
            "Author": pull.author,
            "State": _PULL_STATES[pull.state],
            "BaseRepo": _base_repo(lock),
        },
        "User": {"Username": lock.user.username, "Teams": list(lock.user.teams)},
        "Time": _go_time(lock.acquired_at),
        "Enhanced": {
            "Priority": lock.priority.value,
            "ExpiresAt": _go_time(expires) if expires else None,
            "FencingToken": lock.fencing_token,
            "Backend": lock.backend,
            "Mode": lock.mode,
        },
    }


def from_atlantis_dict(data: dict[str, Any], *, key: str | None = None) -> Lock:
    """Read Atlantis's JSON (written by Atlantis itself or by us).

    A lock's pull and user are read once per value (see :data:`_PARTS_KEPT`): the locks of a
    pull share both."""
    project = data.get("Project") or {}
    pull = data.get("Pull") or {}
    user = data.get("User") or {}
    extra = data.get("Enhanced") or {}
    lock_project = Project(
        repo_full_name=project.get("RepoFullName", ""),
        path=project.get("Path") or ".",
        project_name=project.get("ProjectName", ""),
    )
    workspace = data.get("Workspace") or "default"
    expires = extra.get("ExpiresAt")
    return Lock(
        key=key or lock_key(lock_project, workspace),
        project=lock_project,
        workspace=workspace,
        pull=_kept(_PULLS, _pull, (
            int(pull.get("Num", 0)), pull.get("URL", ""), pull.get("Author", ""),
            pull.get("HeadBranch", ""), pull.get("BaseBranch", ""), pull.get("HeadCommit", ""),
            "closed" if pull.get("State") == 1 else "open", _vcs_host(pull),
            _sanitized_clone_url(pull))),
        # Teams were kept under Enhanced before they moved to where Atlantis reads them.
        user=_kept(_USERS, _user, (
            user.get("Username", ""), _sequence(user.get("Teams") or extra.get("Teams") or []))),
        priority=Priority(extra.get("Priority", "normal")),
        acquired_at=_parse_time(data["Time"]) if data.get("Time") else datetime.now(UTC),
        expires_at=_parse_time(expires) if expires else None,
        fencing_token=int(extra.get("FencingToken", 0)),
        backend=extra.get("Backend", "legacy"),
        mode="shared" if extra.get("Mode") == "shared" else "exclusive",
    )


_PARTS_KEPT = 4096
"""How many pulls, and how many users, :func:`from_atlantis_dict` keeps by the values it read
them from (each forgotten all at once when full, as the encoder's templates).

The locks of one pull share its pull and mostly its user, and each is a model to validate
(a pull about 54k instructions when its VCS host is derived from its address, a user 11k)
and objects that Python's collector tracks for as long as the lock is kept: a decoded lock
was about eleven such objects, six of them its pull's and its user's, and a list of 100,000
locks set off full collections that walked them all again and again. Kept, a list of locks
ten to a pull is about five objects per lock.

The key is the arguments the model is made of, after the codec's own conversions (the pull
number made an int, the VCS type a name): a value that validates is of its field's type,
and a string never equals a number, so equal arguments make equal models (1, 1.0 and True
are equal in Python, but never all valid for one field). An argument that cannot be a key
(a list where a string belongs) is validated without being kept, and fails there. The
models are frozen and nothing changes a user's teams: sharing one is safe."""

_PULLS: dict[tuple[Any, ...], Pull] = {}
_USERS: dict[tuple[Any, ...], User] = {}
_PartT = TypeVar("_PartT", Pull, User)


def _pull(args: tuple[Any, ...]) -> Pull:
    num, url, author, head_branch, base_branch, head_commit, state, host, clone_url = args
    return Pull(num=num, url=url, author=author, head_branch=head_branch,
                base_branch=base_branch, head_commit=head_commit, state=state,
                vcs_host=None if host is None else VcsHost(hostname=host[0], type=host[1]),
                sanitized_clone_url=clone_url)


def _user(args: tuple[Any, ...]) -> User:
    username, teams = args
    return User(username=username, teams=list(teams) if isinstance(teams, tuple) else teams)


def _sequence(value: Any) -> Any:
    """A list as a tuple (a key can hold it); anything else as it is (it fails validation)."""
    return tuple(value) if isinstance(value, list) else value


def _kept(kept: dict[tuple[Any, ...], _PartT], make: Callable[[tuple[Any, ...]], _PartT],
          args: tuple[Any, ...]) -> _PartT:
    """The model ``make`` makes of ``args``, made once while kept (see :data:`_PARTS_KEPT`)."""
    try:
        found = kept.get(args)
    except TypeError:  # an unhashable argument: not a valid one either
        return make(args)
    if found is None:
        found = make(args)
        if len(kept) >= _PARTS_KEPT:
            kept.clear()
        kept[args] = found
    return found


def encode(lock: Lock) -> str:
    """The lock as stored: :func:`atlantis_dict` as compact JSON, byte for byte.

    Written from a template of the lock's parts that a grant does not change (its project,
    workspace, pull, user, priority, side and mode), made once per such shape and kept: a
    grant fills in its time, lease end and fencing token. The same pull asking for the same
    key again (every acquire of a busy key, every re-plan) reuses the template; building the
    nested dicts and running the JSON encoder was most of what writing a lock cost.
    """
    shape = lock_shape(lock)
    fields = lock.__dict__
    template = _TEMPLATES.get(shape)
    if template is None:
        if len(_TEMPLATES) >= _TEMPLATES_KEPT:
            _TEMPLATES.clear()
        template = _TEMPLATES[shape] = _template(lock)
    head, middle, tail = template
    expires = fields["expires_at"]
    return (f'{head}"{_go_time(fields["acquired_at"])}"{middle}'
            f'{"null" if expires is None else chr(34) + _go_time(expires) + chr(34)}'
            f',"FencingToken":{fields["fencing_token"]}{tail}')


_TEMPLATES: dict[tuple[object, ...], tuple[str, str, str]] = {}
_TEMPLATES_KEPT = 4096


def _template(lock: Lock) -> tuple[str, str, str]:
    """The JSON of ``lock`` before its time, between its time and its lease end, and after
    its fencing token (:func:`encode` joins them). Cut from the encoder's own output by the
    structure of :func:`atlantis_dict` (Time, then Enhanced's Priority, ExpiresAt,
    FencingToken, Backend, Mode), never by searching the text: no field's value can shift
    a cut."""
    whole = atlantis_dict(lock)
    enhanced = whole.pop("Enhanced")
    del whole["Time"]
    head = orjson.dumps(whole).decode()[:-1] + ',"Time":'
    middle = ',"Enhanced":{"Priority":' + orjson.dumps(enhanced["Priority"]).decode() + \
        ',"ExpiresAt":'
    tail = (',"Backend":' + orjson.dumps(enhanced["Backend"]).decode()
            + ',"Mode":' + orjson.dumps(enhanced["Mode"]).decode() + "}}")
    return head, middle, tail


def decode(text: str | bytes, *, key: str | None = None) -> Lock:
    return from_atlantis_dict(orjson.loads(text), key=key)


def read(text: str | bytes, *, key: str, side: str) -> Lock:
    """:func:`decode` for a store: a value that is not a lock raises :class:`LockUnreadable`
    (what it says is safe to log and show: never the value itself)."""
    try:
        data = orjson.loads(text)
        if not isinstance(data, dict):
            raise _NotALock(f"JSON {type(data).__name__}, not an object")
        return from_atlantis_dict(data, key=key)
    except Exception as error:  # whatever a foreign value makes the decoder raise
        raise LockUnreadable(unreadable(key, text, error, side=side)) from None


class _NotALock(ValueError):
    """Valid JSON, but not a lock object."""


def unreadable(key: str, raw: str | bytes, error: BaseException | None, *, side: str,
               reason: str = "") -> UnreadableLock:
    """What is kept of a stored value that is not a lock: why (``reason``, or words drawn from
    ``error`` that never quote the value: a JSON error's position, a field's name), its size
    and a digest."""
    data = raw.encode(errors="surrogateescape") if isinstance(raw, str) else bytes(raw)
    return UnreadableLock(
        key=key, side=side, reason=reason or _why(error), size=len(data),
        digest=hashlib.sha256(data).hexdigest()[:16], found_at=datetime.now(UTC))


def _why(error: BaseException | None) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"not JSON: {error.msg} at character {error.pos}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte {error.start})"
    if isinstance(error, _NotALock):
        return str(error)
    if isinstance(error, pydantic.ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "lock"
        return f"not a lock: field {where} is invalid ({first['type']})"
    # int("abc") and friends quote the value in their message: name the kind of error only.
    return f"not a lock: its fields do not decode ({type(error).__name__})"
