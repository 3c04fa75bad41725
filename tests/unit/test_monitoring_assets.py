"""The Grafana dashboard and the Prometheus alerts name only metrics the service exports.

Metric names come from one place, ``enhanced_locking.metrics``. Exposition adds suffixes: a
counter ``x`` is scraped as ``x_total``, a histogram as ``x_bucket``, ``x_sum`` and
``x_count``. Every ``enhanced_locking_*`` series a query uses must be one of those, so renaming
a metric without the assets (or the other way round) fails here rather than as an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from enhanced_locking.durations import parse_duration
from enhanced_locking.metrics import FallbackAction, Metrics, ShadowKind, ShadowResult
from enhanced_locking.types import Reason

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "enhanced-locking"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
RULES = CHART / "files" / "prometheus-rules.yaml"
SERIES = re.compile(r"\benhanced_locking_[a-z0-9_]+\b")


def exposed_series() -> dict[str, str]:
    """Every series name the service can expose, mapped to the metric family it belongs to."""
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("_sum", "_count", ""),
    }
    names: dict[str, str] = {}
    for family in Metrics().registry.collect():
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries() -> dict[str, list[str]]:
    """Panel title -> its PromQL expressions (and the templating queries)."""
    queries: dict[str, list[str]] = {}
    for panel in dashboard()["panels"]:
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if exprs:
            queries[panel["title"] + f" #{panel['id']}"] = exprs
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries["variable " + variable["name"]] = [variable["definition"]]
    return queries


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_series_the_dashboard_queries_is_exported() -> None:
    exposed = exposed_series()
    unknown = {
        f"{title}: {name}"
        for title, exprs in dashboard_queries().items()
        for expr in exprs
        for name in SERIES.findall(expr)
        if name not in exposed
    }
    assert not unknown, f"not in enhanced_locking/metrics.py (as exposed): {sorted(unknown)}"


def test_every_series_the_alerts_query_is_exported() -> None:
    exposed = exposed_series()
    unknown = {
        f"{rule['alert']}: {name}"
        for rule in alert_rules()
        for name in SERIES.findall(rule["expr"])
        if name not in exposed
    }
    assert not unknown, f"not in enhanced_locking/metrics.py (as exposed): {sorted(unknown)}"


@pytest.mark.parametrize(
    "family",
    [
        "enhanced_locking_locks_held",
        "enhanced_locking_queue_depth",
        "enhanced_locking_wait_duration_seconds",
        "enhanced_locking_acquire_duration_seconds",
        "enhanced_locking_routing_decisions",
        "enhanced_locking_fallbacks",
        "enhanced_locking_deadlocks",
        "enhanced_locking_config_generation",
        "enhanced_locking_store_up",
        "enhanced_locking_store_granting",
        "enhanced_locking_requests_shed",
        "enhanced_locking_requests_pool_busy",
    ],
)
def test_the_dashboard_shows(family: str) -> None:
    exposed = exposed_series()
    used = {
        exposed[name]
        for exprs in dashboard_queries().values()
        for expr in exprs
        for name in SERIES.findall(expr)
        if name in exposed
    }
    assert family in used


def test_the_dashboard_is_well_formed_for_grafana() -> None:
    board = dashboard()
    assert board["uid"] == "enhanced-locking"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    for panel in board["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'namespace=~"$namespace"' in target["expr"], (panel["title"], target["expr"])


def test_every_alert_says_how_bad_and_what_happened() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert rule["alert"].startswith("EnhancedLocking"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        if "for" in rule:
            parse_duration(rule["for"])
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_the_monitoring_docs_name_every_alert() -> None:
    docs = (REPO_ROOT / "docs" / "04-monitoring.md").read_text()
    missing = [rule["alert"] for rule in alert_rules() if rule["alert"] not in docs]
    assert not missing, f"docs/04-monitoring.md does not explain {missing}"


def test_every_metric_the_docs_name_is_exported() -> None:
    # A reader pastes these names into Prometheus: each is a scraped series, or a histogram's
    # name (its series add `_bucket`, `_sum` and `_count`).
    series = exposed_series()
    known = set(series) | {family for family in series.values() if f"{family}_bucket" in series}
    for page in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        unknown = sorted(set(SERIES.findall(page.read_text())) - known)
        assert not unknown, f"{page.name} names metrics the service does not export: {unknown}"


COUNTED = re.compile(r"\b(?:increase|rate)\(\s*(enhanced_locking_[a-z0-9_]+_total)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(!=|=)\s*"([^"]*)"')


def _queries() -> list[tuple[str, str]]:
    """Every PromQL the chart's alerts and the docs' query blocks hold, with where it is."""
    found = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for page in sorted((REPO_ROOT / "docs").glob("*.md")):
        found += [(page.name, block) for block in
                  re.findall(r"```promql\n(.*?)```", page.read_text(), re.S)]
    return found


def test_every_counter_a_query_counts_is_exported_at_zero_before_its_first_count() -> None:
    # Prometheus's increase() and rate() need two samples of a series: a labelled counter
    # whose series is born at its first count (prometheus-client makes a child on its first
    # .labels()) is first scraped at 1, and that count is never seen. An alert on
    # "increase(...) > 0" then stays silent for a pod's first fallback or shadow mismatch.
    # (Not retries_total: its operation is any backend call's name, and its query is a rate
    # above one a second, which one count more or less does not move.)
    series: dict[str, list[dict[str, str]]] = {}
    for family in Metrics().registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, []).append(sample.labels)
    missing = []
    for where, query in _queries():
        for name, matchers in COUNTED.findall(query):
            if name == "enhanced_locking_retries_total":
                continue
            wanted = MATCHER.findall(matchers)
            if not any(all((labels.get(label) == value) == (op == "=")
                           for label, op, value in wanted if label != "namespace")
                       for labels in series.get(name, [])):
                missing.append(f"{where}: {name}{matchers}")
    assert not missing, f"not exported before its first count: {sorted(set(missing))}"


@pytest.mark.parametrize(("series", "label", "values"), [
    ("enhanced_locking_fallbacks_total", "action", get_args(FallbackAction)),
    ("enhanced_locking_shadow_discrepancies_total", "kind", get_args(ShadowKind)),
    ("enhanced_locking_shadow_replays_total", "result", get_args(ShadowResult)),
    ("enhanced_locking_acquire_total", "outcome", ("acquired", *(r.value for r in Reason))),
])
def test_each_value_an_alert_splits_by_is_exported_at_zero_from_the_start(
    series: str, label: str, values: tuple[str, ...],
) -> None:
    # The alerts sum by action and by kind: each one's first count must be seen too.
    shown = {sample.labels[label]: sample.value for family in Metrics().registry.collect()
             for sample in family.samples if sample.name == series}
    assert shown == dict.fromkeys(values, 0.0)


STORE_READ = ("enhanced_locking_locks_held", "enhanced_locking_queue_depth")
"""Gauges read from the store at scrape time: every replica of a service that shares the store
(Redis, etcd) reports the store's whole count (tests/integration/test_redis_outage.py)."""


