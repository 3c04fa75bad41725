"""``kubectl locking``: the rollout and the locks from a terminal (a kubectl plugin).

Installed with the package as the executable ``kubectl-locking``; kubectl finds any
``kubectl-NAME`` on the ``PATH`` and runs it for ``kubectl NAME``::

    kubectl locking rollout status [NAME] [--watch] [-o json|yaml]
    kubectl locking rollout promote [NAME] [--full]
    kubectl locking rollout pause|resume|abort|retry [NAME]
    kubectl locking rollout set-weight N [NAME]
    kubectl locking locks list [--repo R] [--pull N] [-o json|yaml]
    kubectl locking locks queue KEY [-o json|yaml]
    kubectl locking locks unlock KEY --reason TEXT

The ``rollout`` commands read and edit the LockMigration with the cluster credentials kubectl
uses (``--kubeconfig``, ``--context``, ``-n``); each edit is one a user could write by hand
(the same spec fields and annotations, see docs/02-migration.md) and prints one line saying
what it did. The ``locks`` commands talk to the lock service's HTTP API (``--url`` or
``ENHANCED_LOCKING_URL``; ``--token`` or ``ENHANCED_LOCKING_TOKEN`` when it asks for one).

Output follows :mod:`enhanced_locking.terminal`: a tree or table for people (coloured on a
terminal), ``-o json|yaml`` for scripts; exit 0 done (and, for ``rollout status``, a rollout
that is neither aborted nor degraded), 1 refused, not found, aborted or degraded, 2 invalid
usage, 3 the cluster or the service could not be reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from enhanced_locking import terminal
from enhanced_locking.cli import add_client_options, resolve_client_options, with_client
from enhanced_locking.client import Client
from enhanced_locking.kubeconfig import NOT_A_KUBECONFIG, not_a_kubeconfig
from enhanced_locking.rollout_summary import RolloutSummary, remaining_text, summarize
from enhanced_locking.types import UnreadableLock

__all__ = ["main"]

PROG = "kubectl-locking"
GROUP, VERSION, PLURAL = "locking.runatlantis.io", "v1alpha1", "lockmigrations"
PROMOTE_ANNOTATION = f"{GROUP}/promote"
RETRY_ANNOTATION = f"{GROUP}/retry"
DEFAULT_MIGRATION = "to-enhanced"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(terminal.EXIT_USAGE, f"{self.prog}: error: {message}\n")


class Unreachable(Exception):
    """The cluster did not answer (or no credentials say how to reach it)."""


class BadSetting(Exception):
    """``--kubeconfig``, ``--context`` or ``KUBECONFIG`` names what is not there or not YAML."""


class Refused(Exception):
    """The API server refused a read or an edit; the message says why."""


# --- the cluster -----------------------------------------------------------------------------
def _kubeconfig_source(kubeconfig: str | None) -> str:
    """Where the kubeconfig came from, as the user gave it."""
    if kubeconfig is not None:
        return f"--kubeconfig {kubeconfig}"
    return f"KUBECONFIG {os.environ['KUBECONFIG']}" if os.environ.get("KUBECONFIG") else (
        "~/.kube/config")


def _check_names(kubeconfig: str | None, context: str | None) -> None:
    """Raise :class:`BadSetting` when ``--kubeconfig`` or ``--context`` names what is not there
    (the client library says only that no configuration was found)."""
    from kubernetes import config

    if kubeconfig is not None and not os.path.isfile(kubeconfig):
        raise BadSetting(f"--kubeconfig {kubeconfig}: no such file")
    if context is None:
        return
    try:
        contexts, _ = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return
    names = [str(c.get("name")) for c in contexts or []]
    if context not in names:
        where = kubeconfig if kubeconfig is not None else _kubeconfig_source(None)
        raise BadSetting(f"--context {context}: no such context in {where} "
                         f"(its contexts: {', '.join(names) or 'none'})")


def _written_wrong(kubeconfig: str | None, error: Exception) -> bool:
    """Whether ``error`` is the client library's word on a kubeconfig file that is there but
    empty or without what it needs (a current context): the file the user named is wrong,
    where no file at all means no credentials."""
    named = kubeconfig or (os.environ.get("KUBECONFIG") or "").split(os.pathsep)[0] or (
        os.path.expanduser("~/.kube/config"))
    return os.path.isfile(named) and str(error).startswith("Invalid kube-config")


class Cluster:
    """The LockMigration calls, with the credentials and namespace kubectl would use."""

    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context, client_configuration=configuration,
                persist_config=False)
            _, active = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=kubeconfig)
        except NOT_A_KUBECONFIG as error:
            raise BadSetting(not_a_kubeconfig(_kubeconfig_source(kubeconfig), error)) from None
        except (config.ConfigException, OSError) as error:
            _check_names(kubeconfig, context)
            if _written_wrong(kubeconfig, error):
                raise BadSetting(f"{_kubeconfig_source(kubeconfig)}: not a kubeconfig file: "
                                 f"{' '.join(str(error).split())}") from None
            raise Unreachable(f"no Kubernetes credentials: {error}") from None
        if context is not None:
            contexts, _ = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=kubeconfig)
            active = next((c for c in contexts if c["name"] == context), active)
        self.default_namespace = str((active or {}).get("context", {}).get("namespace")
                                     or "default")
        self._api = client.CustomObjectsApi(client.ApiClient(configuration))

    def _call(self, what: str, call: Callable[[], Any]) -> dict[str, Any]:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            found = call()
        except ApiException as error:
            raise Refused(f"{what}: {_api_message(error)}") from None
        except HTTPError as error:
            raise Unreachable(f"cannot reach the Kubernetes API server: {error}") from None
        return dict(found)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(f"lockmigration {namespace}/{name}", lambda: (
            self._api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   _request_timeout=10)))

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._call(f"lockmigration {namespace}/{name}", lambda: (
            self._api.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, patch, field_manager="kubectl-locking",
                _content_type="application/merge-patch+json", _request_timeout=10)))


def _api_message(error: Any) -> str:
    try:
        body = json.loads(error.body)
        return str(body.get("message") or f"HTTP {error.status}")
    except (TypeError, ValueError):
        return f"HTTP {error.status} {error.reason}"


# --- rollout status --------------------------------------------------------------------------
_MARK = {"done": ("✔", "green"), "current": ("▶", "bold"), "pending": ("○", "dim")}
_PHASE = {"Completed": "green", "Progressing": "blue", "Paused": "yellow", "Aborted": "red",
          "Degraded": "red"}


def render_tree(summary: RolloutSummary, style: terminal.Style) -> str:
    """The rollout as a tree, for people."""
    lines = [style(f"LockMigration {summary.namespace}/{summary.name}", "bold")]
    rows: list[tuple[str, list[str]]] = []
    phase = style(summary.phase, _PHASE.get(summary.phase, "bold"))
    rows.append((f"Phase:    {phase}  {summary.message}", []))
    now = "-" if summary.weight_now is None else f"{summary.weight_now:g}%"
    target = "-" if summary.weight_target is None else f"{summary.weight_target:g}%"
    rows.append((f"Weight:   {now} now, target {target} (move: {summary.move})", []))
    rows.append((f"Mode:     {summary.mode}, fallback {summary.fallback}"
                 + (", " + style("paused by spec.paused", "yellow")
                    if summary.paused_by_spec else ""), []))
    if summary.steps:
        children = []
        for step in summary.steps:
            mark, colour = _MARK[step.state]
            text = f"{step.number}. {step.text}"
            if step.remaining is not None:
                text += f" ({remaining_text(step.remaining)} left)"
            children.append(style(f"{mark} {text}", colour))
        rows.append(("Steps", children))
    if summary.analysis:
        children = []
        for metric in summary.analysis:
            value = "not measured" if metric.value is None else f"{metric.value:g}"
            mark = style("✔", "green") if metric.ok else style("✘", "red")
            children.append(f"{mark} {metric.name} {value} (limit {metric.limit:g})")
        if summary.analysis_failure:
            children.append(style(f"last failure: {summary.analysis_failure}", "red"))
        rows.append(("Analysis" + (f" (measured {summary.measured_at})"
                                   if summary.measured_at else ""), children))
    if summary.abort is not None:
        reason, message = summary.abort
        rows.append((style(f"Aborted:  {reason}: {message}", "red"), []))
    if summary.conditions:
        rows.append(("Conditions", [
            f"{c['type']} {style(c['status'], 'green' if c['status'] == 'True' else 'dim')} "
            f"{c['reason']}" + (f": {c['message']}" if c["message"] else "")
            for c in summary.conditions]))
    replicas = [f"{summary.replicas} reporting"]
    if summary.pending_replicas:
        replicas.append("pending the move: " + ", ".join(summary.pending_replicas))
    if summary.excluded_replicas:
        replicas.append("excluded: " + ", ".join(summary.excluded_replicas))
    if summary.status_writer:
        replicas.append(f"status by {summary.status_writer}"
                        + (f", last seen {summary.last_seen_at}" if summary.last_seen_at
                           else ""))
    rows.append(("Replicas: " + "; ".join(replicas), []))
    for number, (head, children) in enumerate(rows):
        last = number == len(rows) - 1
        lines.append(("└── " if last else "├── ") + head)
        for position, child in enumerate(children):
            lines.append(("    " if last else "│   ")
                         + ("└── " if position == len(children) - 1 else "├── ") + child)
    return "\n".join(lines)


def _status(cluster: Cluster, args: argparse.Namespace) -> int:
    style = terminal.Style()
    deadline = time.monotonic() + args.timeout if args.timeout else None
    shown: object = None
    while True:
        summary = summarize(cluster.get(args.namespace, args.name), now=datetime.now(UTC))
        if args.output:
            if not args.watch or summary.as_dict() != shown:
                terminal.emit(summary.as_dict(), args.output)
                shown = summary.as_dict()
        else:
            text = render_tree(summary, style)
            if text != shown:
                if args.watch and style.enabled:
                    sys.stdout.write("\033[H\033[2J")
                elif args.watch and shown is not None:
                    print()
                print(text, flush=True)
                shown = text
        if not args.watch or summary.done:
            return terminal.EXIT_OK if summary.healthy else terminal.EXIT_REFUSED
        if deadline is not None and time.monotonic() > deadline:
            terminal.say(PROG, f"--timeout: the rollout is still {summary.phase}")
            return terminal.EXIT_REFUSED
        time.sleep(args.interval)


# --- rollout edits ---------------------------------------------------------------------------
def _token() -> str:
    """A new value for a one-shot annotation (the operator acts on each new value once)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _no_pause(spec: dict[str, Any], status: dict[str, Any]) -> str | None:
    """Why a promote now has no pause to end, as the status shows it (the operator's rule in
    ``kube/rollout.py``: such a promote is recorded, Event PromoteIgnored), else None."""
    steps = spec.get("steps")
    if spec.get("promote"):
        return "spec.promote is true already"
    if not steps:
        return "the migration has no steps"
    index = status.get("currentStepIndex")
    index = index if isinstance(index, int) else 0
    if index >= len(steps):
        return "the rollout has completed"
    if "setWeight" in steps[index]:
        return f"step {index + 1}/{len(steps)} (setWeight {float(steps[index]['setWeight']):g}) " \
            "is not a pause"
    return None


