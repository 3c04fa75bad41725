"""Regenerates the generated parts of docs/ from the code, which stays the one source of truth.

* ``docs/01-foundation.md``: the config reference (each setting's YAML key, env var, flag,
  default, accepted form and description), from ``enhanced_locking.config.settings()``.
* ``docs/api.md``: the endpoint table, from the OpenAPI document of the FastAPI app, and the
  event types, from ``enhanced_locking.events.EVENT_TYPES``.
* ``docs/04-monitoring.md``: the table of metrics, from ``enhanced_locking.metrics``.
* ``docs/openapi.json``: that OpenAPI document in full (also served at ``/openapi.json``).
* ``docs/benchmarks.md``: the summary of the goals, from the goals each bench kept in its own
  section of that page when it last ran (``bench/_goals.py``).

Generated text sits between ``<!-- BEGIN GENERATED: <name> -->`` and
``<!-- END GENERATED: <name> -->``; everything outside the markers is written by hand and kept.
To generate another part, add a :class:`Section` to ``SECTIONS`` (or a whole file to ``FILES``).

Usage: .venv/bin/python hack/gen_docs.py [--check]   (make docs runs it)
  --check   write nothing; exit 1 (naming the stale files) when a doc differs from the code
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from enhanced_locking.api import create_app
from enhanced_locking.config import EnhancedLockingConfig, settings
from enhanced_locking.events import EVENT_TYPES
from enhanced_locking.factory import LockService
from enhanced_locking.locking.enhanced import ReleaseHow
from enhanced_locking.metrics import FallbackAction, Metrics, ShadowKind, ShadowResult
from enhanced_locking.provider import ConfigProvider
from enhanced_locking.types import Reason

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._goals import summary  # noqa: E402

DOCS = ROOT / "docs"
BENCHMARKS = DOCS / "benchmarks.md"
HTTP_METHODS = ("get", "post", "put", "patch", "delete")


@dataclass(frozen=True)
class Section:
    """A generated part of a hand-written doc, between its two markers."""

    path: Path
    name: str
    render: Callable[[], str]

    @property
    def begin(self) -> str:
        return f"<!-- BEGIN GENERATED: {self.name} -->"

    @property
    def end(self) -> str:
        return f"<!-- END GENERATED: {self.name} -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "" or value == []:
        return "empty"
    return f"`{value}`"


def config_table() -> str:
    """Every setting of the config model, in declaration order."""
    lines = [
        "| YAML key | env var | flag | default | accepted | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for setting in settings():
        description = setting.description + (" Masked in every output." if setting.secret else "")
        lines.append(
            f"| `{setting.key}` | `{setting.env}` | `{setting.flag}` | "
            f"{_default(setting.default)} | {_cell(setting.form)} | {_cell(description)} |"
        )
    return "\n".join(lines)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the app, over a service that touches no file or server."""
    config = EnhancedLockingConfig(backend="memory", legacy_backend="memory")
    app = create_app(LockService(ConfigProvider(config)), manage_lifecycle=False)
    return app.openapi()


def _first_line(operation: dict[str, Any]) -> str:
    text = str(operation.get("description") or operation.get("summary") or "")
    return text.strip().split("\n\n")[0].replace("\n", " ")


def endpoint_table() -> str:
    """One row per operation of the OpenAPI document: what it does and its declared answers."""
    lines = ["| method and path | what it does | answers |", "|---|---|---|"]
    for path, item in openapi_document()["paths"].items():
        for method in HTTP_METHODS:
            if method not in item:
                continue
            operation = item[method]
            answers = " · ".join(sorted(operation.get("responses", {})))
            lines.append(
                f"| `{method.upper()} {path}` | {_cell(_first_line(operation))} | {answers} |"
            )
    return "\n".join(lines)


def openapi_json() -> str:
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def metrics_table() -> str:
    """Every metric the service exports, from ``enhanced_locking.metrics``."""
    lines = ["| metric (as scraped) | type | labels | what it counts |", "|---|---|---|---|"]
    for name, kind, labels, help_text in Metrics().describe():
        shown = ", ".join(f"`{label}`" for label in labels) or "none"
        lines.append(f"| `{name}` | {kind} | {shown} | {_cell(help_text)} |")
    return "\n".join(lines)


def event_types() -> str:
    return ", ".join(f"`{name}`" for name in EVENT_TYPES) + "."


def metric_labels() -> str:
    """Every value of the metrics' ``outcome``, ``how``, ``action``, ``kind`` and ``result``
    labels, from the code."""
    reasons = ", ".join(f"`{reason.value}`" for reason in Reason)

    def listed(values: Any) -> str:
        return ", ".join(f"`{value}`" for value in get_args(values))

    return "\n".join([
        f"- `outcome` of an acquire: `acquired`, or the reason it was not: {reasons}.",
        "- `outcome` of a wait: `granted`, or the reason it ended, one of the same (mostly "
        "`timeout`, `cancelled`, `unavailable`, `superseded`).",
        f"- `how` a lock was released: {listed(ReleaseHow)}.",
        f"- `action` of a fallback: {listed(FallbackAction)}.",
        f"- `kind` of a shadow discrepancy: {listed(ShadowKind)}; `result` of a shadow "
        f"replay: {listed(ShadowResult)}.",
    ])


def goals_table() -> str:
    return summary(BENCHMARKS.read_text())


SECTIONS = [
    Section(DOCS / "01-foundation.md", "config", config_table),
    Section(DOCS / "api.md", "endpoints", endpoint_table),
    Section(DOCS / "api.md", "event-types", event_types),
    Section(DOCS / "04-monitoring.md", "metric-labels", metric_labels),
    Section(DOCS / "04-monitoring.md", "metrics", metrics_table),
    Section(BENCHMARKS, "goals", goals_table),
]
FILES: dict[Path, Callable[[], str]] = {DOCS / "openapi.json": openapi_json}


class MarkersMissing(Exception):
    """A doc lacks the markers of a section it should carry."""


def fill(text: str, section: Section) -> str:
    """``text`` with the section's generated part replaced by a fresh rendering."""
    pattern = re.compile(re.escape(section.begin) + r".*?" + re.escape(section.end), re.S)
    if not pattern.search(text):
        raise MarkersMissing(
            f"{section.path.relative_to(ROOT)} needs the lines {section.begin} and {section.end}"
        )
    body = f"{section.begin}\n{section.render()}\n{section.end}"
    return pattern.sub(lambda _: body, text, count=1)


def expected() -> dict[Path, str]:
    """Each generated file and the text the code gives it."""
    texts: dict[Path, str] = {}
    for section in SECTIONS:
        current = texts.get(section.path)
        if current is None:
            current = section.path.read_text() if section.path.exists() else ""
        texts[section.path] = fill(current, section)
    for path, render in FILES.items():
        texts[path] = render()
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/ is current")
    args = parser.parse_args(argv)
    try:
        files = expected()
    except MarkersMissing as error:
        print(f"gen_docs: {error}", file=sys.stderr)
        return 1
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        if stale:
            names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
            print(f"stale: {names}; run `make docs` (hack/gen_docs.py)", file=sys.stderr)
            return 1
        return 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
