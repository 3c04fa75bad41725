"""Following the lock service from a terminal: the event tail and a wait's live position.

``enhanced-locking events`` prints each event of ``GET /v1/events`` as one JSON line.
``enhanced-locking lock acquire --wait 30s`` waits in the key's queue while it shows its
position on stderr: it follows the key's events and, whenever the queue moves, reads
``GET /v1/queue`` to find itself by its request id. stdout stays the final JSON answer, so
scripts can read it as before.

Also here: the queue and admin commands (``lock queue``, ``lock cancel``, ``lock
force-unlock``, ``lock refresh``), registered onto the ``lock`` command by :mod:`.cli`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from enhanced_locking import terminal
from enhanced_locking.service_address import shown_url
from enhanced_locking.types import AcquireResult, LockRequest, UnreadableLock

if TYPE_CHECKING:  # the HTTP client is loaded by the commands that call the service
    from enhanced_locking.client import AsyncClient, Client

__all__ = ["acquire_showing_position", "add_events_command", "add_queue_commands"]

EXIT_REFUSED, EXIT_UNREACHABLE = terminal.EXIT_REFUSED, terminal.EXIT_UNREACHABLE
PROG = "enhanced-locking"


def _print(data: Any) -> None:
    terminal.print_json(data)


async def _watch(client: AsyncClient, request: LockRequest, out: TextIO) -> None:
    last: int | None = None

    async def report() -> None:
        nonlocal last
        queue = await client.queue(request.key)
        waiters = queue["waiters"]
        mine = next((w for w in waiters if w["requestId"] == request.request_id), None)
        if mine is not None and mine["position"] != last:
            last = mine["position"]
            holders = queue.get("holders") or ([queue["holder"]] if queue.get("holder") else [])
            held_by = ", ".join(f"#{h['pull']['num']}" for h in holders)
            if any(h.get("mode") == "shared" for h in holders):
                held_by += " (shared)"
            ahead = ", ".join(f"#{w['pull']}" for w in waiters[:last - 1])
            print(f"queued on {request.key}: position {last} of {len(waiters)}"
                  + (f" (held by pull {held_by})" if held_by else "")
                  + (f"; ahead of it: pull {ahead}" if ahead else ""),
                  file=out, flush=True)

    async for event in client.events(key_prefix=request.key, on_open=report):
        if event.key == request.key:
            await report()


async def _acquire(url: str, request: LockRequest, out: TextIO,
                   token: str | None, connect_timeout: float | None) -> AcquireResult:
    from enhanced_locking.client import AsyncClient, ServiceError

    async with AsyncClient(url, token=token, connect_timeout=connect_timeout) as client:
        watcher = asyncio.create_task(_watch(client, request, out))
        try:
            return await client.acquire(request)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServiceError):
                await watcher


def acquire_showing_position(
    url: str, request: LockRequest, *, out: TextIO = sys.stderr, token: str | None = None,
    connect_timeout: float | None = None,
) -> AcquireResult:
    """Acquire with a wait, printing the queue position to ``out`` while it waits."""
    if request.request_id is None:
        import secrets

        request = request.model_copy(update={"request_id": "cli-" + secrets.token_hex(8)})
    return asyncio.run(_acquire(url, request, out, token, connect_timeout))


# --- events ----------------------------------------------------------------------------------
def _events(args: argparse.Namespace) -> int:
    from enhanced_locking.client import Client, ServiceError

    types = [t for t in (args.type or "").split(",") if t]
    try:
        with Client(args.url, token=args.token,
                    connect_timeout=args.connect_timeout) as client:
            for event in client.events(
                    repo=args.repo, key_prefix=args.key_prefix, types=types,
                    last_event_id=args.last_event_id,
                    on_open=lambda: terminal.say(
                        PROG, f"following the events of {shown_url(args.url)}")):
                print(event.model_dump_json(by_alias=True), flush=True)
    except ServiceError as error:
        # Unreachable 3, an invalid filter 2, refused (no or a bad token, no right) 1: as for
        # every command. The answer is not printed: stdout is the events' JSON lines.
        return terminal.service_failed(PROG, str(error), status=error.status)
    except KeyboardInterrupt:
        return 0
    return 0


def add_events_command(commands: Any) -> argparse.ArgumentParser:
    """The ``events`` command (its ``--url`` and ``--token`` are added by the caller)."""
    events: argparse.ArgumentParser = commands.add_parser(
        "events", help="follow lock and config events (SSE)")
    events.add_argument("--repo", default=None, help="only events of this repository")
    events.add_argument("--key-prefix", default=None, help="only lock keys starting with this")
    events.add_argument("--type", default=None, help="comma-separated event types")
    events.add_argument("--last-event-id", default=None, help="resume after this event id")
    events.set_defaults(func=_events)
    return events


# --- queue and admin -------------------------------------------------------------------------
def _not_held(key: str, answer: dict[str, Any]) -> int:
    message = f"no lock is held on {key}"
    return terminal.refused(PROG, message, {**answer, "lockKey": key, "error": message})


def _queue(client: Client, args: argparse.Namespace) -> int:
    _print(client.queue(args.key))
    return 0


def _cancel(client: Client, args: argparse.Namespace) -> int:
    if not client.cancel_waiter(args.key, args.id, pull=args.pull):
        message = f"no request {args.id} is queued on {args.key}"
        return terminal.refused(PROG, message, {"cancelled": False, "key": args.key,
                                                "id": args.id, "error": message})
    _print({"cancelled": True, "key": args.key, "id": args.id})
    return 0


def _force_unlock(client: Client, args: argparse.Namespace) -> int:
    lock = client.force_unlock(args.key, reason=args.reason)
    if lock is None:
        return _not_held(args.key, {"released": False})
    if isinstance(lock, UnreadableLock):  # cleared: what was stored could not be read
        _print({"released": True, "lock": None,
                "unreadable": lock.model_dump(mode="json", by_alias=True)})
        return 0
    _print({"released": True, "lock": lock.model_dump(mode="json", by_alias=True)})
    return 0


def _refresh(client: Client, args: argparse.Namespace) -> int:
    lock = client.refresh(args.key, pull=args.pull, ttl=args.ttl, repo=args.repo)
    if lock is None:
        return _not_held(args.key, {"lock": None})
    _print({"lock": lock.model_dump(mode="json", by_alias=True)})
    return 0


def add_queue_commands(
    lock_sub: Any, with_client: Callable[[Callable[[Client, argparse.Namespace], int]],
                                         Callable[..., int]],
) -> None:
    queue = lock_sub.add_parser("queue", help="show a key's holder and waiters in order")
    queue.add_argument("--key", required=True, help="lock key, as lock list shows it")
    queue.set_defaults(func=with_client(_queue))

    cancel = lock_sub.add_parser("cancel", help="cancel a queued request")
    cancel.add_argument("--key", required=True, help="lock key the request waits on")
    cancel.add_argument("--id", required=True, help="waiter id or request id")
    cancel.add_argument("--pull", type=int, default=None,
                        help="the pull that queued it: its request of that id, and cancelling "
                             "one's own needs only the lock right (without it: release-any)")
    cancel.set_defaults(func=with_client(_cancel))

    force = lock_sub.add_parser("force-unlock", help="free a lock whoever holds it (admin)")
    force.add_argument("--key", required=True, help="lock key to free")
    force.add_argument("--reason", default=None,
                       help="why (kept in the audit trail; required when access control is on)")
    force.set_defaults(func=with_client(_force_unlock))

    refresh = lock_sub.add_parser("refresh", help="extend the lease of a held lock")
    refresh.add_argument("--key", required=True, help="lock key whose lease to extend")
    refresh.add_argument("--pull", type=int, required=True, help="the pull that holds it")
    refresh.add_argument("--ttl", default=None, help="new lease from now, e.g. 1h (0s: none, the "
                         "lock kept until released; default: enhanced-locking-lock-ttl)")
    refresh.add_argument("--repo", default=None,
                         help="only if it is this repository's lock (keys of two repositories "
                              "can be the same)")
    refresh.set_defaults(func=with_client(_refresh))
