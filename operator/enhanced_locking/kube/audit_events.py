"""Administrative actions of the audit trail as Kubernetes Events on the bound LockPolicy.

When the service runs as the operator, a force-unlock, a release of another pull's lock or a
cancel of another pull's request (allowed or refused) also shows in ``kubectl describe
lockpolicy`` and ``kubectl get events``: who, what, why. The trail itself stays the record;
an Event that cannot be posted changes nothing.
"""

from __future__ import annotations

import asyncio
import logging

from enhanced_locking.kube.cluster import ClusterApi
from enhanced_locking.kube.reconcile import Binding
from enhanced_locking.types import ADMIN_ACTIONS, AuditEntry

__all__ = ["AdminEvents"]

log = logging.getLogger(__name__)

_REASONS = {"force-unlock": "ForceUnlock", "release-any": "ReleaseAny",
            "cancel-any": "CancelAny"}


def message(entry: AuditEntry) -> str:
    """One line: who did (or was refused) what, on which key and pull, and why."""
    done = "was refused" if entry.outcome == "denied" else "did"
    what = f"{entry.action} of {entry.key or '?'}"
    if entry.pull is not None:
        what += f" (pull #{entry.pull} of {entry.repo})"
    why = f": {entry.reason}" if entry.reason else ""
    return f"{entry.identity or 'anonymous'} {done} {what}, outcome {entry.outcome}{why}"


class AdminEvents:
    """An audit sink: posts each administrative entry as an Event (without waiting for it)."""

    def __init__(self, cluster: ClusterApi, binding: Binding) -> None:
        self._cluster = cluster
        self._binding = binding
        self._posting: set[asyncio.Task[None]] = set()

    def __call__(self, entry: AuditEntry) -> None:
        if entry.action not in ADMIN_ACTIONS:
            return
        task = asyncio.get_running_loop().create_task(self._post(entry))
        self._posting.add(task)
        task.add_done_callback(self._posting.discard)

    async def _post(self, entry: AuditEntry) -> None:
        try:
            policy = await self._cluster.get_object(
                "lockpolicies", self._binding.namespace, self._binding.policy)
            if policy is None:
                return
            await self._cluster.post_event(
                policy, kind="LockPolicy",
                type="Warning" if entry.outcome == "denied" else "Normal",
                reason=_REASONS[entry.action], message=message(entry))
        except Exception as error:  # an Event is a courtesy; the audit trail is the record
            log.warning("could not post the %s event: %s", entry.action, error)
