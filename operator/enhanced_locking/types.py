"""Core types shared by every layer: what a lock is, who asks for it, and what they are told.

The shapes follow Atlantis so data can move both ways: a lock key is Atlantis's
``{repoFullName}/{path}/{workspace}/{projectName}``, and a held lock knows its project,
workspace, pull request and user. On top of that an enhanced lock carries a priority, an
optional expiry and a fencing token that strictly increases per key.

The error tree (every error carries the lock key where there is one)::

    LockingError
    ├── InvalidRequest          the caller asked for something impossible (HTTP 422)
    ├── LockNotHeld             the named lock is not held (expired or released) (HTTP 404)
    ├── LockNotOwned            release by a pull that does not hold the lock (HTTP 409)
    ├── BackendUnavailable      the store did not answer; transient, may be retried (HTTP 503)
    │   └── PartlyReleased      a release by pull stopped after some of its parts committed:
    │       │                   carries the locks those parts released
    │   │   └── SidesUnanswered a release by pull the service answered without a store that
    │   │                       did not answer: carries what it freed and names that store
    │   └── PartlyListed        a list the service answered without a store that did not
    │                           answer: carries the locks it read and names that store
    ├── LockUnreadable          the stored lock of a key cannot be read: set aside, never
    │                           granted over, cleared by a force-unlock (HTTP 409)
    ├── LocksUnreadable         a list that found stored locks it cannot read: carries the
    │                           locks it read and the unreadable ones
    ├── StoreRefused            an existing store file is empty or not ours: not opened (exit 2)
    └── UnusableSetting         a setting's value the store cannot use (a Redis database it
                                lacks, a file that cannot be read): names the setting (exit 2;
                                raised at start only: a store that answered once and then
                                refuses its database raises BackendUnavailable)

    AccessError                 who is asking, not what (raised by the API's access control)
    ├── NotAuthenticated        no or invalid credentials (HTTP 401)
    └── NotPermitted            the caller lacks the verb's right (HTTP 403, names the verb)
"""

from __future__ import annotations

import enum
import functools
import urllib.parse
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self, TypeVar, overload

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from enhanced_locking.durations import (
    DURATION_FORM,
    DURATION_PATTERN,
    Ttl,
    format_duration,
    parse_duration,
)
from enhanced_locking.durations import (
    MAX_LENGTH as DURATION_MAX_LENGTH,
)

__all__ = [
    "ADMIN_ACTIONS",
    "PULL_MAX",
    "PULL_MIN",
    "AccessError",
    "AcquireResult",
    "AuditEntry",
    "AuthMethod",
    "BackendName",
    "BackendUnavailable",
    "BatchItem",
    "BatchLockRequest",
    "BatchResult",
    "Candidate",
    "CycleOwner",
    "Event",
    "HoldAnsweredAgain",
    "Identity",
    "InvalidRequest",
    "Lock",
    "LockNotHeld",
    "LockNotOwned",
    "LockRequest",
    "LockText",
    "LockUnreadable",
    "LockingError",
    "Locks",
    "LocksUnreadable",
    "Mode",
    "Moment",
    "NotAuthenticated",
    "NotPermitted",
    "PartlyListed",
    "PartlyReleased",
    "Priority",
    "Project",
    "Pull",
    "PullNumber",
    "Reason",
    "Side",
    "SidesUnanswered",
    "StoreBusy",
    "StoreRefused",
    "Synchronous",
    "UnreadableLock",
    "UnusableSetting",
    "User",
    "VcsHost",
    "VcsHostType",
    "Verb",
    "built",
    "clean_path",
    "collision_message",
    "hidden_collision_message",
    "lock_key",
    "lock_shape",
    "replaced",
    "strip_credentials",
    "utc_text",
    "utcnow",
    "vcs_host_from_url",
]

Side = Literal["legacy", "enhanced"]
"""Which locker answered: the Atlantis-compatible one or the enhanced one."""

Mode = Literal["shared", "exclusive"]
"""How a lock is held: ``shared`` holders coexist (plans), an ``exclusive`` one is alone
(applies)."""

Command = Literal["plan", "apply", "import", "state", "approve_policies", "unlock", "version"]
"""The Atlantis command a request is for (priority rules may name it)."""

BackendName = Literal["boltdb", "redis", "etcd", "memory"]
"""``boltdb`` names the embedded single-file store (SQLite in WAL mode, see the docs)."""

Synchronous = Literal["normal", "full"]
"""When the embedded store's commits reach the disk (``store-synchronous``, SQLite's
``synchronous`` of the same names): ``normal``, a commit survives the process being killed and
an operating-system crash can lose the last ones; ``full``, each commit is synced first."""


utcnow: Callable[[], datetime] = functools.partial(datetime.now, UTC)
"""The time now, in UTC: the default clock of every store and locker. ``datetime.now(UTC)``
as a partial, called in C without a Python frame of its own (about 50 ns less a read: every
grant reads the clock)."""


class Moment:
    """One moment, read from ``clock`` when first asked for and the same after: a read of the
    store that meets only locks without a lease never reads the clock (:meth:`Lock.lapsed`)."""

    __slots__ = ("_clock", "_now")

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._now: datetime | None = None

    def __call__(self) -> datetime:
        now = self._now
        if now is None:
            now = self._now = self._clock()
        return now


def utc_text(value: datetime, *, zone: str = "Z") -> str:
    """``value.isoformat()`` of a time in UTC (its ``tzinfo`` is ``UTC``; the callers check),
    the offset written as ``zone``: ``Z`` as RFC 3339 and pydantic's JSON write UTC, or
    ``+00:00`` as isoformat does.

    isoformat formats every field with C's sprintf and the zone through the tzinfo's offset:
    about 12k instructions, written for every lock and every audit entry. The text up to the
    second is kept per second (every time of that second shares it) and the fraction added."""
    second = (value.toordinal(), value.hour, value.minute, value.second)
    head = _SECONDS.get(second)
    if head is None:
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        head = _SECONDS[second] = value.replace(microsecond=0, tzinfo=None).isoformat()
    micro = value.microsecond
    if not micro:
        return head + zone  # as isoformat: no fraction when it is zero
    # %-formatting: an f-string's format spec costs about twice as much here.
    return "%s.%06d%s" % (head, micro, zone)  # noqa: UP031


_SECONDS: dict[tuple[int, int, int, int], str] = {}
_SECONDS_KEPT = 64


def strip_credentials(url: str) -> str:
    """Drop ``user:token@`` from a URL: Atlantis keeps clone URLs with tokens in them."""
    if "@" not in url:  # no user part anywhere (the common case, and on every lock written)
        return url
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    # Keep the host exactly as written (an IPv6 host keeps its brackets, a port its digits).
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )


_ModelT = TypeVar("_ModelT", bound=BaseModel)
_Defaults = tuple[dict[str, Any], dict[str, FieldInfo], dict[str, Any] | None, bool]
_DEFAULTS: dict[type[BaseModel], _Defaults] = {}
_IMMUTABLE = (bool, int, float, str, bytes, type(None))

