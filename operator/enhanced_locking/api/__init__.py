"""The HTTP API of the lock service."""

from enhanced_locking.api.app import create_app

__all__ = ["create_app"]
