"""``/ui`` and access control: reading needs ``read`` like the API; the force-unlock action is
shown to, and accepted from, only a caller holding ``force-unlock``, with a reason; with
access control off the console stays read-only. A real ``enhanced-locking serve``."""

from __future__ import annotations

from pathlib import Path

import httpx
from tests.conftest import ServiceFactory

from enhanced_locking.client import Client
from enhanced_locking.types import LockRequest

BOT, ALICE = "tok-bot-5c1e", "tok-alice-9d20"
KEY = "acme/infra/./default/"


def with_tokens(service_process: ServiceFactory, tmp_path: Path) -> str:
    """The URL of a service with static tokens: ``BOT`` a locker, ``ALICE`` an admin."""
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{BOT},atlantis,,"bots"\n{ALICE},alice,,"ops"\n')
    return service_process("--enhanced-locking-auth=static",
                           f"--enhanced-locking-auth-tokens-file={tokens}",
                           "--enhanced-locking-auth-roles=locker=group:bots;admin=group:ops").url


def test_actions_only_for_a_caller_with_the_right(service_process: ServiceFactory,
                                                  tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{BOT},atlantis,,"bots"\n{ALICE},alice,,"ops"\n')
    url = service_process("--enhanced-locking-auth=static",
                          f"--enhanced-locking-auth-tokens-file={tokens}",
                          "--enhanced-locking-auth-roles=locker=group:bots;admin=group:ops").url
    with Client(url, token=BOT) as client:
        assert client.acquire(LockRequest.model_validate(
            {"project": {"repoFullName": "acme/infra"}, "pull": {"num": 12}})).acquired

    assert httpx.get(url + "/ui", timeout=10).status_code == 401
    assert httpx.get(url + "/ui/console.js", timeout=10).status_code == 401
    bot = {"Authorization": f"Bearer {BOT}"}
    assert httpx.get(url + "/ui/console.js", headers=bot, timeout=10).status_code == 200
    admin = {"Authorization": f"Bearer {ALICE}"}
    as_bot = httpx.get(url + "/ui", headers=bot, timeout=10)
    assert as_bot.status_code == 200 and KEY in as_bot.text
    assert "Force unlock" not in as_bot.text
    assert "Force unlock" in httpx.get(url + "/ui", headers=admin, timeout=10).text

    refused = httpx.post(url + "/ui/force-unlock", headers=bot, timeout=10,
                         data={"key": KEY, "reason": "stuck"})
    assert refused.status_code == 403
    no_reason = httpx.post(url + "/ui/force-unlock", headers=admin, timeout=10,
                           data={"key": KEY, "reason": " "})
    assert no_reason.status_code == 422
    with Client(url, token=ALICE) as client:
        assert client.get(KEY) is not None  # nothing changed so far

        done = httpx.post(url + "/ui/force-unlock", headers=admin, timeout=10,
                          data={"key": KEY, "reason": "plan stuck"})
        assert done.status_code == 303 and done.headers["location"] == "/ui"
        assert client.get(KEY) is None


def test_the_pages_with_the_force_unlock_form_are_not_shown_in_another_sites_frame(
    service_process: ServiceFactory, tmp_path: Path,
) -> None:
    # Behind the proxy that adds a signed-in user's token, another site's page could show the
    # console in a frame under its own page and have the user click Force unlock there: the
    # post then comes from the console's own page, which the cross-site check takes.
    url = with_tokens(service_process, tmp_path)
    with Client(url, token=ALICE) as client:
        assert client.acquire(LockRequest.model_validate(
            {"project": {"repoFullName": "acme/infra"}, "pull": {"num": 12}})).acquired
    admin = {"Authorization": f"Bearer {ALICE}"}
    for path in ("/ui", "/ui/sections"):
        page = httpx.get(url + path, headers=admin, timeout=10)
        assert page.status_code == 200 and "Force unlock" in page.text, path
        assert page.headers.get("x-frame-options") == "DENY", path
        policy = page.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in policy, path


def test_read_only_when_access_control_is_off(service_process: ServiceFactory) -> None:
    url = service_process().url
    page = httpx.get(url + "/ui", timeout=10)
    assert page.status_code == 200 and "Force unlock" not in page.text
    assert "anonymous" in page.text
    with Client(url) as client:
        assert client.acquire(LockRequest.model_validate(
            {"project": {"repoFullName": "acme/infra"}, "pull": {"num": 12}})).acquired
        refused = httpx.post(url + "/ui/force-unlock", data={"key": KEY, "reason": "x"},
                             timeout=10)
        assert refused.status_code == 403 and "read-only" in refused.json()["error"]
        assert client.get(KEY) is not None


def test_a_pull_filter_of_other_digits_is_a_422(service_process: ServiceFactory) -> None:
    # "²" and "٣" are digits to str.isdigit, not to int() or the API: a 422, as "twelve" is.
    url = service_process().url
    for route in ("/ui", "/ui/sections"):
        for pull in ("²", "٣", "+1", "1 "):
            answer = httpx.get(url + route, params={"pull": pull}, timeout=10)
            assert answer.status_code == 422, (route, pull, answer.text)
            assert "pull" in answer.json()["error"]
        assert httpx.get(url + route, params={"pull": "7"}, timeout=10).status_code == 200


def test_a_force_unlock_posted_from_another_site_is_refused_and_audited(
    service_process: ServiceFactory, tmp_path: Path,
) -> None:
    # The documented setup: a proxy adds the bearer token for a signed-in user's browser, so
    # whatever that browser posts carries the token; another site's page can make it post.
    url = with_tokens(service_process, tmp_path)
    host = url.split("://", 1)[1].rstrip("/")
    admin = {"Authorization": f"Bearer {ALICE}"}
    form = {"key": KEY, "reason": "from elsewhere"}
    with Client(url, token=ALICE) as client:
        assert client.acquire(LockRequest.model_validate(
            {"project": {"repoFullName": "acme/infra"}, "pull": {"num": 12}})).acquired
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Sec-Fetch-Site": "none"},
                        {"Sec-Fetch-Site": "cross-site", "Origin": f"http://{host}"},
                        {"Origin": "https://evil.example"}, {"Origin": "null"}):
            refused = httpx.post(url + "/ui/force-unlock", headers={**admin, **headers},
                                 data=form, timeout=10)
            assert refused.status_code == 403, (headers, refused.text)
            assert "another site" in refused.json()["error"]
        # Not the console form's content type (a form can send text/plain without a preflight).
        for content_type in ("text/plain", "multipart/form-data; boundary=x", None):
            sent = {**admin, "Sec-Fetch-Site": "same-origin"}
            if content_type:
                sent["Content-Type"] = content_type
            wrong = httpx.post(url + "/ui/force-unlock", headers=sent,
                               content=f"key={KEY}&reason=typed", timeout=10)
            assert wrong.status_code == 422, (content_type, wrong.text)
            assert wrong.json()["field"] == "content-type"
        assert client.get(KEY) is not None  # nothing changed so far
        rows = client.audit(action="force-unlock")["entries"]
        assert [(r["outcome"], r["status"], r["key"], r["repo"], r["identity"])
                for r in rows] == \
            [("cross-site", 403, KEY, "acme/infra", "alice")] * 6

        # The console's own page (the browser says same-origin), a browser that sends only
        # Origin (this host), and a client that is no browser (neither header) are taken.
        for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": f"http://{host}"},
                        {"Origin": f"http://{host}"}, {}):
            assert client.acquire(LockRequest.model_validate(
                {"project": {"repoFullName": "acme/infra"}, "pull": {"num": 12}})).acquired
            done = httpx.post(url + "/ui/force-unlock", headers={**admin, **headers},
                              data={"key": KEY, "reason": "plan stuck"}, timeout=10)
            assert done.status_code == 303, (headers, done.text)
            assert client.get(KEY) is None
