"""Static access control: bearer tokens from a file (or a Secret) and a role map in the config.

The tokens file has Kubernetes' static token file form, one token per line::

    token,name,uid,"group1,group2"

(``uid`` and the groups may be left out; blank lines and lines starting with ``#`` are skipped).
The file is read again when its status changes (its inode, change or modification time, or
size), checked at most once a second, so a rotated token takes effect without a restart; a file
that cannot be read or parsed keeps the tokens read last and logs why (naming the line, never
the token). Tokens are kept as SHA-256 digests, each compared with :func:`hmac.compare_digest`
(all of them, so the time taken does not depend on which matched); the token itself is never
stored, logged or audited.

The role map grants roles (``viewer``, ``locker``, ``admin``) or single verbs to subjects
``user:NAME`` and ``group:NAME``.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from enhanced_locking.config import ROLES, EnhancedLockingConfig, not_utf8
from enhanced_locking.types import Identity, Verb

__all__ = ["RoleMap", "StaticTokens", "TokenFileError", "parse_tokens"]

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0


class TokenFileError(ValueError):
    """A tokens file line that cannot be used (the message names the line, not the token)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, *, source: str) -> dict[bytes, Identity]:
    """Token digest → identity, from the tokens file form."""
    out: dict[bytes, Identity] = {}
    # strict: a quoted field that is never closed, or text after its closing quote, is an
    # error (as in Kubernetes' reader of this form), not read on to the end of the file.
    rows = csv.reader(text.splitlines(), strict=True)
    number = 0
    while True:
        try:
            row = next(rows, None)
        except csv.Error as error:
            # The csv module's own refusals (a field over its 128 KiB limit) name no field.
            raise TokenFileError(f"{source} line {number + 1}: {error}") from None
        if row is None:
            break
        if rows.line_num > number + 1:
            # A quoted field closed on a later line took that line's token and name into this
            # line's groups: the later token was lost, and shown wherever the groups are.
            raise TokenFileError(f"{source} line {number + 1}: a quoted field is not closed "
                                 "on its line")
        number = rows.line_num
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise TokenFileError(f"{source} line {number}: expected token,name[,uid[,groups]]")
        token, name = row[0].strip(), row[1].strip()
        uid = row[2].strip() if len(row) > 2 else ""
        groups = tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
        digest = _digest(token)
        if digest in out:
            raise TokenFileError(f"{source} line {number}: the same token appears twice")
        out[digest] = Identity(name=name, uid=uid, groups=groups, method="static")
    return out


@dataclass
class _FileState:
    stamp: tuple[int, ...] = ()
    """What the file's status said when it was read last: device and inode, change and
    modification times, size. The change time too: a copy that keeps the modification time
    (``cp -p``, ``rsync -t``, a tar) of a file whose revoked token was replaced by one of the
    same length leaves time and size as they were, and the revoked token would be taken on."""
    checked: float = 0.0
    unread: bool = False
    """Whether the last look found the file unreadable (said once in the log, not at every
    recheck while it stays so)."""


def _stamp(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_ctime_ns, stat.st_mtime_ns, stat.st_size)


def _unread(path: str, error: Exception) -> str:
    """Why the tokens file at ``path`` was not taken, in the words the config file's own
    errors use (Python's name the error's class and errno, and an undecodable byte names no
    file); a line that cannot be used says so itself (and names no token)."""
    if isinstance(error, OSError):
        return f"cannot read {path}: {(error.strerror or str(error)).lower()}"
    if isinstance(error, UnicodeDecodeError):
        return not_utf8(path, error)
    return str(error)


class StaticTokens:
    """An authenticator over the tokens file and/or inline tokens."""

    def __init__(self, *, path: str = "", inline: str = "") -> None:
        self._path = os.path.expanduser(path) if path else ""
        self._inline = parse_tokens(inline, source="enhanced-locking-auth-tokens") if inline \
            else {}
        self._from_file: dict[bytes, Identity] = {}
        self._state = _FileState()
        if self._path:
            self._reload(force=True)

    @classmethod
    def from_config(cls, config: EnhancedLockingConfig) -> StaticTokens:
        return cls(path=config.auth_tokens_file, inline=config.auth_tokens.get_secret_value())

    def _reload(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._state.checked < RECHECK_SECONDS:
            return
        self._state.checked = now
        try:
            stat = os.stat(self._path)
        except OSError as error:
            if force:
                raise TokenFileError(f"invalid setting enhanced-locking-auth-tokens-file: "
                                     f"cannot read {self._path}: {error.strerror}") from None
            if not self._state.unread:
                self._state.unread = True
                log.error("tokens file %s not (re)loaded, keeping the previous tokens: cannot "
                          "read it: %s", self._path, error.strerror)
            return
        self._state.unread = False
        stamp = _stamp(stat)
        if stamp == self._state.stamp:
            return
        try:
            with open(self._path, "rb") as handle:  # decoded whole: a bad byte's offset is
                text = handle.read().decode("utf-8")  # the file's, not a read chunk's
            tokens = parse_tokens(text, source=self._path)
        except (OSError, UnicodeDecodeError, TokenFileError) as error:
            problem = _unread(self._path, error)
            if force:
                raise TokenFileError(
                    f"invalid setting enhanced-locking-auth-tokens-file: {problem}") from None
            log.error("tokens file %s not (re)loaded, keeping the previous tokens: %s",
                      self._path, problem)
            return
        self._from_file = tokens
        self._state.stamp = stamp
        log.info("tokens file %s loaded: %d tokens", self._path, len(tokens))

    def _lookup(self, token: str) -> Identity | None:
        # Every known digest is compared, in constant time and without stopping at a match:
        # how long this takes says nothing about which token, or how much of one, matched.
        digest = _digest(token)
        found: Identity | None = None
        for table in (self._inline, self._from_file):
            for known, identity in table.items():
                if hmac.compare_digest(known, digest):
                    found = identity
        return found

    async def authenticate(self, token: str) -> Identity | None:
        if self._path:
            self._reload()
        return self._lookup(token)


class RoleMap:
    """An authorizer over the config's role map (static mode grants no per-repo scopes)."""

    per_repository = False

    def __init__(self, roles: Mapping[str, Iterable[str]]) -> None:
        self._verbs: dict[str, set[Verb]] = {}
        for role, subjects in roles.items():
            verbs = {Verb(v) for v in ROLES.get(role, (role,))}
            for subject in subjects:
                self._verbs.setdefault(subject, set()).update(verbs)

    def verbs(self, identity: Identity) -> set[Verb]:
        held = set(self._verbs.get(f"user:{identity.name}", ()))
        for group in identity.groups:
            held |= self._verbs.get(f"group:{group}", set())
        return held

    async def allowed(self, identity: Identity, verb: Verb, *, repo: str | None) -> bool:
        return verb in self.verbs(identity)
