"""Moving lock traffic from the legacy locker to the enhanced one."""

from enhanced_locking.migration.router import Router

__all__ = ["Router"]
