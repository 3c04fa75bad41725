"""The ``enhanced-locking`` command.

::

    enhanced-locking [--version] [--url URL] [--token TOKEN] COMMAND ...
    enhanced-locking serve [--host H] [--port P] [--config FILE] [--enhanced-locking-* ...]
    enhanced-locking operator [--namespace NS] [--policy NAME] [--migration NAME] [serve flags]
    enhanced-locking config show [--config FILE] [--enhanced-locking-* ...]
    enhanced-locking lock acquire|release|list|unlock-pull ...   (talks to a running service)
    enhanced-locking step acquire|release [--command plan|apply|import|state] [--wait D]
    enhanced-locking audit [--identity NAME] [--action A] [--repo R] [--key K] [--limit N] [--all]
    enhanced-locking migrate import (--from-boltdb FILE | --from-redis URL) [--dry-run]
                                    [--output table|json] [--enhanced-locking-* ...]

Exit codes: 0 done; 1 refused (lock held, not found, not owned; ``serve``: its store could not
be opened); 2 invalid usage, config or URL (``serve``: also an address it cannot listen on);
3 the service could not be reached or could not serve the call now (its 503 or 429: a store
did not answer, it is overloaded), took the call and sent no answer in time, or what answered
is not the service.
What goes to stdout and stderr is :mod:`enhanced_locking.terminal`'s one convention. ``--url``,
``--token`` and ``--connect-timeout`` may stand before or after any command word.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import ValidationError

from enhanced_locking import steps, terminal, watching
from enhanced_locking.durations import parse_duration
from enhanced_locking.service_address import (
    CONNECT_TIMEOUT_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_URL,
    TOKEN_ENV,
    URL_ENV,
    service_url,
    token_problem,
)
from enhanced_locking.types import LockRequest, Reason, UnusableSetting

if TYPE_CHECKING:
    # Loaded by the commands that use them: a command that only calls the service never reads
    # the settings' model, one that never calls it never loads the HTTP client.
    from enhanced_locking import config as config_module
    from enhanced_locking.client import Client

__all__ = ["main"]

log = logging.getLogger("enhanced_locking")

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = (
    terminal.EXIT_REFUSED, terminal.EXIT_USAGE, terminal.EXIT_UNREACHABLE)
PROG = "enhanced-locking"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A flag is taken only as written, as Go's flags (Atlantis's) take it: argparse's
        # default took any unambiguous prefix (--enhanced-locking-enable turned the system on).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._later: list[Callable[[argparse.ArgumentParser], None]] = []

    def add_later(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        """Have ``add`` put its arguments on this parser when it is first used (it parses or
        shows its help), not when the command's parsers are built: the settings' ~80 flags
        are built from the config model, which only a few commands load."""
        self._later.append(add)

    def _add_left(self) -> None:
        while self._later:
            self._later.pop(0)(self)

    def complete(self) -> None:
        """Add every argument left for later, now (also each subcommand's parser's)."""
        self._add_left()
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for parser in action.choices.values():
                    if isinstance(parser, _Parser):
                        parser.complete()

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        # argparse hands a subcommand's words to that parser's parse_known_args: only the
        # command that runs gets its arguments added.
        self._add_left()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_left()
        return super().format_help()

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {_unknown(unknown)}")
        return parsed

    def error(self, message: str) -> NoReturn:  # argparse's default exit code is already 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _unknown(arguments: Sequence[str]) -> str:
    """Unrecognized arguments as an error may show them: a misspelled flag's value (which may
    be a password, ``--enhanced-locking-redis-pasword=...``) is left out."""
    shown: list[str] = []
    after_flag = False
    for argument in arguments:
        if argument.startswith("-"):
            flag, sep, _ = argument.partition("=")
            shown.append(f"{flag}=(value not shown)" if sep else flag)
            after_flag = not sep
        elif after_flag:
            shown.append("(value not shown)")
            after_flag = False
        else:
            shown.append(argument)
    return " ".join(shown)


def _load(args: argparse.Namespace) -> config_module.EnhancedLockingConfig:
    return _load_sourced(args)[0]


def _load_sourced(
    args: argparse.Namespace,
) -> tuple[config_module.EnhancedLockingConfig, config_module.Sources]:
    """The config of the flags, env and YAML (a bad one: one line, exit 2), and where each
    setting's value came from."""
    from enhanced_locking import config as config_module

    try:
        return config_module.load_sourced(
            flags=config_module.flags_from_namespace(args), yaml_file=args.config_file
        )
    except config_module.ConfigError as error:
        print(f"enhanced-locking: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _sourced(error: Exception, sources: config_module.Sources | None) -> str:
    """A setting the store cannot use, in the one line of a bad value: with where it came
    from (any other error as it is)."""
    if isinstance(error, UnusableSetting) and sources is not None:
        return (f"invalid setting {error.setting} (from {sources.of_key(error.setting)}): "
                f"{error.detail}")
    return str(error)


def _print(data: Any) -> None:
    terminal.print_json(data)


def listening_url(sock: socket.socket, *, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


# --- serve -----------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    config, sources = _load_sourced(args)
    port = _port_setting(args)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run_service(config, args.host, port, sources=sources))




def _port(value: str) -> int:
    """An argparse type: a TCP port, ASCII digits from 0 to 65535 (0: a free port the system
    picks, which the "listening on" log line names)."""
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 0 <= int(value) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected a port from 0 to 65535 (0: any free port), got {value!r}")
    return int(value)


def _port_setting(args: argparse.Namespace) -> int:
    """``--port``, else ``ENHANCED_LOCKING_PORT``, else 4142; a bad one exits 2 naming it."""
    if args.port is not None:
        return int(args.port)
    raw = os.environ.get("ENHANCED_LOCKING_PORT", "4142")
    try:
        return _port(raw)
    except argparse.ArgumentTypeError as error:
        print(f"enhanced-locking: invalid setting ENHANCED_LOCKING_PORT: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _listen(host: str, port: int) -> socket.socket:
    """Bind the API's socket before anything starts: a port in use (or a host that is not
    this machine's) is the user's setting, one line and exit 2, not uvicorn's exit code."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        print(f"enhanced-locking: cannot listen on {host}:{port} (--host/--port): {reason}",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    sock.set_inheritable(True)
    return sock


def _access_settings_unused(config: config_module.EnhancedLockingConfig) -> list[str]:
    """The access settings given that auth none does not use (named as settings, never their
    values): with them, a service reads as one that checks tokens while anyone may call it."""
    from enhanced_locking.config import KEY_PREFIX

    if config.auth != "none":
        return []
    given = {
        "auth_tokens_file": bool(config.auth_tokens_file),
        "auth_tokens": bool(config.auth_tokens.get_secret_value()),
        "auth_roles": bool(config.auth_roles),
    }
    return [KEY_PREFIX + name.replace("_", "-")
            for name, is_set in given.items() if is_set]


async def _run_service(
    config: config_module.EnhancedLockingConfig, host: str, port: int, operator: Any = None,
    sources: config_module.Sources | None = None,
) -> int:
    """Serve the lock service; with ``operator`` options, kopf runs in the same loop."""
    import uvicorn

    from enhanced_locking.api import create_app
    from enhanced_locking.api import server as server_limits
    from enhanced_locking.api.access import is_loopback, open_to_network_refusal
    from enhanced_locking.api.tls import CertificateReloader
    from enhanced_locking.factory import LockService, check_readable
    from enhanced_locking.provider import ConfigProvider
    from enhanced_locking.types import LockingError, StoreRefused

    exposed = not is_loopback(host)
    refusal = open_to_network_refusal(config, exposed=exposed)
    if refusal is not None:  # before anything listens
        print(f"enhanced-locking: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    bound = _listen(host, port)

    def cannot_start(error: Exception, *, setting: bool) -> int:
        """One line and the exit code: 2 for the user's file or setting, as a bad setting."""
        bound.close()
        if setting:
            print(f"enhanced-locking: {_sourced(error, sources)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"enhanced-locking: cannot start: {error}", file=sys.stderr)
        return EXIT_REFUSED

    try:
        # Each file of the TLS pair can be read (else the one that cannot is named, not the
        # pair as the TLS context's own error would).
        check_readable(config, ("tls_cert_file", "tls_key_file"))
    except UnusableSetting as error:
        return cannot_start(error, setting=True)
    try:
        # Building the service opens the stores: a data dir that cannot be created is a
        # one-line error like a store that does not answer.
        service = LockService(ConfigProvider(config))
    except LockingError as error:
        return cannot_start(error, setting=isinstance(error, StoreRefused | UnusableSetting))
    try:
        app = create_app(service, manage_lifecycle=False, exposed=exposed,
                         loopback_hosts=not exposed)
    except (LockingError, ValueError) as error:
        # A ValueError: access settings that cannot be used (a bad tokens file).
        await service.close()
        return cannot_start(error, setting=not isinstance(error, LockingError))
    try:
        await service.start()
    except LockingError as error:
        return cannot_start(error, setting=isinstance(error, StoreRefused | UnusableSetting))
    log.info("config generation 1 hash %s: %s", service.provider.current.hash,
             json.dumps(config.masked()))
    unused = _access_settings_unused(config)
    if unused:
        log.warning("enhanced-locking-auth is none: authentication is off and %s %s not "
                    "used (set enhanced-locking-auth to static or kubernetes to check tokens)",
                    ", ".join(unused), "is" if len(unused) == 1 else "are")
    if exposed and config.auth == "none":
        log.warning("SERVING WITHOUT AUTHENTICATION ON %s: anyone who reaches the port may "
                    "force-unlock every lock (enhanced-locking-insecure-allow-unauthenticated)",
                    host)
    server_class = _bound_server(uvicorn.Server if operator is None else _operator_server(),
                                 bound)
    tls: dict[str, Any] = {}
    if config.tls_cert_file:
        tls = {"ssl_certfile": config.tls_cert_file, "ssl_keyfile": config.tls_key_file}
    uvicorn_config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on",
        http=server_limits.guarded_protocol(config), **tls,
    )
    server_limits.quiet_accept_errors(asyncio.get_running_loop())
    log.info("serving at most %d connections (open-file limit less %d), %d requests in "
             "flight", server_limits.connection_limit(config), server_limits.FD_RESERVE,
             config.http_max_in_flight)
    reloader: asyncio.Task[None] | None = None
    if tls:
        try:
            uvicorn_config.load()
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            bound.close()
            await service.close()
            print(f"enhanced-locking: invalid setting enhanced-locking-tls-cert-file: cannot "
                  f"load {config.tls_cert_file} with its key: {error}", file=sys.stderr)
            return EXIT_USAGE
        assert uvicorn_config.ssl is not None
        reloader = asyncio.create_task(CertificateReloader(
            uvicorn_config.ssl, config.tls_cert_file, config.tls_key_file).run())
    server = server_class(uvicorn_config)
    # The address is always shown, at info or, when the log shows only warnings, as one (with
    # --port 0 this line is the only place the port is named).
    listening = logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING
    try:
        if operator is not None:
            from enhanced_locking.kube.operator import run

            log.log(listening, "listening on %s once the CRs are applied (the console at /ui, "
                    "API docs at /docs)", listening_url(bound, tls=bool(tls)))
            return await run(service, operator, http=server,
                             audit_sinks=app.state.audit.sinks)
        # Once shut down, uvicorn re-raises the signal that stopped it; by default SIGTERM
        # would then kill the process before the service is closed. Ours receives it instead,
        # so SIGTERM (Kubernetes stopping a pod) closes the stores and exits 0.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            log.log(listening, "listening on %s (the console at /ui, API docs at /docs)",
                    listening_url(bound, tls=bool(tls)))
            await server.serve()
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        if reloader is not None:
            reloader.cancel()
        bound.close()
        await service.close()
    return 0


# --- operator --------------------------------------------------------------------------------
def _operator(args: argparse.Namespace) -> int:
    from enhanced_locking.kube.operator import OperatorOptions

    config, sources = _load_sourced(args)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = OperatorOptions(
        namespace=args.namespace, policy=args.policy, migration=args.migration,
        liveness=args.liveness, resync_interval=args.resync_interval,
        standalone=args.standalone, leader_election=args.leader_election, lease=args.lease,
        lease_duration=args.lease_duration, rollout_interval=args.rollout_interval,
    )
    port = _port_setting(args)
    if args.liveness is not None:
        _check_liveness_port(args.liveness, args.host, port)
    return asyncio.run(_run_service(config, args.host, port, operator=options,
                                    sources=sources))


def _check_liveness_port(liveness: str, host: str, port: int) -> None:
    """kopf's liveness endpoint cannot listen where the lock API does: kopf's would not bind,
    after the CRs were applied. The pair is the user's setting: one line and exit 2."""
    import urllib.parse

    parts = urllib.parse.urlsplit(liveness)
    anywhere = ("0.0.0.0", "::", "")
    if (parts.port or 80) == port and (
            parts.hostname == host or parts.hostname in anywhere or host in anywhere):
        print(f"enhanced-locking: --liveness {liveness}: port {port} is the lock API's "
              f"(--port {port}); give kopf's endpoint a port of its own", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _bound_server(base: Any, bound: socket.socket) -> Any:
    """``base`` (a uvicorn server class) serving on the socket :func:`_listen` bound."""

    class BoundServer(base):  # type: ignore[misc]
        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            await super().serve(sockets=sockets or [bound])

    return BoundServer


def _operator_server() -> Any:
    """A uvicorn server that leaves SIGINT/SIGTERM to the operator, which stops it in order."""
    import contextlib

    import uvicorn

    class OperatorServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return OperatorServer


def _k8s_name(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value) or len(value) > 253:
        raise argparse.ArgumentTypeError(f"not a Kubernetes object name: {value!r}")
    return value


def _liveness_url(value: str) -> str:
    """An argparse type: kopf's liveness endpoint, ``http://HOST:PORT/PATH`` (kopf serves only
    plain HTTP, on the host and port the URL names)."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme != "http" or not parts.hostname or port == 0:
        raise argparse.ArgumentTypeError(
            f"expected an http URL such as http://0.0.0.0:8080/healthz, got {value!r}")
    return value


def _seconds_between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds from ``low`` to ``high``."""

    def seconds(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = 0
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(
                f"expected seconds from {low:g} to {high:g}, got {value!r}"
            )
        return number

    return seconds


_seconds = _seconds_between(1, 86400)
_tick_seconds = _seconds_between(0.1, 60)


def _service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=os.environ.get("ENHANCED_LOCKING_HOST", "127.0.0.1"),
                        help="address to listen on; 0.0.0.0 for every interface "
                             "(env ENHANCED_LOCKING_HOST; default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=None,
                        help="TCP port to listen on, 0 to 65535; 0 picks a free one, named "
                             "by the 'listening on' log line (env ENHANCED_LOCKING_PORT; "
                             "default: 4142)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="log level (default: info)")


def _settings_last(parser: argparse.ArgumentParser) -> None:
    """Add the ~40 setting flags in their own help section, after the command's own options,
    and keep them out of the usage line (which would otherwise be all settings)."""
    own = list(parser._actions)
    formatter = parser._get_formatter()
    formatter.add_usage(None, own, parser._mutually_exclusive_groups, prefix="usage: ")
    usage = formatter.format_help().strip().removeprefix("usage: ")
    indent = " " * (len(parser.prog) + len("usage:  "))
    parser.usage = f"{usage}\n{indent}[--config FILE] [--enhanced-locking-SETTING VALUE ...]"
    assert isinstance(parser, _Parser)
    parser.add_later(_add_setting_flags)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    from enhanced_locking import config as config_module

    config_module.add_flags(parser)


# --- config show -----------------------------------------------------------------------------
def _config_show(args: argparse.Namespace) -> int:
    _print(_load(args).masked())
    return 0


# --- migrate import --------------------------------------------------------------------------
ATLANTIS_REDIS_PASSWORD = "ATLANTIS_REDIS_PASSWORD"
"""Atlantis's own variable for its Redis's password (its ``--redis-password``): the password
of ``--from-redis`` when the URL has none, so that it is in no process list (a command line
is readable by every user of the machine)."""


def _migrate_import(args: argparse.Namespace) -> int:
    config, sources = _load_sourced(args)
    if config.backend == "memory" and not args.dry_run:
        print("enhanced-locking: the memory backend keeps nothing once this command ends; set "
              "--enhanced-locking-backend to boltdb or redis (or use --dry-run)", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_run_import(config, args, sources))


async def _run_import(config: config_module.EnhancedLockingConfig, args: argparse.Namespace,
                      sources: config_module.Sources) -> int:
    from enhanced_locking.factory import build_backend
    from enhanced_locking.migration import importers
    from enhanced_locking.types import LockingError, StoreRefused

    backend = None
    try:
        if args.from_boltdb is not None:
            source, records = importers.read_boltdb(args.from_boltdb)
        else:
            source, records = await importers.read_redis(
                args.from_redis, password=os.environ.get(ATLANTIS_REDIS_PASSWORD) or None)
        backend = build_backend(config, config.backend, "enhanced")
        await backend.ping()
        progress = importers.Progress(len(records), stream=sys.stderr)
        report = await importers.import_locks(
            records, backend, source=source, dry_run=args.dry_run, progress=progress
        )
    except (importers.ImportSourceError, StoreRefused, UnusableSetting) as error:
        print(f"enhanced-locking: {_sourced(error, sources)}", file=sys.stderr)
        return EXIT_USAGE
    except LockingError as error:
        print(f"enhanced-locking: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        if backend is not None:
            await backend.close()
    if args.output == "json":
        _print(report.as_dict())
    else:
        print(report.table())
    if not config.enabled and not args.dry_run and report.count(importers.Outcome.IMPORTED):
        # The locks are on the enhanced side: a service with enhanced locking off honours
        # them from its start (factory.LockService.start), not while it runs already.
        print("enhanced-locking: enhanced-locking-enabled is off in these settings: a service "
              "running with it off since its start does not see the imported locks until it is "
              "started again (it honours them then); turn enhanced locking on for it "
              "(docs/05-importing.md)", file=sys.stderr)
    return 0 if report.clean else EXIT_REFUSED


# --- lock ... --------------------------------------------------------------------------------
def with_client(action: Callable[[Client, argparse.Namespace], int], *,
                program: str = PROG) -> Callable[..., int]:
    """A command that calls the service: ``action`` gets a client of ``--url`` with
    ``--token``; a refusal or an unreachable service ends it as terminal.service_failed says."""
    def run(args: argparse.Namespace) -> int:
        from enhanced_locking.client import Client, ServiceError

        try:
            with Client(args.url, token=args.token,
                        connect_timeout=args.connect_timeout) as client:
                return action(client, args)
        except ServiceError as error:
            return terminal.service_failed(
                program, str(error), status=error.status,
                answer=error.body if isinstance(error.body, dict) else None)
    return run



def _acquire(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "project": {"repoFullName": args.repo, "path": args.path, "projectName": args.project},
        "workspace": args.workspace,
        "pull": {"num": args.pull, "url": args.pull_url, "author": args.user},
        "user": {"username": args.user},
        "priority": args.priority,
        "mode": args.mode,
    }
    if args.command_name:
        body["command"] = args.command_name
    if args.head_commit:
        body["pull"]["headCommit"] = args.head_commit
    for name in ("wait", "ttl"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    if body.get("wait") == "true":  # a bare --wait: up to the service's default-timeout
        body["wait"] = True
    if args.request_id:
        body["requestId"] = args.request_id
    try:
        request = LockRequest.model_validate(body)
    except ValidationError as error:
        print(f"enhanced-locking: {_invalid_flag(error)}", file=sys.stderr)
        return EXIT_USAGE
    if request.wait:  # show the live queue position on stderr while waiting
        result = watching.acquire_showing_position(args.url, request, token=args.token,
                                                   connect_timeout=args.connect_timeout)
    else:
        result = client.acquire(request)
    answer = result.model_dump(mode="json", by_alias=True)
    if not result.acquired:
        return terminal.not_granted(PROG, _why_not(result.lock_key, answer), answer,
                                    unavailable=result.reason is Reason.UNAVAILABLE)
    _print(answer)
    return 0


_ACQUIRE_FLAGS: dict[tuple[str | int, ...], str] = {
    ("project", "repoFullName"): "--repo", ("project", "path"): "--path",
    ("project", "projectName"): "--project", ("workspace",): "--workspace",
    ("pull", "num"): "--pull", ("pull", "url"): "--pull-url", ("pull", "author"): "--user",
    ("pull", "headCommit"): "--head-commit", ("user", "username"): "--user",
    ("priority",): "--priority", ("mode",): "--mode", ("command",): "--command",
    ("wait",): "--wait", ("ttl",): "--ttl", ("requestId",): "--request-id",
}
"""Where each field of the acquire request comes from: the flag a refusal names."""


def _invalid_flag(error: ValidationError) -> str:
    """The first problem of an acquire built from the flags, in one line naming the flag."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    flag = _ACQUIRE_FLAGS.get(tuple(first["loc"]))
    if flag is None:  # a rule over several fields
        return f"invalid request: {message}"
    return f"invalid {flag}: {message}"


def _why_not(key: str, answer: dict[str, Any]) -> str:
    """A refused acquire in one line: the reason, who holds the key, the queue position."""
    line = f"not acquired ({answer.get('reason')}): {key}"
    if answer.get("error"):  # a freeze's message, a key collision
        return f"{line}: {answer['error']}"
    holder = answer.get("holder") or {}
    pull = (holder.get("pull") or {}).get("num")
    if pull is not None:
        user = (holder.get("user") or {}).get("username")
        line += f" is held by pull #{pull}" + (f" of {user}" if user else "")
    if answer.get("queuePosition"):
        line += f"; queue position {answer['queuePosition']}"
    return line


def _release(client: Client, args: argparse.Namespace) -> int:
    lock = client.release(args.key, pull=args.pull, repo=args.repo)
    if lock is None:
        message = f"no lock is held on {args.key}"
        return terminal.refused(PROG, message, {"released": False, "lockKey": args.key,
                                                "error": message})
    _print({"released": True, "lock": lock.model_dump(mode="json", by_alias=True)})
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    listing = client.listing(repo=args.repo, pull=args.pull)
    _print(listing.as_json())
    terminal.not_reached(PROG, listing.unavailable, "listed")
    terminal.not_read(PROG, [(entry.key, entry.side) for entry in listing.unreadable],
                      f"{PROG} lock force-unlock --key KEY --reason TEXT")
    return 0


def _audit(client: Client, args: argparse.Namespace) -> int:
    """The audit trail as JSON lines, newest first (every page with ``--all``)."""
    before = None
    while True:
        page = client.audit(identity=args.identity, verb=args.verb, action=args.action,
                            key=args.key, repo=args.repo, pull=args.pull, outcome=args.outcome,
                            since=args.since, until=args.until, before=before,
                            limit=args.limit)
        for entry in page["entries"]:
            print(json.dumps(entry))
        before = page.get("next")
        if not args.all or before is None:
            return 0


def _unlock_pull(client: Client, args: argparse.Namespace) -> int:
    """The service's whole answer; a store that did not answer keeps the pull's locks there
    held, so that is exit 3 (a script must not read the pull as freed), as for its 503."""
    done = client.release_pull(args.repo, args.pull)
    _print(done.as_json())
    terminal.not_reached(PROG, done.unavailable, "released")
    return EXIT_UNREACHABLE if done.unavailable else 0


def _service_url(value: str) -> str:
    try:
        return service_url(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _connect_seconds(value: str) -> float:
    try:
        return parse_duration(value).total_seconds()
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--token`` and ``--connect-timeout``, accepted wherever a user puts them
    (before or after a command word): every parser level gets them, and a level that is not
    given one leaves it alone."""
    parser.add_argument("--url", type=_service_url, default=argparse.SUPPRESS,
                        help=f"lock service URL (env {URL_ENV}; default: {DEFAULT_URL})")
    parser.add_argument("--token", default=argparse.SUPPRESS, metavar="TOKEN",
                        help=f"bearer token for a service with authentication on (env "
                             f"{TOKEN_ENV}); never printed")
    parser.add_argument("--connect-timeout", dest="connect_timeout", type=_connect_seconds,
                        default=argparse.SUPPRESS, metavar="DURATION",
                        help="how long a call whose connection is refused (the service "
                             "restarting) is sent again before the command exits 3 (env "
                             f"{CONNECT_TIMEOUT_ENV}; default: {DEFAULT_CONNECT_TIMEOUT}; "
                             "0s: tried once)")


def resolve_client_options(args: argparse.Namespace, *, program: str = PROG) -> None:
    """Fill ``args.url``, ``args.token`` and ``args.connect_timeout`` (seconds) from the flags,
    else the environment, else the default; a malformed URL or duration from the environment,
    or a token no header can carry, is a usage error (exit 2)."""
    if getattr(args, "connect_timeout", None) is None:
        try:
            args.connect_timeout = parse_duration(
                os.environ.get(CONNECT_TIMEOUT_ENV) or DEFAULT_CONNECT_TIMEOUT).total_seconds()
        except ValueError as error:
            terminal.say(program, f"{CONNECT_TIMEOUT_ENV}: {error}")
            raise SystemExit(EXIT_USAGE) from None
    if getattr(args, "url", None) is None:
        try:
            given = os.environ.get(URL_ENV)
            args.url = service_url(given) if given else DEFAULT_URL  # the default is one
        except ValueError as error:
            terminal.say(program, f"{URL_ENV}: {error}")
            raise SystemExit(EXIT_USAGE) from None
    setting = "--token"
    if getattr(args, "token", None) is None:
        args.token, setting = os.environ.get(TOKEN_ENV) or None, TOKEN_ENV
    if args.token and (problem := token_problem(args.token)) is not None:
        terminal.say(program, f"{setting}: {problem}")
        raise SystemExit(EXIT_USAGE)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atlantis-enhanced-locking")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


# What the lock commands' exit codes mean, in their help (the module's docstring says it for all).
_LOCK_EXIT_CODES = (
    "Exit codes: 0 done; 1 refused (held, not found, not owned); 2 invalid usage or URL; 3 the "
    "service could not be reached or could not serve the call now, or unlock-pull left a "
    "store's locks held because the store did not answer (the answer lists what it freed; run "
    "it again once the store answers).")


def _parser(*, complete: bool = True) -> _Parser:
    """The command's parser; with ``complete=False`` each subcommand's settings flags are added
    only when that subcommand is run (or its help shown), as :func:`main` runs it."""
    parser = _Parser(prog=PROG, description="Atlantis's enhanced locking service.",
                     epilog="Exit codes: 0 done; 1 refused; 2 invalid usage, config or URL; "
                            "3 the service could not be reached. Docs: docs/01-foundation.md.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    add_client_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the lock service (blocks; stop it with Ctrl-C)",
        description="Serve the lock service's HTTP API (docs/api.md) and the console at /ui. "
                    "It runs in the foreground until stopped.",
    )
    _service_arguments(serve)
    _settings_last(serve)
    serve.set_defaults(func=_serve)

    operator = commands.add_parser(
        "operator", help="run the lock service with the Kubernetes operator (one process; "
                         "blocks)",
        description="The lock service plus kopf reconciling a LockPolicy and a LockMigration "
                    "of one namespace into its configuration (docs/02-migration.md). It runs "
                    "in the foreground until stopped: use another terminal for kubectl.",
    )
    _service_arguments(operator)
    operator.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                          type=_k8s_name, help="namespace of the CRs (env POD_NAMESPACE)")
    operator.add_argument("--policy", default="default", type=_k8s_name,
                          help="name of the LockPolicy to apply (default: default)")
    operator.add_argument("--migration", default="to-enhanced", type=_k8s_name,
                          help="name of the LockMigration to apply (default: to-enhanced)")
    operator.add_argument("--liveness", default=None, metavar="URL", type=_liveness_url,
                          help="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("--resync-interval", default=30.0, type=_seconds, metavar="SECONDS",
                          help="re-read the CRs and their Secrets this often; the status's "
                               "lastSeenAt is renewed as often (default: 30)")
    operator.add_argument("--standalone", default=True, action=argparse.BooleanOptionalAction,
                          help="run without kopf peering (default; one replica)")
    operator.add_argument("--leader-election", default=False,
                          action=argparse.BooleanOptionalAction,
                          help="several replicas: the holder of a Lease writes the status and "
                               "drives the rollout (needs get/create/update on leases)")
    operator.add_argument("--lease", default=None, type=_k8s_name, metavar="NAME",
                          help="the Lease's name (default: enhanced-locking-MIGRATION)")
    operator.add_argument("--lease-duration", default=15.0, type=_seconds, metavar="SECONDS",
                          help="a silent holder's Lease is taken over after this many seconds "
                               "(default: 15)")
    operator.add_argument("--rollout-interval", default=0.5, type=_tick_seconds,
                          metavar="SECONDS",
                          help="how often the rollout timer runs (default: 0.5)")
    _settings_last(operator)
    operator.set_defaults(func=_operator)

    config_cmd = commands.add_parser("config", help="inspect the configuration")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True,
                                           parser_class=_Parser, metavar="COMMAND")
    show = config_sub.add_parser("show", help="print the effective config as JSON (masked)")
    _settings_last(show)
    show.set_defaults(func=_config_show)

    lock = commands.add_parser(
        "lock", help="acquire, release and list locks (talks to a running service)",
        description="Talk to a running lock service. Every answer is JSON on stdout; a "
                    "refusal adds one line on stderr and exits 1.",
        epilog=_LOCK_EXIT_CODES,
    )
    add_client_options(lock)
    lock_sub = lock.add_subparsers(dest="lock_command", required=True, parser_class=_Parser,
                                   metavar="COMMAND")

    acquire = lock_sub.add_parser("acquire", help="acquire a lock")
    acquire.add_argument("--repo", required=True, help="repository, owner/name")
    acquire.add_argument("--path", default=".",
                         help="project directory inside the repository (default: the root, .)")
    acquire.add_argument("--workspace", default="default",
                         help="Terraform workspace (default: default)")
    acquire.add_argument("--project", default="",
                         help="Atlantis project name (default: none)")
    acquire.add_argument("--pull", type=int, required=True, help="pull request number")
    acquire.add_argument("--pull-url", default="",
                         help="pull request URL (credentials in it are stripped)")
    acquire.add_argument("--user", default=os.environ.get("USER", ""),
                         help="who asks (default: $USER)")
    acquire.add_argument("--priority", default="normal",
                         choices=["low", "normal", "high", "critical"],
                         help="place in the queue while waiting (default: normal)")
    acquire.add_argument("--wait", default=None, nargs="?", const="true",
                         help="wait up to this long in the queue, e.g. 30s (bare --wait: the "
                              "service's default-timeout); shows the queue position on stderr")
    acquire.add_argument("--request-id", default=None,
                         help="idempotency key: the same id asked again gets the same answer; "
                              "sent again after a broken connection, a waiting request keeps its "
                              "place in the queue")
    acquire.add_argument("--ttl", default=None,
                         help="lease: the lock expires unless refreshed, e.g. 1h")
    acquire.add_argument("--mode", default="exclusive", choices=["exclusive", "shared"],
                         help="shared holders coexist (plans); exclusive is alone (applies)")
    acquire.add_argument("--command", dest="command_name", default=None,
                         choices=["plan", "apply", "import", "state", "approve_policies",
                                  "unlock", "version"],
                         help="the Atlantis command (priority rules may name it)")
    acquire.add_argument("--head-commit", default="",
                         help="the pull's head commit: a newer one supersedes queued requests "
                              "of an older one")
    acquire.set_defaults(func=with_client(_acquire))

    release = lock_sub.add_parser("release", help="release a lock by key")
    release.add_argument("--key", required=True,
                         help="lock key, repo/path/workspace/project (as lock list shows)")
    release.add_argument("--pull", type=int, default=None,
                         help="release only if this pull holds it")
    release.add_argument("--repo", default=None,
                         help="only if it is this repository's lock (keys of two repositories "
                              "can be the same)")
    release.set_defaults(func=with_client(_release))

    listing = lock_sub.add_parser("list", help="list held locks")
    listing.add_argument("--repo", default=None, help="only locks of this repository")
    listing.add_argument("--pull", type=int, default=None, help="only locks of this pull")
    listing.set_defaults(func=with_client(_list))

    unlock = lock_sub.add_parser("unlock-pull", help="release every lock of a pull request",
                                 epilog=_LOCK_EXIT_CODES)
    unlock.add_argument("--repo", required=True, help="repository, owner/name")
    unlock.add_argument("--pull", type=int, required=True, help="pull request number")
    unlock.set_defaults(func=with_client(_unlock_pull))
    watching.add_queue_commands(lock_sub, with_client)
    for subcommand in lock_sub.choices.values():
        add_client_options(subcommand)
    add_client_options(watching.add_events_command(commands))
    for step_parser in steps.add_step_command(commands):
        add_client_options(step_parser)

    audit = commands.add_parser(
        "audit", help="read the audit trail (the admin right)",
        description="Who did what, newest first, as JSON lines. The token comes from "
                    "--token or ENHANCED_LOCKING_TOKEN (docs/08-access.md).")
    add_client_options(audit)
    for name in ("identity", "action", "key", "repo"):
        audit.add_argument(f"--{name}", default=None)
    audit.add_argument("--verb", default=None,
                       help="the right the call needed (read, lock, prioritize, release-any, "
                            "force-unlock, admin)")
    audit.add_argument("--outcome", default=None,
                       help="how it ended, e.g. acquired, held, released, denied (one the "
                            "trail never writes exits 2 naming those it does)")
    audit.add_argument("--pull", type=int, default=None)
    audit.add_argument("--since", default=None, help="RFC 3339 time, e.g. 2026-01-31T00:00:00Z")
    audit.add_argument("--until", default=None, help="RFC 3339 time")
    audit.add_argument("--limit", type=int, default=100, help="entries per page (1 to 1000)")
    audit.add_argument("--all", action="store_true", help="every page, not only the first")
    audit.set_defaults(func=with_client(_audit))

    migrate = commands.add_parser("migrate", help="move locks from Atlantis to enhanced locking")
    migrate_sub = migrate.add_subparsers(dest="migrate_command", required=True,
                                         parser_class=_Parser)
    importing = migrate_sub.add_parser(
        "import", help="import Atlantis's held locks into the configured enhanced backend",
        description="Exit codes: 0 every lock imported or already there; 1 conflicts or "
                    "unreadable records (see the report); 2 bad input; 3 a store did not answer.",
    )
    source = importing.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-boltdb", metavar="FILE",
                        help="Atlantis's BoltDB file (atlantis.db in its data dir)")
    source.add_argument("--from-redis", metavar="URL",
                        help="Atlantis's Redis, e.g. redis://HOST:6379/0; its password from "
                             f"{ATLANTIS_REDIS_PASSWORD} (Atlantis's own variable), or in the "
                             "URL (redis://:PASSWORD@HOST:6379/0), which the process list shows")
    importing.add_argument("--dry-run", action="store_true",
                           help="report what would be imported; write nothing")
    importing.add_argument("--output", choices=["table", "json"], default="table",
                           help="the report as a table or as JSON (default: table)")
    _settings_last(importing)
    importing.set_defaults(func=_migrate_import)
    if complete:
        parser.complete()
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser(complete=False).parse_args(argv)
    resolve_client_options(args)
    try:
        return terminal.survive_closed_pipe(lambda: int(args.func(args)))
    except KeyboardInterrupt:
        return 130


def run() -> NoReturn:
    """The ``enhanced-locking`` command: :func:`main`, its code the process's exit status.

    Once the command is done (a service stopped, its stores closed), its logs and output are
    flushed and the process ends at once: the interpreter's own teardown (every object of the
    app freed one by one) does nothing the stores need and took about a second of CPU on a
    loaded machine after every SIGTERM. The exit handlers still run (the libraries' as at any
    exit: the Kubernetes client's removes the files it wrote a kubeconfig's embedded client key
    and certificates to; logging's flushes the logs). :func:`main` itself returns the code, so a
    caller of it in its own process (the docs' console examples, run by the unit tests) carries
    on."""
    code = main()
    atexit._run_exitfuncs()  # logging.shutdown among them
    for stream in (sys.stdout, sys.stderr):
        # a reader that went away, or a stream already closed: nothing more to say there
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
