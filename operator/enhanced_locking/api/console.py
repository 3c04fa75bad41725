"""``/ui``: the console, a live page of held locks, queues, the rollout and events.

The page is HTML rendered here, complete without JavaScript (a filter is a plain GET form, a
reload shows the present). ``/ui/console.js``, served by the service like everything else
(no external assets), keeps it live: it follows ``GET /v1/events`` and, when something
happens, fetches ``/ui/sections`` (the same HTML, rendered by the same code) and swaps it in.

Reading needs the ``read`` right, as the API does. Actions (force-unlock, with a reason) are
shown only to a caller who holds ``force-unlock`` while access control is on: with
``enhanced-locking-auth: none`` everyone is anonymous, and the console stays read-only. A
force-unlock is taken only as the console's form posts it, from its own page (see
:func:`~enhanced_locking.api.access.cross_site`): behind a proxy that adds a signed-in user's
token, another site's page could otherwise make that user's browser post one.
"""

from __future__ import annotations

import html
import urllib.parse
from datetime import datetime
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from enhanced_locking.api.access import Caller, CallerDep, cross_site_refusal
from enhanced_locking.api.errors import json_error
from enhanced_locking.api.queue_routes import forced_holds, hold_changed
from enhanced_locking.events import EVENT_TYPES
from enhanced_locking.factory import LockService
from enhanced_locking.rollout_summary import RolloutSummary, remaining_text, summarize
from enhanced_locking.types import (
    PULL_MAX,
    PULL_MIN,
    InvalidRequest,
    Lock,
    LockNotOwned,
    LockUnreadable,
    Verb,
    utcnow,
)

__all__ = ["install_console"]

Repo = Annotated[str | None, Query(max_length=512, description="owner/name")]
Pull = Annotated[str | None, Query(max_length=11, description="Pull request number; empty: "
                                   "any (a filter form sends it empty)")]


def _pull(text: str | None) -> int | None:
    """The pull filter: empty is none; anything but a number is a 422 like the API's.

    ASCII digits only, after a ``-`` for a negative number, as the API's ``pull``
    (``api/params.py``): ``str.isdigit`` is true of ``²``, which ``int`` refuses, and of
    ``٣``, which ``int`` reads as 3."""
    if not text:
        return None
    digits = text.removeprefix("-")  # Atlantis's runs without a pull request: below zero
    if not (digits.isascii() and digits.isdigit()) or not PULL_MIN <= int(text) <= PULL_MAX:
        raise InvalidRequest(f"pull: expected a pull request number, got {text!r}",
                             field="pull")
    return int(text)


FORM_TYPE = "application/x-www-form-urlencoded"

NOT_FRAMED = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}
"""The headers of the pages that carry the force-unlock form: no browser shows them in a frame
(``X-Frame-Options`` for browsers older than ``frame-ancestors``). Behind a proxy that adds a
signed-in user's token, another site could otherwise frame the console under a page of its own
and have the user click Force unlock there: that post comes from the console's own page."""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _asset(name: str) -> str:
    return (resources.files("enhanced_locking.api") / "console_assets" / name).read_text()


