"""A configuration change the service refuses is counted and told, as an applied one is: the
chart's ``EnhancedLockingConfigRejected`` alert reads
``enhanced_locking_config_changes_total{result!="applied"}``, and ``GET /v1/events`` lists
``config-rejected`` among its types."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest

from enhanced_locking.config import ConfigError, EnhancedLockingConfig
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider, ConfigRejected
from enhanced_locking.types import Event


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed): a connect is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _count(service: LockService, result: str) -> float | None:
    return service.metrics.registry.get_sample_value(
        "enhanced_locking_config_changes_total", {"result": result})


async def test_a_refused_configuration_change_is_counted_and_told() -> None:
    service = LockService(ConfigProvider(EnhancedLockingConfig(
        enabled=True, backend="memory", legacy_backend="memory")))
    await service.start()
    seen: list[Event] = []
    service.events.subscribe(seen.append)
    try:
        # Both results are exported from the start, at 0: Prometheus's increase() does not
        # count the first sample of a series, so a first refusal counted from nothing (the
        # series appearing at 1) would never fire the alert.
        assert _count(service, "rejected") == 0
        before = service.provider.current

        # A layer that makes no valid configuration (a maximum wait below the default one).
        with pytest.raises(ConfigError):
            await service.provider.set_layer("cluster", {
                "default_timeout": timedelta(minutes=10), "max_timeout": timedelta(minutes=1)})
        # A valid one an applier refuses: a Redis that does not answer.
        with pytest.raises(ConfigRejected):
            await service.provider.set_layer("cluster", {
                "backend": "redis", "redis_addr": f"127.0.0.1:{_closed_port()}"})

        assert service.provider.current is before
        assert _count(service, "rejected") == 2
        rejected = [e for e in seen if e.type == "config-rejected"]
        assert len(rejected) == 2, [e.type for e in seen]
        assert all(e.details["generation"] == before.generation for e in rejected)
        assert "max" in rejected[0].details["message"], rejected[0].details
        assert rejected[1].details["layer"] == "cluster"

        applied = await service.provider.set_layer("cluster", {"retries": True})
        assert _count(service, "applied") == 2  # the first snapshot's and this one
        assert [e.details["generation"] for e in seen if e.type == "config-applied"] == [
            applied.generation]
    finally:
        await service.close()
