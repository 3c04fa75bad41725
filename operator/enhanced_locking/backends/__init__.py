"""Backends: where locks live. See :mod:`enhanced_locking.backends.base` for the seam."""

from enhanced_locking.backends.base import Backend, Owner, QueueBackend, StoreBackend
from enhanced_locking.backends.embedded import EmbeddedBackend
from enhanced_locking.backends.memory import MemoryBackend

__all__ = [
    "Backend",
    "EmbeddedBackend",
    "MemoryBackend",
    "Owner",
    "QueueBackend",
    "StoreBackend",
]
