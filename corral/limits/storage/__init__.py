"""Where limiter state lives: one protocol, an in-memory and a Redis implementation.

The Redis store is imported from ``corral.limits.storage.redis`` only by callers
that configure ``state: redis://...``.
"""

from corral.limits.storage.base import DEFAULT_CONN_LEASE_MS, LimitStore, StoreError
from corral.limits.storage.memory import MemoryLimitStore

__all__ = ["DEFAULT_CONN_LEASE_MS", "LimitStore", "MemoryLimitStore", "StoreError"]
