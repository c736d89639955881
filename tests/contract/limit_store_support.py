"""Helpers shared by the limit store contract tests and their fixtures."""

from __future__ import annotations

import uuid

from corral.limits.storage.base import LimitStore
from corral.limits.storage.memory import MemoryLimitStore
from corral.limits.storage.redis import RedisLimitStore

# Large, like Redis TIME in ms, so the Lua scripts are exercised at real magnitudes.
CLOCK_START_MS = 1_700_000_000_000
LEASE_MS = 10_000


class FakeClock:
    """Milliseconds that move only when a test says so."""

    def __init__(self, now_ms: int = CLOCK_START_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def make_store(backend: str, clock: FakeClock) -> LimitStore:
    if backend == "memory":
        return MemoryLimitStore(clock=clock, conn_lease_ms=LEASE_MS)
    # A fresh prefix per store keeps tests (and hypothesis examples) apart on one server.
    return RedisLimitStore.from_url(
        backend, prefix=f"test:{uuid.uuid4().hex}:", clock=clock, conn_lease_ms=LEASE_MS
    )
