"""The stable hash that gives each lock key its routing bucket.

Routing must be sticky across processes and restarts, so it cannot use Python's salted
``hash``. A key's bucket is a number in ``0..9999``; a weight of ``w`` percent (two decimals)
sends the buckets below ``w * 100`` to the enhanced locker. Raising the weight therefore only
ever moves keys from legacy to enhanced, never back.
"""

from __future__ import annotations

import hashlib

__all__ = ["BUCKETS", "bucket_of", "is_enhanced_bucket"]

BUCKETS = 10_000


def bucket_of(key: str) -> int:
    """The key's bucket in ``0..BUCKETS-1`` (blake2b: stable, fast, well spread)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def is_enhanced_bucket(bucket: int, weight: float) -> bool:
    """Whether a bucket routes to the enhanced side at ``weight`` percent."""
    return bucket < round(weight * 100)
