"""Writes crds/*.yaml from the CR models (operator/enhanced_locking/kube/); one source of truth.

Usage: python hack/gen_crds.py [--check]
  --check   write nothing; exit 1 (naming the stale files) when crds/ differs from the models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from enhanced_locking.kube import crds

CRD_DIR = Path(__file__).resolve().parents[1] / "crds"


def expected() -> dict[Path, str]:
    """Each CRD file and the text the models give it."""
    return {CRD_DIR / f"{kind.plural}.yaml": crds.render(kind) for kind in crds.KINDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that crds/ is current")
    args = parser.parse_args(argv)
    files = expected()
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        if stale:
            names = ", ".join(str(p.relative_to(CRD_DIR.parent)) for p in stale)
            print(f"stale: {names}; run `make docs` (hack/gen_crds.py)", file=sys.stderr)
            return 1
        return 0
    CRD_DIR.mkdir(exist_ok=True)
    for path in stale:
        path.write_text(files[path])
        print(f"wrote {path.relative_to(CRD_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
