"""The Makefile as a contributor meets it: ``make`` alone prints ``make help``, which names
every target there is (and only those), and every ``make TARGET`` that README.md and docs/
write is one of them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAKEFILE = ROOT / "Makefile"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def make(*args: str) -> str:
    assert shutil.which("make"), "GNU make is missing: apt-get install make"
    result = subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rules() -> set[str]:
    """The targets the Makefile has a rule for (not the venv's stamp file)."""
    return set(re.findall(r"^([a-z][\w-]*):(?!=)", MAKEFILE.read_text(), re.MULTILINE))


def phony() -> set[str]:
    text = MAKEFILE.read_text().replace("\\\n", " ")
    declared, = re.findall(r"^\.PHONY:(.*)$", text, re.MULTILINE)
    return set(declared.split())


def test_every_phony_name_has_a_rule() -> None:
    # A name declared phony without a rule "succeeds" doing nothing: `make typecheck` said
    # "Nothing to be done" and exited 0.
    assert phony() == rules()


def test_make_alone_prints_the_help_and_it_names_every_target() -> None:
    shown = make("help")
    assert make() == shown
    listed = re.findall(r"^make ([a-z][\w-]*)\s", shown, re.MULTILINE)
    assert len(listed) == len(set(listed)), shown
    assert set(listed) == rules() - {"help"}, shown


def test_every_make_target_the_docs_name_exists() -> None:
    named: dict[str, set[str]] = {}
    for page in PAGES:
        text = page.read_text()
        spans = re.findall(r"```.*?```", text, re.DOTALL)
        spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
        for span in spans:
            for target in re.findall(r"(?<![\w./-])make ([a-z][\w-]*)", span):
                named.setdefault(target, set()).add(page.name)
    assert "run" in named and "test" in named  # the reader is found
    unknown = {target: sorted(pages) for target, pages in named.items() if target not in rules()}
    assert not unknown, f"pages name make targets the Makefile lacks: {unknown}"
