"""Policy rules: freezes, concurrency limits and priority rules, as data and one decision.

A LockPolicy CR (or the YAML key ``enhanced-locking-policies``) carries the rules; they are part
of the config snapshot like every other setting, so an edit reaches every replica the way any
setting does. This module is pure: it says what the rules are and what they decide, and every
store asks it the same questions in its grant step, so a rule behaves the same on each backend.
The Redis scripts cannot call Python; they receive the rules compiled by :func:`compile_rules`
(globs as Lua patterns, times in ms) and mirror :func:`verdict` line by line, and a test runs
both on the same generated cases (as for the service order).

**The grant table** (:func:`verdict`), for a request (or a queued waiter) of owner ``o`` asking
for keys ``K`` in mode ``m`` at time ``now``; the first line that applies decides:

=========================================================  ============================
the request's own pull already holds every key of ``K``    granted (unchanged; held locks
                                                            are never touched by a rule)
a new request, and a refusing freeze covers a key of ``K``  ``frozen``: refused with the
                                                            freeze's message
another pull holds a key of ``K`` exclusively, or ``m`` is  ``held`` (wait or refuse as
exclusive and another pull holds a key in any mode          the request asked)
a new shared request, and an exclusive request of another   ``held``: it queues behind the
pull waits on a key of ``K``                                writer (writers never starve)
an active freeze covers a key of ``K``                      ``frozen``: a waiting freeze
                                                            queues a new request; a queued
                                                            one stays queued
a concurrency group of a key of ``K`` is full               ``limited``: it waits
otherwise                                                   granted
=========================================================  ============================

A freeze is active from ``from`` (or always) until ``until`` (or for ever). A concurrency
group is the set of held locks whose key matches the rule's pattern (``per: pattern``), or the
same and of one repository (``repository``) or one organisation (``organisation``): at most
``limit`` locks (shared holders each count) are held in it at once. A request that would take
the group past its limit waits, in the service order of every waiter of the group's keys.

**Priority rules** are decided before a request reaches a store (:func:`assigned_priority`):
the first rule (in order) whose pattern and command match gives the priority; a client may ask
for less, never for more, unless it has the admin right.
"""

from __future__ import annotations

import contextvars
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from enhanced_locking.types import Command, Mode, Priority, clean_path

__all__ = [
    "CALLER_IS_ADMIN",
    "ConcurrencyLimit",
    "Freeze",
    "KeyParts",
    "KeyPattern",
    "OverLimit",
    "PolicyRules",
    "PriorityRule",
    "Verdict",
    "assigned_priority",
    "compile_rules",
    "glob_to_lua",
    "glob_to_regex",
    "groups_of",
    "over_limit",
    "verdict",
]

