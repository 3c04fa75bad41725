"""The CustomResourceDefinitions, generated from the CR models (``hack/gen_crds.py`` writes them).

Pydantic's JSON schema is close to what Kubernetes wants but not the same: a CRD schema must be
*structural* (no ``$ref``, every node typed, no ``anyOf`` of types, no ``additionalProperties``
next to ``properties``) and speaks OpenAPI 3.0 (``exclusiveMinimum`` is a flag). This module
inlines and rewrites the models' schema into that form, and refuses any keyword it does not
know rather than passing it through unchecked. Unknown fields in a CR are refused by the API
server's strict field validation (the default of ``kubectl apply``), which plays the part of
pydantic's ``extra="forbid"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel

from enhanced_locking.config import settings
from enhanced_locking.durations import DURATION_PATTERN
from enhanced_locking.kube.lockmigration import LockMigrationSpec, LockMigrationStatus
from enhanced_locking.kube.lockpolicy import LockPolicySpec, LockPolicyStatus
from enhanced_locking.kube.models import GROUP, VERSION
from enhanced_locking.kube.overrides import MIGRATION_SETTINGS, POLICY_SETTINGS

__all__ = [
    "KINDS", "Kind", "SchemaError", "crd", "field_table", "render", "structural_schema",
]

# Keywords copied as they are; everything else is rewritten below or refused.
_KEPT = {
    "type", "description", "enum", "pattern", "format", "maxLength", "minLength",
    "minimum", "maximum", "maxItems", "minItems", "required", "multipleOf",
}
_DROPPED = {"title", "default", "additionalProperties", "$defs", "examples"}


class SchemaError(ValueError):
    """A model's schema has a shape this generator cannot express as a structural schema."""


def _ready(path: str) -> dict[str, Any]:
    return {"name": "Ready", "type": "string", "jsonPath": path}


@dataclass(frozen=True)
class Kind:
    """One custom resource kind: its names, models and ``kubectl get`` columns."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    columns: tuple[dict[str, Any], ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"


_READY = '.status.conditions[?(@.type=="Ready")]'
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

LOCK_POLICY = Kind(
    kind="LockPolicy",
    plural="lockpolicies",
    singular="lockpolicy",
    short_names=("lockpol",),
    spec=LockPolicySpec,
    status=LockPolicyStatus,
    description=(
        "The enhanced lock service's settings, declared in the cluster. Fields left out keep "
        "the service's own settings; deleting the policy returns the service to them."
    ),
    columns=(
        {"name": "Enabled", "type": "boolean", "jsonPath": ".spec.enabled"},
        {"name": "Backend", "type": "string", "jsonPath": ".spec.backend"},
        {**_ready(_READY + ".status")},
        {"name": "Reason", "type": "string", "jsonPath": _READY + ".reason"},
        {
            "name": "Config",
            "type": "integer",
            "jsonPath": ".status.appliedGeneration",
            "description": "The service's configuration generation.",
            "priority": 1,
        },
        {"name": "Message", "type": "string", "jsonPath": _READY + ".message", "priority": 1},
        _AGE,
    ),
)

LOCK_MIGRATION = Kind(
    kind="LockMigration",
    plural="lockmigrations",
    singular="lockmigration",
    short_names=("lockmig",),
    spec=LockMigrationSpec,
    status=LockMigrationStatus,
    description=(
        "Moves lock traffic from Atlantis's legacy locker to the enhanced one: a fixed weight "
        "or rollout steps, route or shadow mode, abort and promote."
    ),
    columns=(
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {
            "name": "Mode",
            "type": "string",
            "jsonPath": ".status.mode",
            "description": "The routing mode the service runs now (route or shadow).",
        },
        {
            "name": "Weight",
            "type": "number",
            "jsonPath": ".status.currentWeight",
            "description": "Percent of lock keys the service routes to enhanced now.",
        },
        {
            "name": "Step",
            "type": "string",
            "jsonPath": ".status.step",
            "description": "The rollout step in force, N/M (with spec.steps).",
        },
        {
            "name": "Mismatches",
            "type": "integer",
            "jsonPath": ".status.counters.mismatches",
            "description": "Shadow replays whose answer differed from the authoritative one.",
        },
        {
            "name": "Conflicts",
            "type": "integer",
            "jsonPath": ".status.counters.conflicts",
            "description": "Keys held on both sides by different pulls, now.",
        },
        {**_ready(_READY + ".status")},
        {"name": "Policy", "type": "string", "jsonPath": ".spec.policyRef.name", "priority": 1},
        {"name": "Fallbacks", "type": "integer", "jsonPath": ".status.counters.fallbacks",
         "priority": 1},
        {"name": "Errors", "type": "integer", "jsonPath": ".status.counters.errors",
         "priority": 1},
        {"name": "Moving", "type": "string", "jsonPath": ".status.transition.phase",
         "priority": 1, "description": "The weight move: stable, moving or isolated."},
        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
        _AGE,
    ),
)

KINDS = (LOCK_POLICY, LOCK_MIGRATION)


_DURATION_HINT = " A Go duration such as 500ms, 30s, 2m or 1h30m."


def _describe(node: dict[str, Any]) -> str:
    text = " ".join(str(node["description"]).replace("``", "").split())
    if node.get("pattern") == DURATION_PATTERN and "duration" not in text.lower():
        text += _DURATION_HINT
    return text


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a ``$ref`` (keeping the referring node's own keys, e.g. its description)."""
    if "$ref" not in node:
        return node
    name = node["$ref"].rsplit("/", 1)[-1]
    target = dict(defs[name])
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def _convert(node: dict[str, Any], defs: dict[str, Any], where: str) -> dict[str, Any]:
    node = _resolve(node, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b != {"type": "null"}]
        if len(branches) != 1:
            raise SchemaError(f"{where}: a union of several types is not structural")
        merged = _resolve(branches[0], defs)
        merged = {**merged, **{k: v for k, v in node.items() if k != "anyOf"}}
        return _convert(merged, defs, where)
    if "allOf" in node and len(node["allOf"]) == 1:
        merged = {**_resolve(node["allOf"][0], defs)}
        merged.update({k: v for k, v in node.items() if k != "allOf"})
        return _convert(merged, defs, where)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key in _KEPT:
            out[key] = value
        elif key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "properties":
            out[key] = {
                name: _convert(child, defs, f"{where}.{name}") for name, child in value.items()
            }
        elif key == "items":
            out[key] = _convert(value, defs, f"{where}[]")
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound], out[key] = value, True
        else:
            raise SchemaError(f"{where}: the schema keyword {key!r} has no CRD translation")
    if "type" not in out:
        raise SchemaError(f"{where}: every node of a structural schema needs a type")
    if "description" in out:
        out["description"] = _describe(out)
    # `type` and `description` first: the order people read them in (`kubectl explain`).
    out = {k: out[k] for k in ("type", "description") if k in out} | out
    if out.get("type") == "array" and "x-kubernetes-list-type" not in out:
        out["x-kubernetes-list-type"] = "atomic"
    return out


