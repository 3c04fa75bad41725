"""schemathesis against ``/openapi.json`` with authentication on: every generated request, sent
with an admin's token and without one, gets a documented answer and never a server error."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.contract import CONFIG, schemathesis_command
from tests.support.service import ServiceProcess, running

TOKEN = "contract-admin-token-5d0c1f"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    root = tmp_path_factory.mktemp("contract-auth")
    tokens = root / "tokens.csv"
    tokens.write_text(f"{TOKEN},contract-admin,,\n")
    process = ServiceProcess(root / "data", log_dir=root / "logs", args=(
        "--enhanced-locking-enabled", "--enhanced-locking-max-timeout=1s",
        "--enhanced-locking-default-timeout=1s", "--enhanced-locking-audit-stdout=false",
        "--enhanced-locking-auth=static", f"--enhanced-locking-auth-tokens-file={tokens}",
        "--enhanced-locking-auth-roles=admin=user:contract-admin"))
    with running(process):
        yield process


@pytest.mark.timeout(900)
@pytest.mark.parametrize("headers", [["-H", f"Authorization: Bearer {TOKEN}"], []],
                         ids=["admin", "no-token"])
def test_no_generated_request_gets_a_server_error(
    served: ServiceProcess, tmp_path: Path, headers: list[str],
) -> None:
    result = subprocess.run([
        # The configuration bounds the event stream's cases (see schemathesis.toml).
        *schemathesis_command(), "--config-file", str(CONFIG), "run", served.url + "/openapi.json",
        "--checks", "not_a_server_error", "--max-examples", "15", "--request-timeout", "10",
        "--workers", "1", "--seed", "1", "--no-color", *headers,
    ], capture_output=True, text=True, timeout=840, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-4000:]
    counted = [line for line in result.stdout.splitlines() if " generated, " in line]
    assert counted and counted[-1].strip().endswith("passed"), result.stdout[-3000:]
    assert "500 Internal Server Error" not in served.output()
