"""luacheck over the service's Lua for Redis, as Redis runs it.

The function library's scripts: a script alone uses the library's functions, and the library
alone defines functions only some scripts use, so the files are checked inside the text that is
actually loaded into Redis (``redis_scripts.FUNCTIONS``). Warnings point back at the file and
line they come from (``lua/lib.lua:42``, ``lua/acquire.lua:7``). The scripts of their own
(``lua/standalone/*.lua``, each sent alone by ``EVALSHA``) are checked as they are, file by file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from enhanced_locking.backends import redis_lua, redis_scripts

REPO = Path(__file__).resolve().parent.parent
LUA = REPO / "operator/enhanced_locking/backends/lua"
STANDALONE = LUA / redis_lua.STANDALONE
_WHERE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<rest>.*)$")


def _origins() -> list[str]:
    """For each line of ``redis_scripts.FUNCTIONS`` (from 1), where it comes from."""
    where = ["operator/enhanced_locking/backends/redis_scripts.py (_HEADER):"]
    preamble = redis_scripts.LIBRARY.count("\n") - redis_lua.source("lib.lua").count("\n")
    where += ["operator/enhanced_locking/backends/redis_scripts.py (_PREAMBLE):"] * preamble
    lib = (LUA / "lib.lua").relative_to(REPO)
    where += [f"{lib}:{n}" for n in range(1, redis_lua.source("lib.lua").count("\n") + 1)]
    for name in redis_scripts.NAMES:
        file = (LUA / f"{name.lower()}.lua").relative_to(REPO)
        wrapper = f"operator/enhanced_locking/backends/redis_scripts.py (function {name}):"
        where += [wrapper, wrapper]
        body = redis_lua.source(f"{name.lower()}.lua").count("\n")
        where += [f"{file}:{n}" for n in range(1, body + 1)]
        where.append(wrapper)
    return where


def _luacheck(luacheck: str, paths: list[str]) -> list[str]:
    """luacheck's warnings about ``paths`` (``file:line:column: (code) text``), one a line."""
    run = subprocess.run(
        [luacheck, "--config", str(REPO / ".luacheckrc"), "--formatter", "plain",
         "--codes", "--no-color", *paths],
        capture_output=True, text=True, check=False, cwd=REPO)
    if run.returncode not in (0, 1, 2):
        return [f"luacheck failed ({run.returncode}): {run.stdout}{run.stderr}"]
    return run.stdout.splitlines()


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
    origins = _origins()
    if len(origins) != redis_scripts.FUNCTIONS.count("\n"):
        print("hack/lint_lua.py does not know how redis_scripts.FUNCTIONS is assembled",
              file=sys.stderr)
        return 1
    standalone = sorted(STANDALONE.glob("*.lua"))
    seen: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "functions.lua"
        path.write_text(redis_scripts.FUNCTIONS)
        for out in _luacheck(luacheck, [str(path)]):
            match = _WHERE.match(out)
            warning = out if match is None else (
                f"{origins[int(match['line']) - 1]}:{match['rest']}")
            seen.append(warning)
            print(warning)
    if standalone:
        for out in _luacheck(luacheck, [str(p.relative_to(REPO)) for p in standalone]):
            seen.append(out)
            print(out)
    failed = bool(seen)
    print(f"luacheck: {len(files)} scripts with lua/lib.lua, {len(standalone)} standalone "
          f"scripts, {'warnings above' if failed else 'no warnings'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
