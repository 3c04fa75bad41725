"""``GET /v1/audit``: the audit trail, newest first, filtered and paged (the ``admin`` right)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import FastAPI, Query

from enhanced_locking.api.access import CallerDep
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.api.errors import error_answers, json_error
from enhanced_locking.api.params import OptionalPullNum, PageSize, Time
from enhanced_locking.backends.audit_store import AuditQuery
from enhanced_locking.types import Reason, Verb

__all__ = ["AUDIT_OUTCOMES", "CURSOR_PATTERN", "install_audit_routes"]

CURSOR_PATTERN = r"^[0-9]{1,18}(-[0-9a-f]{1,18})?$"
"""Every audit store's entry id: a number (embedded), ``<ms>-<seq>`` (Redis),
``<µs>-<hex>`` (etcd)."""

Text = Annotated[str | None, Query(max_length=4096)]

AUDIT_OUTCOMES = frozenset({
    "ok", "acquired", *(reason.value for reason in Reason), "client-gone", "released",
    "refreshed", "cancelled", "cleared-unreadable", "pull-closed", "not-found", "collision",
    "no-lease", "denied", "not-owned", "kept", "invalid", "overloaded", "unavailable",
    "error",
    "unauthenticated", "cross-site", "changed", "foreign-host",
})
"""Every outcome an audit row is written with, but the counts of a release of several keys."""
_COUNTED_OUTCOME = re.compile(r"released [0-9]+(, not reached [0-9]+|, dropped [0-9]+ queued)?")
"""The outcome of a release of several keys: how many were freed and, if any, not reached (a
batch) or the queued requests dropped (by pull)."""
_VERBS = frozenset(verb.value for verb in Verb) | {""}
"""A row's verb: the right its call needed, none (``""``) for a refused credential."""


def _unknown(name: str, value: str | None) -> str | None:
    """Why the filter ``name`` can match no row (a typo), naming the values it can take; else
    ``None``. A filter that matches nothing would answer an empty page, as if nothing had
    happened."""
    if value is None:
        return None
    if name == "verb" and value not in _VERBS:
        return (f"verb: not a verb of the audit trail: {value!r} (one of "
                f"{', '.join(sorted(_VERBS - {''}))})")
    if name == "outcome" and value not in AUDIT_OUTCOMES and not _COUNTED_OUTCOME.fullmatch(value):
        return (f"outcome: not an outcome of the audit trail: {value!r} (one of "
                f"{', '.join(sorted(AUDIT_OUTCOMES))}; a release of several keys counts them: "
                "'released 2', 'released 1, not reached 1', 'released 1, dropped 1 queued')")
    return None


def install_audit_routes(app: FastAPI) -> None:
    @app.get("/v1/audit", responses=error_answers({
        401: "No or invalid credentials.", 403: "The caller lacks the admin right.",
    }))
    async def audit(
        caller: CallerDep,
        identity: Text = None,
        verb: Text = None,
        action: Text = None,
        key: Text = None,
        repo: Text = None,
        pull: OptionalPullNum = None,
        outcome: Text = None,
        since: Annotated[Time, Query(description="RFC 3339; entries at or after")] = None,
        until: Annotated[Time, Query(description="RFC 3339; entries before")] = None,
        before: Annotated[str | None, Query(max_length=64, pattern=CURSOR_PATTERN,
                                            description="The next page: the last id seen.")]
        = None,
        limit: PageSize = 100,
    ) -> Any:
        """The audit trail newest first, filtered; ``next`` is the cursor of the next page.

        A ``verb`` or ``outcome`` that no row can have answers 422 naming the values it takes.

        A ``before`` of another store's form answers 422: the cursor is an id of the store that
        keeps the trail, and each store has its own form (a number in the embedded store,
        ``<ms>-<seq>`` in Redis, ``<µs>-<hex>`` on etcd)."""
        await caller.need(Verb.ADMIN, action="audit-read")
        for name, value in (("verb", verb), ("outcome", outcome)):
            if (problem := _unknown(name, value)) is not None:
                return json_error(422, problem, field=name)
        trail: AuditTrail = app.state.audit
        query = AuditQuery(identity=identity, verb=verb, action=action, key=key, repo=repo,
                           pull=pull, outcome=outcome, since=since, until=until,
                           before=before, limit=limit)
        try:
            entries = await trail.read(query)
        except ValueError:
            return json_error(422, f"before: not a cursor of this store: {before!r}",
                              field="before")
        page = [entry.model_dump(mode="json", by_alias=True) for entry in entries]
        return {"entries": page, "next": entries[-1].id if len(entries) == limit else None}
