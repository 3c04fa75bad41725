"""A replica of the service's previous release, its code taken from the repository's history.

During a rolling upgrade replicas of two releases share one store, so what a release writes
must be read by the release before it, and the other way round. :class:`PreviousReplica`
runs the previous release's Redis store (``enhanced_locking`` at
:data:`PREVIOUS_RELEASE`, taken with ``git archive``) in a child process of its own, against
the same redis-server as the test's store of this release, and asks it to acquire and release
one step at a time: the child keeps its store open between the steps, so it knows the locks it
granted as a replica does.

:data:`PREVIOUS_RELEASE` is read from the Atlantis adapter's tests
(``servicetest.PreviousRelease``), where the commit is named once. A shallow clone lacks it:
it is fetched from ``origin`` first, and a clone that still lacks it fails the test saying so.

The child runs ``python -m tests.support.previous_release ADDR NAMESPACE``, reads one JSON
step a line (``["acquire", repo, path, pull, user]``: a lock of that project, workspace
``default``, as :func:`tests.support.locks.request_for` asks for it; ``["release", key, repo,
pull]``) and answers one JSON line: the lock granted, held or released (``null``: none), as
``key``, ``token``, ``user`` and ``granted``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["PREVIOUS_RELEASE", "PreviousReplica", "previous_release_tree"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_SERVICETEST = REPO_ROOT / "atlantis" / "internal" / "servicetest" / "servicetest.go"
_COMMIT = re.compile(r'^const PreviousRelease = "([0-9a-f]{40})"$', re.MULTILINE)
_STEP_SECONDS = 30.0
"""A step's bound: a child's start (imports, a connection) takes about a second."""


def _previous_release() -> str:
    found = _COMMIT.search(_SERVICETEST.read_text())
    assert found is not None, f"no `const PreviousRelease` in {_SERVICETEST}"
    return found.group(1)


PREVIOUS_RELEASE = _previous_release()


def previous_release_tree(into: Path) -> Path:
    """The ``operator`` directory of the previous release, written under ``into``."""
    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(("git", "-C", str(REPO_ROOT), *args), capture_output=True,
                              check=False)

    if git("cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}").returncode != 0:
        git("fetch", "--quiet", "origin", PREVIOUS_RELEASE)  # a shallow clone
    archive = subprocess.run(
        ("sh", "-c", 'git -C "$1" archive "$2" operator | tar -x -C "$3"', "archive",
         str(REPO_ROOT), PREVIOUS_RELEASE, str(into)), capture_output=True, check=False)
    tree = into / "operator"
    if archive.returncode != 0 or not (tree / "enhanced_locking").is_dir():
        raise AssertionError(
            f"cannot take the service's code at {PREVIOUS_RELEASE} from the repository's "
            f"history (a shallow clone has none: `git fetch --unshallow`): "
            f"{archive.stderr.decode(errors='replace')}")
    return tree


class PreviousReplica:
    """The previous release's Redis store in a child process (see the module docstring)."""

    def __init__(self, child: asyncio.subprocess.Process) -> None:
        self._child = child

    @classmethod
    async def start(cls, tree: Path, addr: str, namespace: str) -> PreviousReplica:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("ENHANCED_LOCKING_", "ATLANTIS_ENHANCED_LOCKING_"))}
        env["PYTHONPATH"] = os.pathsep.join((str(tree), str(REPO_ROOT)))
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.previous_release", addr, namespace,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=str(tree.parent), env=env)
        replica = cls(child)
        answer = await replica._ask(["origin"])
        assert answer == str(tree / "enhanced_locking"), (
            f"the child imported enhanced_locking from {answer}, not the previous release's")
        return replica

    async def acquire(self, repo: str, path: str, pull: int, user: str) -> dict[str, Any]:
        answer = await self._ask(["acquire", repo, path, pull, user])
        assert isinstance(answer, dict)
        return answer

    async def release(self, key: str, repo: str, pull: int) -> dict[str, Any] | None:
        answer = await self._ask(["release", key, repo, pull])
        assert answer is None or isinstance(answer, dict)
        return answer

    async def _ask(self, step: list[Any]) -> Any:
        child = self._child
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(step).encode() + b"\n")
        await child.stdin.drain()
        line = await asyncio.wait_for(child.stdout.readline(), _STEP_SECONDS)
        if not line:
            assert child.stderr is not None
            error = await child.stderr.read()
            raise AssertionError(f"the previous release's replica ended at {step}: "
                                 f"{error.decode(errors='replace')[-4000:]}")
        return json.loads(line)

    async def stop(self) -> None:
        child = self._child
        if child.returncode is None:
            assert child.stdin is not None
            child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), _STEP_SECONDS)
            except TimeoutError:
                child.kill()
                await child.wait()


def _shown(lock: Any, *, granted: bool | None = None) -> dict[str, Any] | None:
    if lock is None:
        return None
    shown = {"key": lock.key, "token": lock.fencing_token, "user": lock.user.username}
    if granted is not None:
        shown["granted"] = granted
    return shown


async def _serve(addr: str, namespace: str) -> None:  # pragma: no cover - runs in the child
    from tests.support.locks import lock_for, request_for

    import enhanced_locking
    from enhanced_locking.backends.redis_store import RedisBackend
    from enhanced_locking.config import EnhancedLockingConfig

    store = RedisBackend.from_config(EnhancedLockingConfig(redis_addr=addr), namespace)
    await store.ping()
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            step = json.loads(line)
            answer: Any
            if step[0] == "origin":
                answer = str(Path(enhanced_locking.__file__).parent)
            elif step[0] == "acquire":
                _, repo, path, pull, user = step
                granted, lock = await store.acquire(lock_for(request_for(
                    repo=repo, path=path, project=path, pull=pull, user=user)))
                answer = _shown(lock, granted=granted)
            else:
                _, key, repo, pull = step
                answer = _shown(await store.release(key, owner=(repo, pull)))
            print(json.dumps(answer), flush=True)
    finally:
        await store.close()


if __name__ == "__main__":  # pragma: no cover - the child
    asyncio.run(_serve(sys.argv[1], sys.argv[2]))
