"""A client's etcd calls whose answers go astray, on a real cluster.

:class:`LostAnswers` stands in for one of the client's services (its key-value or lease
calls) and passes every call to it, except those it is told to lose: the first ``applied``
of them are applied by etcd and their answers lost (a member that applied the write, then
froze); after those, the next ``unanswered`` reach nothing (each fails 0.2 s later), and the
next ``refused`` fail at once as a call that cannot be served (not sent again by the call).
A lost answer is what a call past its deadline raises. Each call of those it loses is kept
with its arguments by name (``arguments``), to tell what every attempt carried.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

__all__ = ["LostAnswers"]


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=details)


class LostAnswers:
    """``real``'s calls, the ones named in ``losing`` going astray (see the module)."""

    def __init__(self, real: Any, *, losing: tuple[str, ...], applied: int,
                 unanswered: int = 0, refused: int = 0) -> None:
        self._real = real
        self._losing = losing
        self.applied = applied
        self.unanswered = unanswered
        self.refused = refused
        self.sent = 0
        """Calls made of those named in ``losing``."""
        self.arguments: list[dict[str, Any]] = []
        """Each of those calls' arguments, by parameter name (defaults filled in)."""

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._real, name)
        if name not in self._losing:
            return call
        return lambda *args, **options: self._astray(call, *args, **options)

    async def _astray(self, call: Callable[..., Awaitable[Any]], *args: Any,
                      **options: Any) -> Any:
        self.sent += 1
        bound = inspect.signature(call).bind(*args, **options)
        bound.apply_defaults()
        self.arguments.append(dict(bound.arguments))
        if self.applied:
            self.applied -= 1
            await call(*args, **options)
        elif self.unanswered:
            self.unanswered -= 1
            await asyncio.sleep(0.2)
        elif self.refused:
            self.refused -= 1
            raise _error(grpc.StatusCode.INTERNAL, "lost on its way")
        else:
            return await call(*args, **options)
        raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
