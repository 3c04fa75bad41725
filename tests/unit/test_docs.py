"""The generated parts of docs/ agree with the code (``make docs`` regenerates them)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_docs_match_the_code() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "hack" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr or result.stdout


def test_no_example_empties_or_deletes_a_file_of_the_default_data_dir() -> None:
    # Pasted, such an example would empty the store of a service running with the defaults
    # (make run): examples that need a broken store make one in a directory of their own.
    clobber = re.compile(r"(?::\s*>|>\s*|\brm\b[^\n]*?|\btruncate\b[^\n]*?)\s*~/\.atlantis/")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert not clobber.search(line), f"{page.name}:{number}: {line}"


def _section(page: str, heading: str) -> str:
    text = (ROOT / "docs" / page).read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return " ".join(text[start:end if end != -1 else len(text)].split())


def test_examples_of_the_enhanced_locker_say_to_turn_it_on() -> None:
    # On the default service (enhanced locking off) a shared plan, a lease or a refresh goes to
    # the legacy locker, which ignores them: the pages say so and how to turn it on.
    for page, heading in [("08-policies.md", "Shared and exclusive locks"),
                          ("api.md", "Batches, leases, queues and events")]:
        section = _section(page, heading)
        assert "--enhanced-locking-enabled" in section, f"{page}: {heading}"
        assert "legacy locker" in section, f"{page}: {heading}"
