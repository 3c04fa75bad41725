"""The service's Lua for Redis: one file per script, shipped as package data, lint-clean."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from enhanced_locking.backends import (
    atlantis_redis,
    audit_store,
    redis_connection,
    redis_events,
    redis_lua,
    redis_scripts,
)
from enhanced_locking.migration import routing_registry

REPO = Path(__file__).resolve().parents[2]
LUA = REPO / "operator/enhanced_locking/backends/lua"
STANDALONE = LUA / redis_lua.STANDALONE


def test_every_named_script_is_a_file_of_its_own_and_every_file_a_named_script() -> None:
    files = {p.stem for p in LUA.glob("*.lua")} - {"lib"}
    assert files == {name.lower() for name in redis_scripts.NAMES}


def test_the_scripts_are_one_function_library_the_library_then_a_function_per_file() -> None:
    library = (LUA / "lib.lua").read_text()
    functions = redis_scripts.FUNCTIONS
    assert functions.startswith(f"#!lua name={redis_scripts.LIBRARY_NAME}\n"
                                + redis_scripts.LIBRARY)
    assert redis_scripts.LIBRARY.endswith(library)
    for name in redis_scripts.NAMES:
        body = (LUA / f"{name.lower()}.lua").read_text()
        function = redis_scripts.FUNCTION_NAMES[name]
        assert function == f"el_{redis_scripts.VERSION}_{name.lower()}"
        # The lean functions start with the lean layout's own begin (lua/lib.lua).
        begin = "begin_lean" if name in redis_scripts.LEAN else "begin"
        assert (f"redis.register_function('{function}', function(call_keys, call_args)\n"
                f"  {begin}(call_keys, call_args)\n{body}end)\n") in functions
    assert len(set(redis_scripts.FUNCTION_NAMES.values())) == len(redis_scripts.NAMES)


def test_the_library_name_is_a_digest_of_the_library_and_every_script_file() -> None:
    # A release whose scripts differ in any byte loads a library (and functions) of another
    # name, so replicas of two releases never call each other's code.
    text = redis_scripts.LIBRARY + "".join(
        "function(call_keys, call_args)\n  "
        + ("begin_lean" if name in redis_scripts.LEAN else "begin") + "(call_keys, call_args)\n"
        + (LUA / f"{name.lower()}.lua").read_text() + "end" for name in redis_scripts.NAMES)
    digest = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:12]
    assert redis_scripts.VERSION == digest
    assert redis_scripts.LIBRARY_NAME == f"enhanced_locking_{digest}"


def test_each_script_file_opens_with_its_contract() -> None:
    files = [LUA / f"{name.lower()}.lua" for name in redis_scripts.NAMES]
    for path in [*files, *STANDALONE.glob("*.lua")]:
        head = path.read_text().split("\nlocal ", 1)[0]
        assert re.search(r"^-- KEYS", head, re.M), f"{path.name}: no KEYS line in its header"
        assert re.search(r"^-- returns", head, re.M), f"{path.name}: no returns line in its header"


def test_each_standalone_script_is_a_file_its_user_reads_from_the_package() -> None:
    # The scripts sent alone by EVALSHA (not part of the function library): each is read from
    # lua/standalone/ through importlib.resources, as shipped, and every file there has a user.
    users = {
        "try_lock": atlantis_redis.TRY_LOCK,
        "release_if_owned": atlantis_redis.RELEASE_IF_OWNED,
        "replace_written_over": redis_connection.REPLACE_WRITTEN_OVER,
        "append_events": redis_events.APPEND_EVENTS,
        "append_audit_entry": audit_store.APPEND_AUDIT_ENTRY,
        "prune_audit": audit_store.PRUNE_AUDIT,
        "routing_report": routing_registry.REPORT,
        "routing_read": routing_registry.READ,
    }
    assert {path.stem for path in STANDALONE.glob("*.lua")} == set(users)
    for name, text in users.items():
        assert text == (STANDALONE / f"{name}.lua").read_text(encoding="utf-8"), name
        assert redis_lua.standalone(name) == text
        assert "redis.call(" in text, name


def test_the_time_constants_reach_lua_from_python() -> None:
    preamble = redis_scripts.LIBRARY.split("-- The library", 1)[0]
    assert f"= {redis_scripts.CLAIM_MS}, {redis_scripts.GRACE_MS}," in preamble
    assert "@" not in redis_scripts.FUNCTIONS


def test_the_wheel_ships_the_lua_files() -> None:
    # setuptools reads package-data patterns as globs: `*` stays inside one folder.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["enhanced_locking"]
    package = REPO / "operator/enhanced_locking"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    lua = set(LUA.rglob("*.lua"))
    assert len(lua) == len(redis_scripts.NAMES) + 1 + len(list(STANDALONE.glob("*.lua")))
    for path in lua:
        assert path in shipped, path.relative_to(package).as_posix()


def test_luacheck_finds_nothing_in_the_scripts() -> None:
    assert shutil.which("luacheck"), (
        "luacheck is missing: run hack/ensure-luacheck.sh (Debian's lua-check package)")
    run = subprocess.run([sys.executable, str(REPO / "hack/lint_lua.py")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no warnings" in run.stdout


# --- which keys a script may name ---------------------------------------------------------------
# Redis Cluster's rule is that every key a script touches is passed in KEYS. Redis itself does
# not enforce it where it would matter here (7.0 refuses only a key of another slot, and every
# key of a namespace shares one slot), so it is checked twice. Here, in the source: a script
# may name a key only through KEYS, or through one of the library's name functions below, each
# of which returns its name through `checked` (compared with KEYS as the script runs), and it
# writes only through `w` (after which no undeclared name may turn up). At run time, by
# tests/integration/test_redis_declared_keys.py, which watches Redis run every script
# (MONITOR) and fails on a key touched that its call did not declare. Each name function forms
# the name of a key a script finds while it runs; each is listed, with why, in
# docs/03-redis.md ("Keys found while a script runs").
FORMED_INSIDE = {
    "lock_name": "the lock hash of a key found in an index or in a waiter's batch",
    "shared_name": "the shared holders of such a key",
    "fence_name": "the fencing counter of such a key",
    "queue_name": "the queues of such a key",
    "by_pull_name": "the index by pull of the waiters of such a key",
    "by_pull_mark": "the indexes' mark (their generation), declared by every acquire that waits",
    "waiter_name": "the record of a waiter named by a queue entry",
    "outcome_name": "the outcome of such a waiter",
    "pull_index": "the index of the pull a waiter's grant is for",
    "waits_name": "the index of waits of a waiter's pull, or of a pull the deadlock walk reached",
}
NOT_KEYS = {"tell"}
"""Functions that form a name that is not a key (``tell``: the pub/sub channel of a replica)."""

KEYS_CONSTANTS = {"INCARNATION", "OP", "HELD", "FENCED", "QUEUED", "LIVENESS", "SEQ"}
KEY_COMMANDS_FIRST = {
    "GET", "SET", "INCR", "HINCRBY", "HGET", "HSET", "HDEL", "HMGET", "HGETALL", "HVALS",
    "SADD", "SREM", "SMEMBERS", "SISMEMBER", "ZADD", "ZREM", "ZRANGE", "ZCARD", "ZSCORE",
    "ZCOUNT", "ZRANGEBYSCORE", "ZRANGEBYLEX",
    "ZREMRANGEBYSCORE", "PEXPIREAT", "PEXPIRE", "PERSIST", "TYPE", "PTTL",
}
KEY_COMMANDS_ALL = {"DEL", "EXISTS"}
NO_KEYS = {"TIME", "PUBLISH"}
WRITES = {"SET", "INCR", "HINCRBY", "HSET", "HDEL", "SADD", "SREM", "ZADD", "ZREM",
          "ZREMRANGEBYSCORE", "PEXPIREAT", "PEXPIRE", "PERSIST", "DEL"}
"""Commands that change a key: a script sends them only through the library's ``w``."""


