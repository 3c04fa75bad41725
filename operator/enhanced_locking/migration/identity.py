"""The identity of a lock is its parts, not its joined key.

Atlantis names a lock ``{repo}/{path}/{workspace}/{projectName}``, and two different projects
can join to the same name: repository ``gl/grp`` with path ``sub/proj`` and repository
``gl/grp/sub`` with path ``proj`` (GitLab subgroups make this real). Atlantis's own stores, its
UI (``DELETE /locks?id=``) and its ``Unlock`` address a lock by that joined key, and this service
shares Atlantis's Redis layout and answers Atlantis's calls, so the joined key stays the key on
every backend. What changes is what a key may hold: one project. A second project that joins to
a held key is refused with ``reason: "collision"`` and a message naming both; it is never
granted the other's lock (not even when the same pull number holds it) and, with ``repo`` on a
release, never releases it.

The router checks every answer (:func:`checked`): a grant of a lock that is not the requested
project's (the backend's "the holder asking again" rule matched on repository and pull) and a
refusal by another project's lock both become a collision. A waiting request and a batch are
checked before they queue (:func:`refuse_ambiguous`), so they are never queued behind a name.
"""

from __future__ import annotations

from enhanced_locking.types import (
    AcquireResult,
    Lock,
    Project,
    Reason,
    collision_message,
)

__all__ = ["checked", "refuse_ambiguous"]


def refuse_ambiguous(
    key: str, project: Project, workspace: str, holder: Lock | None
) -> AcquireResult | None:
    """A collision answer if ``holder`` holds ``key`` for another project, else ``None``."""
    if holder is None or holder.is_for(project, workspace):
        return None
    return AcquireResult.refused(key, Reason.COLLISION, holder,
                                 error=collision_message(key, project, workspace, holder))


def checked(project: Project, workspace: str, result: AcquireResult) -> AcquireResult:
    """``result``, unless it grants or refuses by another project's lock under the same key."""
    lock = result.lock if result.acquired else result.holder
    if result.acquired or result.reason is Reason.HELD:
        return refuse_ambiguous(result.lock_key, project, workspace, lock) or result
    return result