def _edit(cluster: Cluster, args: argparse.Namespace) -> int:
    action = args.rollout_command
    where = f"lockmigration {args.namespace}/{args.name}"
    current = cluster.get(args.namespace, args.name)
    spec = current.get("spec") or {}
    patch: dict[str, Any]
    if action == "promote" and args.full:
        # spec.abort and spec.promote cannot both be true (the CRD refuses it): the one asked
        # for last wins, as a user editing by hand would clear the other.
        patch = {"spec": {"promote": True, **({"abort": None} if spec.get("abort") else {})}}
        cleared = ", spec.abort cleared" if spec.get("abort") else ""
        said = (f"full promotion requested (spec.promote: true{cleared}): every key to "
                "enhanced, the steps left skipped")
    elif action == "promote":
        value = _token()
        patch = {"metadata": {"annotations": {PROMOTE_ANNOTATION: value}}}
        # A promote waits while spec.paused holds the rollout: clear it in the same edit, as
        # `kubectl argo rollouts promote` does, so a paused rollout goes on as asked.
        unpaused = ""
        if spec.get("paused"):
            patch["spec"], unpaused = {"paused": False}, ", spec.paused cleared"
        idle = _no_pause(spec, current.get("status") or {})
        ends = (f"no pause is in progress ({idle}): the promote is recorded and skips nothing"
                if idle else "the pause in progress ends")
        said = f"promote requested ({PROMOTE_ANNOTATION}={value}{unpaused}): {ends}"
    elif action == "pause":
        patch, said = {"spec": {"paused": True}}, "paused (spec.paused: true)"
    elif action == "resume":
        patch, said = {"spec": {"paused": False}}, "resumed (spec.paused: false)"
    elif action == "abort":
        # After a full promotion most of all: an abort that the CRD refused would leave every
        # key on enhanced.
        patch = {"spec": {"abort": True, **({"promote": None} if spec.get("promote") else {})}}
        cleared = ", spec.promote cleared" if spec.get("promote") else ""
        said = f"abort requested (spec.abort: true{cleared}): every key goes back to legacy"
    elif action == "retry" and spec.get("abort"):
        patch, said = {"spec": {"abort": False}}, \
            "restarted from step 1 (spec.abort: false)"
    elif action == "retry":
        value = _token()
        patch = {"metadata": {"annotations": {RETRY_ANNOTATION: value}}}
        said = f"retry requested ({RETRY_ANNOTATION}={value}): an aborted rollout restarts"
    else:  # set-weight
        if spec.get("steps"):
            return terminal.refused(
                PROG, f"{where} has spec.steps, which drive the weight: edit the steps, or "
                "promote/abort; set-weight is for a migration with a fixed weight")
        patch, said = {"spec": {"weight": args.weight}}, f"weight set to {args.weight:g}"
        if spec.get("abort"):  # abort and promote win over the weight (docs/02-migration.md)
            said += "; spec.abort is true: every key stays on legacy until it is cleared"
        elif spec.get("promote"):
            said += "; spec.promote is true: every key stays on enhanced until it is cleared"
    edited = cluster.patch(args.namespace, args.name, patch)
    if args.output:
        terminal.emit({"object": where, "action": action, "patch": patch,
                       "generation": (edited.get("metadata") or {}).get("generation")},
                      args.output)
    else:
        print(f"{where}: {said}")
    return terminal.EXIT_OK


