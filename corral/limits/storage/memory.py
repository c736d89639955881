"""In-process limit state: one Corral process, nothing else to run.

Each operation runs to completion without awaiting, so on one event loop it is
atomic by construction, like the Lua scripts on Redis.

State lives in dicts whose entries carry the time from which they are
indistinguishable from absent (a fully decayed limit_req node, a full token
bucket, a key whose leases have all lapsed). Such entries are dropped lazily
when touched and by an amortised sweep, so memory follows the active keys; the
decisions never change because of it (REFERENCE A1: this is faithful to nginx's
LRU eviction).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from corral.limits import conn, leaky, tokens
from corral.limits.conn import ConnCall, ConnDecision, ConnLease
from corral.limits.leaky import Node, ReqDecision, ReqZoneCall
from corral.limits.status import LimitStatus
from corral.limits.storage.base import DEFAULT_CONN_LEASE_MS, require_distinct
from corral.limits.tokens import Bucket, TokenCall, TokenDecision

K = TypeVar("K")
V = TypeVar("V")

# Below this size a sweep is not worth its cost.
_MIN_SWEEP_INTERVAL = 1024


def monotonic_ms() -> int:
    """nginx's clock: monotonic milliseconds, immune to wall-clock steps."""
    return time.monotonic_ns() // 1_000_000


class _ExpiringMap(Generic[K, V]):
    """A dict whose entries vanish once ``now >= expires_at``: lazily when read,
    and all at once when the owner sweeps."""

    def __init__(self) -> None:
        self._data: dict[K, tuple[V, int]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K, now_ms: int) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires_at = item
        if expires_at <= now_ms:
            del self._data[key]
            return None
        return value

    def put(self, key: K, value: V, expires_at: int) -> None:
        self._data[key] = (value, expires_at)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def sweep(self, now_ms: int) -> int:
        # Rebuilt rather than deleted from: a dict never shrinks its table on deletion,
        # so after a flood of distinct keys it would keep their room for good.
        data = self._data
        live = {key: item for key, item in data.items() if item[1] > now_ms}
        if len(live) < len(data):
            self._data = live
        return len(data) - len(live)


class MemoryLimitStore:
    """:class:`~corral.limits.storage.base.LimitStore` in process memory.

    ``clock`` returns milliseconds and must not go backwards (tests pass a fake).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], int] = monotonic_ms,
        conn_lease_ms: int = DEFAULT_CONN_LEASE_MS,
    ) -> None:
        if conn_lease_ms <= 0:
            raise ValueError("conn_lease_ms must be > 0")
        self._clock = clock
        self._lease_ms = conn_lease_ms
        self._req: _ExpiringMap[tuple[str, str], Node] = _ExpiringMap()
        self._conn: _ExpiringMap[tuple[str, str], dict[str, int]] = _ExpiringMap()
        self._tokens: _ExpiringMap[tuple[str, int, str], Bucket] = _ExpiringMap()
        self._ops = 0

    def key_count(self) -> int:
        """Keys currently held, for tests and the status page."""
        return len(self._req) + len(self._conn) + len(self._tokens)

    def sweep(self) -> int:
        """Drop every void entry now: called periodically, so the keys of a flood
        that then stops go away too (the amortised sweep needs operations to run).
        Returns how many were dropped."""
        now = self._clock()
        self._ops = 0
        return sum(entries.sweep(now) for entries in (self._req, self._conn, self._tokens))

    def _now(self) -> int:
        """Read the clock, and now and then drop every void entry.

        A full sweep after as many operations as there are keys costs O(1) amortised
        per operation, and keys that are never touched again still go away.
        """
        now = self._clock()
        self._ops += 1
        if self._ops >= max(self.key_count(), _MIN_SWEEP_INTERVAL):
            self._ops = 0
            for entries in (self._req, self._conn, self._tokens):
                entries.sweep(now)
        return now

    async def limit_req(
        self, calls: Sequence[ReqZoneCall], *, dry_run: bool = False
    ) -> ReqDecision:
        require_distinct((c.zone for c in calls), "limit_req")
        now = self._now()
        keys = [(c.zone, c.key) for c in calls]
        zones = [(c.params, self._req.get(k, now)) for c, k in zip(calls, keys, strict=True)]
        decision = leaky.evaluate(zones, now, dry_run=dry_run)
        for call, key, node in zip(calls, keys, decision.nodes, strict=False):
            self._req.put(key, node, leaky.expires_at_ms(call.params, node))
        return decision

    async def conn_acquire(
        self, calls: Sequence[ConnCall], *, dry_run: bool = False
    ) -> ConnDecision:
        require_distinct((c.zone for c in calls), "limit_conn")
        if not calls:
            return ConnDecision(LimitStatus.PASSED)
        now = self._now()
        holders = [self._live(c, now) for c in calls]
        counts = [len(live) for live in holders]
        decision = conn.acquire(counts, [c.limit for c in calls], dry_run=dry_run)
        if decision.zone_index is not None:
            return decision
        holder = uuid.uuid4().hex
        for call, live in zip(calls, holders, strict=True):
            live[holder] = now + self._lease_ms
            self._conn.put((call.zone, call.key), live, max(live.values()))
        return ConnDecision(decision.status, None, decision.counts, ConnLease(holder, tuple(calls)))

    async def conn_refresh(self, lease: ConnLease) -> bool:
        now = self._now()
        held = True
        for call in lease.calls:
            live = self._live(call, now)
            if lease.holder not in live:
                # Lapsed: its slot may already be someone else's, so it is not taken back.
                held = False
                continue
            live[lease.holder] = now + self._lease_ms
            self._conn.put((call.zone, call.key), live, max(live.values()))
        return held

    async def conn_release(self, lease: ConnLease) -> None:
        now = self._now()
        for call in lease.calls:
            rest = conn.release(self._live(call, now), lease.holder)
            if rest is None:
                self._conn.pop((call.zone, call.key))
            else:
                self._conn.put((call.zone, call.key), rest, max(rest.values()))

    def _live(self, call: ConnCall, now_ms: int) -> dict[str, int]:
        return conn.live_holders(self._conn.get((call.zone, call.key), now_ms) or {}, now_ms)

    async def tokens_check(
        self, calls: Sequence[TokenCall], *, dry_run: bool = False
    ) -> TokenDecision:
        require_distinct(((c.zone, c.budget.window_ms) for c in calls), "token")
        now = self._now()
        zones = [(c.budget, self._tokens.get(_token_key(c), now)) for c in calls]
        return tokens.check(zones, now, dry_run=dry_run)

    async def tokens_charge(self, calls: Sequence[TokenCall], tokens_used: int) -> None:
        require_distinct(((c.zone, c.budget.window_ms) for c in calls), "token")
        if not 0 <= tokens_used <= tokens.MAX_BUDGET:
            raise ValueError(f"token count must be 0..{tokens.MAX_BUDGET}, got {tokens_used}")
        if tokens_used == 0:
            return  # nothing to take; leave the buckets untouched
        now = self._now()
        for call in calls:
            key = _token_key(call)
            bucket = tokens.charge(self._tokens.get(key, now), call.budget, tokens_used, now)
            self._tokens.put(key, bucket, tokens.expires_at_ms(bucket, call.budget))

    async def close(self) -> None:
        return None


def _token_key(call: TokenCall) -> tuple[str, int, str]:
    # The window is part of the key so a rule's minute and day budgets never share state.
    return (call.zone, call.budget.window_ms, call.key)
