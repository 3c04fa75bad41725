"""Fixtures every test tier shares.

* ``free_port()``: a free TCP port of 127.0.0.1 (tests never depend on a fixed port).
* ``data_dir``: an empty data dir (``--data-dir``) private to the test.
* ``service_process(*flags, env=..., data_dir=...)``: starts ``enhanced-locking serve`` as a real
  process on a free loopback port and waits for ``/healthz``. The answer has ``.url``,
  ``.process``, ``.stop()``, ``.kill()`` (SIGKILL) and ``.restart()`` (same port, same data dir).
  Processes still running at the end of the test are stopped; when a test fails, the output of
  its processes is added to the report.
* ``unlocked_url``: the URL of one such process (no flags) shared by a module's tests, for
  tests that never take a lock on it: a start and a stop for the module, not for each test.
* ``service``: a :class:`LockService` in this process (provider, lockers, router), started and
  closed around the test. Override ``service_settings`` in a module to configure it, or call
  ``make_service(**settings)`` for several.
* ``backend_factory``: parametrised over every backend kind in ``BACKEND_KINDS``
  (``tests/support/backends.py``); calling it gives a backend of that kind on a store private to
  the test (all calls in one test share the store, so namespaces can be checked against each
  other). Add a kind there and every test using ``backend_factory`` runs against it too.

Hypothesis runs under one profile for every tier: no per-example deadline and no "too slow"
health check, since tests never fail on speed (a loaded machine slowed an example past
Hypothesis's default 200 ms, and the test failed for it).
"""

from __future__ import annotations

import collections
import gc
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # `tests.support` without installing the tests
    sys.path.insert(0, str(_REPO_ROOT))

from tests.support import service as service_support  # noqa: E402
from tests.support.backends import BACKEND_KINDS, BackendFactory  # noqa: E402
from tests.support.service import ServiceProcess, services, serving  # noqa: E402

from enhanced_locking.backends import EmbeddedBackend  # noqa: E402
from enhanced_locking.config import EnhancedLockingConfig  # noqa: E402
from enhanced_locking.factory import LockService  # noqa: E402
from enhanced_locking.provider import ConfigProvider  # noqa: E402

settings.register_profile(
    "enhanced-locking", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("enhanced-locking")

pytest_plugins = [
    "tests.support.redis_fixtures",  # redis_server, redis_servers
    "tests.support.etcd_fixtures",  # etcd_cluster, etcd_prefix, three
    "tests.support.queues",  # queue_backend_factory, rigs
    "tests.support.bbolt_writer",  # bolt_writer
]

# --- where the time goes ----------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--durations-by-file", type=int, default=0, metavar="N",
        help="list the N test files that took longest (their tests' setup, call and teardown, "
             "module fixtures included)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    """With ``--durations-by-file=N``: the N test files that took longest, and their tests."""
    count: int = config.getoption("durations_by_file")
    if count <= 0:
        return
    seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
    tests: collections.Counter[str] = collections.Counter()
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(report, pytest.TestReport):
                path = report.nodeid.split("::", 1)[0]
                seconds[path] += report.duration
                tests[path] += report.when == "call"
    terminalreporter.write_sep("=", f"slowest {count} test files")
    for path, took in sorted(seconds.items(), key=lambda item: -item[1])[:count]:
        terminalreporter.write_line(f"{took:9.1f}s {tests[path]:6d} tests  {path}")
    terminalreporter.write_line(f"{sum(seconds.values()):9.1f}s {sum(tests.values()):6d} tests  "
                                f"in {len(seconds)} files")


# --- garbage collection ------------------------------------------------------------------------


def pytest_collection_finish(session: pytest.Session) -> None:
    """Leave what lives for the whole run out of every later full garbage collection.

    After collection the process holds about 200,000 objects that live until it ends (every
    imported module, every collected test). A full collection walked them all each time: about
    0.2 s of CPU, which on a loaded machine was a pause of up to 5 s in the middle of a test,
    long enough for a store call's own 5 s limit to run out (a Redis Cluster acquire was
    answered ``did not answer``). Frozen, they are skipped; the tests' own garbage is still
    collected as before.
    """
    gc.collect()
    gc.freeze()


# --- ports and directories -------------------------------------------------------------------


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` gives a TCP port of 127.0.0.1 that nothing listens on."""
    return service_support.free_port


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data dir for the embedded store (``{data_dir}/enhanced-locking.db``)."""
    path = tmp_path / "data"
    path.mkdir()
    return path


# --- the service as a real process -----------------------------------------------------------

_STARTED = pytest.StashKey[list[ServiceProcess]]()
ServiceFactory = Callable[..., ServiceProcess]


@pytest.fixture(scope="module")
def unlocked_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of an ``enhanced-locking serve`` process (no flags) that a module's tests share,
    started once: for tests that never take a lock on it (their calls only read, or are
    refused before they reach it), so that each finds it as the last left it: holding none."""
    with serving(tmp_path_factory.mktemp("unlocked")) as service:
        yield service.url