# Read once: on a model class, ``cls.__new__`` goes through pydantic's metaclass hook (about
# 400 instructions a read), and a model's own __new__ is object's.
_new_object = object.__new__
_new_tuple = tuple.__new__
# The four slots of every pydantic model, set through their own descriptors (what
# ``object.__setattr__`` finds after looking the name up on the model's type, about a third of
# the cost of a model written out field by field): the ``__dict__`` of its fields, the set of
# fields given, its extra fields and its private attributes.
_SLOTS = BaseModel.__dict__
_set_fields: Callable[[BaseModel, dict[str, Any]], None] = _SLOTS["__dict__"].__set__
_set_fields_set: Callable[[BaseModel, set[str]], None] = _SLOTS["__pydantic_fields_set__"].__set__
_set_extra: Callable[[BaseModel, None], None] = _SLOTS["__pydantic_extra__"].__set__
_set_private: Callable[[BaseModel, dict[str, Any] | None], None] = (
    _SLOTS["__pydantic_private__"].__set__)


def _defaults_of(cls: type[BaseModel]) -> _Defaults:
    """Each field's default in field order, the fields whose default is made per model (a
    factory, or a mutable value pydantic copies), the private attributes' defaults when
    every one is immutable (copied as they are; else ``None``: made per model), and whether
    the class has private attributes at all."""
    plain: dict[str, Any] = {}
    fresh: dict[str, FieldInfo] = {}
    for name, field in cls.__pydantic_fields__.items():
        plain[name] = field.default
        if field.default_factory is not None or isinstance(field.default, list | dict | set):
            fresh[name] = field
    privates = cls.__private_attributes__
    fixed = ({name: attribute.default for name, attribute in privates.items()}
             if all(attribute.default_factory is None and isinstance(attribute.default, _IMMUTABLE)
                    for attribute in privates.values()) else None)
    _DEFAULTS[cls] = plain, fresh, fixed, bool(privates)
    return _DEFAULTS[cls]


def built(cls: type[_ModelT], /, **values: Any) -> _ModelT:
    """A model of ``values`` that are already of their types (ours, just checked or read),
    without validating them again: the hot path's ``model_construct``, at a fraction of its
    cost. Fields not given take their defaults; private attributes theirs."""
    plain, fresh, fixed, private = _DEFAULTS.get(cls) or _defaults_of(cls)
    data = {**plain, **values}
    if fresh:
        for name, field in fresh.items():
            if name not in values:
                data[name] = field.get_default(call_default_factory=True, validated_data=None)
    model = _new_object(cls)
    _set_fields(model, data)
    _set_fields_set(model, set(values))
    _set_extra(model, None)
    if not private:
        _set_private(model, None)
    elif fixed is not None:
        _set_private(model, dict(fixed))
    else:
        _set_private(model, {
            name: attribute.get_default() for name, attribute in
            cls.__private_attributes__.items()})
    return model


def replaced(model: _ModelT, /, **changes: Any) -> _ModelT:
    """``model`` with ``changes`` (already of their types), not validated again: the hot
    path's ``model_copy(update=...)``."""
    copy = _new_object(type(model))
    _set_fields(copy, {**model.__dict__, **changes})
    _set_fields_set(copy, model.__pydantic_fields_set__.union(changes))
    _set_extra(copy, None)
    private = model.__pydantic_private__
    _set_private(copy, dict(private) if private else None)
    return copy


Name = Annotated[str, Field(min_length=1, max_length=512)]
Text = Annotated[str, Field(max_length=2048)]
Url = Annotated[str, Field(max_length=2048), AfterValidator(strip_credentials)]


class Priority(enum.StrEnum):
    """Service order for waiters; aging can raise a waiter's effective level."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def level(self) -> int:
        return _LEVELS[self]

    @classmethod
    def from_level(cls, level: int) -> Priority:
        return _BY_LEVEL[max(0, min(level, len(_BY_LEVEL) - 1))]


_LEVELS = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.CRITICAL: 3}
_BY_LEVEL = [Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL]


def clean_path(path: str) -> str:
    """A project's path as Atlantis keeps it: Go's ``path.Clean``, and ``/`` becomes ``.``.

    Atlantis's ``models.NewProject`` cleans every path, so ``envs/net/``, ``./envs/net`` and
    ``envs/net`` are one project there; they must be one lock here too. The rules are Go's:
    repeated and trailing slashes and ``.`` elements go, ``x/..`` pairs cancel, ``..`` at the
    start of a relative path stays, ``..`` above ``/`` is dropped, and the empty path is ``.``.
    """
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    cleaned = "/".join(parts)
    # Go's Clean gives "/" for a rooted path that cleans to nothing; NewProject makes it ".".
    return ("/" + cleaned if rooted and cleaned else cleaned) or "."


class Project(_Model):
    """An Atlantis project: a directory of a repository, optionally named.

    The path is cleaned as Atlantis cleans it (:func:`clean_path`) wherever a project is made:
    the API, the command line, the importers and the stored locks read back.
    """

    repo_full_name: Name
    path: Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(clean_path)] = "."
    project_name: Annotated[str, Field(max_length=512)] = ""


VcsHostType = Literal["Github", "Gitlab", "BitbucketCloud", "BitbucketServer", "AzureDevops",
                      "Gitea"]
"""Atlantis's ``models.VCSHostType`` by its Go name (stored as its number, as Go does)."""


class VcsHost(_Model):
    """Where the pull's repository is hosted (Atlantis's ``models.VCSHost``).

    Atlantis finds a pull's plans under ``{hostname}::{repoFullName}::{num}`` and picks the
    VCS client by ``type``, so a lock that Atlantis unlocks needs both.
    """

    hostname: Annotated[str, Field(max_length=255)] = ""
    type: VcsHostType = "Github"


# How a pull request's web address looks on each VCS Atlantis supports (the path part).
_PULL_URL_SHAPES: tuple[tuple[str, VcsHostType], ...] = (
    ("/-/merge_requests/", "Gitlab"),
    ("/merge_requests/", "Gitlab"),
    ("/_git/", "AzureDevops"),
    ("/pull-requests/", "BitbucketCloud"),
    ("/pulls/", "Gitea"),
    ("/pull/", "Github"),
)
_KNOWN_HOSTS: dict[str, VcsHostType] = {
    "github.com": "Github", "gitlab.com": "Gitlab", "bitbucket.org": "BitbucketCloud",
    "dev.azure.com": "AzureDevops", "gitea.com": "Gitea",
}


