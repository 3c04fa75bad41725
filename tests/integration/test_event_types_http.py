"""``GET /v1/events?type=`` takes every type of event the service publishes (``EVENT_TYPES``,
the one list ``publish`` is held to), against a real ``enhanced-locking serve``: a reader that
follows ``frozen`` gets the event of an acquire refused by a freeze, and a type the service
never publishes is refused with a 422 naming it. The label values it exports are the ones
docs/04-monitoring.md names: the refusal is counted under ``outcome="frozen"``, which the page's
list of an acquire's outcomes named no more than the other reasons past the first seven."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import ServiceFactory

from enhanced_locking.events import EVENT_TYPES
from enhanced_locking.types import Reason

REPO = "acme/frozen"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "04-monitoring.md"


def _config(path: Path) -> Path:
    now = datetime.now(UTC)
    path.write_text(yaml.safe_dump({
        "enhanced-locking-enabled": True,
        "enhanced-locking-policies": {"freezes": [{
            "name": "release-week", "match": {"repo": REPO}, "message": "release week",
            "action": "refuse", "from": (now - timedelta(hours=1)).isoformat(),
            "until": (now + timedelta(hours=1)).isoformat()}]},
    }))
    return path


async def _first(http: httpx.AsyncClient, types: str, ready: asyncio.Event) -> dict[str, str]:
    """The first event of ``types`` the stream brings: its SSE fields."""
    async with http.stream("GET", "/v1/events", params={"type": types}) as stream:
        assert stream.status_code == 200, await stream.aread()
        ready.set()
        fields: dict[str, str] = {}
        async for line in stream.aiter_lines():
            if not line:
                if "data" in fields:
                    return fields
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    raise AssertionError("the event stream ended")


async def test_a_reader_of_frozen_events_gets_the_refusal_of_a_frozen_key(
    service_process: ServiceFactory, tmp_path: Path,
) -> None:
    served = service_process("--config", str(_config(tmp_path / "service.yaml")))
    body = {"project": {"repoFullName": REPO, "path": "net", "projectName": "net"},
            "pull": {"num": 7, "url": f"https://git.example/{REPO}/pull/7", "author": "w"},
            "user": {"username": "w"}}
    async with httpx.AsyncClient(base_url=served.url, timeout=30.0) as http:
        ready = asyncio.Event()
        reader = asyncio.ensure_future(
            _first(http, "frozen,freeze-started,freeze-ended,superseded", ready))
        await asyncio.wait_for(ready.wait(), timeout=30)
        refused = await http.post("/v1/locks", json=body)
        assert refused.status_code == 409, refused.text
        assert refused.json()["reason"] == "frozen", refused.text
        event = await asyncio.wait_for(reader, timeout=30)
    assert event["event"] == "frozen", event
    assert json.loads(event["data"])["key"] == f"{REPO}/net/default/net", event


async def test_every_published_type_is_taken_and_an_unknown_one_refused_by_name(
    service_process: ServiceFactory,
) -> None:
    served = service_process("--enhanced-locking-enabled")
    async with httpx.AsyncClient(base_url=served.url, timeout=30.0) as http:
        async with http.stream("GET", "/v1/events",
                               params={"type": ",".join(EVENT_TYPES)}) as stream:
            assert stream.status_code == 200, await stream.aread()
        unknown = await http.get("/v1/events", params={"type": "frozen,abandoned"})
    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["field"] == "type", unknown.text
    assert "'abandoned'" in unknown.json()["error"], unknown.text


def _named() -> set[str]:
    """The values the page's label paragraph names (in backquotes)."""
    text = PAGE.read_text()
    paragraph = text[text.index("## Every metric"):text.index("<!-- BEGIN GENERATED: metrics")]
    return set(re.findall(r"`([a-z_-]+)`", paragraph))


def test_every_outcome_and_how_exported_is_one_the_docs_name(
    service_process: ServiceFactory, tmp_path: Path,
) -> None:
    served = service_process("--config", str(_config(tmp_path / "service.yaml")))
    with httpx.Client(base_url=served.url, timeout=30.0) as http:
        for repo in (REPO, "acme/infra"):
            body = {"project": {"repoFullName": repo, "path": "net"}, "pull": {"num": 7}}
            http.post("/v1/locks", json=body)
        assert http.post("/v1/locks", json={"project": {"repoFullName": "acme/infra",
                                                        "path": "net"},
                                            "pull": {"num": 8}}).json()["reason"] == "held"
        assert http.delete("/v1/locks/by-key", params={
            "key": "acme/infra/net/default/"}).status_code == 200
        exported = http.get("/metrics").text
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exported):
        for sample in family.samples:
            for label in ("outcome", "how"):
                if label in sample.labels:
                    values.setdefault(label, set()).add(sample.labels[label])
    assert "frozen" in values["outcome"], values
    named = _named()
    assert values["outcome"] | values["how"] <= named, sorted(
        (values["outcome"] | values["how"]) - named)
    # Every reason a refusal can give is an outcome the acquire counter may carry.
    assert {reason.value for reason in Reason} <= named, sorted(
        {reason.value for reason in Reason} - named)
