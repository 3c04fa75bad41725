"""The static-token example of docs/08-access.md, pasted: it runs as written with bash (only the
port and the home directory are this test's) and does what the page says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support.service import free_port, scrubbed_env

DOC = Path(__file__).resolve().parents[2] / "docs" / "08-access.md"
BLOCK = re.compile(r"<!-- example: (?P<name>[a-z-]+) -->\n```bash\n(?P<body>.*?)```", re.DOTALL)


def test_the_static_token_example_runs_as_written(tmp_path: Path) -> None:
    blocks = {m["name"]: m["body"] for m in BLOCK.finditer(DOC.read_text())}
    port = str(free_port())
    script = blocks["static"].replace("4142", port)
    env = scrubbed_env({
        "HOME": str(tmp_path), "ENHANCED_LOCKING_PORT": port,
        "ENHANCED_LOCKING_URL": f"http://127.0.0.1:{port}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "401"
    assert json.loads(lines[1])["acquired"] is True
    assert json.loads(lines[2])["verb"] == "force-unlock"
    assert lines[3].strip() == '"released": true,'
    audit = [json.loads(line) for line in lines if line.startswith('{"id"')]
    assert [(row["identity"], row["action"], row["outcome"]) for row in audit] == [
        ("alice", "force-unlock", "released"),
        ("atlantis", "force-unlock", "denied"),
        ("atlantis", "acquire", "acquired"),
    ]
    assert (tmp_path / ".atlantis" / "enhanced-locking.db").exists()
    assert "tok-" not in (tmp_path / "audit.jsonl").read_text()