def vcs_host_from_url(url: str) -> VcsHost | None:
    """The VCS host a pull request's web address points at, or ``None`` without one.

    The hostname is the URL's, as Go's ``url.Hostname()`` gives it (no port, no brackets, case
    kept: Atlantis takes it from the clone URL the same way). The type comes from well-known
    hosts, then from the shape of the address (``/pull/N`` GitHub, ``/-/merge_requests/N``
    GitLab, ``/pulls/N`` Gitea, ``/pull-requests/N`` Bitbucket — Server when under
    ``/projects/`` —, ``/_git/`` Azure DevOps); an address of no known shape says ``Github``,
    Go's zero value. A request can always name the host and type itself.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return None
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    else:
        host = host.partition(":")[0]
    if not host:
        return None
    kind = _KNOWN_HOSTS.get(host.lower())
    if kind is None:
        path = parts.path
        kind = next((name for shape, name in _PULL_URL_SHAPES if shape in path), "Github")
        if kind == "BitbucketCloud" and path.startswith("/projects/"):
            kind = "BitbucketServer"
    return VcsHost(hostname=host, type=kind)


def _whole_number(value: object) -> object:
    # JSON's integers (12, and 12.0, which JSON Schema counts as an integer); never a string
    # ("12"), a boolean or a fraction: a request is read as typed, not guessed at.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a whole number, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(value)
    return value


PULL_MIN = -(2**31)
"""The lowest pull number: Atlantis numbers a plan or apply without a pull request (its
``/api/plan``, ``/api/apply``, drift runs) with a made-up negative one, as low as ``-2**30``
and a counter; a VCS's own pull numbers start at 1."""
PULL_MAX = 2**31 - 1
"""The highest pull number (Atlantis's Go ``int`` as VCS hosts number pulls: 32 bits)."""

PullNumber = Annotated[int, Field(ge=PULL_MIN, le=PULL_MAX), BeforeValidator(_whole_number)]
"""A pull request number as a request carries it (strict: ``"12"`` is refused); negative for
Atlantis's runs without a pull request."""


class Pull(_Model):
    """The pull request that holds or asks for a lock (Atlantis's ``PullRequest``).

    ``vcsHost`` is where its repository lives (Atlantis's ``BaseRepo.VCSHost``); left out, it
    is derived from ``url`` (:func:`vcs_host_from_url`). ``sanitizedCloneUrl`` is its
    repository's clone URL as Atlantis's ``BaseRepo.SanitizedCloneURL`` has it, without any
    ``user:password@`` (Atlantis's has the VCS user and ``<redacted>``; none is kept): its
    Bitbucket Server client reads the project key from it, to comment on the pull.
    """

    num: PullNumber
    url: Url = ""
    author: Text = ""
    head_branch: Text = ""
    base_branch: Text = ""
    head_commit: Text = ""
    state: Literal["open", "closed"] = "open"
    vcs_host: VcsHost | None = None
    sanitized_clone_url: Url = ""

    @model_validator(mode="after")
    def _derive_vcs_host(self) -> Pull:
        if self.vcs_host is None and self.url:
            derived = vcs_host_from_url(self.url)
            if derived is not None:
                # The model is frozen: set the derived value the way pydantic would have.
                object.__setattr__(self, "vcs_host", derived)
        return self


class User(_Model):
    username: Text = ""
    teams: Annotated[list[Text], Field(max_length=256)] = []

    def __hash__(self) -> int:
        # Hashable although ``teams`` is a list, so pydantic shares the default ``User()`` of
        # a request instead of deep-copying it on every validation (nothing changes a User).
        return hash((self.username, tuple(self.teams)))


def lock_key(project: Project, workspace: str) -> str:
    """Atlantis's lock key: ``{repoFullName}/{path}/{workspace}/{projectName}``.

    The one place a key is made: every entry point builds a :class:`Project` (whose path is
    cleaned as Atlantis cleans it) and asks this function.
    """
    # The fields read from the model's __dict__: a pydantic model's attribute is read
    # through its __getattr__ hook (about 400 instructions each), and every acquire makes a key.
    fields = project.__dict__
    return f"{fields['repo_full_name']}/{fields['path']}/{workspace}/{fields['project_name']}"


def _wait_value(value: object) -> object:
    if value is None or isinstance(value, bool | timedelta):
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"expected true, false or {DURATION_FORM}, got {value!r}")


def _wait_json(value: timedelta | bool) -> str | bool:
    return value if isinstance(value, bool) else format_duration(value)


WaitFor = Annotated[
    timedelta | bool,
    BeforeValidator(_wait_value),
    PlainSerializer(_wait_json, when_used="json"),
    WithJsonSchema({"oneOf": [{"type": "boolean"},
                              {"type": "string", "pattern": DURATION_PATTERN,
                               "maxLength": DURATION_MAX_LENGTH}]}),
]
"""How long a request may wait: a Go duration; ``true`` for ``default-timeout``; ``false``
or ``"0s"`` (or leaving it out) for no wait at all, as in Atlantis."""

RequestId = Annotated[str, Field(min_length=1, max_length=128)]


class _RequestKey:
    """``LockRequest.key``: made by :func:`lock_key` on the first read and kept in the
    request's ``__dict__``, where every later read finds it (a descriptor without ``__set__``:
    the instance's ``__dict__`` comes first). ``functools.cached_property`` does the same under
    a lock (Python 3.11: one ``RLock`` for every instance, taken on each first read): a first
    read 10.0k instructions there, 6.6k here (making the key alone, 3.6k). Two threads reading
    a new request's key at once each make the same text."""

    @overload
    def __get__(self, instance: None, owner: type) -> _RequestKey: ...

    @overload
    def __get__(self, instance: LockRequest, owner: type) -> str: ...

    def __get__(self, instance: LockRequest | None, owner: type) -> _RequestKey | str:
        if instance is None:
            return self
        fields = instance.__dict__
        key = fields["key"] = lock_key(fields["project"], fields["workspace"])
        return key


