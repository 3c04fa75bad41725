"""The console at ``/ui`` in headless Chromium, served by ``enhanced-locking operator`` on a
real API server: a lock taken through the API appears without a reload, a waiter's position
moves up, a rollout step change shows. Screenshots go to build/test-artifacts/console/ (the
ones in docs/images come from here)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from tests.support.browser import chromium, screenshot, until
from tests.support.controlplane import KubeCluster
from tests.support.operator import OperatorProcess, cr
from tests.support.waiting import wait_for

from enhanced_locking.client import Client, ServiceError
from enhanced_locking.hashing import bucket_of, is_enhanced_bucket
from enhanced_locking.types import LockRequest

pytestmark = pytest.mark.e2e

STEPS = [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}]


def enhanced_path() -> str:
    """A project path whose key the enhanced locker takes at weight 50 (it queues waiters)."""
    return next(f"envs/p{i}" for i in range(1000)
                if is_enhanced_bucket(bucket_of(f"acme/infra/envs/p{i}/default/"), 50))


def request(path: str, pull: int, user: str, wait: str | None = None) -> LockRequest:
    body: dict[str, Any] = {"project": {"repoFullName": "acme/infra", "path": path},
                            "pull": {"num": pull}, "user": {"username": user}}
    if wait:
        body["wait"] = wait
    return LockRequest.model_validate(body)


@pytest.fixture
def operator(kube_cluster: KubeCluster, kube_namespace: str,
             start_operator: Callable[..., OperatorProcess]) -> OperatorProcess:
    for kind, name, spec in (
        ("LockPolicy", "default", {"enabled": True, "backend": "memory"}),
        ("LockMigration", "to-enhanced", {"policyRef": {"name": "default"}, "steps": STEPS,
                                          "analysis": {"maxErrorRate": 0.5}}),
    ):
        kube_cluster.kubectl("apply", "-n", kube_namespace, "-f", "-", input=json.dumps({
            "apiVersion": "locking.runatlantis.io/v1alpha1", "kind": kind,
            "metadata": {"name": name}, "spec": spec}))
    process = start_operator()
    wait_for("the pause of step 2", lambda: (cr(kube_cluster, "lockmigrations", "to-enhanced",
                                                kube_namespace) or {}).get("status", {})
             .get("currentStepIndex") == 1, timeout=60)
    return process


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def text_of(browser: Any, selector: str) -> str:
    """The visible text of what ``selector`` finds, read in one step (the script may swap the
    sections in at any moment)."""
    text: str = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(function (e) { return e.innerText; }).join(' ');", selector)
    return text


def test_the_console_follows_locks_queues_and_the_rollout_live(
    kube_cluster: KubeCluster, kube_namespace: str, operator: OperatorProcess, browser: Any,
) -> None:
    path = enhanced_path()
    key = f"acme/infra/{path}/default/"
    browser.get(operator.url + "/ui")
    until("the page follows the event stream", lambda: text_of(browser, "#live") == "live")
    assert "No locks held." in text_of(browser, "#locks")
    assert "Phase Paused" in text_of(browser, "#rollout")
    browser.execute_script("window.notReloaded = true;")  # gone if the page reloads

    with Client(operator.url) as client:
        assert client.acquire(request(path, 12, "alice")).acquired
    def locks_row() -> str | None:
        text = text_of(browser, "#locks")
        return text if key in text else None

    row = until("the lock taken through the API shows", locks_row)
    assert "#12 alice" in row and "enhanced" in row

    answers: list[Any] = []

    def wait_for_lock(pull: int, user: str) -> None:
        try:
            with Client(operator.url) as waiting:
                answers.append(waiting.acquire(request(path, pull, user, wait="60s")))
        except ServiceError as error:  # the service stopped under it: the test has failed
            answers.append(error)

    waiters = []
    for pull, user in ((13, "bob"), (14, "carol")):
        waiter = threading.Thread(target=wait_for_lock, args=(pull, user), daemon=True)
        waiter.start()
        waiters.append(waiter)
        def queued(p: int = pull) -> bool:
            return f"#{p} " in text_of(browser, "#queues")

        until(f"#{pull} queued", queued)
    queue = text_of(browser, f'.queue[data-key="{key}"] li')
    assert queue.index("1 #13 bob") < queue.index("2 #14 carol"), queue
    assert "waits for holder #12 alice" in queue and "waits for #13 (position 1)" in queue
    screenshot(browser, "console-queue")

    httpx.post(operator.url + "/v1/admin/force-unlock", params={"key": key},
               timeout=10).raise_for_status()
    def moved_up() -> str | None:
        text = text_of(browser, f'.queue[data-key="{key}"] li')
        return text if text.startswith("1 #14 carol") else None

    moved = until("#14 moves up to position 1", moved_up)
    assert "waits for holder #13 bob" in moved
    assert "#13 bob" in text_of(browser, "#locks")
    assert "force-unlocked" in text_of(browser, "#event-list")

    kube_cluster.kubectl("annotate", "lockmigration", "to-enhanced", "-n", kube_namespace,
                         "--overwrite", "locking.runatlantis.io/promote=console-test")
    until("the rollout's step change shows", lambda: "Phase Completed"
          in text_of(browser, "#rollout"), timeout=60,
          details=lambda: text_of(browser, "#rollout"))
    assert "setWeight 100" in text_of(browser, "#rollout .steps li.done")
    assert "rollout-changed" in text_of(browser, "#event-list")
    assert browser.execute_script("return window.notReloaded === true;")
    screenshot(browser, "console-rollout")

    httpx.post(operator.url + "/v1/admin/force-unlock", params={"key": key},
               timeout=10).raise_for_status()
    for waiter in waiters:
        waiter.join(timeout=30)
    assert sorted(a.lock.pull.num for a in answers
                  if not isinstance(a, ServiceError) and a.acquired) == [13, 14]


def test_the_console_without_javascript_is_the_same_page_and_filters(
    operator: OperatorProcess,
) -> None:
    path = enhanced_path()
    with Client(operator.url) as client:
        assert client.acquire(request(path, 21, "dave")).acquired
    page = httpx.get(operator.url + "/ui", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert f"acme/infra/{path}/default/" in page.text and "#21 dave" in page.text
    assert '<form class="filters" method="get" action="/ui">' in page.text
    assert "http://" not in page.text.replace(operator.url, "")  # nothing from elsewhere
    other = httpx.get(operator.url + "/ui", params={"repo": "acme/web", "pull": ""}, timeout=10)
    assert "No locks held." in other.text
    bad = httpx.get(operator.url + "/ui", params={"pull": "twelve"}, timeout=10)
    assert bad.status_code == 422 and "pull" in bad.json()["error"]
    assert "Force unlock" not in page.text  # access control off: read-only
