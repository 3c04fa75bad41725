"""docs/05-importing.md's "Try it", pasted: its two blocks run as written with bash from the
repository's root (only the throwaway Redis's port and the temporary directory are this
test's), against a bbolt file the tests' writer makes and a real redis-server, and print what
the page shows."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.support.redis_server import find_redis_server, free_port
from tests.support.service import scrubbed_env

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "05-importing.md"
BLOCK = re.compile(r"<!-- example: (?P<name>[a-z-]+) -->\n```sh\n(?P<body>.*?)```", re.DOTALL)
SHOWN = re.compile(r"The second command prints:\n\n```\n(?P<out>.*?)```", re.DOTALL)
PAGE_PORT = "6399"


def test_the_try_it_imports_from_bbolt_and_redis_as_the_page_shows(tmp_path: Path) -> None:
    find_redis_server()  # fails saying how to get it
    for tool in ("go", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.fail(f"docs/05-importing.md's example needs {tool} on the PATH "
                        "(Go: hack/versions.env names the version; redis-cli: apt-get install "
                        "redis-tools)", pytrace=False)
    if not (ROOT / ".venv" / "bin" / "enhanced-locking").exists():
        pytest.fail("the page's commands need the venv: run `make venv` first", pytrace=False)
    text = DOC.read_text()
    blocks = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
    assert set(blocks) == {"import-boltdb", "import-redis"}
    assert PAGE_PORT in blocks["import-redis"]
    port = str(free_port())
    script = blocks["import-boltdb"] + blocks["import-redis"].replace(PAGE_PORT, port)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    try:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                              env=scrubbed_env({"TMPDIR": str(temporary)}),
                              capture_output=True, text=True, timeout=600, check=False)
    finally:
        subprocess.run(["redis-cli", "-p", port, "shutdown", "nosave"], capture_output=True,
                       timeout=30, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    (demo,) = temporary.iterdir()

    shown = SHOWN.search(text)
    assert shown, "the page should show what the second command prints"
    assert shown["out"].replace(".../atlantis.db", f"{demo}/atlantis.db") in done.stdout
    assert "(dry run: nothing was written)" in done.stdout
    start = done.stdout.index("{\n")
    report, end = json.JSONDecoder().raw_decode(done.stdout, start)
    assert report["summary"]["skipped"] == 2 and report["summary"]["imported"] == 0
    from_redis = done.stdout[end:]
    assert f"redis redis://127.0.0.1:{port}/0 into the boltdb backend" in from_redis
    assert re.search(r"acme/infra/envs/qa/default/ +#21 +imported", from_redis), from_redis
    assert "read 1, imported 1, skipped 0, conflicts 0, invalid 0" in from_redis