class LockRequest(_Model):
    """One acquire: fail fast without ``wait``; wait up to ``wait`` in the key's queue with it.

    ``wait: true`` waits up to the configured ``default-timeout``; a duration above
    ``max-timeout`` is refused (422), never clamped.
    """

    project: Project
    workspace: Annotated[str, Field(min_length=1, max_length=512)] = "default"
    pull: Pull
    user: User = User()
    priority: Priority = Priority.NORMAL
    mode: Mode = "exclusive"
    command: Command | None = None
    wait: WaitFor | None = None
    ttl: Ttl | None = None
    request_id: RequestId | None = None

    key: ClassVar[_RequestKey] = _RequestKey()
    """The lock key, made once per request: an acquire reads it five times on its way (the
    route, the router's steps, the store's candidate) and each making costs about 4k
    instructions. Kept in the model's ``__dict__`` beside its fields (not one of them: not
    dumped, not compared); a copy forgets it (:meth:`model_copy`). See :class:`_RequestKey`."""

    def model_copy(self, *, update: Mapping[str, Any] | None = None,
                   deep: bool = False) -> Self:
        """A copy that makes its own key: pydantic copies the ``__dict__``, where the key is
        kept, and an update of the project or workspace would leave it stale."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("key", None)
        return copied


class BatchItem(_Model):
    """One lock of a batch: which project, in which workspace."""

    project: Project
    workspace: Annotated[str, Field(min_length=1, max_length=512)] = "default"

    @property
    def key(self) -> str:
        return lock_key(self.project, self.workspace)


class BatchLockRequest(_Model):
    """Several locks for one pull, all or nothing (e.g. every project of a pull request).

    While it waits the batch holds none of them: it is granted every key at once, when all are
    free together.
    """

    locks: Annotated[list[BatchItem], Field(min_length=1, max_length=100)]
    pull: Pull
    user: User = User()
    priority: Priority = Priority.NORMAL
    mode: Mode = "exclusive"
    command: Command | None = None
    wait: WaitFor | None = None
    ttl: Ttl | None = None
    request_id: RequestId | None = None

    @field_validator("locks")
    @classmethod
    def _one_pull(cls, locks: list[BatchItem]) -> list[BatchItem]:
        seen: set[str] = set()
        repo = locks[0].project.repo_full_name
        for item in locks:
            if item.key in seen:
                raise ValueError(f"lock {item.key} appears twice in the batch")
            if item.project.repo_full_name != repo:
                raise ValueError(f"every lock of a batch belongs to the pull's repository "
                                 f"({repo}); {item.key} does not")
            seen.add(item.key)
        return locks

    @property
    def keys(self) -> list[str]:
        return [item.key for item in self.locks]

    @property
    def owner(self) -> tuple[str, int]:
        """(repository, pull number): who will hold the locks."""
        return self.locks[0].project.repo_full_name, self.pull.num

    def requests(self) -> list[LockRequest]:
        """The batch as one request per key (they share pull, user, priority, wait, ttl)."""
        shared = self.model_dump(exclude={"locks"})
        return [LockRequest(project=item.project, workspace=item.workspace, **shared)
                for item in self.locks]


class Lock(_Model):
    """A held lock."""

    key: str
    project: Project
    workspace: str
    pull: Pull
    user: User
    priority: Priority = Priority.NORMAL
    acquired_at: datetime
    expires_at: datetime | None = None
    fencing_token: int = 0
    backend: Side = "enhanced"
    mode: Mode = "exclusive"

    @property
    def owner(self) -> tuple[str, int]:
        """(repository, pull number): Atlantis's owner of a lock."""
        return self.project.repo_full_name, self.pull.num

    def owned_by(self, repo_full_name: str, pull_num: int) -> bool:
        """Atlantis's ownership rule: the same pull number of the same repository."""
        return self.project.repo_full_name == repo_full_name and self.pull.num == pull_num

    def is_for(self, project: Project, workspace: str) -> bool:
        """Whether this is the lock of that project and workspace: the identity of a lock is
        its parts. Two projects can join to one key (``gl/grp`` + ``sub/proj`` and
        ``gl/grp/sub`` + ``proj``); the key alone cannot tell them apart."""
        # The same object first: a grant carries the request's own project.
        return ((self.project is project or self.project == project)
                and self.workspace == workspace)

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def lapsed(self, now: Callable[[], datetime]) -> bool:
        """``expired(now())``, the moment asked for only when the lock has a lease: a lock
        without one never lapses, and reading the clock (making a ``datetime``) costs about
        3k instructions. (``expires_at`` read from the ``__dict__``: a model's attribute is
        read through pydantic's ``__getattr__`` hook.)"""
        expires = self.__dict__["expires_at"]
        return expires is not None and expires <= now()

    @classmethod
    def for_request(
        cls, request: LockRequest, *, now: datetime, token: int, backend: Side
    ) -> Lock:
        expires = now + request.ttl if request.ttl else None
        return cls(
            key=request.key,
            project=request.project,
            workspace=request.workspace,
            pull=request.pull,
            user=request.user,
            priority=request.priority,
            acquired_at=now,
            expires_at=expires,
            fencing_token=token,
            backend=backend,
        )


class Candidate(NamedTuple):
    """What a request asks to hold on one key: a lock's parts that a grant does not change
    (its key, project, workspace, pull, user, priority, side and mode), without the grant's
    stamps (its times and fencing token). A locker hands its store one per key; the store
    makes the one :class:`Lock` model of a grant from it (:meth:`granted`) and keeps it in a
    waiter while the request waits.

    A plain record, not a pydantic model: a model made and freed on every acquire cost about
    17k instructions (four ``object.__setattr__`` calls, a fields set, its ``__dict__``), and
    every read of its fields went through pydantic's ``__getattr__`` hook; a named tuple is
    one object whose fields are read by name at C speed. Read by name only."""

    key: str
    project: Project
    workspace: str
    pull: Pull
    user: User
    priority: Priority = Priority.NORMAL
    mode: Mode = "exclusive"
    backend: Side = "enhanced"

    @property
    def owner(self) -> tuple[str, int]:
        """(repository, pull number): who will hold the lock (see :attr:`Lock.owner`)."""
        return self.project.repo_full_name, self.pull.num

    @classmethod
    def of_request(cls, request: LockRequest, *, priority: Priority) -> Candidate:
        """The candidate ``request`` asks for, at ``priority`` (the rules may change the
        request's own): every part from the request, already validated, and its key as the
        request made it. Its fields read from the request's ``__dict__`` (an attribute of a
        model is read through pydantic's ``__getattr__`` hook, about 400 instructions each)."""
        fields = request.__dict__
        project, workspace = fields["project"], fields["workspace"]
        # The tuple made directly, its values in the order of the fields above: the named
        # constructor is a Python function of its own (about half the cost of this call).
        # A test holds every field, read by name, to the request's.
        return _new_tuple(cls, (request.key, project, workspace,
                                fields["pull"], fields["user"], priority, fields["mode"],
                                "enhanced"))

    @classmethod
    def of_lock(cls, lock: Lock) -> Candidate:
        """What ``lock`` holds, without its stamps (a lock to store that came as a model; a
        waiter's candidate read back from a stored record)."""
        fields = lock.__dict__
        return cls(key=fields["key"], project=fields["project"], workspace=fields["workspace"],
                   pull=fields["pull"], user=fields["user"], priority=fields["priority"],
                   mode=fields["mode"], backend=fields["backend"])

    def granted(self, *, acquired_at: datetime, expires_at: datetime | None,
                fencing_token: int) -> Lock:
        """The lock a store grants: these parts with its times and fencing token.

        What ``built(Lock, ...)`` of every field makes, written out (every fresh grant makes
        one; the general ``built`` merges defaults and reads the class's private attributes).
        A test holds the two to the same model."""
        lock = _new_object(Lock)
        _set_fields(lock, {
            "key": self.key, "project": self.project, "workspace": self.workspace,
            "pull": self.pull, "user": self.user, "priority": self.priority,
            "acquired_at": acquired_at, "expires_at": expires_at,
            "fencing_token": fencing_token, "backend": self.backend, "mode": self.mode})
        _set_fields_set(lock, _LOCK_FIELDS.copy())
        _set_extra(lock, None)
        _set_private(lock, None)
        return lock


_LOCK_FIELDS = set(Lock.__pydantic_fields__)

Locks = list[Lock]
"""A list of locks (an alias: classes with a ``list`` method shadow the builtin inside them)."""


class Reason(enum.StrEnum):
    """Why an acquire was not granted."""

    HELD = "held"
    TIMEOUT = "timeout"
    QUEUE_FULL = "queue_full"
    DEADLOCK = "deadlock"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    COLLISION = "collision"
    """Another project joins to the same key (see :func:`collision_message`)."""
    SUPERSEDED = "superseded"
    """A newer head commit of the same pull asked for the same lock: this request is stale."""
    LIMITED = "limited"
    """A concurrency limit's group is full (a request that does not wait), or a batch asks
    for more locks of one group than its limit (at once, or as the limit is lowered below it
    while it waits)."""
    FROZEN = "frozen"
    """A freeze covers the key and refuses requests (``error`` carries its message)."""
    UNREADABLE = "unreadable"
    """The key's stored lock cannot be read (it is set aside): nothing is granted over it
    until a force-unlock clears it (``error`` says why it is unreadable)."""


