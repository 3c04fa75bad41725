"""The enhanced locker on etcd against the same reference model as the in-process stores.

:mod:`tests.unit.test_locker_model` drives acquire (fail fast or waiting), batch, release,
force-unlock, release by pull, cancel, lease timers and time passing, and after every step
compares the real locker with a model written from the rules. The etcd backend takes the
model's clock like the in-process stores (its time is the replica's clock, see
``etcd_store``), so time passes here too; etcd's own lease timers run on real time, so the
lease backstop is off. Fencing tokens are etcd revisions: the model checks that each grant's
token is above every earlier one of its key (see ``same_token``). Each example gets a key
prefix of its own on the session's etcd.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, settings
from tests.support.etcd_fixtures import etcd_config
from tests.support.etcd_server import EtcdCluster
from tests.support.queues import rig_for
from tests.unit.test_locker_model import LockerModel

from enhanced_locking.backends.etcd_connection import EtcdConnection, EtcdSettings
from enhanced_locking.backends.etcd_store import EtcdBackend
from enhanced_locking.locking.leasing import LeaseTimers

pytestmark = pytest.mark.etcd

_CLUSTER: list[EtcdCluster] = []
_EXAMPLES = iter(range(1, 1_000_000))


@pytest.fixture(autouse=True, scope="module")
def _etcd(etcd_cluster: EtcdCluster) -> None:
    _CLUSTER[:] = [etcd_cluster]


class EtcdLockerModel(LockerModel):
    """The model over an EtcdBackend on the model's clock."""

    def __init__(self) -> None:
        super().__init__()  # builds an in-process rig; replaced below
        config = etcd_config(_CLUSTER[0], f"/model-{next(_EXAMPLES)}/")
        backend = EtcdBackend(EtcdConnection(EtcdSettings.from_config(config)),
                              prefix=config.etcd_key_prefix, clock=self.clock,
                              lease_backstop=False)
        self.run(self.rig.locker.backend.close())
        old = self.rig.settings
        self.rig = rig_for(backend, **{k: v for k, v in old.items() if k != "enabled"})
        self.rig.locker.leases = LeaseTimers(self.rig.locker.expire,
                                             clock=lambda: self.clock.now.replace(year=1970))
        self.revisions: dict[str, dict[int, int]] = {}

    async def settle(self) -> None:
        """Until no call waits for etcd (a grant's notice is delivered when its step commits)."""
        backend = self.rig.locker.backend
        assert isinstance(backend, EtcdBackend)
        quiet = 0
        while quiet < 3:
            for _ in range(12):
                await asyncio.sleep(0)
            await asyncio.sleep(0.002)
            quiet = 0 if backend.in_flight else quiet + 1

    def same_token(self, path: str, model: int, actual: int) -> bool:
        """The model's n-th grant of a key is a revision above every earlier grant's."""
        seen = self.revisions.setdefault(path, {})
        if model in seen:
            return seen[model] == actual
        if any((m < model) != (a < actual) for m, a in seen.items()):
            return False
        seen[model] = actual
        return True


EtcdLockerModel.TestCase.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TestLockerOnEtcd = EtcdLockerModel.TestCase