def _calls(text: str, pattern: str = r"\b(?:redis\.p?call|CALL|PCALL|w|w_try)\(",
           ) -> list[tuple[int, list[str]]]:
    """Every ``redis.call(...)`` / ``redis.pcall(...)`` (``CALL(...)`` / ``PCALL(...)`` in the
    library, which keeps the two) / ``w(...)`` / ``w_try(...)``: its line and its top-level
    arguments (the library's own definitions of ``w`` and ``w_try`` excepted)."""
    found = []
    for match in re.finditer(pattern, text):
        if text[max(0, match.start() - 15):match.start()].endswith("local function "):
            continue
        args: list[str] = []
        depth, current, i, quote = 1, "", match.end(), ""
        while depth:
            ch = text[i]
            if quote:
                current += ch
                if ch == quote and text[i - 1] != "\\":
                    quote = ""
            elif ch in "'\"":
                quote, current = ch, current + ch
            elif ch in "([{":
                depth, current = depth + 1, current + ch
            elif ch in ")]}":
                depth -= 1
                if depth:
                    current += ch
            elif ch == "," and depth == 1:
                args, current = [*args, current.strip()], ""
            else:
                current += ch
            i += 1
        found.append((text.count("\n", 0, match.start()) + 1, [*args, current.strip()]))
    return found


