"""luacheck over the Redis backend's scripts, each as Redis runs it (the library, then the script).

A script alone uses the library's functions, and the library alone defines functions only some
scripts use, so each file is checked inside the text that is actually sent to Redis. Warnings
point back at the file and line they come from (``lua/lib.lua:42``, ``lua/acquire.lua:7``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from enhanced_locking.backends import redis_scripts

REPO = Path(__file__).resolve().parent.parent
LUA = REPO / "operator/enhanced_locking/backends/lua"
_WHERE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<rest>.*)$")


def _origin(line: int, library_lines: int, script: str) -> str:
    """Where line ``line`` of an assembled script comes from."""
    preamble = redis_scripts.LIBRARY.count("\n") - redis_scripts.source("lib.lua").count("\n")
    if line <= preamble:
        return "operator/enhanced_locking/backends/redis_scripts.py (_PREAMBLE):"
    if line <= library_lines:
        return f"{(LUA / 'lib.lua').relative_to(REPO)}:{line - preamble}"
    return f"{(LUA / script).relative_to(REPO)}:{line - library_lines}"


def main() -> int:
    luacheck = shutil.which("luacheck")
    if luacheck is None:
        print("luacheck is missing: run hack/ensure-luacheck.sh (Debian's lua-check)",
              file=sys.stderr)
        return 1
    files = sorted(p.name for p in LUA.glob("*.lua") if p.name != "lib.lua")
    expected = sorted(f"{name.lower()}.lua" for name in redis_scripts.NAMES)
    if files != expected:
        print(f"lua/ holds {files}, redis_scripts.NAMES names {expected}", file=sys.stderr)
        return 1
    library_lines = redis_scripts.LIBRARY.count("\n")
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as scratch:
        for file, name in zip(files, sorted(redis_scripts.NAMES), strict=True):
            path = Path(scratch) / file
            path.write_text(getattr(redis_scripts, name))
            run = subprocess.run(
                [luacheck, "--config", str(REPO / ".luacheckrc"), "--formatter", "plain",
                 "--codes", "--no-color", str(path)],
                capture_output=True, text=True, check=False)
            if run.returncode not in (0, 1, 2):
                print(run.stdout + run.stderr, file=sys.stderr)
                return 1
            for out in run.stdout.splitlines():
                match = _WHERE.match(out)
                if match is None:
                    print(out)
                    continue
                warning = f"{_origin(int(match['line']), library_lines, file)}:{match['rest']}"
                if warning not in seen:  # the library's own, once (not once per script)
                    seen.add(warning)
                    print(warning)
    failed = bool(seen)
    print(f"luacheck: {len(files)} scripts with lua/lib.lua, "
          f"{'warnings above' if failed else 'no warnings'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
