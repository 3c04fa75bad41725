"""docs/08-policies.md's "plan shared, apply exclusive" commands, pasted: run as written against
a real ``enhanced-locking serve --enhanced-locking-enabled`` (only its address is this test's),
the plan is granted shared and the apply of the same pull, its only holder, exclusive at once."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from tests.support.pasting import answers, run_block
from tests.support.service import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "08-policies.md"
BLOCK = re.compile(r"<!-- example: plan-shared-apply-exclusive -->\n```bash\n(?P<body>.*?)```",
                   re.DOTALL)


def test_a_plan_is_shared_and_the_apply_of_its_pull_exclusive(
        service_process: Callable[..., ServiceProcess]) -> None:
    found = BLOCK.search(PAGE.read_text())
    assert found is not None, "docs/08-policies.md: no plan-shared-apply-exclusive block"
    assert "--enhanced-locking-enabled" in found["body"]
    service = service_process("--enhanced-locking-enabled")
    plan, apply = answers(run_block(found["body"], url=service.url, cwd=ROOT))
    assert plan["acquired"] is True and apply["acquired"] is True
    assert (plan["lock"]["mode"], apply["lock"]["mode"]) == ("shared", "exclusive")
    assert plan["lock"]["backend"] == apply["lock"]["backend"] == "enhanced"
    assert apply["lock"]["key"] == plan["lock"]["key"] == "acme/infra/envs/prod/default/"
    assert apply["lock"]["fencingToken"] > plan["lock"]["fencingToken"]  # a new grant
