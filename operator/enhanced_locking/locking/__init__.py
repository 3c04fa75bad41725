"""Lockers: the legacy (Atlantis) one and the enhanced one, behind one interface."""

from enhanced_locking.locking.base import AtlantisCalls, Locker, TryLockResponse
from enhanced_locking.locking.enhanced import EnhancedLocker
from enhanced_locking.locking.legacy import LegacyLocker

__all__ = ["AtlantisCalls", "EnhancedLocker", "LegacyLocker", "Locker", "TryLockResponse"]
