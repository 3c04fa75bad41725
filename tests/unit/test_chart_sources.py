"""The chart's generated files match their sources.

``charts/enhanced-locking/templates/crd-*.yaml`` come from ``crds/`` and ``values.schema.json``
from ``values.yaml`` and the config model, through ``hack/gen_chart.py``. A change to a source
without ``make chart`` fails here. The chart's behaviour under Helm and the API server is
tested in ``tests/e2e/test_chart.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from enhanced_locking import config

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "enhanced-locking"


def _gen_chart() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_chart", REPO_ROOT / "hack" / "gen_chart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_chart", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_chart() -> ModuleType:
    return _gen_chart()


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return data


def test_generated_chart_files_are_current(gen_chart: ModuleType) -> None:
    stale = gen_chart.stale_files()
    assert not stale, f"stale generated chart files, run `make chart`: {stale}"


def test_every_crd_of_the_repository_is_a_chart_template() -> None:
    for source in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(source.read_text())
        template = CHART / "templates" / f"crd-{crd['spec']['names']['plural']}.yaml"
        text = template.read_text()
        assert "{{- if .Values.crds.install }}" in text
        assert "helm.sh/resource-policy: keep" in text
        assert f"name: {crd['metadata']['name']}" in text


def test_every_object_of_the_values_schema_is_closed(schema: dict[str, Any]) -> None:
    """``additionalProperties: false`` everywhere but the documented free-form maps."""
    free_form = {
        "lockPolicy.spec", "lockMigration.spec", "affinity",
    }

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '<root>'} is open"
            for key, child in node["properties"].items():
                walk(child, f"{path}.{key}".lstrip("."))
        elif node.get("type") == "object":
            extra = node.get("additionalProperties")
            assert path in free_form or isinstance(extra, dict), f"{path} accepts anything"

    walk(schema, "")


def test_every_value_has_a_description(schema: dict[str, Any]) -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        for key, child in node.get("properties", {}).items():
            here = f"{path}.{key}".lstrip(".")
            if "properties" not in child:
                assert child.get("description"), f"values.yaml: {here} has no comment"
            walk(child, here)

    walk(schema, "")


def test_the_config_value_accepts_exactly_the_service_settings(schema: dict[str, Any]) -> None:
    accepted = set(schema["properties"]["config"]["properties"])
    settings = {setting.key for setting in config.settings()}
    secrets = {setting.key for setting in config.settings() if setting.secret}
    assert secrets == {"enhanced-locking-redis-password", "enhanced-locking-etcd-password",
                       "enhanced-locking-auth-tokens", "enhanced-locking-github-webhook-secret",
                       "enhanced-locking-gitlab-webhook-secret",
                       "enhanced-locking-gitea-webhook-secret"}
    # The Deployment's environment sets these from auth.* and tls.* (it beats the file).
    set_by_the_chart = {
        "enhanced-locking-auth", "enhanced-locking-auth-namespace",
        "enhanced-locking-auth-audience", "enhanced-locking-auth-cache-ttl",
        "enhanced-locking-insecure-allow-unauthenticated", "enhanced-locking-auth-tokens-file",
        "enhanced-locking-tls-cert-file", "enhanced-locking-tls-key-file",
    }
    assert accepted == settings - secrets - {"data-dir"} - set_by_the_chart