@pytest.fixture
def service_process(
    request: pytest.FixtureRequest, tmp_path: Path, data_dir: Path
) -> Iterator[ServiceFactory]:
    """Start ``enhanced-locking serve`` processes: ``service_process("--flag=v", env={...})``."""
    with services(request.node.stash.setdefault(_STARTED, [])) as group:
        def start(
            *flags: str, env: Mapping[str, str] | None = None, data_dir: Path = data_dir
        ) -> ServiceProcess:
            return group.start(ServiceProcess(data_dir, args=flags, env=env,
                                              log_dir=tmp_path / "logs"))

        yield start


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, add the output of the test's service processes (and any still running)."""
    report = yield
    if report.failed:
        started = item.stash.get(_STARTED, None)
        processes = list(started or ())
        processes += [p for p in ServiceProcess.running if p not in processes]
        for process in processes:
            report.sections.append((f"enhanced-locking serve: {process.name}", process.output()))
    return report


# --- the service in this process -------------------------------------------------------------

ServiceMaker = Callable[..., Awaitable[LockService]]


@pytest.fixture
async def make_service(data_dir: Path) -> AsyncIterator[ServiceMaker]:
    """``await make_service(enabled=True, ...)``: a started LockService over those settings.

    Settings are the config model's field names; the data dir defaults to ``data_dir``.
    """
    services: list[LockService] = []

    async def make(**settings: Any) -> LockService:
        config = EnhancedLockingConfig(**{"data_dir": str(data_dir), **settings})
        service = LockService(ConfigProvider(config))
        await service.start()
        services.append(service)
        return service

    yield make
    for service in reversed(services):
        await service.close()


StoreOpener = Callable[[LockService, str], EmbeddedBackend]


@pytest.fixture
async def store() -> AsyncIterator[StoreOpener]:
    """``store(service, namespace)``: another connection to a service's store file, as a
    replica that can still reach it has (tests plant data behind the service's back through
    it); closed at the end."""
    opened: list[EmbeddedBackend] = []

    def open_store(service: LockService, namespace: str) -> EmbeddedBackend:
        opened.append(EmbeddedBackend(service.provider.current.config.data_path, namespace))
        return opened[-1]

    yield open_store
    for backend in opened:
        await backend.close()


@pytest.fixture
def service_settings() -> dict[str, Any]:
    """Settings of the ``service`` fixture; override this fixture to change them."""
    return {}


@pytest.fixture
async def service(make_service: ServiceMaker, service_settings: dict[str, Any]) -> LockService:
    """A started in-process LockService (embedded store in ``data_dir`` unless overridden)."""
    return await make_service(**service_settings)


# --- backends of every kind ------------------------------------------------------------------


@pytest.fixture(
    params=[pytest.param(name, marks=kind.marks, id=name) for name, kind in BACKEND_KINDS.items()]
)
async def backend_factory(request: pytest.FixtureRequest) -> AsyncIterator[BackendFactory]:
    """Backends of each kind in ``BACKEND_KINDS`` in turn (the test runs once per kind)."""
    kind = BACKEND_KINDS[request.param]
    factory = BackendFactory(request.param, kind.setup(request), persistent=kind.persistent,
                             revision_tokens=kind.revision_tokens)
    yield factory
    await factory.close()
