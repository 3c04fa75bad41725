"""``GET /v1/audit``: the audit trail, newest first, filtered and paged (the ``admin`` right)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query

from enhanced_locking.api.access import CallerDep
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.api.errors import error_answers, json_error
from enhanced_locking.api.params import OptionalPullNum, Time
from enhanced_locking.backends.audit_store import AuditQuery
from enhanced_locking.types import Verb

__all__ = ["CURSOR_PATTERN", "install_audit_routes"]

CURSOR_PATTERN = r"^[0-9]{1,18}(-[0-9a-f]{1,18})?$"
"""Every audit store's entry id: a number (embedded), ``<ms>-<seq>`` (Redis),
``<µs>-<hex>`` (etcd)."""

Text = Annotated[str | None, Query(max_length=4096)]


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
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Any:
        """The audit trail newest first, filtered; ``next`` is the cursor of the next page.

        A ``before`` of another store's form answers 422: the cursor is an id of the store that
        keeps the trail, and each store has its own form (a number in the embedded store,
        ``<ms>-<seq>`` in Redis, ``<µs>-<hex>`` on etcd)."""
        await caller.need(Verb.ADMIN, action="audit-read")
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
