"""Every outcome an audit row is written with is one ``GET /v1/audit?outcome=`` accepts.

The filter names the outcomes there are when it is given one no row can have (a typo would
otherwise answer an empty page); this holds that list to the code that writes the rows: each
string written as an outcome (``note.done("...")``, ``outcome="..."``, the failures' table)
is in it, and a list entry nobody writes is a test failure too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from enhanced_locking.api import access
from enhanced_locking.api.audit_routes import AUDIT_OUTCOMES
from enhanced_locking.types import REFUSALS, Reason

API = Path(access.__file__).resolve().parent


def _strings(node: ast.expr) -> set[str]:
    """The plain strings ``node`` can be (a literal, or either side of ``a if c else b``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _strings(node.body) | _strings(node.orelse)
    return set()


def written_outcomes() -> set[str]:
    found: set[str] = set()
    for path in sorted(API.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and node.func.attr == "done" and node.args:
                found |= _strings(node.args[0])
            for keyword in node.keywords:
                if keyword.arg == "outcome":
                    found |= _strings(keyword.value)
    found |= {outcome for _, outcome, _ in access._FAILURES}
    found |= {"error", "ok"}  # failure_outcome's fallback, AuditNote's default
    return found


def test_every_outcome_written_is_one_the_filter_takes() -> None:
    written = written_outcomes()
    assert {"acquired", "released", "denied", "pull-closed", "cross-site"} <= written
    assert written - AUDIT_OUTCOMES == set()


def test_the_filter_takes_no_outcome_that_is_never_written() -> None:
    written = written_outcomes() | {reason.value for reason in Reason}  # str(result.reason)
    assert AUDIT_OUTCOMES - written == set()


def _refusal_status(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value in (401, 403)


def test_the_refusals_the_trail_bounds_apart_are_the_outcomes_written_with_401_or_403() -> None:
    """The audit trail keeps :data:`REFUSALS` within a bound of their own (a flood of them
    never pushes out the others): each outcome written with a 401 or 403 is one of them, and
    each of them is written with one."""
    found = {outcome for _, outcome, status in access._FAILURES if status in (401, 403)}
    for path in sorted(API.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            if "outcome" in keywords and _refusal_status(keywords.get("status")):
                found |= _strings(keywords["outcome"])
            if (isinstance(node.func, ast.Attribute) and node.func.attr == "done"
                    and len(node.args) > 1 and _refusal_status(node.args[1])):
                found |= _strings(node.args[0])
    assert found == REFUSALS