def describe_project(project: Project, workspace: str) -> str:
    name = f", project {project.project_name}" if project.project_name else ""
    return (f"repository {project.repo_full_name}, path {project.path}, "
            f"workspace {workspace}{name}")


def collision_message(key: str, project: Project, workspace: str, holder: Lock) -> str:
    """Why a project is refused a key that another project's lock holds under the same name."""
    return (f"lock key {key} is ambiguous: {describe_project(project, workspace)} and "
            f"{describe_project(holder.project, holder.workspace)} (held by pull "
            f"#{holder.pull.num}) join to the same key, which Atlantis's lock layout keeps as "
            "one lock; rename one of the projects (e.g. give it a project name)")


def hidden_collision_message(key: str) -> str:
    """:func:`collision_message` for a caller who may not read the holder's repository: the
    other project is not described."""
    return (f"lock key {key} is ambiguous: a project of another repository (one this caller "
            "may not read) joins to the same key, which Atlantis's lock layout keeps as one "
            "lock; rename one of the projects (e.g. give it a project name)")


class CycleOwner(_Model):
    """One owner of a deadlock's cycle as the caller is shown it: its name (``repo#pull``) with
    its repository and pull as data of their own; an owner in a repository the caller may not
    read is ``(other repository)``, with neither."""

    name: str
    repo: str | None = None
    pull: int | None = None


GRANT_HEADER = "Lock-Grant"
"""The header of an acquire's 200 that says whether the call granted the lock (``new``: its
lease, if it has one, starts now), answered the lock its pull already held (``again``:
unchanged, lease and all), or upgraded its pull's shared hold to exclusive in place
(``upgraded``: a new fencing token, its lease starting now; never given back as a grant, as
the pull held the key before). A client that renews a held lock's lease renews only
``again``."""
NEW_GRANT, GRANT_AGAIN, GRANT_UPGRADED = "new", "again", "upgraded"


def batch_grant(locks: Sequence[Lock], kept: Collection[str],
                upgraded: Collection[str] = ()) -> str:
    """A batch's 200's :data:`GRANT_HEADER`: one word a lock of its ``locks``, in their order
    (``new``; ``upgraded`` for a key in ``upgraded``, its pull's shared hold made exclusive;
    ``again`` for another key in ``kept``, held by the pull already), comma-separated as an
    HTTP list (``new, again``); a batch of one says what an acquire's 200 says."""
    return ", ".join(GRANT_UPGRADED if lock.key in upgraded
                     else GRANT_AGAIN if lock.key in kept else NEW_GRANT for lock in locks)


def kept_by_grant(locks: Sequence[Lock], header: str | None) -> frozenset[str] | None:
    """The keys a batch's 200 says its pull held already, upgraded or not (:func:`batch_grant`:
    not the batch's to give back); ``None`` when it says nothing that can be read lock by
    lock (no header, as from an older service or a proxy that drops it, or not one known word
    a lock)."""
    words = [word.strip() for word in header.split(",")] if header is not None else []
    if len(words) != len(locks) or not set(words) <= {NEW_GRANT, GRANT_AGAIN, GRANT_UPGRADED}:
        return None
    return frozenset(lock.key for lock, word in zip(locks, words, strict=True)
                     if word != NEW_GRANT)


def upgraded_by_grant(locks: Sequence[Lock], header: str | None) -> frozenset[str]:
    """The keys a batch's 200 says were its pull's shared holds made exclusive in place
    (``upgraded``: :func:`batch_grant`); none when it does not say so lock by lock."""
    if kept_by_grant(locks, header) is None:
        return frozenset()
    assert header is not None
    return frozenset(lock.key for lock, word in zip(locks, header.split(","), strict=True)
                     if word.strip() == GRANT_UPGRADED)


class AcquireResult(_Model):
    """The answer to an acquire: granted with the lock, or refused with the reason and holder."""

    acquired: bool
    lock_key: str
    lock: Lock | None = None
    reason: Reason | None = None
    holder: Lock | None = None
    queue_position: int | None = None
    cycle: list[str] | None = None
    cycle_owners: list[CycleOwner] | None = None
    """A ``deadlock``'s cycle, owner by owner (``cycle``'s names, typed)."""
    hidden_owners: int | None = None
    """How many owners of the cycle are in repositories the caller may not read (shown as
    ``(other repository)``); null when none is."""
    error: str | None = None
    """Why, in words, where the reason alone does not say it (a ``collision``; a freeze's
    message for ``frozen``)."""
    _fresh: bool = PrivateAttr(default=True)
    _upgraded: bool = PrivateAttr(default=False)

    @classmethod
    def granted(cls, lock: Lock, *, fresh: bool = True, upgraded: bool = False) -> AcquireResult:
        """``fresh``: granted by this call (false when the pull already held it);
        ``upgraded``: its pull's shared hold upgraded to exclusive in place (not ``fresh``).

        What ``built(cls, acquired=True, lock_key=lock.key, lock=lock)`` makes, with the
        private ``_fresh`` set, written out: every acquire answers one, and the general
        ``built`` (merging defaults, reading the class's private attributes) cost about as
        much again as the object itself. A test holds the two to the same model."""
        result = _new_object(cls)
        # Copies of dicts and a set made once (a copy of a dict is one block copied; a dict
        # display inserts its items one by one): 8.5k to 7.1k instructions an answer.
        fields = _GRANTED_FIELDS.copy()
        fields["lock_key"] = lock.__dict__["key"]
        fields["lock"] = lock
        _set_fields(result, fields)
        _set_fields_set(result, _GRANTED_SET.copy())
        _set_extra(result, None)
        _set_private(result, (_UPGRADED if upgraded else _FRESH if fresh else _NOT_FRESH).copy())
        return result

    @property
    def fresh(self) -> bool:
        """Granted by this call: a caller gone before the answer gives it back. A lock the
        pull already held (Atlantis's rule: asked again, it is granted unchanged) is not."""
        # Read from the private dict: ``self._fresh`` goes through pydantic's __getattr__.
        return self.acquired and self.__pydantic_private__["_fresh"]  # type: ignore[index]

    @property
    def upgraded(self) -> bool:
        """Its pull's shared hold upgraded to exclusive in place by this call (a new fencing
        token, its lease starting now): not :attr:`fresh`, so never given back as a grant
        (that would free the pull's shared hold with it); the pull keeps the exclusive lock."""
        return self.acquired and self.__pydantic_private__["_upgraded"]  # type: ignore[index]

    @classmethod
    def refused(
        cls, key: str, reason: Reason, holder: Lock | None = None, **extra: Any
    ) -> AcquireResult:
        return cls(acquired=False, lock_key=key, reason=reason, holder=holder, **extra)