_ROOT_PATH = "."
"""The root project's path (``clean_path`` of ``""``, ``./`` or ``/``): as a ``pathPrefix``,
it covers the whole repository."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

CALLER_IS_ADMIN: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "caller_is_admin", default=False)
"""Whether the caller of the current request has the admin right (may ask for a priority above
its rule's). The API sets it from the caller's identity; everything else leaves it false."""


class _Rule(BaseModel):
    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True,
                              extra="forbid")


RuleName = Annotated[str, Field(min_length=1, max_length=63,
                                pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
Glob = Annotated[str, Field(min_length=1, max_length=512)]


def _cel(rule: str, message: str, field_path: str | None = None) -> Any:
    """A CEL rule for the CRD schema (the API server checks what the validators below do);
    a fresh copy each time the schema is built."""
    def extra(schema: dict[str, Any]) -> None:
        entry = {"rule": rule, "message": message}
        if field_path:
            entry["fieldPath"] = field_path
        schema["x-kubernetes-validations"] = [entry]
    return extra


def _moment(schema: dict[str, Any]) -> None:
    """A freeze's ``from`` and ``until`` in the CRD schema: the API server's date-time takes the
    year 0000, and a moment whose offset puts it past the years 0001 to 9999 in UTC, which
    name no time the service can hold (:func:`_in_utc_years`)."""
    schema["maxLength"] = 64
    _cel("self >= timestamp('0001-01-01T00:00:00Z')", "the year must be 0001 or later")(schema)
    schema["x-kubernetes-validations"].append({
        "rule": "self <= timestamp('9999-12-31T23:59:59.999999999Z')",
        "message": "the year must be 9999 or earlier, in UTC"})


def _in_utc_years(moment: datetime) -> datetime:
    """``moment``, which names a time in UTC of the years 0001 to 9999 (the status and
    the service hold freezes' moments in UTC): an offset that puts it outside them is refused."""
    try:
        moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{moment.isoformat()} is outside the years 0001 to 9999 in UTC: "
                         "must be 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z") from None
    return moment


_Moment = Annotated[AwareDatetime, AfterValidator(_in_utc_years)]


class KeyPattern(_Rule):
    """Which lock keys a rule covers; every selector given must match (at least one).

    ``repo``, ``workspace`` and ``key`` are globs (``*`` any run of characters, ``/``
    included; ``?`` one character; nothing else is special). ``pathPrefix`` matches the
    project's path and every path below it (``envs/prod`` covers ``envs/prod/eu``, not
    ``envs/production``); ``.``, Atlantis's path of a repository's root project, covers every
    project of the repository.
    """

    model_config = ConfigDict(json_schema_extra=_cel(
        "has(self.repo) || has(self.pathPrefix) || has(self.workspace) || has(self.key)",
        "a pattern needs at least one of repo, pathPrefix, workspace, key"))

    repo: Glob | None = Field(None, description="Repository full name, a glob (acme/*).")
    path_prefix: Annotated[Glob, AfterValidator(clean_path)] | None = Field(
        None, description="Project path; covers the paths below it (envs/prod); . (the root "
        "project) covers the whole repository.")
    """Cleaned as a project's path is (:func:`~enhanced_locking.types.clean_path`), so
    ``envs/prod/`` and ``./envs/prod`` cover what ``envs/prod`` covers."""
    workspace: Glob | None = Field(None, description="Terraform workspace, a glob.")
    key: Glob | None = Field(
        None, description="The whole lock key {repo}/{path}/{workspace}/{project}, a glob.")

    @model_validator(mode="after")
    def _not_empty(self) -> KeyPattern:
        if not (self.repo or self.path_prefix or self.workspace or self.key):
            raise ValueError("a pattern needs at least one of repo, pathPrefix, workspace, key")
        return self

    def matches(self, parts: KeyParts) -> bool:
        return (
            (self.repo is None or _matches(self.repo, parts.repo))
            and (self.path_prefix is None or _under(parts.path, self.path_prefix))
            and (self.workspace is None or _matches(self.workspace, parts.workspace))
            and (self.key is None or _matches(self.key, parts.key))
        )


class Freeze(_Rule):
    """No new grant on the covered keys while active; held locks are left alone."""

    model_config = ConfigDict(json_schema_extra=_cel(
        "!has(self.from) || !has(self.until) || timestamp(self.until) > timestamp(self.from)",
        "until must be after from", ".until"))

    name: RuleName = Field(description="The freeze's name (events and status use it).")
    match: KeyPattern = Field(description="The keys it covers.")
    message: Annotated[str, Field(min_length=1, max_length=1024)] = Field(
        description="What a refused request is told.")
    # Aware: RFC 3339 has an offset, and a time without one names no moment (compared
    # with the clock, it failed every grant step with a TypeError).
    from_: _Moment | None = Field(
        None, alias="from", description="When it starts (RFC 3339; none: now).",
        json_schema_extra=_moment)
    until: _Moment | None = Field(
        None, description="When it ends (RFC 3339; none: when the rule is removed).",
        json_schema_extra=_moment)
    action: Literal["refuse", "wait"] = Field(
        "refuse", description="refuse: answer frozen with the message; wait: queue until the "
        "freeze ends.")
    """``refuse``: a request is answered ``frozen`` with the message; ``wait``: it queues and
    is granted when the freeze ends (if its wait lasts that long)."""

    @model_validator(mode="after")
    def _ordered(self) -> Freeze:
        if self.from_ is not None and self.until is not None and self.until <= self.from_:
            raise ValueError(f"freeze {self.name}: until must be after from")
        return self

    def active(self, now: datetime) -> bool:
        return ((self.from_ is None or self.from_ <= now)
                and (self.until is None or now < self.until))


class ConcurrencyLimit(_Rule):
    """At most ``limit`` locks held at once in a group of keys."""

    name: RuleName = Field(description="The limit's name (its groups are named after it).")
    match: KeyPattern | None = Field(None, description="The keys it covers (none: every key).")
    per: Literal["pattern", "repository", "organisation"] = Field(
        "pattern", description="One group for every matching key, or one per repository, or "
        "one per organisation.")
    limit: Annotated[int, Field(ge=1, le=100_000)] = Field(
        description="Most locks held at once in a group (shared holders each count).")


class PriorityRule(_Rule):
    """The priority the server gives a request for matching keys (and commands)."""

    name: RuleName = Field(description="The rule's name.")
    match: KeyPattern | None = Field(None, description="The keys it covers (none: every key).")
    commands: Annotated[list[Command], Field(max_length=8)] = Field(
        default_factory=list, description="The Atlantis commands it covers (none: all).")
    priority: Priority = Field(description="The priority it gives: a client may ask for less.")


class PolicyRules(_Rule):
    """Every rule of a policy; empty lists are no rules at all."""

    freezes: Annotated[list[Freeze], Field(max_length=32)] = Field(
        default_factory=list, description="No new grants on matching keys while active.")
    concurrency: Annotated[list[ConcurrencyLimit], Field(max_length=32)] = Field(
        default_factory=list, description="At most limit locks held at once in a group.")
    priority_rules: Annotated[list[PriorityRule], Field(max_length=32)] = Field(
        default_factory=list, description="The priority the server gives requests.")

    @model_validator(mode="after")
    def _consistent(self) -> PolicyRules:
        for kind, rules in (("freezes", self.freezes), ("concurrency", self.concurrency),
                            ("priorityRules", self.priority_rules)):
            names = [rule.name for rule in rules]
            for name in names:
                if names.count(name) > 1:
                    raise ValueError(f"{kind}: the name {name} is used twice")
        for i, first in enumerate(self.priority_rules):
            for second in self.priority_rules[i + 1:]:
                if _ambiguous(first, second):
                    raise ValueError(
                        f"priorityRules: {first.name} and {second.name} cover the same keys "
                        "and commands with different priorities (which wins would depend on "
                        "their order); narrow one of them")
        return self

    def __bool__(self) -> bool:
        return bool(self.freezes or self.concurrency or self.priority_rules)


def _ambiguous(first: PriorityRule, second: PriorityRule) -> bool:
    """Same pattern, overlapping commands, different priorities: order alone would decide."""
    if first.priority == second.priority or first.match != second.match:
        return False
    if not first.commands or not second.commands:
        return True
    return bool(set(first.commands) & set(second.commands))


# --- matching ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyParts:
    """What rules look at: the key and the project parts it was built from."""

    key: str
    repo: str
    path: str
    workspace: str

    @property
    def organisation(self) -> str:
        return self.repo.partition("/")[0]


def glob_to_regex(glob: str) -> str:
    """A glob as a Python regular expression (whole-string match)."""
    out = []
    for char in glob:
        out.append(".*" if char == "*" else "." if char == "?" else re.escape(char))
    return "".join(out)


_LUA_MAGIC = set("^$()%.[]*+-?")


def glob_to_lua(glob: str) -> str:
    """The same glob as a Lua pattern, anchored (the Redis scripts match with it). A ``?`` is
    written ``%?``, which the scripts make one UTF-8 character (``lua/lib.lua``): ``.`` is
    one byte in Lua, where Python's ``?`` is one character, so a key holding a multi-byte
    character matched differently per store."""
    out = []
    for char in glob:
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append("%?")
        elif char in _LUA_MAGIC:
            out.append("%" + char)
        elif char == "\0":
            out.append("%z")
        else:
            out.append(char)
    return "^" + "".join(out) + "$"


_compiled: dict[str, re.Pattern[str]] = {}


def _matches(glob: str, text: str) -> bool:
    pattern = _compiled.get(glob)
    if pattern is None:
        if len(_compiled) > 4096:
            _compiled.clear()
        pattern = _compiled[glob] = re.compile(glob_to_regex(glob), re.DOTALL)
    return pattern.fullmatch(text) is not None


def _under(path: str, prefix: str) -> bool:
    # The root project's path "." is above every path of the repository (they are relative).
    return prefix == _ROOT_PATH or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def groups_of(parts: KeyParts, rules: PolicyRules) -> dict[str, int]:
    """The concurrency groups a key belongs to, with their limits."""
    groups: dict[str, int] = {}
    for rule in rules.concurrency:
        if rule.match is not None and not rule.match.matches(parts):
            continue
        suffix = {"pattern": "", "repository": ":" + parts.repo,
                  "organisation": ":" + parts.organisation}[rule.per]
        groups[rule.name + suffix] = rule.limit
    return groups


@dataclass(frozen=True)
class OverLimit:
    """A request that asks for more locks of one concurrency group than its limit."""

    key: str
    """The request's first key in the group."""
    group: str
    asked: int
    limit: int

    @property
    def message(self) -> str:
        return (f"the request asks for {self.asked} locks of the concurrency group "
                f"{self.group}, whose limit is {self.limit}: they can never be held together, "
                "so it does not wait; ask for fewer at a time, or raise the limit")


def over_limit(keys: Sequence[KeyParts], rules: PolicyRules) -> OverLimit | None:
    """The first concurrency group ``keys`` alone take past its limit: a request for them can
    never be granted (unless its pull holds every one already: :func:`verdict`'s first line),
    however long it waits. ``None`` for every request of fewer keys than a limit."""
    asked: dict[str, list[str]] = {}
    for parts in keys:
        for group, limit in groups_of(parts, rules).items():
            found = asked.setdefault(group, [])
            found.append(parts.key)
            if len(found) > limit:
                return OverLimit(key=found[0], group=group,
                                 asked=sum(group in groups_of(p, rules) for p in keys),
                                 limit=limit)
    return None


# --- the decision -----------------------------------------------------------------------------
class Verdict(enum.StrEnum):
    GRANT = "grant"
    HELD = "held"
    FROZEN = "frozen"
    LIMITED = "limited"


@dataclass(frozen=True)
class Holding:
    """One held lock as the decision sees it."""

    owner: tuple[str, int]
    mode: Mode


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    key: str | None = None
    freeze: Freeze | None = None


def verdict(
    *,
    owner: tuple[str, int],
    mode: Mode,
    keys: Sequence[KeyParts],
    holders: Mapping[str, Sequence[Holding]],
    exclusive_waiting: Mapping[str, bool],
    group_counts: Mapping[str, int],
    rules: PolicyRules,
    now: datetime,
    new: bool,
) -> Decision:
    """Whether a request (``new``) or a queued waiter may be granted now (the table above).

    ``holders`` are each key's live holders; ``exclusive_waiting`` says whether an exclusive
    request of another pull waits on the key; ``group_counts`` are the locks held now in each
    concurrency group the keys belong to.
    """
    if all(any(h.owner == owner and not (mode == "exclusive" and h.mode == "shared")
                   for h in holders.get(k.key, ())) for k in keys):
        return Decision(Verdict.GRANT)  # its own locks, unchanged (an upgrade goes on below)
    frozen = active_freeze(keys, rules, now)
    if new and frozen is not None and frozen[1].action == "refuse":
        return Decision(Verdict.FROZEN, frozen[0], frozen[1])
    for parts in keys:
        others = [h for h in holders.get(parts.key, ()) if h.owner != owner]
        if any(h.mode == "exclusive" for h in others) or (mode == "exclusive" and others):
            return Decision(Verdict.HELD, parts.key)
        if new and mode == "shared" and exclusive_waiting.get(parts.key, False):
            return Decision(Verdict.HELD, parts.key)
    if frozen is not None:
        return Decision(Verdict.FROZEN, frozen[0], frozen[1])
    adding: dict[str, int] = {}
    limits: dict[str, int] = {}
    for parts in keys:
        if any(h.owner == owner for h in holders.get(parts.key, ())):
            continue  # held already: not a new lock in its groups
        for group, limit in groups_of(parts, rules).items():
            adding[group] = adding.get(group, 0) + 1
            limits[group] = limit
    for group, count in adding.items():
        if group_counts.get(group, 0) + count > limits[group]:
            return Decision(Verdict.LIMITED, next(
                p.key for p in keys if group in groups_of(p, rules)))
    return Decision(Verdict.GRANT)


def active_freeze(
    keys: Iterable[KeyParts], rules: PolicyRules, now: datetime
) -> tuple[str, Freeze] | None:
    """The first active freeze covering one of ``keys`` (a refusing one before a waiting one)."""
    found: tuple[str, Freeze] | None = None
    for parts in keys:
        for freeze in rules.freezes:
            if freeze.active(now) and freeze.match.matches(parts):
                if freeze.action == "refuse":
                    return parts.key, freeze
                found = found or (parts.key, freeze)
    return found


def assigned_priority(
    parts: KeyParts, command: Command | None, asked: Priority, rules: PolicyRules, *,
    admin: bool = False,
) -> Priority:
    """The priority a request gets: its rule's, or less if it asked for less.

    With no rule matching, the request keeps what it asked. With the admin right a client may
    ask for more than its rule gives.
    """
    for rule in rules.priority_rules:
        if rule.match is not None and not rule.match.matches(parts):
            continue
        if rule.commands and command not in rule.commands:
            continue
        if admin or asked.level <= rule.priority.level:
            return asked
        return rule.priority
    return asked


def freeze_edges(rules: PolicyRules, now: datetime) -> list[datetime]:
    """The future moments at which a freeze starts or ends (to wake queues then)."""
    moments = {m for f in rules.freezes for m in (f.from_, f.until) if m is not None and m > now}
    return sorted(moments)


def _ms(moment: datetime | None, *, up: bool = False) -> int:
    """``moment`` in whole ms since the epoch (0: none), rounded down or, with ``up``, up."""
    if moment is None:
        return 0
    since = moment - _EPOCH
    return -(-since // _MS) if up else since // _MS


_MS = timedelta(milliseconds=1)


def _lua_pattern(pattern: KeyPattern | None) -> dict[str, Any]:
    if pattern is None:
        return {}
    out: dict[str, Any] = {}
    if pattern.repo is not None:
        out["repo"] = glob_to_lua(pattern.repo)
    if pattern.path_prefix is not None and pattern.path_prefix != _ROOT_PATH:
        # (the root covers every path: no selector, as _under)
        out["path"] = pattern.path_prefix.rstrip("/") or pattern.path_prefix
        out["pathx"] = pattern.path_prefix
    if pattern.workspace is not None:
        out["ws"] = glob_to_lua(pattern.workspace)
    if pattern.key is not None:
        out["key"] = glob_to_lua(pattern.key)
    return out


def compile_rules(rules: PolicyRules) -> dict[str, Any]:
    """The rules the Redis scripts evaluate: globs as Lua patterns, times in ms.

    The scripts decide and stamp grants by the server's clock in whole ms, so a freeze's
    window is rounded outward (``from`` down, ``until`` up): a grant the scripts let through
    is stamped outside the configured window, never up to a millisecond inside it."""
    return {
        "f": [{"m": _lua_pattern(f.match), "from": _ms(f.from_), "until": _ms(f.until, up=True),
               "refuse": f.action == "refuse", "name": f.name} for f in rules.freezes],
        "c": [{"m": _lua_pattern(c.match), "per": c.per, "limit": c.limit, "name": c.name}
              for c in rules.concurrency],
    }
