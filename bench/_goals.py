"""The goals the benchmarks judge, kept once: in the section of docs/benchmarks.md that measured
them, as one JSON comment per goal inside that section's markers (``write_section`` puts them
there with the table). ``hack/gen_docs.py`` writes the summary table at the top of the page
from those comments, so a rerun of one bench updates its rows of the summary with
``make docs`` and ``tests/unit/test_docs.py`` fails while the two disagree.

This module imports nothing of the service: ``hack/gen_docs.py`` reads it too.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

MARK = "<!-- goal "
_RECORD = re.compile(r"^<!-- goal (\{.*\}) -->$", re.M)
_HEADING = re.compile(r"^## (.+)$", re.M)


@dataclass(frozen=True)
class Goal:
    """One goal a bench judges: what is asked, what its run measured, and whether that met it
    (judged on the median round, as the section's table judges it)."""

    asked: str
    measured: str
    met: bool

    def record(self) -> str:
        """The comment that keeps this goal in its section (invisible where the page renders)."""
        return f"{MARK}{json.dumps(asdict(self), ensure_ascii=False)} -->"


def records(goals: tuple[Goal, ...] | list[Goal]) -> str:
    """The comments of ``goals``, one a line: what ``write_section`` appends to a table."""
    return "\n".join(goal.record() for goal in goals)


def anchor(heading: str) -> str:
    """The link target a Markdown renderer (GitHub's) gives a heading."""
    kept = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return "#" + kept.replace(" ", "-")


def summary(page: str) -> str:
    """The summary table of every goal recorded in ``page`` (docs/benchmarks.md), in the order
    of its sections, each row linking to the section that measured it."""
    rows = ["| goal | measured in the section's last run | met | section |",
            "|---|---|---|---|"]
    headings = [(match.start(), match.group(1)) for match in _HEADING.finditer(page)]
    for match in _RECORD.finditer(page):
        goal = Goal(**json.loads(match.group(1)))
        heading = [text for start, text in headings if start < match.start()][-1]
        short = heading.split(":", 1)[0]
        rows.append(f"| {goal.asked} | {goal.measured} | {'met' if goal.met else 'missed'} "
                    f"| [{short}]({anchor(heading)}) |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Report:
    """A bench's table and the goals it judged, for ``write_section``."""

    text: str
    goals: tuple[Goal, ...] = ()
