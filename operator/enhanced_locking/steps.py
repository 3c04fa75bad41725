"""``enhanced-locking step``: the lock service from an Atlantis custom workflow step.

A stock Atlantis runs ``run:`` steps with the project and pull request in the environment
(``server/core/runtime/run_step_runner.go`` in Atlantis v0.47.1): ``BASE_REPO_OWNER``,
``BASE_REPO_NAME``, ``PULL_NUM``, ``PULL_AUTHOR``, ``PULL_URL``, ``HEAD_COMMIT``,
``HEAD_BRANCH_NAME``, ``BASE_BRANCH_NAME``, ``REPO_REL_DIR``, ``WORKSPACE``, ``PROJECT_NAME``
and ``USER_NAME``. ``COMMAND_NAME`` is set only for workflow hooks, not for ``run:`` steps, so
the step says which command it belongs to with ``--command`` (``COMMAND_NAME`` is the
fallback).

``step acquire`` takes the project's lock for the pull request, waiting in the key's queue up to
``--wait`` with a priority by command (``apply``, ``import`` and ``state`` above ``plan``).
While it waits it prints its place, the holders and the waiters ahead of it, read from
``GET /v1/queue`` every ``--poll`` (a poll, not the event stream: it works with events turned
off and across replicas, and costs one small request per waiting step every few seconds), and,
on each line it prints (once per change of place, holders or waiters ahead), the estimate of its
wait from ``GET /v1/queue/waiter``. Atlantis puts a step's output in the pull request's comment.
It exits 0 holding the lock, 1 with one line when it is refused (held with no wait, timeout,
queue full, deadlock, collision), 2 when the environment or a flag is wrong, 3 when the service
cannot be reached or cannot serve the call now (503: its store did not answer, or it is
overloaded; 429; an acquire answered ``unavailable``), as every command does
(:func:`terminal.service_failed`, :func:`terminal.not_granted`).

``step release`` gives the project's lock back (only this pull's, only this repository's); a
lock already gone is not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import ValidationError

from enhanced_locking import terminal
from enhanced_locking.durations import format_duration, parse_duration
from enhanced_locking.types import AcquireResult, LockRequest, Priority, Reason

if TYPE_CHECKING:  # the HTTP client is loaded by the commands that call the service
    from enhanced_locking.client import AsyncClient, ServiceError

__all__ = ["COMMAND_PRIORITY", "add_step_command", "request_from_env"]

PROG = "enhanced-locking step"

COMMAND_PRIORITY = {"plan": Priority.NORMAL, "apply": Priority.HIGH, "import": Priority.HIGH,
                    "state": Priority.HIGH}
"""An apply waits ahead of plans: it finishes work a plan would have to redo. ``import`` and
``state`` (``atlantis state rm``) write the state as an apply does, and wait as one. Atlantis
takes no lock of its own for them when its project locks are off, so their stages need the
step as much as plan and apply do."""

REQUIRED = ("BASE_REPO_OWNER", "BASE_REPO_NAME", "PULL_NUM")


class StepError(Exception):
    """The step cannot run as configured (exit 2; the message names what is wrong)."""


def _command(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    command = args.command or env.get("COMMAND_NAME", "")
    if command not in COMMAND_PRIORITY:
        raise StepError(
            "say which command this step runs: --command plan or --command apply (import and "
            f"state for those stages; got {command or 'nothing'}; Atlantis sets COMMAND_NAME "
            "only in workflow hooks)")
    return command


def request_from_env(
    env: Mapping[str, str], *, command: str, wait: str | None, ttl: str | None,
    priority: str | None, request_id: str | None = None,
) -> LockRequest:
    """The acquire a step asks for, from Atlantis's step environment."""
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise StepError(f"{', '.join(missing)} not set: run this as an Atlantis workflow step "
                        "(or set them as Atlantis would)")
    try:
        pull = int(env["PULL_NUM"])
    except ValueError:
        raise StepError(f"PULL_NUM is not a number: {env['PULL_NUM']!r}") from None
    body: dict[str, Any] = {
        "project": {"repoFullName": f"{env['BASE_REPO_OWNER']}/{env['BASE_REPO_NAME']}",
                    "path": env.get("REPO_REL_DIR") or ".",
                    "projectName": env.get("PROJECT_NAME", "")},
        "workspace": env.get("WORKSPACE") or "default",
        "pull": {"num": pull, "url": env.get("PULL_URL", ""),
                 "author": env.get("PULL_AUTHOR", ""),
                 "headCommit": env.get("HEAD_COMMIT", ""),
                 "headBranch": env.get("HEAD_BRANCH_NAME", ""),
                 "baseBranch": env.get("BASE_BRANCH_NAME", "")},
        "user": {"username": env.get("USER_NAME", "")},
        "priority": priority or COMMAND_PRIORITY[command].value,
        "requestId": request_id or f"step-{command}-{secrets.token_hex(8)}",
    }
    if wait:
        body["wait"] = wait
    if ttl:
        body["ttl"] = ttl
    try:
        return LockRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise StepError(f"invalid lock request from the step environment: {field}: "
                        f"{message}") from None