def _sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(LUA.glob("*.lua"))}


def _assignments(texts: dict[str, str]) -> dict[str, list[str]]:
    """``name = expression`` of every variable assigned in the scripts (with ``local`` or not)."""
    out: dict[str, list[str]] = {}
    for text in texts.values():
        for line in text.splitlines():
            m = re.match(r"\s*(?:local\s+)?([A-Za-z_][\w, ]*?)\s*=\s*(.+?)\s*(?:--.*)?$", line)
            if not m or "==" in line.split("--")[0].split("=", 1)[0] + "=":
                continue
            names = [n.strip() for n in m.group(1).split(",")]
            values = [v.strip() for v in re.split(r",(?![^()]*\))", m.group(2))]
            for name, value in zip(names, values, strict=False):
                out.setdefault(name, []).append(value)
    return out


def _key_argument_problem(arg: str, assigned: dict[str, list[str]]) -> str | None:
    """Why ``arg`` (an expression in a key position) is not a declared or listed key name."""
    if ".." in arg or arg.startswith(("'", '"')):
        return "a key name built in place"
    call = re.fullmatch(r"([A-Za-z_]\w*)\(.*\)", arg, re.S)
    if call:
        return None if call.group(1) in FORMED_INSIDE else f"{call.group(1)}() is not listed"
    if arg in KEYS_CONSTANTS or re.fullmatch(r"KEYS\[\d+\]", arg):
        return None
    if arg.startswith("{") or re.fullmatch(r"[\d.]+|false|nil|true", arg):
        return None  # a value that is no name (another variable of the same name)
    if re.fullmatch(r"[A-Za-z_]\w*", arg):
        for value in assigned.get(arg, []):
            problem = _key_argument_problem(value, {**assigned, arg: []})
            if problem:
                return f"{arg} = {value}: {problem}"
        return None  # a function's parameter: its callers pass a checked name
    return f"an expression ({arg})"


def test_a_script_names_a_key_only_through_keys_or_a_listed_name_function() -> None:
    texts = _sources()
    problems = []
    for file, text in texts.items():
        assigned = _assignments({"lib.lua": texts["lib.lua"], file: text})
        for line, args in _calls(text):
            command = args[0].strip("'\"")
            if command in NO_KEYS or command == "...":  # `w`'s own redis.call(...)
                continue
            assert command in KEY_COMMANDS_FIRST | KEY_COMMANDS_ALL, (
                f"{file}:{line}: {command} is not in this test's table of key positions")
            positions = args[1:] if command in KEY_COMMANDS_ALL else args[1:2]
            for arg in positions:
                problem = _key_argument_problem(arg, assigned)
                if problem:
                    problems.append(f"{file}:{line}: {command} {arg}: {problem}")
    assert not problems, "\n".join(problems)


def test_only_the_listed_name_functions_form_key_names_from_the_namespace() -> None:
    """``base`` (ARGV[1], the start of every key name) is read only by the listed functions,
    and a KEYS name is never the start of another."""
    using = set()
    for file, text in _sources().items():
        # The code without its comments and string literals (a field may be called 'base').
        code = "\n".join(re.sub(r"'[^']*'", "''", line).split("--", 1)[0]
                         for line in text.splitlines())
        assert "ARGV[1]" not in code.replace("base = ARGV[1]", ""), file
        for constant in [*KEYS_CONSTANTS, r"KEYS\[\d+\]"]:
            assert not re.search(rf"\b{constant}\s*\.\.", code), f"{file}: {constant} .."
        for m in re.finditer(r"\bbase\b", code):
            if file != "lib.lua":
                raise AssertionError(f"{file} reads base: a key name formed in a script")
            if (code[max(0, m.start() - 6):m.start()] == "local "
                    or code.startswith("base = ARGV[1]", m.start())):
                continue  # its definition (set by `begin` at the start of each call)
            start = code.rfind("local function ", 0, m.start())
            name = re.match(r"local function (\w+)", code[start:]) if start >= 0 else None
            assert name, "base read outside a function"
            using.add(name.group(1))
    assert using == set(FORMED_INSIDE) | NOT_KEYS


