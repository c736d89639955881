"""What a usage store keeps and the protocol every store implements.

A store only adds and reads: the ledger (``ledger.py``) sums requests in memory and
hands a batch over every few seconds, so a store sees one write per batch, never
one per request. Each store passes the contract suite in
``tests/contract/test_usage_store.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


class UsageStoreError(Exception):
    """A store could not be opened, read or written; the message names the store
    (its file or key prefix) and the cause."""


class UsageKey(NamedTuple):
    """Made once per request on the request path: a named tuple hashes and compares
    in C, about three times cheaper than a frozen dataclass."""

    day: str        # UTC day, YYYY-MM-DD
    client: str     # the key's name, else the client's IP
    model: str      # "" when the request named none (refused before, or not inference)
    tier: str


@dataclass(slots=True)
class Usage:
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    errors: int = 0                 # failed upstream: 5xx from or for a backend
    total_ms: float = 0.0           # summed request durations
    first_byte_ms: float = 0.0      # summed times to the first byte ...
    first_bytes: int = 0            # ... over this many requests that had one
    refusals: dict[str, int] = field(default_factory=dict)   # by rule or cause

    def add(self, other: Usage) -> None:
        self.requests += other.requests
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.errors += other.errors
        self.total_ms += other.total_ms
        self.first_byte_ms += other.first_byte_ms
        self.first_bytes += other.first_bytes
        for rule, n in other.refusals.items():
            self.refusals[rule] = self.refusals.get(rule, 0) + n


class UsageStore(Protocol):
    async def add(self, batch: Mapping[UsageKey, Usage]) -> None:
        """Add each entry to what is kept for its key (creating it if new)."""

    async def query(self, first_day: str, last_day: str,
                    client: str | None = None) -> dict[UsageKey, Usage]:
        """Everything kept for the days ``first_day``..``last_day`` (inclusive),
        only ``client``'s when given."""
        ...

    async def prune(self, before_day: str) -> None:
        """Forget the days before ``before_day`` (retention, ``usage.keep``)."""

    async def close(self) -> None: ...

    def describe(self) -> str:
        """Where the figures are kept, for the status page (never a password)."""
        ...
