"""The test helpers that run the service as a process: ``running`` and ``services``."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.service import ServiceProcess, running, services


def test_a_service_that_does_not_come_up_fails_the_test_with_its_output(tmp_path: Path) -> None:
    broken = ServiceProcess(tmp_path / "data", args=("--enhanced-locking-max-timeout=soon",))
    with pytest.raises(pytest.fail.Exception) as failed, running(broken):
        pytest.fail("the body ran although the service did not start")
    assert "exited with 2 before serving" in str(failed.value)
    assert "max-timeout" in str(failed.value)


def test_every_process_a_group_started_is_stopped_even_when_the_body_raises(
    tmp_path: Path,
) -> None:
    with pytest.raises(RuntimeError), services() as group:
        first = group.start(ServiceProcess(tmp_path / "a"))
        second = group.start(ServiceProcess(tmp_path / "b"))
        assert first.process is not None and first.process.poll() is None
        raise RuntimeError("the test body broke")
    for process in (first, second):
        assert process.process is not None and process.process.poll() is not None
        assert process not in ServiceProcess.running
