"""VCS webhooks: a closed or merged pull request gives back its locks and its queued requests.

``POST /v1/webhooks/github``, ``/v1/webhooks/gitlab`` and ``/v1/webhooks/gitea`` take the
pull/merge request events of each VCS, as Atlantis's own ``/events`` does, so a stock Atlantis
whose locks live here (``docs/07-atlantis.md``) loses nothing when a pull request closes. With
Gitea this matters most: Atlantis itself does not release on a close without merge there.

These routes authenticate by the VCS's own proof, not by the API's bearer tokens (a VCS cannot
send one), which is why they are a router of their own and marked ``public`` for the access
seam: the request is verified before its body is read as JSON.

* GitHub: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``;
* Gitea: ``X-Gitea-Signature: <hex HMAC-SHA256 of the body>``;
* GitLab: ``X-Gitlab-Token: <the secret token itself>``.

Each compares in constant time against its secret setting (``enhanced-locking-github-webhook-
secret`` and its two siblings, read live). A missing or wrong proof answers 401 and changes
nothing; an endpoint whose secret is unset is off (404 naming the setting). Secrets are never
logged or echoed.

What counts: GitHub and Gitea ``pull_request`` with ``action: closed`` (merged or not), GitLab
``Merge Request Hook`` with ``action`` ``close`` or ``merge``. Everything else (``ping``, opened,
synchronize, comments) is acknowledged with 200 and ignored. A close drops the pull's queued
requests and releases its locks, but only what it asked for or took before the close time the
event carries (``closed_at``, GitLab's ``updated_at``): a redelivered close, even after the pull
was reopened and locked again, changes nothing. Delivery ids already handled by this process
are answered ``duplicate`` without looking further. Refused deliveries and closes are rows of
the audit trail (identity ``webhook:<vcs>``), like every mutating call of the API.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from enhanced_locking.api.access import failure_outcome, public
from enhanced_locking.api.audit import AuditTrail
from enhanced_locking.api.errors import error_answers, json_error
from enhanced_locking.config import EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.types import AuditEntry, BackendUnavailable, StoreBusy, Verb, utcnow

__all__ = ["MAX_BODY", "ClosedPull", "DeliveryLog", "webhook_router"]

log = logging.getLogger(__name__)

Vcs = Literal["github", "gitlab", "gitea"]

_SETTING = {
    "github": "enhanced-locking-github-webhook-secret",
    "gitlab": "enhanced-locking-gitlab-webhook-secret",
    "gitea": "enhanced-locking-gitea-webhook-secret",
}
MAX_BODY = 25 * 1024 * 1024
"""The most bytes of a webhook's body read (GitHub caps payloads at 25 MB); a larger body is
answered 413 before it is read (:class:`~enhanced_locking.api.server.BodyLimit`)."""


@dataclass(frozen=True)
class ClosedPull:
    """A verified event that closes a pull request."""

    repo: str
    pull: int
    closed_at: datetime | None
    merged: bool


class WebhookRefused(Exception):
    """The request is not a valid delivery (the message says why; never a secret)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DeliveryLog:
    """Delivery ids this process has handled (the last ``size``), to answer redeliveries."""

    def __init__(self, size: int = 10_000) -> None:
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._size = size

    def seen(self, delivery: str) -> bool:
        return delivery in self._seen

    def add(self, delivery: str) -> None:
        self._seen[delivery] = None
        while len(self._seen) > self._size:
            self._seen.popitem(last=False)


# --- proofs ------------------------------------------------------------------------------------
def _hmac_hex(secret: SecretStr, body: bytes) -> str:
    return hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()


def verify(vcs: Vcs, secret: SecretStr, headers: Any, body: bytes) -> None:
    """Raise :class:`WebhookRefused` (401) unless the request carries the VCS's proof."""
    if vcs == "gitlab":
        given, expected, header = (headers.get("x-gitlab-token") or "",
                                   secret.get_secret_value(), "X-Gitlab-Token")
    elif vcs == "github":
        given, header = headers.get("x-hub-signature-256") or "", "X-Hub-Signature-256"
        expected = "sha256=" + _hmac_hex(secret, body)
    else:
        given, header = headers.get("x-gitea-signature") or "", "X-Gitea-Signature"
        expected = _hmac_hex(secret, body)
    if not given:
        raise WebhookRefused(401, f"{vcs} webhook: no {header} header")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise WebhookRefused(401, f"{vcs} webhook: {header} does not match the configured "
                                  f"secret ({_SETTING[vcs]})")