def structural_schema(model: type[BaseModel], *, mode: str = "validation") -> dict[str, Any]:
    """The model's JSON schema as a structural OpenAPI schema for a CRD."""
    schema = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[arg-type]
    defs = schema.pop("$defs", {})
    return _convert(schema, defs, model.__name__)


def crd(kind: Kind) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    spec = structural_schema(kind.spec)
    status = structural_schema(kind.status, mode="serialization")
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.name,
            "labels": {
                "app.kubernetes.io/name": "enhanced-locking",
                "app.kubernetes.io/part-of": "atlantis",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["atlantis", "enhanced-locking"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(kind.columns),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": kind.description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = (
    "# Generated by hack/gen_crds.py from operator/enhanced_locking/kube/{module}.py:\n"
    "# edit the models there and run `make docs`, never this file.\n"
)


class _Plain(yaml.SafeDumper):
    """Writes a repeated part of a schema out again instead of as a YAML alias (``*id001``),
    which reads badly and which some tools that read CRDs do not follow."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(kind: Kind) -> str:
    """The CRD of ``kind`` as the YAML text kept in ``crds/``."""
    module = kind.spec.__module__.rsplit(".", 1)[-1]
    body = yaml.dump(crd(kind), Dumper=_Plain, sort_keys=False, allow_unicode=True, width=100)
    return HEADER.format(module=module) + body


def _form(node: dict[str, Any]) -> str:
    """A short human form of a schema node's type and bounds."""
    kind = str(node["type"])
    if "enum" in node:
        return " \\| ".join(f"`{value}`" for value in node["enum"])
    if node.get("pattern") == DURATION_PATTERN:
        return "duration"
    if kind in ("integer", "number"):
        low, high = node.get("minimum"), node.get("maximum")
        word = "integer" if kind == "integer" else "number"
        if low is None or high is None:
            return word
        return f"{word} {_number(low)}..{_number(high)}"
    if kind == "string" and "maxLength" in node:
        return f"string (≤ {node['maxLength']})"
    if kind == "array":
        return f"list (≤ {node.get('maxItems')})"
    return {"boolean": "bool", "object": "object"}.get(kind, kind)


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def field_table(kind: Kind) -> str:
    """The spec's fields as a Markdown table, for the docs (generated with the CRDs)."""
    spec = structural_schema(kind.spec)
    mapping = POLICY_SETTINGS if kind is LOCK_POLICY else MIGRATION_SETTINGS
    keys = {s.field: s.key for s in settings()}
    rows = ["| field | type | service setting | meaning |", "|---|---|---|---|"]

    def walk(node: dict[str, Any], path: str) -> None:
        for name, child in node.get("properties", {}).items():
            here = f"{path}.{name}" if path else name
            description = str(child.get("description", "")).replace("|", "\\|")
            description = description.removesuffix(_DURATION_HINT)
            required = " Required." if name in node.get("required", []) else ""
            setting = mapping.get(here.removeprefix("spec."))
            where = f"`{keys[setting]}`" if setting else ""
            rows.append(f"| `{here}` | {_form(child)} | {where} | {description}{required} |")
            walk(child, here)
            if child["type"] == "array":
                walk(child["items"], f"{here}[]")

    walk(spec, "spec")
    return "\n".join(rows)
