"""Enhanced Locking: Atlantis's lock service with queues, priorities, Redis and migration.

The public surface is what this module lists; everything else may move.
"""

from enhanced_locking.client import Client, ServiceError
from enhanced_locking.config import ConfigError, EnhancedLockingConfig, load_config
from enhanced_locking.factory import LockService
from enhanced_locking.provider import ConfigProvider, ConfigRejected, Snapshot
from enhanced_locking.types import (
    AcquireResult,
    BackendUnavailable,
    Event,
    InvalidRequest,
    Lock,
    LockingError,
    LockNotHeld,
    LockNotOwned,
    LockRequest,
    Priority,
    Project,
    Pull,
    Reason,
    User,
    lock_key,
)

__all__ = [
    "AcquireResult",
    "BackendUnavailable",
    "Client",
    "ConfigError",
    "ConfigProvider",
    "ConfigRejected",
    "EnhancedLockingConfig",
    "Event",
    "InvalidRequest",
    "Lock",
    "LockNotHeld",
    "LockNotOwned",
    "LockRequest",
    "LockService",
    "LockingError",
    "Priority",
    "Project",
    "Pull",
    "Reason",
    "ServiceError",
    "Snapshot",
    "User",
    "load_config",
    "lock_key",
]
__version__ = "0.1.0"
