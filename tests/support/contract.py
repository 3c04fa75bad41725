"""What the schemathesis runs share: the command, and the configuration next to the tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

__all__ = ["CONFIG", "schemathesis_command"]

CONFIG = Path(__file__).parents[1] / "integration" / "schemathesis.toml"


def schemathesis_command() -> list[str]:
    """The installed ``schemathesis`` next to this interpreter; the test fails without it."""
    script = Path(sys.executable).parent / "schemathesis"
    if not script.exists():
        pytest.fail("schemathesis is not installed in this environment; run `make venv` "
                    "(it is in the test extras of pyproject.toml)", pytrace=False)
    return [str(script)]
