"""The test helpers that run the service as a process: ``running`` and ``services``, and that
the server they check is the process they started."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from tests.support.service import ServiceProcess, ServiceStartError, running, services


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


def test_a_group_starts_processes_side_by_side_and_stops_each_with_its_sigterm(
    tmp_path: Path,
) -> None:
    with services() as group:
        first, second = group.start_all([ServiceProcess(tmp_path / "a"),
                                         ServiceProcess(tmp_path / "b")])
        assert first.port != second.port
        for process in (first, second):
            assert httpx.get(f"{process.url}/healthz").status_code == 200
    for process in (first, second):
        # Shut down in order (exit 0), not killed after the grace.
        assert process.process is not None and process.process.returncode == 0
        assert process not in ServiceProcess.running


def test_a_process_of_a_group_that_does_not_come_up_fails_the_test_and_the_rest_are_stopped(
    tmp_path: Path,
) -> None:
    broken = ServiceProcess(tmp_path / "broken", args=("--enhanced-locking-max-timeout=soon",))
    spawned = ServiceProcess(tmp_path / "spawned")
    with pytest.raises(pytest.fail.Exception) as failed, services() as group:
        group.start_all([broken, spawned])
        pytest.fail("the body ran although a service did not start")
    assert "exited with 2 before serving" in str(failed.value)
    assert "max-timeout" in str(failed.value)
    assert spawned.process is not None and spawned.process.poll() is not None
    assert spawned not in ServiceProcess.running


class _Impostor(BaseHTTPRequestHandler):
    """Another run's server on the port: it answers every health check."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "15")
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def impostor(port: int = 0) -> Iterator[int]:
    """An HTTP server on ``port`` of 127.0.0.1 answering 200 to everything; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _Impostor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_first_start_serves_on_the_free_port_the_service_picked_and_a_restart_keeps_it(
    tmp_path: Path,
) -> None:
    process = ServiceProcess(tmp_path / "data")
    assert process.port_argument == "0"
    with running(process):
        port = process.port
        assert 0 < port < 65536 and process.bound_port() == port
        assert httpx.get(f"{process.url}/healthz").json() == {"status": "ok"}
        process.restart(kill=True)
        assert process.port == port and process.bound_port() == port
        assert process.argv[process.argv.index("--port") + 1] == str(port)
        assert httpx.get(f"{process.url}/healthz").status_code == 200


def test_a_service_logging_only_warnings_still_names_its_port_and_restarts_on_it(
    tmp_path: Path,
) -> None:
    with running(ServiceProcess(tmp_path / "data", args=("--log-level", "warning"))) as process:
        port = process.port
        assert " WARNING enhanced_locking: listening on " in process.stderr()
        process.restart()
        assert process.port == port and process.bound_port() == port


def test_another_server_on_the_port_is_never_taken_for_the_service(tmp_path: Path) -> None:
    with impostor() as port:
        process = ServiceProcess(tmp_path / "data", port=port)
        with pytest.raises(pytest.fail.Exception) as failed, running(process):
            pytest.fail("the impostor's answer was taken for the service's")
    assert "exited with 2 before serving" in str(failed.value)
    assert "address already in use" in str(failed.value)


def test_a_restart_whose_port_was_taken_meanwhile_fails_instead_of_serving_the_other(
    tmp_path: Path,
) -> None:
    process = ServiceProcess(tmp_path / "data")
    with running(process):
        process.kill()
        with impostor(process.port), pytest.raises(ServiceStartError) as failed:
            process.start()
    assert "address already in use" in str(failed.value)
