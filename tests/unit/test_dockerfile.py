"""The Dockerfile, read as Docker reads it, agrees with the project it packages.

No Docker engine runs here, so the image is not built by the tests: instead the Dockerfile is
parsed into instructions and checked against pyproject.toml (what the wheel needs, the console
script, the Python version), the CLI (the default command exists) and the runtime contract the
Helm chart relies on (a numeric non-root user, /data as the store, a read-only root filesystem).
``hack/kind-e2e.sh`` builds and runs the image where Docker exists.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

from enhanced_locking import cli

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case), its argument text, its stage."""

    keyword: str
    text: str
    stage: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Splits a Dockerfile into instructions: joins ``\\`` continuations, drops comments."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments, also inside continuations, are removed by Docker's parser
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        if not whole:
            continue
        keyword, _, rest = whole.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, rest.strip(), stage))
    return instructions


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), text
    return value


def _key_values(text: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs of ENV/LABEL/ARG (quotes removed)."""
    pairs: dict[str, str] = {}
    for token in shlex.split(text):
        key, _, value = token.partition("=")
        pairs[key] = value
    return pairs


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _final_stage(instructions: list[Instruction]) -> int:
    return max(i.stage for i in instructions)


def _in_stage(instructions: list[Instruction], stage: int, keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.stage == stage and i.keyword == keyword]


def test_the_base_image_is_a_build_argument_used_by_every_stage(
    instructions: list[Instruction], pyproject: dict[str, Any]
) -> None:
    first = instructions[0]
    assert first.keyword == "ARG" and first.stage == -1, "ARG PYTHON_IMAGE must precede FROM"
    name, _, default = first.text.partition("=")
    assert name == "PYTHON_IMAGE"
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "a multi-stage build: the wheel is built in its own stage"
    for instruction in froms:
        assert instruction.text.split()[0] == "${PYTHON_IMAGE}", instruction.text
    match = re.fullmatch(r"python:(\d+\.\d+)(-slim.*)", default)
    assert match, f"the default base should be a slim CPython image, got {default!r}"
    assert match[1] in SpecifierSet(pyproject["project"]["requires-python"]), (
        f"{default} does not satisfy requires-python {pyproject['project']['requires-python']}"
    )


def test_the_first_stage_builds_the_wheel_from_what_pyproject_needs(
    instructions: list[Instruction], pyproject: dict[str, Any]
) -> None:
    build_from = next(i for i in instructions if i.keyword == "FROM")
    assert " AS " in build_from.text.upper(), "the build stage is named, for COPY --from"
    build_name = build_from.text.split()[-1]
    copied = set()
    for copy in _in_stage(instructions, 0, "COPY"):
        *sources, _destination = shlex.split(copy.text)
        copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["setuptools"]["packages"]["find"]["where"])
    assert needed <= copied, f"the build stage must COPY {sorted(needed - copied)}"
    runs = " ".join(i.text for i in _in_stage(instructions, 0, "RUN"))
    assert re.search(r"pip wheel .*--no-deps", runs), "the project's wheel is built with pip"
    final = _final_stage(instructions)
    assert any(
        i.text.startswith(f"--from={build_name} ") for i in _in_stage(instructions, final, "COPY")
    ), "the runtime stage copies the installed wheel from the build stage"
    assert not _in_stage(instructions, final, "RUN") or all(
        "pip" not in i.text for i in _in_stage(instructions, final, "RUN")
    ), "nothing is pip-installed in the runtime stage"


def test_the_image_runs_as_a_numeric_non_root_user(instructions: list[Instruction]) -> None:
    users = _in_stage(instructions, _final_stage(instructions), "USER")
    assert users, "the runtime stage sets USER"
    user, _, group = users[-1].text.partition(":")
    assert user.isdigit() and int(user) != 0, "numeric, so the kubelet can check runAsNonRoot"
    assert group.isdigit() and int(group) != 0


def test_the_image_works_with_a_read_only_root_filesystem(
    instructions: list[Instruction],
) -> None:
    final = _final_stage(instructions)
    env: dict[str, str] = {}
    for instruction in _in_stage(instructions, final, "ENV"):
        env |= _key_values(instruction.text)
    volumes = [v for i in _in_stage(instructions, final, "VOLUME") for v in _exec_form(i.text)]
    assert env.get("ATLANTIS_DATA_DIR") in volumes, "the embedded store lives on a volume"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", "no .pyc is written at run time"
    assert env.get("HOME") == "/tmp", "HOME points at the one writable scratch mount"
    runs = " ".join(i.text for i in _in_stage(instructions, 0, "RUN"))
    assert "compileall" in runs, "bytecode is compiled at build time instead"


def test_the_entrypoint_is_the_console_script_and_the_default_command_exists(
    instructions: list[Instruction], pyproject: dict[str, Any]
) -> None:
    final = _final_stage(instructions)
    entrypoint = _exec_form(_in_stage(instructions, final, "ENTRYPOINT")[-1].text)
    assert entrypoint == ["enhanced-locking"]
    assert "enhanced-locking" in pyproject["project"]["scripts"]
    command = _exec_form(_in_stage(instructions, final, "CMD")[-1].text)
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0, f"`enhanced-locking {' '.join(command)}` is not a command"


def test_the_image_carries_oci_labels(
    instructions: list[Instruction], pyproject: dict[str, Any]
) -> None:
    labels: dict[str, str] = {}
    for instruction in _in_stage(instructions, _final_stage(instructions), "LABEL"):
        labels |= _key_values(instruction.text)
    prefix = "org.opencontainers.image."
    for name in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert prefix + name in labels, f"missing label {prefix}{name}"
    assert labels[prefix + "licenses"] == pyproject["project"]["license"]  # an SPDX string
    args = {
        i.text.partition("=")[0]: i.text.partition("=")[2]
        for i in instructions
        if i.keyword == "ARG"
    }
    assert labels[prefix + "version"] == "${VERSION}"
    assert args["VERSION"] == pyproject["project"]["version"], "the default VERSION is pyproject's"


# --- .dockerignore ---------------------------------------------------------------------------


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go's filepath.Match plus ``**``)."""
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        i += 1
    return re.compile(out)


def docker_ignores(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context (the last match decides)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        exception = raw.startswith("!")
        pattern = raw.removeprefix("!").strip().strip("/")
        regex = _docker_pattern(pattern)
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_build_context_has_every_file_the_wheel_needs(
    instructions: list[Instruction], ignore_patterns: list[str]
) -> None:
    for copy in _in_stage(instructions, 0, "COPY"):
        *sources, _destination = shlex.split(copy.text)
        for source in sources:
            root = REPO_ROOT / source
            files = [root] if root.is_file() else [p for p in root.rglob("*.py")]
            assert files, f"COPY {source}: nothing there"
            for file in files:
                relative = file.relative_to(REPO_ROOT).as_posix()
                assert not docker_ignores(ignore_patterns, relative), f"{relative} is ignored"


@pytest.mark.parametrize(
    "path",
    [".git/config", ".venv/bin/python", "tests/unit/test_dockerfile.py", "charts/x/values.yaml",
     "operator/enhanced_locking/__pycache__/cli.cpython-311.pyc", "enhanced-locking.db"],
)
def test_the_build_context_leaves_out_everything_else(
    ignore_patterns: list[str], path: str
) -> None:
    assert docker_ignores(ignore_patterns, path)
