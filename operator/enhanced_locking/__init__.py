"""Enhanced Locking: Atlantis's lock service with queues, priorities, Redis and migration.

The public surface is what this module lists; everything else may move. Each name is imported
from its module when it is first used: importing one module of the package (as the
``enhanced-locking`` command does for ``enhanced_locking.cli``) does not load the service, its
stores and their clients.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULES = {
    "client": ("Client", "ServiceError"),
    "config": ("ConfigError", "EnhancedLockingConfig", "load_config"),
    "factory": ("LockService",),
    "provider": ("ConfigProvider", "ConfigRejected", "Snapshot"),
    "types": ("AcquireResult", "BackendUnavailable", "Event", "InvalidRequest", "Lock",
              "LockingError", "LockNotHeld", "LockNotOwned", "LockRequest", "Priority", "Project",
              "Pull", "Reason", "User", "lock_key"),
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}

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


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (and kept here after)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
