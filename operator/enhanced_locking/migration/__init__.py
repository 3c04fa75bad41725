"""Migration from the legacy locker to the enhanced one: routing, and later shadowing and rollout."""

from enhanced_locking.migration.router import Router

__all__ = ["Router"]
