"""A history checker for locks: no key granted to two holders at once, no fencing token falling.

Clients in one event loop tell the checker when an acquire *returned* granted and when they
are about to release. Everything runs on one thread, so the checker's view is exact: a grant
reported while the checker still records another holder is a real double grant (the other
holder has not even started releasing), and a token not above the key's previous one is a real
fall.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from enhanced_locking.types import Lock

__all__ = ["GrantHistory"]


@dataclass
class GrantHistory:
    holders: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    sides: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    grants: int = 0

    def granted(self, who: str, lock: Lock) -> None:
        self.grants += 1
        self.sides[lock.backend] += 1
        current = self.holders.get(lock.key)
        if current is not None:
            self.violations.append(f"{lock.key} granted to {who} while {current} holds it")
        self.holders[lock.key] = who
        seen = self.tokens[lock.key]
        if seen and lock.fencing_token <= seen[-1]:
            self.violations.append(
                f"{lock.key}: token {lock.fencing_token} ({lock.backend}) for {who} after "
                f"{seen[-1]}"
            )
        seen.append(lock.fencing_token)

    def releasing(self, who: str, key: str) -> None:
        current = self.holders.get(key)
        if current != who:
            self.violations.append(f"{who} releases {key} held by {current}")
        self.holders.pop(key, None)
