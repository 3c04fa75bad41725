"""docs/03-redis.md's service on a local Redis, pasted: the page's block starts a throwaway
redis-server and a service on it (only the ports are this test's), a lock lands in that Redis,
and the page's ``redis-cli ... shutdown nosave`` stops it."""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from tests.support.redis_server import find_redis_server
from tests.support.service import ServiceProcess, free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "03-redis.md"
BLOCK = re.compile(r"A service on a local Redis.*?\(.*?`(?P<stop>redis-cli [^`]+)` stops it\):"
                   r"\n\n```sh\n(?P<body>.*?)```", re.DOTALL)


def test_the_local_redis_block_serves_locks_from_that_redis(
    service_process: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    found = BLOCK.search(DOC.read_text())
    assert found is not None, "docs/03-redis.md: no block for a service on a local Redis"
    start, serve = found["body"].replace("\\\n", " ").strip().splitlines()
    binaries = Path(find_redis_server()).parent
    if not (binaries / "redis-cli").exists():
        pytest.fail(f"{binaries / 'redis-cli'} is missing: run `make redis`", pytrace=False)
    port = str(free_port())

    def paste(line: str) -> str:
        script = line.replace("6379", port)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                                env={"PATH": f"{binaries}:/usr/bin:/bin"}, capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def keys() -> list[str]:
        return paste("redis-cli -p 6379 --scan --pattern 'atlantis:enhanced:*'").split()

    paste(start)
    try:
        words = shlex.split(serve.replace("6379", port))
        assert words[:2] == ["enhanced-locking", "serve"], serve
        service = service_process(*words[2:])
        answer = httpx.post(f"{service.url}/v1/locks", timeout=30, json={
            "project": {"repoFullName": "acme/infra", "path": "envs/prod"}, "pull": {"num": 12}})
        assert answer.json()["acquired"] is True
        assert answer.json()["lock"]["backend"] == "enhanced"
        assert any(key.startswith("atlantis:enhanced:enhanced:lock:") for key in keys())
    finally:
        paste(found["stop"])
    with pytest.raises(AssertionError, match="Connection refused"):
        keys()