_GRANTED_FIELDS: dict[str, Any] = {
    "acquired": True, "lock_key": "", "lock": None, "reason": None, "holder": None,
    "queue_position": None, "cycle": None, "cycle_owners": None, "hidden_owners": None,
    "error": None}
"""A granted answer's fields in their order, its ``lock_key`` and ``lock`` to be set (copied
per answer, never handed out)."""
_GRANTED_SET = {"acquired", "lock_key", "lock"}
_FRESH: dict[str, Any] = {"_fresh": True, "_upgraded": False}
_NOT_FRESH: dict[str, Any] = {"_fresh": False, "_upgraded": False}
_UPGRADED: dict[str, Any] = {"_fresh": False, "_upgraded": True}


class BatchResult(_Model):
    """The answer to a batch acquire: every lock, or the key that blocked it and why."""

    acquired: bool
    locks: list[Lock] = []
    lock_key: str | None = None
    reason: Reason | None = None
    holder: Lock | None = None
    queue_position: int | None = None
    cycle: list[str] | None = None
    cycle_owners: list[CycleOwner] | None = None
    """A ``deadlock``'s cycle, owner by owner (``cycle``'s names, typed)."""
    hidden_owners: int | None = None
    """How many owners of the cycle are in repositories the caller may not read (shown as
    ``(other repository)``); null when none is."""
    error: str | None = None
    """Why, in words, where the reason alone does not say it (a ``collision``; a freeze's
    message for ``frozen``)."""
    _kept: frozenset[str] | None = PrivateAttr(default=None)
    _upgraded: frozenset[str] = PrivateAttr(default=frozenset())

    @classmethod
    def granted(cls, locks: Sequence[Lock], *, kept: frozenset[str] | None,
                upgraded: frozenset[str] = frozenset()) -> BatchResult:
        """Every lock of the batch held now; ``kept``, ``upgraded``: see :attr:`kept`,
        :attr:`upgraded`."""
        result = cls(acquired=True, locks=list(locks))
        result._kept = kept
        result._upgraded = upgraded
        return result

    @property
    def kept(self) -> frozenset[str] | None:
        """Granted: the keys whose locks the pull held already, answered unchanged or
        :attr:`upgraded` (not this call's to give back: only the other keys were granted by
        it). ``None``: not said key by key (a batch answered by a locker or a store path that
        does not tell)."""
        return self._kept if self.acquired else None

    @property
    def upgraded(self) -> frozenset[str]:
        """Granted: the keys of :attr:`kept` whose shared hold of the pull this call upgraded
        to exclusive in place (a new fencing token; kept by the pull, never given back)."""
        return self._upgraded if self.acquired else frozenset()

    def kept_or(self, looked: frozenset[str]) -> frozenset[str]:
        """:attr:`kept` where the grant says it; else ``looked``, the keys a look before the
        grant saw the pull hold (older: the pull's other request may take a key in between)."""
        kept = self.kept
        return looked if kept is None else kept


class Event(_Model):
    """Something that happened to a lock or to the configuration, for subscribers and SSE."""

    id: str = ""
    type: str
    time: datetime
    key: str | None = None
    repo: str | None = None
    lock: Lock | None = None
    details: dict[str, Any] = {}

    @classmethod
    def recorded(cls, *, id: str, type: str, time: datetime, key: str | None,
                 repo: str | None, lock: Lock | None, details: dict[str, Any]) -> Event:
        """An event of values that are already of their types (what a bus recorded).

        What ``built(cls, ...)`` of every field makes, written out: every event a shared bus
        publishes (two per lock pair) and every event read from the in-process bus is one, and
        the general ``built`` (merging defaults, reading the class's private attributes) cost
        about a third of the event. A test holds the two to the same model."""
        event = _new_object(cls)
        _set_fields(event, {"id": id, "type": type, "time": time, "key": key, "repo": repo,
                            "lock": lock, "details": details})
        _set_fields_set(event, _EVENT_FIELDS.copy())
        _set_extra(event, None)
        _set_private(event, None)
        return event


_EVENT_FIELDS = set(Event.__pydantic_fields__)


