"""The console's live part in headless Chromium against a real ``enhanced-locking serve`` (no
Kubernetes; ``tests/e2e/test_console.py`` has the rollout): the page's event list shows every
type of event the service publishes, a waiter's ``superseded`` among them, and a ``gap`` (the
service restarted under the page, which resumes with an id of the old process) shows as a gap,
after which the sections are read again; the filter form takes any pull number the API does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tests.conftest import ServiceFactory
from tests.support.browser import chromium, until

from enhanced_locking.client import Client, ServiceError
from enhanced_locking.events import EVENT_TYPES
from enhanced_locking.types import AcquireResult, LockRequest

KEY = "acme/infra/envs/prod/default/"


def request(pull: int, commit: str, wait: str | None = None,
            path: str = "envs/prod") -> LockRequest:
    body: dict[str, Any] = {"project": {"repoFullName": "acme/infra", "path": path},
                            "pull": {"num": pull, "headCommit": commit},
                            "user": {"username": f"user{pull}"}}
    if wait:
        body["wait"] = wait
    return LockRequest.model_validate(body)


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def text_of(browser: Any, selector: str) -> str:
    """The visible text of what ``selector`` finds, read in one step."""
    text: str = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(function (e) { return e.innerText; }).join('\\n');", selector)
    return text


def test_the_page_follows_every_event_type_the_service_publishes(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled")
    page = httpx.get(served.url + "/ui", timeout=10).text
    listed = page.split('data-types="', 1)[1].split('"', 1)[0].split(",")
    assert listed == list(EVENT_TYPES)


def test_a_superseded_waiter_and_a_gap_show_in_the_event_list(
    service_process: ServiceFactory, browser: Any,
) -> None:
    served = service_process("--enhanced-locking-enabled")
    browser.get(served.url + "/ui")
    until("the page follows the event stream", lambda: text_of(browser, "#live") == "live")
    with Client(served.url) as client:
        assert client.acquire(request(12, "c12")).acquired
    until("the lock shows", lambda: "#12 user12" in text_of(browser, "#locks"))

    answers: dict[str, AcquireResult | ServiceError] = {}

    def wait(commit: str) -> None:
        try:
            with Client(served.url) as waiting:
                answers[commit] = waiting.acquire(request(13, commit, wait="60s"))
        except ServiceError as error:
            answers[commit] = error

    older = threading.Thread(target=wait, args=("old0",), daemon=True)
    older.start()
    until("#13 queued", lambda: "#13 " in text_of(browser, "#queues"))
    newer = threading.Thread(target=wait, args=("new1",), daemon=True)
    newer.start()
    older.join(timeout=30)
    stale = answers.get("old0")
    assert isinstance(stale, AcquireResult) and stale.reason == "superseded", stale
    until("the superseded request shows in the event list",
          lambda: "superseded" in text_of(browser, "#event-list"),
          details=lambda: text_of(browser, "#event-list"))

    httpx.post(served.url + "/v1/admin/force-unlock", params={"key": KEY},
               timeout=10).raise_for_status()
    newer.join(timeout=30)
    granted = answers.get("new1")
    assert isinstance(granted, AcquireResult) and granted.acquired, granted
    until("#13 holds the lock", lambda: "#13 user13" in text_of(browser, "#locks"))

    # A new process: the page's stream resumes with an id of the old one and is told gap.
    served.restart()
    until("the gap shows", lambda: "gap" in text_of(browser, "#event-list .gap"),
          timeout=60, details=lambda: text_of(browser, "#event-list"))
    events = text_of(browser, "#event-list")
    assert "undefined" not in events, events
    assert "replay" in text_of(browser, "#event-list .gap")
    until("the page follows the new process", lambda: text_of(browser, "#live") == "live")
    assert "#13 user13" in text_of(browser, "#locks")


def test_the_filter_form_takes_a_pull_of_a_run_without_a_pull_request(
    service_process: ServiceFactory, browser: Any,
) -> None:
    # Atlantis numbers a plan or apply made through its API, with no pull request, below zero.
    served = service_process("--enhanced-locking-enabled")
    with Client(served.url) as client:
        assert client.acquire(request(-7, "api")).acquired
        assert client.acquire(request(12, "c12", path="envs/dev")).acquired
    browser.get(served.url + "/ui")
    field = browser.find_element("css selector", 'form.filters input[name="pull"]')
    field.send_keys("-7")
    browser.find_element("css selector", "form.filters button").click()
    until("the filter is sent", lambda: "pull=-7" in browser.current_url,
          details=lambda: browser.current_url)
    until("only the run's lock shows", lambda: "#-7" in text_of(browser, "#locks")
          and "#12" not in text_of(browser, "#locks"), details=lambda: text_of(browser, "#locks"))
