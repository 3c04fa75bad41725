"""schemathesis against ``/openapi.json`` with authentication on: every generated request sent
without a token gets a documented answer and never a server error; and with an admin's token on
the Redis store (a real redis-server), every check of the embedded store's run in
test_api_contract.py passes too (the audit trail, the queues and the locks are Redis's there).

An admin's generated requests run once, on Redis, with every check. They are the same requests
(one schema, one seed) as the embedded store's run in test_api_contract.py, where authentication
is off and every check, "no server error" among them, runs too. A third run of them, on the
embedded store with an admin's token and the server-error check alone, checked nothing these two
do not (a store is not told who asks, beyond the identity an audit row keeps as text).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.contract import CONFIG, schemathesis_command
from tests.support.redis_server import RedisServer
from tests.support.service import ServiceProcess, running

TOKEN = "contract-admin-token-5d0c1f"


def _with_tokens(root: Path, *flags: str) -> ServiceProcess:
    tokens = root / "tokens.csv"
    tokens.write_text(f"{TOKEN},contract-admin,,\n")
    return ServiceProcess(root / "data", log_dir=root / "logs", args=(
        "--enhanced-locking-enabled", "--enhanced-locking-max-timeout=1s",
        "--enhanced-locking-default-timeout=1s", "--enhanced-locking-audit-stdout=false",
        "--enhanced-locking-auth=static", f"--enhanced-locking-auth-tokens-file={tokens}",
        "--enhanced-locking-auth-roles=admin=user:contract-admin", *flags))


def _schemathesis(url: str, cwd: Path, *, checks: str, headers: list[str],
                  ) -> subprocess.CompletedProcess[str]:
    # The configuration bounds the event stream's cases (see schemathesis.toml).
    return subprocess.run([
        *schemathesis_command(), "--config-file", str(CONFIG), "run", url + "/openapi.json",
        "--checks", checks, "--max-examples", "15", "--request-timeout", "10",
        "--workers", "1", "--seed", "1", "--no-color", *headers,
    ], capture_output=True, text=True, timeout=840, cwd=cwd)


def _passed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-4000:]
    counted = [line for line in result.stdout.splitlines() if " generated, " in line]
    assert counted and counted[-1].strip().endswith("passed"), result.stdout[-3000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with running(_with_tokens(tmp_path_factory.mktemp("contract-auth"))) as process:
        yield process


@pytest.mark.timeout(900)
def test_no_generated_request_without_a_token_gets_a_server_error(
    served: ServiceProcess, tmp_path: Path,
) -> None:
    _passed(_schemathesis(served.url, tmp_path, checks="not_a_server_error", headers=[]))
    assert "500 Internal Server Error" not in served.output()


@pytest.mark.redis
@pytest.mark.timeout(900)
def test_every_check_passes_on_redis_with_an_admin_token(
    redis_server: RedisServer, tmp_path: Path,
) -> None:
    process = _with_tokens(tmp_path, "--enhanced-locking-backend=redis",
                           f"--enhanced-locking-redis-addr={redis_server.addr}")
    with running(process):
        result = _schemathesis(process.url, tmp_path, checks="all",
                               headers=["-H", f"Authorization: Bearer {TOKEN}"])
        _passed(result)
        assert "500 Internal Server Error" not in process.output()