class LockingError(Exception):
    """Base of every error this package raises on purpose."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class InvalidRequest(LockingError):
    """The request cannot be served as asked (e.g. a wait above ``max-timeout``)."""

    def __init__(self, message: str, *, field: str, key: str | None = None) -> None:
        super().__init__(message, key=key)
        self.field = field


class LockNotHeld(LockingError):
    """A call that needs a held lock (a refresh) found the key free: it expired or was
    released."""

    def __init__(self, key: str) -> None:
        super().__init__(f"lock {key} is not held (it expired or was released)", key=key)


class LockNotOwned(LockingError):
    """A release named a pull that does not hold the lock."""

    def __init__(self, key: str, holder: Lock) -> None:
        super().__init__(
            f"lock {key} is held by pull #{holder.pull.num} of {holder.project.repo_full_name}",
            key=key,
        )
        self.holder = holder


class HoldAnsweredAgain(LockingError):
    """A give-back of a grant whose caller went away found the same hold answered to another
    request of its pull (Atlantis's re-entry: the pull holds the key already) since: it stays
    held, for that request."""

    def __init__(self, lock: Lock) -> None:
        super().__init__(
            f"lock {lock.key} was answered to another request of pull #{lock.pull.num} of "
            f"{lock.project.repo_full_name} too: kept for it", key=lock.key)
        self.lock = lock


class BackendUnavailable(LockingError):
    """The store did not answer; the operation may be retried."""


class StoreBusy(BackendUnavailable):
    """The store answers, but this replica had no free connection to it within the bound of a
    call's wait for one (every connection of its pool was busy with other calls): the
    service is overloaded, the store is not away. Nothing of the call was sent. Answered as
    the service's other overload (503 ``overloaded`` with ``Retry-After``); a router does not
    fall back to legacy for it. What was done before it, in a call of several steps, is
    undone as after an outage (a ``BackendUnavailable``)."""


class PartlyReleased(BackendUnavailable):
    """A release by pull done a part at a time (etcd) stopped when a later part's step failed:
    the parts before it committed, and ``released`` holds the locks they freed (released for
    good: the error is about the rest of the pull's locks, still held)."""

    def __init__(self, message: str, *, released: list[Lock]) -> None:
        super().__init__(message)
        self.released = released


class PartlyListed(BackendUnavailable):
    """A list the service answered (200) without a lock store that did not answer: ``locks``
    holds the locks read on the stores that answered, ``unavailable`` names the others, whose
    locks are not among them, and ``unreadable`` the stored locks it found and cannot read
    (as :class:`LocksUnreadable` carries them). Raised by the client library
    (``Client.list``) so a caller cannot read a partial list as everything held."""

    def __init__(self, message: str, *, locks: list[Lock], unavailable: tuple[str, ...],
                 unreadable: tuple[UnreadableLock, ...] = ()) -> None:
        super().__init__(message)
        self.locks = locks
        self.unavailable = unavailable
        self.unreadable = unreadable


class SidesUnanswered(PartlyReleased):
    """A release by pull the service answered (200) without a lock store that did not answer:
    ``released`` holds the locks freed on the stores that answered, ``unavailable`` names the
    others (``legacy``, ``enhanced``), whose locks of the pull stay held. Raised by the client
    library (``Client.unlock_pull``) so a caller cannot read the pull as freed; the same call
    made again once the store answers frees the rest."""

    def __init__(self, message: str, *, released: list[Lock],
                 unavailable: tuple[str, ...]) -> None:
        super().__init__(message, released=released)
        self.unavailable = unavailable


class UnreadableLock(_Model):
    """A stored lock that cannot be read, set aside under its key.

    Says why in a few words and identifies the stored value by its size and a digest, never by
    its content (an unreadable value may hold anything, credentials included).
    """

    key: str
    side: str
    """The lock space it was found in (``legacy``, ``enhanced``, ``shadow``)."""
    reason: str
    size: int
    """The stored value's length in bytes."""
    digest: str
    """The first 16 hex digits of the stored value's SHA-256."""
    found_at: datetime


class LockUnreadable(LockingError):
    """The stored lock of a key cannot be decoded: the key is set aside (never granted over;
    a force-unlock clears it)."""

    def __init__(self, found: UnreadableLock, *, where: str = "") -> None:
        """``where``: the store's own name for the value, where it differs from the key."""
        at = f" at {where}" if where else ""
        super().__init__(
            f"cannot read the stored lock of {found.key}{at} ({found.reason}); it is set "
            "aside: nothing is granted on this key until a force-unlock clears it",
            key=found.key)
        self.found = found


class LocksUnreadable(LockingError):
    """A list the service answered (200) naming stored locks it cannot read (set aside: each
    key is held, by whom is not known, until a force-unlock clears it): ``locks`` holds the
    locks read, ``unreadable`` the others, which are not among them. Raised by the client
    library (``Client.list``) so a caller cannot read the list as everything held; not a
    ``BackendUnavailable``: asking again does not mend it, a force-unlock does."""

    def __init__(self, locks: list[Lock], unreadable: tuple[UnreadableLock, ...]) -> None:
        keys = ", ".join(entry.key for entry in unreadable)
        super().__init__(f"stored locks that cannot be read hold {keys} (a force-unlock of each "
                         f"clears it): they are not among the {len(locks)} listed")
        self.locks = locks
        self.unreadable = unreadable


class StoreRefused(LockingError):
    """An existing store file is empty or belongs to something else; opening it as a new store
    would lose its locks and send its fencing tokens back to 1, so it is not opened."""


class UnusableSetting(LockingError):
    """A setting's value is well formed but the store cannot use it (a Redis database number
    the server lacks, a TLS file that cannot be read): the user's to fix, not an outage.

    ``setting`` is the setting's YAML key (``enhanced-locking-redis-db``, ``data-dir``) and
    ``detail`` what is wrong, so the command can add where the value came from."""

    def __init__(self, setting: str, detail: str) -> None:
        super().__init__(f"invalid setting {setting}: {detail}")
        self.setting = setting
        self.detail = detail


class Verb(enum.StrEnum):
    """What a caller asks to do; each call of the API needs one or more of these rights.

    In Kubernetes mode each is a verb on the virtual resource ``locks.locking.runatlantis.io``
    (``kubectl auth can-i force-unlock locks.locking.runatlantis.io``).
    """

    READ = "read"
    """List and get locks, queues, events, config and migration state."""
    LOCK = "lock"
    """Acquire; refresh, release and cancel what one's own pull holds or queued."""
    PRIORITIZE = "prioritize"
    """Ask for a priority above ``normal``."""
    RELEASE_ANY = "release-any"
    """Release, refresh or cancel what another pull holds or queued."""
    FORCE_UNLOCK = "force-unlock"
    """Free a lock whoever holds it (with a reason)."""
    ADMIN = "admin"
    """Read the audit trail and other administrative state."""


AuthMethod = Literal["none", "static", "kubernetes"]
"""How a caller was identified: ``none`` when access control is off."""


class Identity(_Model):
    """Who is calling, as the authenticator established it (never the credential itself)."""

    name: Annotated[str, Field(max_length=512)]
    groups: tuple[Annotated[str, Field(max_length=512)], ...] = ()
    method: AuthMethod
    uid: Annotated[str, Field(max_length=256)] = ""


REFUSALS = frozenset({"unauthenticated", "denied", "cross-site", "foreign-host"})
"""The outcomes of a call refused for who made it or where it came from (401, 403): the audit
trail keeps these within a bound of their own, so a flood of them never pushes out the
entries of calls that were served (see :mod:`enhanced_locking.backends.audit_store`)."""


class AuditEntry(_Model):
    """One row of the audit trail: who did what, why, when, from where, and how it ended."""

    id: str = ""
    time: datetime
    identity: str
    groups: tuple[str, ...] = ()
    method: str
    verb: str
    action: str
    key: str | None = None
    repo: str | None = None
    pull: int | None = None
    outcome: str
    status: int
    reason: str | None = None
    peer: str = ""
    request_id: str | None = None

    @property
    def refusal(self) -> bool:
        """Whether this is the entry of a refused call (its outcome one of :data:`REFUSALS`)."""
        return self.outcome in REFUSALS

    @classmethod
    def recorded(
        cls, *, id: str = "", time: datetime, identity: str, groups: tuple[str, ...],
        method: str, verb: str, action: str, key: str | None, repo: str | None,
        pull: int | None, outcome: str, status: int, reason: str | None, peer: str,
        request_id: str | None,
    ) -> AuditEntry:
        """An entry of values already of their types, with the ``id`` its store handed out
        for it (``AuditStore.new_id``; ``""``, none, where the store gives it as it writes):
        what ``built(cls, ...)`` makes of these fields, written out (every audited call makes
        one; the general ``built`` merges defaults and reads the class's private attributes,
        about 6k instructions more). A test holds the two to the same model."""
        entry = _new_object(cls)
        _set_fields(entry, {
            "id": id, "time": time, "identity": identity, "groups": groups, "method": method,
            "verb": verb, "action": action, "key": key, "repo": repo, "pull": pull,
            "outcome": outcome, "status": status, "reason": reason, "peer": peer,
            "request_id": request_id})
        given = {"time", "identity", "groups", "method", "verb", "action", "key", "repo",
                 "pull", "outcome", "status", "reason", "peer", "request_id"}
        if id:
            given.add("id")
        _set_fields_set(entry, given)
        _set_extra(entry, None)
        _set_private(entry, None)
        return entry

    def with_id(self, id: str) -> AuditEntry:
        """This entry with the ``id`` its store gave it: ``replaced(self, id=id)`` written out
        (an AuditEntry has no extra fields and no private attributes)."""
        entry = _new_object(type(self))
        data = self.__dict__.copy()
        data["id"] = id
        _set_fields(entry, data)
        _set_fields_set(entry, self.__pydantic_fields_set__ | _ID)
        _set_extra(entry, None)
        _set_private(entry, None)
        return entry


_ID = frozenset({"id"})

ADMIN_ACTIONS = frozenset({"force-unlock", "release-any", "cancel-any"})
"""Audited actions that act on what others hold; the operator also posts them as Events."""


class AccessError(Exception):
    """Base of the access-control refusals: about who asks, not about what is asked."""


class NotAuthenticated(AccessError):
    """No credentials, or credentials no authenticator accepts (HTTP 401)."""

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.invalid_token = invalid_token


class NotPermitted(AccessError):
    """The caller is known but lacks the right the call needs (HTTP 403)."""

    def __init__(self, identity: Identity, verb: Verb, *, repo: str | None = None) -> None:
        scope = f" on {repo}" if repo else ""
        super().__init__(f"{identity.name} may not {verb.value}{scope} (needs the {verb.value!r} "
                         "right)")
        self.identity = identity
        self.verb = verb
        self.repo = repo


def lock_shape(lock: Lock) -> tuple[object, ...]:
    """What a grant does not change of ``lock`` (its project, workspace, pull, user, priority,
    side and mode), as a hashable key: the kept JSON templates of a lock (the stored value,
    the API's answer) are looked up by it.

    Read from the models' ``__dict__`` (where pydantic keeps them): an attribute of a pydantic
    model is read through its ``__getattr__`` hook, about 400 instructions each, and the shape
    takes twenty of them; the models themselves as the key would be hashed and compared by
    pydantic, in Python.

    The last lock's shape is kept (the lock is frozen, and kept alive with it, so no other
    object can be taken for it): a grant's lock is shaped for its stored value and at once
    again for its answer. A shape is about 7k instructions, a kept one 0.7k."""
    global _last_shape
    last, shape = _last_shape
    if last is lock:
        return shape
    fields = lock.__dict__
    project, pull = fields["project"].__dict__, fields["pull"].__dict__
    user, host = fields["user"].__dict__, pull["vcs_host"]
    shape = (project["project_name"], project["repo_full_name"], project["path"],
            fields["workspace"], pull["num"], pull["head_commit"], pull["url"],
            pull["head_branch"], pull["base_branch"], pull["author"], pull["state"],
            None if host is None else (host.hostname, host.type), pull["sanitized_clone_url"],
            user["username"],
            tuple(user["teams"]), fields["priority"], fields["backend"], fields["mode"])
    _last_shape = (lock, shape)
    return shape


_last_shape: tuple[Lock | None, tuple[object, ...]] = (None, ())


class LockText:
    """A lock's JSON as pydantic writes it, by alias (the API's answers: ``acquiredAt``) or
    by field name (the events' JSON: ``acquired_at``), written from a template of the lock's
    shape (:func:`lock_shape`) made once per shape by pydantic and kept, with the grant's
    time, lease end and fencing token filled in.

    pydantic's serializer ran about 34k instructions for a lock, for every lock an answer or
    an event carries (each lock pair answers two and publishes two); the same pull asking for
    the same key again (every re-plan, every acquire of a busy key) reuses the template. A
    lock whose times are not in UTC (none the stores answer) is not written here
    (:meth:`written` answers ``None``: the caller asks pydantic)."""

    __slots__ = ("_acquired", "_by_alias", "_expires", "_fencing", "_repo", "_templates",
                 "_written")

    def __init__(self, *, by_alias: bool) -> None:
        self._by_alias = by_alias
        names = [Lock.model_fields[name].alias or name if by_alias else name
                 for name in ("acquired_at", "expires_at", "fencing_token")]
        repo = (Project.model_fields["repo_full_name"].alias or "repo_full_name" if by_alias
                else "repo_full_name")
        self._acquired = f',"{names[0]}":'.encode()
        self._expires = f'"{names[1]}"'.encode()
        self._fencing = f'"{names[2]}"'.encode()
        self._repo = f',"project":{{"{repo}":'.encode()
        self._templates: dict[tuple[object, ...], tuple[bytes, bytes, bytes, bytes]] = {}
        self._written: dict[int, tuple[Lock, tuple[bytes, bytes, bytes]]] = {}

    def json(self, lock: Lock) -> bytes:
        """pydantic's JSON of ``lock`` (by alias or by field name, as this writer's)."""
        return lock.__pydantic_serializer__.to_json(lock, by_alias=self._by_alias)

    def written(self, lock: Lock) -> tuple[bytes, bytes, bytes] | None:
        """``lock``'s JSON, its key's JSON and its repository's (``repo_full_name``) JSON,
        from its template; ``None`` when a time of it is not in UTC.

        The text of a lock written is kept with the lock (frozen, and kept alive with it, so
        no other object can be taken for it) until it is written again: the lock a release
        answers is the one its grant answered (on the embedded store, and on Redis the lock
        this replica made), written again in about 1.6k instructions instead of 22k, and then
        let go (a lock kept alive longer is walked by more of the collector's passes). Kept by
        the lock's identity, for up to a few hundred locks at a time, so that 32 clients whose
        grants and releases interleave still find theirs."""
        kept_texts = self._written
        kept = kept_texts.pop(id(lock), None)
        if kept is not None and kept[0] is lock:
            return kept[1]
        fields = lock.__dict__  # not through the model's attribute hook (see lock_shape)
        acquired, expires = fields["acquired_at"], fields["expires_at"]
        if acquired.tzinfo is not UTC or (expires is not None and expires.tzinfo is not UTC):
            return None
        head, tail, key, repo = self._template(lock)
        written = b"%s\"%s\",%s:%s,%s:%d%s" % (
            head, utc_text(acquired).encode(), self._expires,
            b"null" if expires is None else b'"' + utc_text(expires).encode() + b'"',
            self._fencing, fields["fencing_token"], tail), key, repo
        if len(kept_texts) >= _WRITTEN_KEPT:
            kept_texts.clear()
        kept_texts[id(lock)] = (lock, written)
        return written

    def _template(self, lock: Lock) -> tuple[bytes, bytes, bytes, bytes]:
        """The kept template of ``lock``'s shape: its JSON before the time of its grant, after
        its fencing token, its key as JSON and its repository as JSON."""
        # The key too: the lock's JSON writes it, the shape does not name it.
        shape = (lock.__dict__["key"], lock_shape(lock))
        templates = self._templates
        template = templates.get(shape)
        if template is None:
            if len(templates) >= _TEMPLATES_KEPT:
                templates.clear()
            template = templates[shape] = self._cut(self.json(lock))
        return template

    def _cut(self, text: bytes) -> tuple[bytes, bytes, bytes, bytes]:
        """pydantic's JSON of a lock before the value of the time of its grant, after its
        fencing token's value, its key's JSON and its repository's JSON. Those three fields
        follow every field a caller's text can be in, only ``backend`` and ``mode`` (fixed
        words) follow them; the key comes first, up to the ``project`` object, whose first
        field is the repository, up to ``path``: a quote inside a string is escaped, so no
        match of these names with their quotes falls inside a string."""
        head = text[:text.rindex(self._acquired) + len(self._acquired)]
        key_ends = text.index(self._repo)
        repo_starts = key_ends + len(self._repo)
        return (head, text[text.rindex(b',"backend":'):], text[len(b'{"key":'):key_ends],
                text[repo_starts:text.index(b',"path":', repo_starts)])


_WRITTEN_KEPT = 256
_TEMPLATES_KEPT = 4096