# --- locks -----------------------------------------------------------------------------------
def _age(since: str | None, now: datetime) -> str:
    """``45s``, ``12m``, ``3h4m``, ``2d3h``: how long ago ``since`` was."""
    if not since:
        return "-"
    seconds = max(0, int((now - datetime.fromisoformat(since.replace("Z", "+00:00")))
                         .total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], style: terminal.Style) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    line = "   ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [style(line.rstrip(), "bold")]
    for row in rows:
        out.append("   ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(out)


def _who(lock: dict[str, Any]) -> str:
    user = (lock.get("user") or {}).get("username") or ""
    return f"#{lock['pull']['num']}" + (f" {user}" if user else "")


def _locks_list(client: Client, args: argparse.Namespace) -> int:
    listing = client.listing(repo=args.repo, pull=args.pull)
    answer = listing.as_json()
    if args.output:
        terminal.emit(answer, args.output)
    elif answer["locks"]:
        now = datetime.now(UTC)
        rows = [[lock["key"], _who(lock), _age(lock["acquiredAt"], now),
                 "-" if not lock.get("expiresAt") else lock["expiresAt"],
                 str(lock["fencingToken"]), lock["backend"]] for lock in answer["locks"]]
        print(_table(["KEY", "PULL", "AGE", "LEASE UNTIL", "TOKEN", "BACKEND"], rows,
                     terminal.Style()))
    elif not listing.unavailable and not listing.unreadable:
        print("no locks held" + (f" in {args.repo}" if args.repo else ""))
    if listing.unreadable and not args.output:
        print("set aside, cannot be read (a force-unlock clears them):")
        print(_table(["KEY", "BACKEND", "WHY"],
                     [[entry.key, entry.side, entry.reason] for entry in listing.unreadable],
                     terminal.Style()))
    elif args.output:  # the answer names them; a script reading its locks is told too
        terminal.not_read(PROG, [(entry.key, entry.side) for entry in listing.unreadable],
                          "kubectl locking locks unlock KEY --reason TEXT")
    terminal.not_reached(PROG, listing.unavailable, "listed")
    return terminal.EXIT_OK


def _locks_queue(client: Client, args: argparse.Namespace) -> int:
    queue = client.queue(args.key)
    if args.output:
        terminal.emit(queue, args.output)
        return terminal.EXIT_OK
    holder = queue.get("holder")
    # Every holder: several pulls hold a key shared (``holder`` is only the first of them).
    holders = queue.get("holders") or ([holder] if holder else [])
    style = terminal.Style()
    if len(holders) > 1:
        print(f"{args.key}: held shared by pulls " + ", ".join(
            f"{_who(h)} (fencing token {h['fencingToken']})" for h in holders))
    else:
        print(f"{args.key}: " + (f"held by pull {_who(holder)}, fencing token "
                                 f"{holder['fencingToken']}" if holder else "free"))
    waiters = queue.get("waiters") or []
    if not waiters:
        print("no waiters")
        return terminal.EXIT_OK
    ahead = [("holders " if len(holders) > 1 else "holder ")
             + ", ".join(_who(h) for h in holders) if holders else "the key's release"]
    ahead += [f"#{w['pull']} (position {w['position']})" for w in waiters]
    rows = [[str(w["position"]), f"#{w['pull']} {w['user']}".strip(), w["effectivePriority"],
             f"{w['waitedMs'] / 1000:.0f}s", w["deadline"], ahead[number]]
            for number, w in enumerate(waiters)]
    print(_table(["POS", "PULL", "PRIORITY", "WAITED", "GIVES UP AT", "WAITS FOR"], rows, style))
    return terminal.EXIT_OK


def _locks_unlock(client: Client, args: argparse.Namespace) -> int:
    lock = client.force_unlock(args.key, reason=args.reason)
    if lock is None:
        message = f"no lock is held on {args.key}"
        return terminal.refused(PROG, message, {"released": False, "lockKey": args.key,
                                                "error": message})
    if isinstance(lock, UnreadableLock):  # cleared: what was stored could not be read
        cleared = lock.model_dump(mode="json", by_alias=True)
        if args.output:
            terminal.emit({"released": True, "lock": None, "unreadable": cleared,
                           "reason": args.reason}, args.output)
        else:
            print(f"unlocked {args.key} (its stored lock could not be read: {lock.reason}); "
                  f"reason: {args.reason}")
        return terminal.EXIT_OK
    answer = lock.model_dump(mode="json", by_alias=True)
    if args.output:
        terminal.emit({"released": True, "lock": answer, "reason": args.reason}, args.output)
    else:
        print(f"unlocked {args.key} (was held by pull {_who(answer)}, fencing token "
              f"{answer['fencingToken']}); reason: {args.reason}")
    return terminal.EXIT_OK


# --- wiring ----------------------------------------------------------------------------------
def _with_cluster(action: Callable[[Cluster, argparse.Namespace], int]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        try:
            cluster = Cluster(args.kubeconfig, args.context)
            args.namespace = args.namespace or cluster.default_namespace
            return action(cluster, args)
        except Unreachable as error:
            terminal.say(PROG, str(error))
            return terminal.EXIT_UNREACHABLE
        except BadSetting as error:
            terminal.say(PROG, str(error))
            return terminal.EXIT_USAGE
        except Refused as error:
            return terminal.refused(PROG, str(error))
    return run


def _with_service(action: Callable[[Client, argparse.Namespace], int]) -> Callable[..., int]:
    return with_client(action, program=PROG)


def _weight(value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        weight = -1
    if not 0 <= weight <= 100:
        raise argparse.ArgumentTypeError(f"expected a weight from 0 to 100, got {value!r}")
    return weight


def _seconds(*, above_zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, above 0 or at least 0."""

    def seconds(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0 or (above_zero and number == 0):
            least = "above 0" if above_zero else "0 or more"
            raise argparse.ArgumentTypeError(f"expected seconds, {least}, got {value!r}")
        return number

    return seconds


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=["json", "yaml"], default=None,
                        help="print JSON or YAML for scripts instead of the view for people")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kubectl locking",
                     description="Enhanced locking's rollout and locks "
                                 "(docs/10-operators-tools.md).",
                     epilog="Exit codes: 0 done; 1 refused, not found, aborted or degraded; 2 "
                            "invalid usage; 3 the cluster or the service could not be reached.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     metavar="COMMAND")

    cluster = _Parser(add_help=False)
    cluster.add_argument("-n", "--namespace", default=None,
                         help="namespace of the LockMigration (default: the context's)")
    cluster.add_argument("--kubeconfig", default=None,
                         help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    cluster.add_argument("--context", default=None, help="kubeconfig context to use")

    rollout = commands.add_parser("rollout", help="see and steer the LockMigration's rollout")
    verbs = rollout.add_subparsers(dest="rollout_command", required=True, parser_class=_Parser,
                                   metavar="COMMAND")
    status = verbs.add_parser("status", parents=[cluster],
                              help="the rollout as a tree: steps, weight, pause, analysis")
    status.add_argument("--watch", "-w", action="store_true",
                        help="keep showing it until the rollout completes, aborts or degrades")
    status.add_argument("--timeout", type=_seconds(above_zero=False), default=None,
                        metavar="SECONDS",
                        help="with --watch: give up (exit 1) after this long; 0: never, as with "
                        "kubectl rollout status")
    status.add_argument("--interval", type=_seconds(above_zero=True), default=1.0,
                        metavar="SECONDS", help=argparse.SUPPRESS)
    _output(status)
    status.set_defaults(func=_with_cluster(_status))
    edits = {
        "promote": "end the pause in progress (--full: every key to enhanced now)",
        "pause": "hold the rollout at its step (spec.paused: true)",
        "resume": "let a paused rollout go on (spec.paused: false)",
        "abort": "send every key back to legacy (spec.abort: true)",
        "retry": "restart an aborted rollout from step 1",
        "set-weight": "set a fixed weight (a migration without steps)",
    }
    for verb, text in edits.items():
        edit = verbs.add_parser(verb, parents=[cluster], help=text)
        if verb == "set-weight":
            edit.add_argument("weight", type=_weight, metavar="N",
                              help="percent of lock keys routed to enhanced, 0 to 100")
        if verb == "promote":
            edit.add_argument("--full", action="store_true",
                              help="promote fully (spec.promote: true), skipping every step left")
        _output(edit)
        edit.set_defaults(func=_with_cluster(_edit))
    for sub in verbs.choices.values():
        sub.add_argument("name", nargs="?", default=DEFAULT_MIGRATION,
                         help=f"the LockMigration (default: {DEFAULT_MIGRATION})")

    locks = commands.add_parser("locks", help="held locks and queues, from the lock service")
    add_client_options(locks)
    kinds = locks.add_subparsers(dest="locks_command", required=True, parser_class=_Parser,
                                 metavar="COMMAND")
    listing = kinds.add_parser("list", help="held locks: holder, age, lease, fencing token")
    listing.add_argument("--repo", default=None, help="only locks of this repository")
    listing.add_argument("--pull", type=int, default=None, help="only locks of this pull")
    _output(listing)
    listing.set_defaults(func=_with_service(_locks_list))
    queue = kinds.add_parser("queue", help="a key's holder and waiters, in service order")
    queue.add_argument("key", help="the lock key, as locks list shows it")
    _output(queue)
    queue.set_defaults(func=_with_service(_locks_queue))
    unlock = kinds.add_parser("unlock", help="free a lock whoever holds it (admin; audited)")
    unlock.add_argument("key", help="the lock key")
    unlock.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    _output(unlock)
    unlock.set_defaults(func=_with_service(_locks_unlock))
    for sub in kinds.choices.values():
        add_client_options(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "locks":
        resolve_client_options(args, program=PROG)
    try:
        return terminal.survive_closed_pipe(lambda: int(args.func(args)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