# --- events ------------------------------------------------------------------------------------
def _time(value: object) -> datetime | None:
    """An event's time: RFC 3339 (GitHub, Gitea, GitLab today) or GitLab's older
    ``2018-08-22 06:14:20 UTC``; ``None`` when absent or unreadable (then no time guard)."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace(" UTC", "+00:00").replace("Z", "+00:00")
    if " " in text and "T" not in text:
        text = text.replace(" ", "T", 1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _object(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if not isinstance(value, dict):
        raise WebhookRefused(422, f"the event has no {name} object")
    return value


def _number(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        raise WebhookRefused(422, f"the event's {what} is not a pull request number")
    return value


def _repo(value: object) -> str:
    if not isinstance(value, str) or "/" not in value or len(value) > 512:
        raise WebhookRefused(422, "the event names no repository (owner/name)")
    return value


def closed_pull(vcs: Vcs, event: str, data: dict[str, Any]) -> ClosedPull | None:
    """The pull request an event closes, or ``None`` for an event that closes nothing."""
    if vcs == "gitlab":
        if event != "Merge Request Hook" and data.get("object_kind") != "merge_request":
            return None
        attributes = _object(data, "object_attributes")
        if attributes.get("action") not in ("close", "merge"):
            return None
        return ClosedPull(
            repo=_repo(_object(data, "project").get("path_with_namespace")),
            pull=_number(attributes.get("iid"), "object_attributes.iid"),
            closed_at=_time(attributes.get("updated_at")),
            merged=attributes.get("action") == "merge",
        )
    if event != "pull_request" or data.get("action") != "closed":
        return None
    pull = _object(data, "pull_request")
    return ClosedPull(
        repo=_repo(_object(data, "repository").get("full_name")),
        pull=_number(pull.get("number", data.get("number")), "pull_request.number"),
        closed_at=_time(pull.get("closed_at")),
        merged=pull.get("merged") is True,
    )


_EVENT_HEADER = {"github": "x-github-event", "gitlab": "x-gitlab-event", "gitea": "x-gitea-event"}
_DELIVERY_HEADERS = {
    "github": ("x-github-delivery",),
    "gitlab": ("idempotency-key", "x-gitlab-event-uuid"),
    "gitea": ("x-gitea-delivery",),
}


def webhook_router(
    service: LockService, *, settings: Callable[[], EnhancedLockingConfig],
    deliveries: DeliveryLog | None = None,
) -> APIRouter:
    """The three webhook routes over ``service``; secrets read live from ``settings()``."""
    router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
    handled = deliveries or DeliveryLog()
    secrets: dict[Vcs, Callable[[EnhancedLockingConfig], SecretStr]] = {
        "github": lambda c: c.github_webhook_secret,
        "gitlab": lambda c: c.gitlab_webhook_secret,
        "gitea": lambda c: c.gitea_webhook_secret,
    }

    async def audit(request: Request, vcs: Vcs, *, outcome: str, status: int,
                    closed: ClosedPull | None = None, reason: str | None = None) -> None:
        """One audit row per delivery that was refused or changed something; the identity is
        the VCS whose signature vouched for it."""
        trail: AuditTrail | None = getattr(request.app.state, "audit", None)
        if trail is None:
            return
        peer = f"{request.client.host}:{request.client.port}" if request.client else ""
        await trail.record(AuditEntry(
            time=utcnow(), identity=f"webhook:{vcs}" if status != 401 else "",
            method="signature", verb=Verb.LOCK.value if closed else "",
            action=f"POST /v1/webhooks/{vcs}", repo=closed.repo if closed else None,
            pull=closed.pull if closed else None, outcome=outcome, status=status,
            reason=reason, peer=peer,
        ))

    async def not_closed(request: Request, vcs: Vcs, closed: ClosedPull,
                         error: BackendUnavailable, *, unserved: str = "the lock store did "
                         "not answer", until: str = "the store answers") -> JSONResponse:
        """The answer to a close the store did not serve (or the service withheld:
        ``unserved`` says which, ``until`` when to send it again): the pull's locks (or some of
        them) are still held, and no VCS sends a failed delivery again on its own, so the
        answer, the log and the audit trail say so and how to free them. The delivery is not
        counted as handled: sent again, it frees them."""
        outcome, status = failure_outcome(error)
        message = (f"{vcs} webhook: {closed.repo} #{closed.pull} closed, but {unserved} "
                   f"({error}): its locks are still held; send this delivery again "
                   f"from the VCS's webhook page once {until}, or run `enhanced-locking "
                   f"lock unlock-pull --repo {closed.repo} --pull {closed.pull}`")
        log.warning("%s", message)
        await audit(request, vcs, outcome=outcome, status=status, closed=closed,
                    reason=str(error))
        answer = json_error(status, message, reason=outcome)
        if isinstance(error, StoreBusy):
            service.metrics.requests_pool_busy.inc()
            answer.headers["Retry-After"] = "1"
        return answer

    async def receive(vcs: Vcs, request: Request) -> JSONResponse:
        secret = secrets[vcs](settings())
        if not secret.get_secret_value():
            return json_error(404, f"the {vcs} webhook is off: set {_SETTING[vcs]}")
        body = await request.body()  # at most MAX_BODY bytes: BodyLimit refuses more
        try:
            verify(vcs, secret, request.headers, body)
            delivery = next((request.headers[h] for h in _DELIVERY_HEADERS[vcs]
                             if request.headers.get(h)), None)
            if delivery is not None and handled.seen(f"{vcs}:{delivery}"):
                return JSONResponse({"duplicate": True, "delivery": delivery})
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise WebhookRefused(422, f"{vcs} webhook: the body is not JSON") from None
            except RecursionError:  # no VCS nests an event this deep
                raise WebhookRefused(422, f"{vcs} webhook: the body is nested too deep to "
                                          "read") from None
            if not isinstance(data, dict):
                raise WebhookRefused(422, f"{vcs} webhook: the body is not a JSON object")
            event = request.headers.get(_EVENT_HEADER[vcs], "")
            closed = closed_pull(vcs, event, data)
        except WebhookRefused as refused:
            if refused.status == 401:
                log.warning("%s", refused)  # says which header failed, never the secret
                await audit(request, vcs, outcome="unauthenticated", status=401,
                            reason=str(refused))
            return json_error(refused.status, str(refused))
        if closed is None:
            answer: dict[str, Any] = {"ignored": event or "unknown event"}
        elif (withheld := service.withheld) is not None:
            # Its settings in force are not the ones that name the stores of the pull's locks.
            return await not_closed(request, vcs, closed, BackendUnavailable(withheld),
                                    unserved="the service serves no lock call yet",
                                    until="it does")
        else:
            try:
                done = await service.router.close_pull(closed.repo, closed.pull,
                                                       closed_at=closed.closed_at)
            except BackendUnavailable as error:
                return await not_closed(request, vcs, closed, error)
            log.info("%s webhook: %s #%d %s: released %d lock(s), dropped %d queued request(s)",
                     vcs, closed.repo, closed.pull, "merged" if closed.merged else "closed",
                     len(done.released), len(done.cancelled))
            answer = {"repo": closed.repo, "pull": closed.pull, "merged": closed.merged,
                      "released": [lock.key for lock in done.released],
                      "cancelled": done.cancelled}
            await audit(request, vcs, outcome="pull-closed", status=200, closed=closed,
                        reason=f"released {len(done.released)}, dropped "
                               f"{len(done.cancelled)} queued")
        if delivery is not None:
            handled.add(f"{vcs}:{delivery}")
        return JSONResponse(answer)

    answers = error_answers({
        401: "The signature or token is missing or does not match; nothing changed.",
        404: "This VCS's webhook secret is not set: the endpoint is off.",
        413: "The body is larger than a VCS sends.",
        422: "A verified body that is not a pull/merge request event.",
        503: "A close the lock store did not serve: the pull's locks are still held; the "
             "delivery sent again once the store answers frees them.",
    })

    @router.post("/github", responses=answers)
    @public("authenticated by the GitHub webhook signature (X-Hub-Signature-256)")
    async def github(request: Request) -> JSONResponse:
        """A GitHub ``pull_request`` event: closed (merged or not) frees the pull's locks and
        queued requests."""
        return await receive("github", request)

    @router.post("/gitlab", responses=answers)
    @public("authenticated by the GitLab webhook secret token (X-Gitlab-Token)")
    async def gitlab(request: Request) -> JSONResponse:
        """A GitLab ``Merge Request Hook``: close or merge frees the merge request's locks and
        queued requests."""
        return await receive("gitlab", request)

    @router.post("/gitea", responses=answers)
    @public("authenticated by the Gitea webhook signature (X-Gitea-Signature)")
    async def gitea(request: Request) -> JSONResponse:
        """A Gitea ``pull_request`` event: closed (merged or not) frees the pull's locks and
        queued requests."""
        return await receive("gitea", request)

    return router
