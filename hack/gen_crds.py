"""Writes crds/*.yaml from the CR models (operator/enhanced_locking/kube/); one source of truth.

Also the field tables of docs/02-migration.md (between ``<!-- fields:KIND begin/end -->``).

Usage: .venv/bin/python hack/gen_crds.py [--check]   (make docs runs it)
  --check   write nothing; exit 1 (naming the stale files) when crds/ or the docs differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from enhanced_locking.kube import crds

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "crds"
MIGRATION_DOC = REPO / "docs" / "02-migration.md"


def _with_tables(text: str) -> str:
    for kind in crds.KINDS:
        begin, end = f"<!-- fields:{kind.kind} begin -->", f"<!-- fields:{kind.kind} end -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{MIGRATION_DOC.name} lacks the {begin} ... {end} markers")
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = f"{head}{begin}\n{crds.field_table(kind)}\n{end}{tail}"
    return text


def expected() -> dict[Path, str]:
    """Each generated file and the text the models give it."""
    files = {CRD_DIR / f"{kind.plural}.yaml": crds.render(kind) for kind in crds.KINDS}
    files[MIGRATION_DOC] = _with_tables(MIGRATION_DOC.read_text())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that crds/ is current")
    args = parser.parse_args(argv)
    files = expected()
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        if stale:
            names = ", ".join(str(p.relative_to(REPO)) for p in stale)
            print(f"stale: {names}; run `make docs` (hack/gen_crds.py)", file=sys.stderr)
            return 1
        return 0
    CRD_DIR.mkdir(exist_ok=True)
    for path in stale:
        path.write_text(files[path])
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