def _who(pull: object, user: object) -> str:
    return f"pull #{pull}" + (f" ({user})" if user else "")


def describe_queue(queue: dict[str, Any], request_id: str) -> str | None:
    """One line: where this request stands, who holds the key and who is ahead, or ``None``
    if it is not queued."""
    waiters = queue.get("waiters") or []
    mine = next((w for w in waiters if w.get("requestId") == request_id), None)
    if mine is None:
        return None
    ahead = [w for w in waiters if w["position"] < mine["position"]]
    holders = queue.get("holders") or ([queue["holder"]] if queue.get("holder") else [])
    behind: list[str] = []
    if holders:
        names = ", ".join(_who(h["pull"]["num"], h["user"].get("username")) for h in holders)
        shared = any(h.get("mode") == "shared" for h in holders)
        verb = "holds" if len(holders) == 1 else "hold"
        behind.append(f"{names} of {holders[0]['project']['repoFullName']}, which {verb} it"
                      + (" shared" if shared else ""))
    behind += [_who(w["pull"], w.get("user")) + f", {w['priority']}" for w in ahead]
    return (f"waiting for {queue['key']}: position {mine['position']} of {len(waiters)}"
            + (f", behind {'; '.join(behind)}" if behind else ""))


def describe_estimate(view: dict[str, Any] | None) -> str:
    """What a waiting line ends with: the estimate of the wait (from the key's recent hold
    times), that there is none yet, or nothing when the request is no longer queued."""
    if view is None:
        return ""
    seconds = view.get("estimateSeconds")
    if seconds is None:
        return "; no estimate yet (no release of this key seen)"
    return f"; estimated wait {format_duration(timedelta(seconds=round(seconds)))}"


async def _show_position(client: AsyncClient, request: LockRequest, every: float,
                         out: TextIO) -> None:
    from enhanced_locking.client import ServiceError

    last = None
    assert request.request_id is not None
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(ServiceError):  # the acquire reports an outage itself
            line = describe_queue(await client.queue(request.key), request.request_id)
            if line is not None and line != last:
                view = await client.waiter(request.key, request.request_id)
                print(line + describe_estimate(view), file=out, flush=True)
                last = line


async def acquire_with_progress(
    url: str, request: LockRequest, *, poll: float, out: TextIO, token: str | None = None,
    connect_timeout: float | None = None,
) -> AcquireResult:
    """Acquire (a long poll when it waits), printing the queue position while it waits."""
    from enhanced_locking.client import AsyncClient

    async with AsyncClient(url, token=token, connect_timeout=connect_timeout) as client:
        watcher = None
        if request.wait:
            watcher = asyncio.create_task(_show_position(client, request, poll, out))
        try:
            return await client.acquire(request)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher


def refusal_line(result: AcquireResult, request: LockRequest) -> str:
    """The one line a refused step ends with."""
    holder = result.holder
    by = (f" by {_who(holder.pull.num, holder.user.username or holder.pull.author)} of "
          f"{holder.project.repo_full_name}") if holder else ""
    reason = result.reason
    if reason is Reason.TIMEOUT:
        return f"gave up waiting for {request.key} after {_fmt_wait(request)}: still held{by}"
    if reason is Reason.HELD:
        return f"{request.key} is locked{by} ({_not_waited(request)})"
    if reason is Reason.QUEUE_FULL:
        return f"the queue for {request.key} is full{'; held' + by if by else ''}"
    if reason is Reason.DEADLOCK:
        return f"refused {request.key}: waiting would deadlock ({' -> '.join(result.cycle or [])})"
    if reason is Reason.COLLISION and result.error:
        return result.error
    if reason is Reason.UNAVAILABLE:
        # The service's words when it said any: which store did not answer, or why it grants
        # no lock for now (a store of switched-off locks not read, a policy not applied yet).
        why = result.error or "the lock store behind the service did not answer"
        return f"{request.key}: {why}; nothing is known of the lock"
    if result.error:
        # The service's words where the reason alone does not say it: a request taken out of
        # the queue (cancelled: its pull closed or unlocked, or an admin), a freeze's message.
        # The holder did none of it.
        return f"refused {request.key} ({reason}): {result.error}"
    return f"refused {request.key}: {reason}{by}"


def _not_waited(request: LockRequest) -> str:
    """Why a step was refused at once: the ``--wait`` it was given asked for no wait, or the
    legacy locker answered (it keeps no queue, whatever the wait: Atlantis's semantics)."""
    wait = request.wait
    if wait is True or (isinstance(wait, timedelta) and wait > timedelta(0)):
        return (f"--wait {_fmt_wait(request)}, but the legacy locker answered at once: it keeps "
                "no queue; waiting needs the key on the enhanced locker, enhanced-locking-enabled")
    return f"--wait {format_duration(timedelta(0))}: no waiting"


def _fmt_wait(request: LockRequest) -> str:
    wait = request.wait
    return ("the service's default timeout" if wait is True or not wait
            else format_duration(wait))


def _acquire(args: argparse.Namespace, env: Mapping[str, str], out: TextIO) -> int:
    from enhanced_locking.client import Client, ServiceError

    command = _command(args, env)
    request = request_from_env(env, command=command, wait=args.wait, ttl=args.ttl,
                               priority=args.priority)
    print(f"enhanced-locking: {command} of pull #{request.pull.num} asks for {request.key} "
          f"({request.priority.value} priority"
          + (f", waiting up to {args.wait})" if args.wait else ")"), file=out, flush=True)
    try:
        result = asyncio.run(acquire_with_progress(args.url, request, poll=args.poll, out=out,
                                                   token=args.token,
                                                   connect_timeout=args.connect_timeout))
    except ServiceError as error:
        if args.priority is not None or not _may_not_prioritize(error):
            raise
        # The command's own priority, not one the user asked for: a caller without the
        # prioritize right (the locker role Atlantis is given) asks again at normal. The 403
        # came before the service did anything with the request.
        request = request.model_copy(update={"priority": Priority.NORMAL})
        print(f"enhanced-locking: no 'prioritize' right, so {command} asks with normal "
              "priority", file=out, flush=True)
        result = asyncio.run(acquire_with_progress(args.url, request, poll=args.poll, out=out,
                                                   token=args.token,
                                                   connect_timeout=args.connect_timeout))
    if (args.ttl and result.acquired and result.lock is not None
            and result.lock.expires_at is not None and not result.fresh):
        # The pull that already holds the lock gets it back unchanged, lease and all: an apply
        # step after the plan's would run on what is left of the plan's lease, and the lock
        # could expire (and go to the next waiter) part way through the apply. --ttl is the
        # lease from this step on (the legacy locker's locks have none to renew). A fresh
        # grant (the service's Lock-Grant: new) has it already and is not renewed: a renewal
        # that failed after it would fail the step with the lock held, and Atlantis runs no
        # later step (no release) of a failed one. A failed renewal of a held lock leaves it
        # as it was, the pull's with its lease.
        with Client(args.url, token=args.token,
                    connect_timeout=args.connect_timeout) as client:
            renewed = client.refresh(request.key, pull=request.pull.num, ttl=args.ttl,
                                     repo=request.project.repo_full_name)
        if renewed is None:
            return terminal.refused("enhanced-locking", f"the lease of {request.key} ended "
                                    "before this step could renew it: not locked")
        result = result.model_copy(update={"lock": renewed})
    if result.acquired and result.lock is not None:
        print(f"enhanced-locking: locked {result.lock.key} for pull #{result.lock.pull.num} "
              f"(fencing token {result.lock.fencing_token})", file=out, flush=True)
        return 0
    return terminal.not_granted("enhanced-locking", refusal_line(result, request),
                                unavailable=result.reason is Reason.UNAVAILABLE)


