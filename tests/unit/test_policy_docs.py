"""The examples of docs/08-policies.md, pasted: each is valid, and the rules do what it says."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.locks import request_for
from tests.support.queues import rig_for, settle
from tests.support.service import enhanced_locking_command, scrubbed_env

from enhanced_locking import cli
from enhanced_locking.backends import MemoryBackend
from enhanced_locking.config import load_config
from enhanced_locking.kube.lockpolicy import LockPolicySpec
from enhanced_locking.kube.overrides import policy_overrides
from enhanced_locking.policies import PolicyRules
from enhanced_locking.types import Priority, Reason

PAGE = Path(__file__).resolve().parents[2] / "docs" / "08-policies.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), re.S)


def policies() -> list[dict[str, Any]]:
    return [doc for text in blocks("yaml") if (doc := yaml.safe_load(text)).get("kind")
            == "LockPolicy"]


def rules_of(example: dict[str, Any]) -> PolicyRules:
    rules = policy_overrides(LockPolicySpec.model_validate(example["spec"]))["policies"]
    assert isinstance(rules, PolicyRules)
    return rules


def test_the_page_has_an_example_per_rule() -> None:
    kinds = {key for doc in policies() for key in doc["spec"]}
    assert {"freezes", "concurrency", "priorityRules"} <= kinds


def test_every_lockpolicy_example_is_a_valid_policy() -> None:
    for example in policies():
        assert rules_of(example)


def test_the_yaml_config_example_loads(tmp_path: Path) -> None:
    [text] = [t for t in blocks("yaml") if "enhanced-locking-policies" in t]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = load_config(yaml_file=path, env={})
    assert [f.name for f in config.policies.freezes] == ["weekend"]
    assert config.policies.concurrency[0].limit == 10


def test_a_bad_rule_in_the_yaml_config_stops_the_service_as_the_page_shows(
    tmp_path: Path,
) -> None:
    [text] = [t for t in blocks("yaml") if "enhanced-locking-policies" in t]
    [shown] = blocks("text")
    (tmp_path / "config.yaml").write_text(text.replace("limit: 10", "limit: 0"))
    result = subprocess.run([*enhanced_locking_command(), "serve", "--config", "config.yaml",
                             "--data-dir", "data", "--port", "0"], cwd=tmp_path,
                            env=scrubbed_env(), capture_output=True, text=True, timeout=60,
                            check=False)
    assert (result.returncode, result.stderr, result.stdout) == (2, shown, "")


def test_the_cli_examples_parse() -> None:
    lines = [line for text in blocks("bash") for line in text.splitlines()
             if line.startswith("enhanced-locking ")]
    assert lines
    for line in lines:
        args = cli._parser().parse_args(shlex.split(line)[1:])
        assert args.mode in ("shared", "exclusive")


async def test_the_freeze_example_refuses_prod_with_its_message() -> None:
    [example] = [p for p in policies() if "freezes" in p["spec"]]
    rules = rules_of(example)
    freeze = rules.freezes[0].model_copy(update={"from_": None, "until": None})  # now
    rig = rig_for(MemoryBackend(), policies=PolicyRules(freezes=[freeze]))
    try:
        refused = await rig.locker.acquire(request_for(repo="acme/infra", path="envs/prod"))
        assert refused.reason is Reason.FROZEN and refused.error == freeze.message
        other = await rig.locker.acquire(request_for(repo="acme/infra", path="envs/dev"))
        assert other.acquired
    finally:
        await rig.close()


async def test_the_limit_example_holds_prod_to_two() -> None:
    [example] = [p for p in policies() if "concurrency" in p["spec"]]
    rig = rig_for(MemoryBackend(), policies=rules_of(example))
    try:
        tasks = [rig.spawn(rig.locker.acquire(request_for(
            pull=n, path=f"envs/prod/p{n}").model_copy(update={"wait": timedelta(seconds=30)})))
            for n in range(1, 6)]
        await settle()
        assert sum(t.done() for t in tasks) == 2
        await rig.locker.release_by_pull("acme/infra", 1)
        await settle()
        assert sum(t.done() for t in tasks) == 3
    finally:
        await rig.close()


@pytest.mark.parametrize("asked", ["critical", "low"])
async def test_the_priority_example_gives_prod_applies_critical_and_plans_low(
        asked: str) -> None:
    [example] = [p for p in policies() if "priorityRules" in p["spec"]]
    rig = rig_for(MemoryBackend(), policies=rules_of(example), priority_queue=True)
    try:
        await rig.locker.acquire(request_for(pull=1, path="envs/prod"))
        for pull, command in ((2, "plan"), (3, "apply")):
            rig.spawn(rig.locker.acquire(request_for(pull=pull, path="envs/prod").model_copy(
                update={"wait": timedelta(seconds=30), "command": command,
                        "priority": Priority(asked)})))
            await settle()
        got = {w.owner[1]: w.priority.value for w in await rig.locker.queue(
            request_for(path="envs/prod").key)}
        assert got == ({2: "low", 3: "critical"} if asked == "critical" else {2: "low", 3: "low"})
    finally:
        await asyncio.sleep(0)
        await rig.close()
