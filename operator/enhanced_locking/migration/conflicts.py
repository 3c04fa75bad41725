"""Keys held on both sides by different pulls: found, reported, never dropped silently.

Such a key means two pulls were told they hold the same lock, which the router exists to
prevent. It can only come from outside the normal path: a grant made by legacy while the
enhanced backend was unreachable (fallback) meeting a grant made on enhanced by another replica,
or data written behind the service's back. Whoever finds one (fallback reconciliation, a weight
move settling) reports it here; the book publishes a ``lock-conflict`` event, logs it, and keeps
it until a later check finds the key no longer double-held. The operator turns a non-empty book
into a ``Degraded`` condition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from enhanced_locking.events import Bus
from enhanced_locking.metrics import Metrics
from enhanced_locking.types import Lock, utcnow

__all__ = ["ConflictBook", "LockConflict", "holder_summary"]

log = logging.getLogger(__name__)


def holder_summary(lock: Lock | None) -> dict[str, Any] | None:
    """Who holds a lock, in the words of a status or an event (no URLs, no user data)."""
    if lock is None:
        return None
    return {
        "repo": lock.project.repo_full_name,
        "pull": lock.pull.num,
        "fencingToken": lock.fencing_token,
        "acquiredAt": lock.acquired_at.isoformat(),
    }


@dataclass(frozen=True)
class LockConflict:
    """One key held by one pull on legacy and by another on enhanced."""

    key: str
    legacy: Lock
    enhanced: Lock
    source: str
    """Who found it: ``fallback`` (reconciliation), ``weight-move`` (a move settling) or
    ``acquire`` (a pull asking again for its hold found another pull's on the other side)."""
    found_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "legacyHolder": holder_summary(self.legacy),
            "enhancedHolder": holder_summary(self.enhanced),
            "source": self.source,
            "foundAt": self.found_at.isoformat(),
        }


def is_conflict(legacy: Lock | None, enhanced: Lock | None) -> bool:
    """Both sides hold the key, for different pulls."""
    return (
        legacy is not None
        and enhanced is not None
        and not legacy.owned_by(enhanced.project.repo_full_name, enhanced.pull.num)
    )


class ConflictBook:
    """The conflicts known now, keyed by lock key."""

    def __init__(self, *, events: Bus, metrics: Metrics) -> None:
        self.events = events
        self.metrics = metrics
        self._open: dict[str, LockConflict] = {}

    def report(self, *, key: str, legacy: Lock, enhanced: Lock, source: str) -> LockConflict:
        """Record a conflict; a key already recorded is not reported twice."""
        known = self._open.get(key)
        if known is not None and known.legacy == legacy and known.enhanced == enhanced:
            return known
        conflict = LockConflict(key, legacy, enhanced, source, utcnow())
        self._open[key] = conflict
        self.metrics.lock_conflicts.set(len(self._open))
        log.error(
            "lock %s is held on legacy by %s#%d and on enhanced by %s#%d (found by %s)",
            key, legacy.project.repo_full_name, legacy.pull.num,
            enhanced.project.repo_full_name, enhanced.pull.num, source,
        )
        self.events.publish(
            "lock-conflict", key=key, repo=legacy.project.repo_full_name, source=source,
            legacyHolder=holder_summary(legacy), enhancedHolder=holder_summary(enhanced),
        )
        return conflict

    def resolve(self, key: str) -> bool:
        """Forget a key that is no longer double-held; whether it was recorded."""
        found = self._open.pop(key, None) is not None
        if found:
            self.metrics.lock_conflicts.set(len(self._open))
            log.info("lock %s is no longer held on both sides", key)
        return found

    def keys(self) -> list[str]:
        return sorted(self._open)

    def items(self) -> list[LockConflict]:
        return [self._open[key] for key in sorted(self._open)]

    def __len__(self) -> int:
        return len(self._open)