def _may_not_prioritize(error: ServiceError) -> bool:
    """Whether ``error`` is the service's 403 for a caller without the ``prioritize`` right."""
    return (error.status == 403 and isinstance(error.body, dict)
            and error.body.get("verb") == "prioritize")


def _release(args: argparse.Namespace, env: Mapping[str, str], out: TextIO) -> int:
    from enhanced_locking.client import Client, ServiceError

    request = request_from_env(env, command="plan", wait=None, ttl=None, priority=None)
    with Client(args.url, token=args.token, connect_timeout=args.connect_timeout) as client:
        try:
            lock = client.release(request.key, pull=request.pull.num,
                                  repo=request.project.repo_full_name)
        except ServiceError as error:
            if error.status != 409:
                raise
            print(f"enhanced-locking: not released: {error}", file=sys.stderr, flush=True)
            return terminal.EXIT_REFUSED
    if lock is None:
        print(f"enhanced-locking: {request.key} was not locked; nothing to release", file=out)
    else:
        print(f"enhanced-locking: released {lock.key} of pull #{lock.pull.num}", file=out)
    return 0


def _run(args: argparse.Namespace) -> int:
    from enhanced_locking.client import ServiceError

    try:
        if getattr(args, "poll", 1.0) <= 0:
            raise StepError("--poll must be above 0s")
        action = _acquire if args.step_command == "acquire" else _release
        return action(args, os.environ, sys.stdout)
    except StepError as error:
        terminal.say(PROG, str(error))
        return terminal.EXIT_USAGE
    except ServiceError as error:
        return terminal.service_failed(PROG, str(error), status=error.status)


def _seconds(text: str) -> float:
    try:
        return parse_duration(text).total_seconds()
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_step_command(commands: Any) -> list[argparse.ArgumentParser]:
    """The ``step`` command; returns its parsers, which the caller gives ``--url`` and
    ``--token`` as every command has them (before or after any command word)."""
    step = commands.add_parser(
        "step", help="take or give back a project's lock from an Atlantis workflow step",
        description="Reads Atlantis's run-step environment (BASE_REPO_OWNER, BASE_REPO_NAME, "
                    "PULL_NUM, REPO_REL_DIR, WORKSPACE, PROJECT_NAME, ...). Exit codes: 0 "
                    "locked/released; 1 refused or timed out; 2 bad environment or flags; 3 "
                    "service unreachable or unable to serve now (503, 429).")
    sub = step.add_subparsers(dest="step_command", required=True)
    acquire = sub.add_parser("acquire", help="take the project's lock, waiting in the queue")
    acquire.add_argument("--command", choices=sorted(COMMAND_PRIORITY), default=None,
                         help="the Atlantis command this step belongs to (default: "
                              "COMMAND_NAME): plan, apply, import or state (state rm); apply, "
                              "import and state wait ahead of plan")
    acquire.add_argument("--wait", default="5m",
                         help="longest wait in the queue, a Go duration (default 5m, the "
                              "service's default max-timeout); 0s fails at once")
    acquire.add_argument("--ttl", default=None, help="lease of the lock, e.g. 24h")
    acquire.add_argument("--priority", default=None,
                         choices=[p.value for p in Priority],
                         help="override the priority the command gives")
    acquire.add_argument("--poll", type=_seconds, default=5.0,
                         help="how often to print the queue position while waiting (default "
                              "5s)")
    acquire.set_defaults(func=_run)
    release = sub.add_parser("release", help="give the project's lock back")
    release.set_defaults(func=_run)
    return [step, acquire, release]
