"""The Redis backend's Lua scripts: one file per script, shipped as package data, lint-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from enhanced_locking.backends import redis_scripts

REPO = Path(__file__).resolve().parents[2]
LUA = REPO / "operator/enhanced_locking/backends/lua"


def test_every_named_script_is_a_file_of_its_own_and_every_file_a_named_script() -> None:
    files = {p.stem for p in LUA.glob("*.lua")} - {"lib"}
    assert files == {name.lower() for name in redis_scripts.NAMES}


def test_each_script_is_the_library_then_its_own_file() -> None:
    library = (LUA / "lib.lua").read_text()
    for name in redis_scripts.NAMES:
        text = getattr(redis_scripts, name)
        assert text == redis_scripts.LIBRARY + (LUA / f"{name.lower()}.lua").read_text()
        assert library in text


def test_each_script_file_opens_with_its_contract() -> None:
    for name in redis_scripts.NAMES:
        head = (LUA / f"{name.lower()}.lua").read_text().split("\nlocal ", 1)[0]
        assert re.search(r"^-- KEYS", head, re.M), f"{name}: no KEYS line in its header"
        assert re.search(r"^-- returns", head, re.M), f"{name}: no returns line in its header"


def test_the_time_constants_reach_lua_from_python() -> None:
    preamble = redis_scripts.LIBRARY.split("-- The library", 1)[0]
    assert f"= {redis_scripts.CLAIM_MS}, {redis_scripts.GRACE_MS}," in preamble
    assert "@" not in redis_scripts.ACQUIRE


def test_the_wheel_ships_the_lua_files() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["enhanced_locking"]
    package = REPO / "operator/enhanced_locking"
    for path in LUA.glob("*.lua"):
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def test_luacheck_finds_nothing_in_the_scripts() -> None:
    assert shutil.which("luacheck"), (
        "luacheck is missing: run hack/ensure-luacheck.sh (Debian's lua-check package)")
    run = subprocess.run([sys.executable, str(REPO / "hack/lint_lua.py")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no warnings" in run.stdout
