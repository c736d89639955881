"""The storage protocol every limiter state store implements.

One atomic operation per algorithm: a request's zones are judged and committed
together, so no other request (or replica) can slip in between the check of one
zone and the charge of another. Stores differ only in where state lives and which
clock they read: memory reads a clock given at construction (monotonic by
default); Redis reads the server's ``TIME`` so every replica judges by one clock.
The same contract tests run against both.

Failure: a store that cannot answer raises :class:`StoreError` and nothing else,
so the caller can apply its single ``on_store_error: allow | deny`` choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from corral.limits.conn import ConnCall, ConnDecision, ConnLease
from corral.limits.leaky import ReqDecision, ReqZoneCall
from corral.limits.tokens import TokenCall, TokenDecision

# Long generations run for minutes, so a request holding a limit_conn slot must
# refresh its lease (every third of this is comfortable); a crashed holder's slot
# comes back after at most this long.
DEFAULT_CONN_LEASE_MS: Final = 30_000


class StoreError(Exception):
    """The limit store is unreachable or failed; the caller decides allow or deny."""


class LimitStore(Protocol):
    async def limit_req(
        self, calls: Sequence[ReqZoneCall], *, dry_run: bool = False
    ) -> ReqDecision:
        """nginx ``limit_req`` for one request over its zones, in config order.

        An empty ``calls`` passes trivially: no zone applied (``$limit_req_status``
        stays empty in nginx).
        """
        ...

    async def conn_acquire(
        self, calls: Sequence[ConnCall], *, dry_run: bool = False
    ) -> ConnDecision:
        """Count the request in every zone or in none; the lease says what to release."""
        ...

    async def conn_refresh(self, lease: ConnLease) -> bool:
        """Extend the lease; False if it had already lapsed in some zone (slot lost)."""
        ...

    async def conn_release(self, lease: ConnLease) -> None:
        """Stop counting the request; releasing twice or after expiry is harmless."""
        ...

    async def tokens_check(
        self, calls: Sequence[TokenCall], *, dry_run: bool = False
    ) -> TokenDecision:
        """Refuse while any budget is empty or in debt; consumes nothing."""
        ...

    async def tokens_charge(self, calls: Sequence[TokenCall], tokens: int) -> None:
        """Charge the actual usage to every budget, into debt if need be."""
        ...

    async def close(self) -> None: ...


def require_distinct(zones: Iterable[object], what: str) -> None:
    """A zone applies at most once per request (nginx: "is duplicate")."""
    seen: set[object] = set()
    for zone in zones:
        if zone in seen:
            raise ValueError(f"{what} zone {zone!r} applied twice to one request")
        seen.add(zone)
