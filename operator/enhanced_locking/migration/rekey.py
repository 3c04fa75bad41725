"""Locks stored under a key whose path was not cleaned, moved to the key Atlantis would use.

Before the service cleaned project paths as Atlantis does (``types.clean_path``), a request
for ``envs/net/`` or ``./envs/net`` was stored under a key of its own, beside ``envs/net``.
Every entry point now makes the clean key, so such a lock would no longer be found by its
project. :func:`clean_stored_keys` runs when a store is opened: each lock whose stored key is
not the key of its (cleaned) project is taken over under the clean key by the same pull, with
the fencing counter raised to the higher of the two keys', and then released under the old
one. It only uses the backend seam (``export``, ``adopt``, ``release``), so it works the same
on every store, and a second run (or a second replica running it at once) changes nothing.

When the clean key is already held by *another* pull (the double grant the old keys allowed),
nothing is moved: both keep their locks, the old one stays listed, findable by its pull and
releasable by its old key, and a warning names both so a person can release one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from enhanced_locking.backends.base import Backend
from enhanced_locking.types import Lock, LockNotOwned, lock_key

__all__ = ["RekeyReport", "clean_stored_keys"]

log = logging.getLogger(__name__)


@dataclass
class RekeyReport:
    """What a run did: locks moved to their clean key, and locks left because of a conflict."""

    moved: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)


async def clean_stored_keys(backend: Backend) -> RekeyReport:
    """Move every lock of ``backend`` stored under an uncleaned key to its clean key."""
    report = RekeyReport()
    locks, tokens = await backend.export()
    for lock in locks:
        clean = lock_key(lock.project, lock.workspace)
        if clean == lock.key:
            continue
        if await _move(backend, lock, clean, tokens):
            report.moved.append((lock.key, clean))
            log.info("lock %s moved to %s (its path cleaned as Atlantis cleans it)",
                     lock.key, clean)
        else:
            report.conflicts.append((lock.key, clean))
            log.warning("lock %s of %s #%d stays under its old key: %s is held by another pull; "
                        "release one of them", lock.key, lock.project.repo_full_name,
                        lock.pull.num, clean)
    return report


async def _move(backend: Backend, lock: Lock, clean: str, tokens: dict[str, int]) -> bool:
    moved = lock.model_copy(update={"key": clean})
    token = max(tokens.get(lock.key, 0), tokens.get(clean, 0), lock.fencing_token)
    if await backend.adopt([moved], {clean: token}):
        return False  # the clean key is another pull's
    try:
        await backend.release(lock.key, owner=(lock.project.repo_full_name, lock.pull.num))
    except LockNotOwned:
        pass  # the old key changed hands since the export: the new holder keeps it
    return True