def test_the_keys_formed_inside_a_script_are_the_ones_the_docs_list() -> None:
    docs = (REPO / "docs/03-redis.md").read_text()
    section = docs.split("### Keys found while a script runs", 1)[1].split("\n#", 1)[0]
    for name in FORMED_INSIDE:
        assert f"`{name}`" in section, f"docs/03-redis.md does not say why {name} is formed"


def test_a_script_writes_only_through_w() -> None:
    """``w`` marks that the call wrote: a name not declared after that fails the call, so a
    script's discovery must name every key before its first write."""
    problems = []
    for file, text in _sources().items():
        for line, args in _calls(text, r"\bredis\.p?call\("):
            if args[0].strip("'\"") in WRITES:
                problems.append(f"{file}:{line}: {args[0]} not through w()")
        for line, args in _calls(text, r"\bw(?:_try)?\("):
            command = args[0].strip("'\"")
            assert command in WRITES, f"{file}:{line}: w({command}) is not a write"
    assert not problems, "\n".join(problems)


def test_every_formed_name_is_checked_against_keys() -> None:
    """Each name function returns its name through ``checked`` and nothing else."""
    code = (LUA / "lib.lua").read_text()
    for name in FORMED_INSIDE:
        start = code.index(f"local function {name}(")
        segment = re.split(r"\n(?=local |--|\n)", code[start:], maxsplit=1)[0]
        match = re.fullmatch(
            rf"local function {name}\([\w, ]*\)\s*return checked\((base \.\. [^\n]*)\)\s*end",
            segment)
        assert match, f"{name} does not return checked(base .. ...): {segment!r}"
        assert "checked(" not in match.group(1) and "return" not in match.group(1), name


def _callers(code: str, callee: str) -> set[str]:
    """The library's functions whose body calls ``callee``."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^local function (\w+)", code, re.M)]
    callers = set()
    for (start, name), (end, _) in zip(starts, [*starts[1:], (len(code), "")], strict=True):
        body = code[start:end].split("\n", 1)[1]
        body = "\n".join(line.split("--", 1)[0] for line in body.splitlines())
        if re.search(rf"\b{callee}\(", body):
            callers.add(name)
    return callers


def test_a_queue_walk_is_planned_by_running_it_not_by_a_copy_of_it() -> None:
    """Serving a queue decides grant by grant; its discovery runs the same walk to plan
    (``serve(keys, PLAN)``), so a decision changed in one cannot be missed by the other.
    Only the walk's acting steps tell the two runs apart; no other function plans a grant
    or names a waiter's keys for one, and every script that serves a queue plans the serve
    before its writes."""
    lib = (LUA / "lib.lua").read_text()
    assert _callers(lib, "walk_key") == {"serve"}
    assert _callers(lib, "walk_all") == {"serve"}
    assert _callers(lib, "plan_grant") == {"give"}
    assert _callers(lib, "plan_waiter") == {"meet"}
    serving = 0
    for file, text in _sources().items():
        if file == "lib.lua":
            continue
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        for callee in ("walk_key", "walk_all", "plan_grant", "plan_waiter", "meet", "give"):
            assert not re.search(rf"\b{callee}\(", code), f"{file} calls {callee}"
        writes = [m.start() for m in re.finditer(r"\b(?:serve\([^\n]*, fx\)|settle\()", code)]
        for at in writes:
            serving += 1
            plan = code.rfind(", PLAN)", 0, at)
            assert plan >= 0 and re.search(r"\bserve\([^\n]*$", code[:plan]), (
                f"{file}: a queue served without its walk planned first")
            assert code.find("planned()", plan, at) >= 0, (
                f"{file}: a planned walk whose names were not asked for before the writes")
    assert serving == 7  # (cancel.lua's serve answers whom it served, give_back.lua's hands on)


def test_a_queue_entry_is_formed_and_read_only_by_its_functions() -> None:
    """``queue_member``, ``member_waiter`` and ``member_seq`` (``lua/lib.lua``) are the
    scripts' one place for a queue entry's layout, which
    ``tests/integration/test_redis_queue_members.py`` holds to ``RedisKeys``'."""
    layout = re.compile(r"%016d|string\.sub\([^)]*, 18\)|string\.sub\([^)]*, 1, 16\)")
    found = [f"{file}:{n}" for file, text in _sources().items()
             for n, line in enumerate(text.splitlines(), 1)
             if layout.search(line) and not re.match(
                 r"local function (queue_member|member_waiter|member_seq)\(", line)]
    assert not found, f"a queue entry's layout written out again: {found}"
