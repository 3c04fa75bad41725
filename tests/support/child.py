"""Child processes that die with the test process, started without running Python in the child.

A child started with ``preexec_fn`` makes :mod:`subprocess` fork the whole interpreter and run
Python between fork and exec; when a gRPC client (the etcd stores) has threads in flight, gRPC's
fork handling aborts that child (``epoll_wait error: Bad file descriptor``, exit -6). Without
``preexec_fn`` CPython starts children with ``vfork``, which runs no fork handlers. The parent
death signal is set instead by ``setpriv --pdeathsig KILL`` (util-linux), which execs the real
command in the same process, so its pid and signals are the command's own.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

__all__ = ["dying_with_parent"]

_SETPRIV = shutil.which("setpriv")


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it gets SIGKILL when the test process dies (where setpriv exists)."""
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
