"""What the command-line tools print, and how they end: one convention for every command.

* **stdout carries the answer**, as JSON (or YAML, or a table for people), whether the command
  did what it was asked or was refused: a script reads one document either way.
* **stderr carries one line** for every refusal and every error, prefixed with the program's
  name (``enhanced-locking: no lock is held on KEY``); never a traceback for a user's mistake.
  So does an answer that left some locks out because their store did not answer, and the
  line says whose are missing: a list is done with what it reached (exit 0); a release by
  pull left those locks held, so it exits 3, as a call the service could not serve does.
* **The exit code says which**: 0 done; 1 refused (held, not found, not owned, forbidden);
  2 invalid usage, config or URL; 3 the service (or the cluster) could not be reached, or
  could not serve the call (or, for a release by pull, all of it) now.
* A reader that stops early (``enhanced-locking lock list | head``) ends the command quietly
  with 141, as a shell reports a SIGPIPE, instead of a ``BrokenPipeError`` traceback.

Colour is used only when stdout is a terminal and ``NO_COLOR`` is not set (no-color.org).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from enhanced_locking.service_address import TOKEN_ENV

__all__ = [
    "EXIT_OK",
    "EXIT_PIPE",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "NOT_SERVED",
    "Style",
    "emit",
    "not_granted",
    "print_json",
    "refused",
    "say",
    "service_failed",
    "survive_closed_pipe",
]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a writer whose reader went away."""
NOT_SERVED = frozenset({0, 503, 429})
"""The statuses of a call the lock service was not reached for (0) or could not serve now (its
store did not answer, it is overloaded): nothing is known of the lock, exit 3."""


def print_json(data: Any, *, out: TextIO | None = None) -> None:
    """``data`` as indented JSON on stdout (the answer of every JSON-speaking command)."""
    print(json.dumps(data, indent=2), file=out or sys.stdout)


def emit(data: Any, output: str, *, out: TextIO | None = None) -> None:
    """``data`` as ``json`` or ``yaml`` (the ``-o`` of the kubectl plugin)."""
    stream = out or sys.stdout
    if output == "yaml":
        import yaml

        stream.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        print_json(data, out=stream)


def say(program: str, message: str) -> None:
    """One line on stderr, prefixed with the program's name."""
    print(f"{program}: {message}", file=sys.stderr)


def not_reached(program: str, sides: Sequence[str], what: str) -> None:
    """One line on stderr for an answer that left out the locks of ``sides`` (their store did
    not answer): ``what`` the command did not do to them (``listed``, ``released``)."""
    if sides:
        stores = " and ".join(f"the {side} store" for side in sides)
        say(program, f"{stores} did not answer: its locks are not {what}")


def not_read(program: str, keys: Sequence[tuple[str, str]], clear: str) -> None:
    """One line on stderr for a list that found stored locks it cannot read (``keys``: each
    one's key and side): they are not among the locks listed, and their keys stay held until
    a force-unlock (``clear``: the program's command for it) clears them."""
    if keys:
        named = ", ".join(f"{key} ({side})" for key, side in keys)
        say(program, f"stored locks that cannot be read are not listed: {named}; their keys "
                     f"stay held until a force-unlock (`{clear}`) clears them")


def refused(program: str, message: str, answer: Any | None = None) -> int:
    """A refusal: the answer (if any) on stdout, one line on stderr; exit code 1."""
    if answer is not None:
        print_json(answer)
    say(program, message)
    return EXIT_REFUSED


def not_granted(program: str, message: str, answer: Any | None = None, *,
                unavailable: bool) -> int:
    """An acquire the service answered without a grant: a refusal (exit 1: held, timed out,
    queue full, ...), but one of reason ``unavailable`` (a store did not answer and the service
    fails closed) is exit 3, as its 503 is: nothing is known of the lock."""
    if not unavailable:
        return refused(program, message, answer)
    if answer is not None:
        print_json(answer)
    say(program, message)
    return EXIT_UNREACHABLE


def service_failed(program: str, message: str, *, status: int, answer: Any | None = None) -> int:
    """How a command ends when the lock service did not do what it asked: not reached, or
    it could not serve the call now (``status`` 0, 503 or 429: its store did not answer, it
    is overloaded; exit 3, nothing is known of the lock), the request invalid (422: exit 2),
    or refused (404, 409, 401/403, any other status: the service's answer on stdout, one line
    on stderr, exit 1)."""
    if status in NOT_SERVED:
        say(program, message)
        return EXIT_UNREACHABLE
    if status == 422:
        say(program, message)
        return EXIT_USAGE
    if status == 401:
        # Who reads this line (an Atlantis step's is in the pull request's comment) is told
        # where the command takes its token from, never the token.
        message += f" (the token is --token's, else {TOKEN_ENV}'s: docs/08-access.md)"
    return refused(program, message, answer)


def survive_closed_pipe(run: Callable[[], int]) -> int:
    """Run a command; if its reader closes the pipe, stop quietly with :data:`EXIT_PIPE`."""
    try:
        code = run()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush at exit again: point stdout at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    return code


class Style:
    """ANSI colours when the stream is a terminal (and ``NO_COLOR`` is unset), else plain."""

    _CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33",
              "blue": "34", "cyan": "36"}

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        stream = stream or sys.stdout
        if enabled is None:
            enabled = stream.isatty() and not os.environ.get("NO_COLOR")
        self.enabled = enabled

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles:
            return text
        codes = ";".join(self._CODES[name] for name in styles)
        return f"\033[{codes}m{text}\033[0m"