def _age(since: datetime, now: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _who(lock: Lock) -> str:
    user = lock.user.username
    return f"#{lock.pull.num}" + (f" {user}" if user else "")


def _locks_section(locks: list[Lock], now: datetime, actions: bool) -> str:
    if not locks:
        return '<section id="locks"><h2>Held locks</h2><p class="empty">No locks held.</p>' \
               '</section>'
    head = ("<tr><th>Key</th><th>Pull</th><th>Age</th><th>Lease until</th>"
            "<th>Fencing token</th><th>Backend</th>" + ("<th></th>" if actions else "") + "</tr>")
    rows = []
    for lock in locks:
        lease = lock.expires_at.isoformat().replace("+00:00", "Z") if lock.expires_at else "-"
        action = ""
        if actions:
            action = (
                '<td><form method="post" action="/ui/force-unlock" class="action">'
                f'<input type="hidden" name="key" value="{_e(lock.key)}">'
                '<input name="reason" required placeholder="reason" aria-label="reason">'
                '<button>Force unlock</button></form></td>')
        rows.append(
            f'<tr data-key="{_e(lock.key)}"><td class="key">{_e(lock.key)}</td>'
            f'<td>{_e(_who(lock))}</td><td>{_age(lock.acquired_at, now)}</td>'
            f"<td>{_e(lease)}</td><td>{lock.fencing_token}</td><td>{_e(lock.backend)}</td>"
            f"{action}</tr>")
    return (f'<section id="locks"><h2>Held locks ({len(locks)})</h2><table>{head}'
            + "".join(rows) + "</table></section>")


async def _queues_section(service: LockService, locks: list[Lock], now: datetime) -> str:
    parts = []
    for lock in locks:
        waiters = await service.router.queue(lock.key)
        if not waiters:
            continue
        items = []
        ahead = f"holder {_who(lock)}"
        for position, waiter in enumerate(waiters, start=1):
            first = waiter.candidates[0]
            user = first.user.username
            who = f"#{first.pull.num}" + (f" {user}" if user else "")
            items.append(
                f'<li data-pull="{first.pull.num}"><span class="pos">{position}</span> '
                f"{_e(who)} <span class=\"prio\">{_e(first.priority.value)}</span> "
                f"waited {_age(waiter.enqueued_at, now)}, waits for {_e(ahead)}</li>")
            ahead = f"#{first.pull.num} (position {position})"
        parts.append(f'<div class="queue" data-key="{_e(lock.key)}"><h3>{_e(lock.key)}</h3>'
                     f"<p>held by {_e(_who(lock))}, who blocks {len(waiters)}</p>"
                     f'<ol>{"".join(items)}</ol></div>')
    body = "".join(parts) or '<p class="empty">Nobody waits.</p>'
    return f'<section id="queues"><h2>Queues</h2>{body}</section>'


def _rollout_section(summary: RolloutSummary | None) -> str:
    if summary is None:
        return ('<section id="rollout"><h2>Rollout</h2><p class="empty">No LockMigration: '
                "this service does not run with the operator, or it has not read one yet."
                "</p></section>")
    now = "-" if summary.weight_now is None else f"{summary.weight_now:g}%"
    target = "-" if summary.weight_target is None else f"{summary.weight_target:g}%"
    steps = "".join(
        f'<li class="{s.state}">{_e(s.text)}'
        + (f" ({remaining_text(s.remaining)} left)" if s.remaining is not None else "")
        + "</li>" for s in summary.steps)
    metrics = "".join(
        f'<tr class="{"ok" if m.ok else "bad"}"><td>{_e(m.name)}</td>'
        f'<td>{"not measured" if m.value is None else f"{m.value:g}"}</td>'
        f"<td>{m.limit:g}</td></tr>" for m in summary.analysis)
    conditions = "".join(
        f"<li>{_e(c['type'])} <b>{_e(c['status'])}</b> {_e(c['reason'])}</li>"
        for c in summary.conditions)
    abort = ""
    if summary.abort is not None:
        abort = f'<p class="abort">Aborted: {_e(summary.abort[0])}: {_e(summary.abort[1])}</p>'
    pending = ", ".join(summary.pending_replicas) or "none"
    return (
        f'<section id="rollout"><h2>Rollout {_e(summary.namespace)}/{_e(summary.name)}</h2>'
        f'<p>Phase <b class="phase">{_e(summary.phase)}</b>: {_e(summary.message)}</p>'
        f'<p>Weight <b class="weight">{now}</b> now, target {target} '
        f"(move {_e(summary.move)}; replicas pending: {_e(pending)})</p>{abort}"
        + (f'<ol class="steps">{steps}</ol>' if steps else "")
        + (f"<table><tr><th>Analysis</th><th>Value</th><th>Limit</th></tr>{metrics}</table>"
           if metrics else "")
        + f'<ul class="conditions">{conditions}</ul></section>')


async def _sections(service: LockService, caller: Caller, repo: str | None,
                    pull: int | None) -> str:
    now = utcnow()
    locks = await service.router.list(repo=repo, pull=pull)
    actions = not caller.access.open and await caller.may(Verb.FORCE_UNLOCK, repo=repo)
    rollout = service.rollout
    summary = summarize(rollout, now=now) if rollout is not None else None
    return (_locks_section(locks, now, actions) + await _queues_section(service, locks, now)
            + _rollout_section(summary))


def _page(sections: str, repo: str | None, pull: int | None, who: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Enhanced Locking console</title>
<link rel="stylesheet" href="/ui/console.css">
<script src="/ui/console.js" defer></script>
</head><body>
<header><h1>Enhanced Locking</h1><span class="who">{_e(who)}</span>
<span id="live" class="live">static page (reload to refresh)</span></header>
<form class="filters" method="get" action="/ui">
<label>Repository <input name="repo" value="{_e(repo or '')}" placeholder="owner/name"></label>
<label>Pull <input name="pull" type="number" min="{PULL_MIN}" max="{PULL_MAX}"
value="{'' if pull is None else pull}">
</label><button>Filter</button></form>
<main><div id="sections">{sections}</div>
<section id="events"><h2>Events</h2><ol id="event-list" data-types="{_e(','.join(EVENT_TYPES))}">
<li class="empty">Live events appear here as they happen (with JavaScript).</li></ol></section>
</main>
</body></html>"""


def install_console(app: FastAPI, service: LockService) -> None:
    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def console(caller: CallerDep, repo: Repo = None, pull: Pull = None) -> HTMLResponse:
        """The console page: complete without JavaScript."""
        number = _pull(pull)
        await caller.need(Verb.READ, action="console", repo=repo or None, pull=number)
        sections = await _sections(service, caller, repo or None, number)
        return HTMLResponse(_page(sections, repo, number, caller.identity.name),
                            headers=NOT_FRAMED)

    @app.get("/ui/sections", response_class=HTMLResponse, include_in_schema=False)
    async def sections(caller: CallerDep, repo: Repo = None, pull: Pull = None) -> HTMLResponse:
        """The page's data sections, for the script to swap in."""
        number = _pull(pull)
        await caller.need(Verb.READ, action="console", repo=repo or None, pull=number)
        return HTMLResponse(await _sections(service, caller, repo or None, number),
                            headers=NOT_FRAMED)

    @app.post("/ui/force-unlock", include_in_schema=False)
    async def force_unlock(caller: CallerDep, request: Request) -> Response:
        """The console's one action: force-unlock with a reason (audited); then the page.

        A plain HTML form posts it (``key``, ``reason``), so it works without JavaScript."""
        if caller.access.open:
            return json_error(403, "the console is read-only while access control is off "
                                   "(enhanced-locking-auth: none); use the API or the CLI")
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != FORM_TYPE:
            return json_error(422, f"content-type: the console's force-unlock takes its form "
                                   f"({FORM_TYPE}), got {kind or 'none'!r}",
                              field="content-type")
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0]
        reason = (form.get("reason") or [""])[0].strip()
        if not 0 < len(key) <= 4096 or not 0 < len(reason) <= 1024:
            return json_error(422, "key and reason: a force-unlock needs both (the reason is "
                                   "audited)", field="reason")
        try:
            holder = await caller.read_for_right(service.router.get(key), Verb.FORCE_UNLOCK,
                                                 action="force-unlock", key=key, reason=reason)
        except LockUnreadable:  # whose it is cannot be read: force-unlock clears it
            holder = None
        repo = holder.project.repo_full_name if holder else None
        # A page on another site can post a plain form here, and the browser of a signed-in
        # user would send it with that user's session (a proxy adding the bearer token).
        refused = await cross_site_refusal(caller, request, key=key, repo=repo, reason=reason,
                                           instead="use the console's own page, the API or "
                                                   "the CLI")
        if refused is not None:
            return refused
        await caller.need(Verb.FORCE_UNLOCK, action="force-unlock", key=key, repo=repo,
                          reason=reason)
        checked = await forced_holds(service, caller, key, holder, reason=reason)
        async with caller.audited(action="force-unlock", verb=Verb.FORCE_UNLOCK, key=key,
                                  repo=repo, reason=reason) as note:
            try:
                lock = await service.router.force_unlock(key, checked=checked)
            except LockNotOwned:  # taken after the read by a hold the right was not asked of
                note.done("changed", 409)
                return hold_changed(key)
            if lock is None:
                note.done("not-found", 404)
            else:
                note.done("released")
                note.pull = lock.pull.num
        return RedirectResponse("/ui", status_code=303)

    # The script and the style sheet hold no data, but they are served like the page (with
    # the read right): the service's only routes open to anyone stay health and metrics.
    @app.get("/ui/console.js", include_in_schema=False)
    async def script(caller: CallerDep) -> Response:
        await caller.need(Verb.READ, action="console")
        return Response(_asset("console.js"), media_type="text/javascript; charset=utf-8")

    @app.get("/ui/console.css", include_in_schema=False)
    async def style(caller: CallerDep) -> Response:
        await caller.need(Verb.READ, action="console")
        return Response(_asset("console.css"), media_type="text/css; charset=utf-8")
