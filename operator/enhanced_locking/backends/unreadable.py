"""Stored locks that cannot be read, set aside by key until a force-unlock clears them.

A store shared with other programs (Atlantis's Redis layout), edited by hand, or written by a
buggy release can hold a value under a lock's key that is not a lock. One such value must not
take the service down, and must never be taken for a free key. Every backend decodes what it
reads through :func:`enhanced_locking.backends.codec.read`; a value that is not a lock is
*set aside*:

* a read of that key (get, acquire, release with an owner, refresh) raises
  :class:`~enhanced_locking.types.LockUnreadable`: the key is neither free nor known to be
  held, so nothing is granted on it and nothing is answered as if it were someone's lock;
* a read of many keys (list, release by pull, export, the scans of a start) skips it and
  goes on with the others;
* a force-unlock deletes whatever is stored under the key and clears the entry.

Each backend keeps an :class:`UnreadableLocks` (``backend.unreadable``): the keys this
process found unreadable, with why. It is what this replica has seen: a full scan (a list
without filters) replaces it, a read that decodes a key again clears that key (another
replica, or a person, repaired it). The service listens to it
(:meth:`UnreadableLocks.listen`) for its event, metric, log line and ``/readyz`` detail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from enhanced_locking.types import UnreadableLock

__all__ = ["Listener", "UnreadableLocks"]

Listener = Callable[[UnreadableLock, bool], None]
"""Told of each change: the entry, and ``True`` when it was found, ``False`` when cleared."""


class UnreadableLocks:
    """The unreadable keys of one backend's lock space, as this process last saw them."""

    def __init__(self, side: str) -> None:
        self.side = side
        self._found: dict[str, UnreadableLock] = {}
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` on every change from now on; the answer stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def entries(self) -> list[UnreadableLock]:
        """Every unreadable key, in key order."""
        return [self._found[key] for key in sorted(self._found)]

    def __len__(self) -> int:
        return len(self._found)

    def __contains__(self, key: object) -> bool:
        return key in self._found

    def get(self, key: str) -> UnreadableLock | None:
        """``key``'s entry, if it is set aside."""
        return self._found.get(key)

    def found(self, entry: UnreadableLock) -> None:
        """``entry.key`` was read and is not a lock (kept with the first finding's time)."""
        if entry.key in self._found:
            return
        self._found[entry.key] = entry
        self._tell(entry, True)

    def readable(self, key: str) -> None:
        """``key`` was read and decoded (or found free): it is not set aside any more."""
        if self._found and key in self._found:
            self._tell(self._found.pop(key), False)

    def cleared(self, key: str) -> UnreadableLock | None:
        """``key``'s stored value was deleted (a force-unlock): its entry, if it had one."""
        entry = self._found.pop(key, None)
        if entry is not None:
            self._tell(entry, False)
        return entry

    def scanned(self, unreadable: Iterable[UnreadableLock], *, every: bool = True) -> None:
        """A scan found these unreadable; with ``every`` it read every key, so the keys set
        aside before and not found again are gone."""
        seen = {entry.key: entry for entry in unreadable}
        for key in [key for key in self._found if every and key not in seen]:
            self._tell(self._found.pop(key), False)
        for entry in seen.values():
            self.found(entry)

    def _tell(self, entry: UnreadableLock, found: bool) -> None:
        for listener in list(self._listeners):
            listener(entry, found)