def test_a_gauge_every_replica_reads_from_the_shared_store_is_not_added_up_across_them() -> None:
    # sum() over the replicas of one service counts each lock and waiter once per replica: the
    # backlog alert fired at 100 / replicas waiters, the dashboard showed replicas x the locks.
    # Each service's count is the max of its replicas' (by namespace and job, the scrape job
    # being the service), and only those are added up.
    exprs = [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    exprs += [(title, expr) for title, found in dashboard_queries().items() for expr in found]
    wrong = [f"{where}: {expr}" for where, expr in exprs for name in STORE_READ
             if name in expr and not re.search(
                 r"max by \(namespace, job(, backend)?\) \(" + name + r"\b", expr)]
    assert not wrong, wrong


def test_shadow_replays_are_counted_through_their_typed_results() -> None:
    # The replayer counts through Metrics' typed calls (ShadowResult, ShadowKind), so a result
    # or kind it counts is one the docs list and the scrape shows from the start.
    metrics = Metrics()
    metrics.shadow_replayed("matched")
    metrics.shadow_replayed("dropped")
    metrics.shadow_replayed("error")
    metrics.shadow_mismatch("release-holder")
    shown = {(sample.name, tuple(sample.labels.values())): sample.value
             for family in metrics.registry.collect() for sample in family.samples}
    for result in get_args(ShadowResult):
        assert shown[("enhanced_locking_shadow_replays_total", (result,))] == 1.0, result
    assert shown[("enhanced_locking_shadow_discrepancies_total", ("release-holder",))] == 1.0
    assert sum(value for (name, _), value in shown.items()
               if name == "enhanced_locking_shadow_discrepancies_total") == 1.0
