"""The ``enhanced-locking`` command.

::

    enhanced-locking serve [--host H] [--port P] [--config FILE] [--enhanced-locking-* ...]
    enhanced-locking config show [--config FILE] [--enhanced-locking-* ...]
    enhanced-locking lock acquire|release|list|unlock-pull ...   (talks to a running service)

Exit codes: 0 done; 1 refused (lock held, not found, not owned); 2 invalid usage or config;
3 the service could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from enhanced_locking import config as config_module
from enhanced_locking.client import DEFAULT_URL, Client, ServiceError
from enhanced_locking.types import LockRequest

__all__ = ["main"]

log = logging.getLogger("enhanced_locking")

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default exit code is already 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _load(args: argparse.Namespace) -> config_module.EnhancedLockingConfig:
    try:
        return config_module.load_config(
            flags=config_module.flags_from_namespace(args), yaml_file=args.config_file
        )
    except config_module.ConfigError as error:
        print(f"enhanced-locking: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


# --- serve -----------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    config = _load(args)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run_service(config, args.host, args.port))


async def _run_service(config: config_module.EnhancedLockingConfig, host: str, port: int) -> int:
    import uvicorn

    from enhanced_locking.api import create_app
    from enhanced_locking.factory import LockService
    from enhanced_locking.provider import ConfigProvider
    from enhanced_locking.types import LockingError

    service = LockService(ConfigProvider(config))
    try:
        await service.start()
    except LockingError as error:
        print(f"enhanced-locking: cannot start: {error}", file=sys.stderr)
        return EXIT_REFUSED
    log.info("config generation 1 hash %s: %s", service.provider.current.hash,
             json.dumps(config.masked()))
    server = uvicorn.Server(uvicorn.Config(
        create_app(service, manage_lifecycle=False), host=host, port=port,
        log_level="warning", lifespan="on",
    ))
    try:
        await server.serve()
    finally:
        await service.close()
    return 0


# --- config show -----------------------------------------------------------------------------
def _config_show(args: argparse.Namespace) -> int:
    _print(_load(args).masked())
    return 0


# --- lock ... --------------------------------------------------------------------------------
def _with_client(action: Callable[[Client, argparse.Namespace], int]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        try:
            with Client(args.url) as client:
                return action(client, args)
        except ServiceError as error:
            print(f"enhanced-locking: {error}", file=sys.stderr)
            if error.status == 0:
                return EXIT_UNREACHABLE
            return EXIT_USAGE if error.status == 422 else EXIT_REFUSED
    return run


def _acquire(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "project": {"repoFullName": args.repo, "path": args.path, "projectName": args.project},
        "workspace": args.workspace,
        "pull": {"num": args.pull, "url": args.pull_url, "author": args.user},
        "user": {"username": args.user},
        "priority": args.priority,
    }
    for name in ("wait", "ttl"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    try:
        request = LockRequest.model_validate(body)
    except ValueError as error:
        print(f"enhanced-locking: invalid request: {error}", file=sys.stderr)
        return EXIT_USAGE
    result = client.acquire(request)
    _print(result.model_dump(mode="json", by_alias=True))
    return 0 if result.acquired else EXIT_REFUSED


def _release(client: Client, args: argparse.Namespace) -> int:
    lock = client.release(args.key, pull=args.pull)
    if lock is None:
        print(f"enhanced-locking: no lock is held on {args.key}", file=sys.stderr)
        return EXIT_REFUSED
    _print({"released": True, "lock": lock.model_dump(mode="json", by_alias=True)})
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    locks = client.list(repo=args.repo, pull=args.pull)
    _print({"locks": [lock.model_dump(mode="json", by_alias=True) for lock in locks]})
    return 0


def _unlock_pull(client: Client, args: argparse.Namespace) -> int:
    locks = client.unlock_pull(args.repo, args.pull)
    _print({"released": [lock.model_dump(mode="json", by_alias=True) for lock in locks]})
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="enhanced-locking", description="Atlantis's enhanced locking service.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the lock service")
    serve.add_argument("--host", default=os.environ.get("ENHANCED_LOCKING_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int,
                       default=int(os.environ.get("ENHANCED_LOCKING_PORT", "4142")))
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    config_module.add_flags(serve)
    serve.set_defaults(func=_serve)

    config_cmd = commands.add_parser("config", help="inspect the configuration")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True,
                                           parser_class=_Parser)
    show = config_sub.add_parser("show", help="print the effective config as JSON (masked)")
    config_module.add_flags(show)
    show.set_defaults(func=_config_show)

    lock = commands.add_parser("lock", help="acquire, release and list locks")
    lock.add_argument("--url", default=os.environ.get("ENHANCED_LOCKING_URL", DEFAULT_URL),
                      help="lock service URL (env ENHANCED_LOCKING_URL)")
    lock_sub = lock.add_subparsers(dest="lock_command", required=True, parser_class=_Parser)

    acquire = lock_sub.add_parser("acquire", help="acquire a lock")
    acquire.add_argument("--repo", required=True, help="owner/name")
    acquire.add_argument("--path", default=".")
    acquire.add_argument("--workspace", default="default")
    acquire.add_argument("--project", default="", help="Atlantis project name")
    acquire.add_argument("--pull", type=int, required=True)
    acquire.add_argument("--pull-url", default="")
    acquire.add_argument("--user", default=os.environ.get("USER", ""))
    acquire.add_argument("--priority", default="normal",
                         choices=["low", "normal", "high", "critical"])
    acquire.add_argument("--wait", default=None, help="wait up to this long, e.g. 30s")
    acquire.add_argument("--ttl", default=None, help="lease, e.g. 1h")
    acquire.set_defaults(func=_with_client(_acquire))

    release = lock_sub.add_parser("release", help="release a lock by key")
    release.add_argument("--key", required=True)
    release.add_argument("--pull", type=int, default=None, help="only if this pull holds it")
    release.set_defaults(func=_with_client(_release))

    listing = lock_sub.add_parser("list", help="list held locks")
    listing.add_argument("--repo", default=None)
    listing.add_argument("--pull", type=int, default=None)
    listing.set_defaults(func=_with_client(_list))

    unlock = lock_sub.add_parser("unlock-pull", help="release every lock of a pull request")
    unlock.add_argument("--repo", required=True)
    unlock.add_argument("--pull", type=int, required=True)
    unlock.set_defaults(func=_with_client(_unlock_pull))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
