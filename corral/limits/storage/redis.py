"""Limit state in Redis, shared by every Corral replica.

Each operation is one Lua script (``limit_req.lua``, ``limit_conn.lua``,
``tokens.lua`` next to this file), registered once and run by EVALSHA; Redis
runs a script without interleaving anything else, which makes the operation
atomic across replicas. The scripts mirror the pure modules step for step, and a
property test holds them to identical decisions.

Clock: by default the scripts read Redis ``TIME``, so replicas whose own clocks
disagree still judge by one clock. A ``clock`` given at construction is sent
instead (tests drive both stores on the same fake schedule with it).

Keys: ``<prefix><kind>:<len(zone)>:<zone>:<key>``; the zone's length makes the
split unambiguous whatever characters zones and keys contain (IPv6 keys have
colons). Every key carries a TTL that ends when its state has become
indistinguishable from no state, so idle keys go away by themselves. A request's
zones are several keys in one script, so on Redis Cluster the prefix must contain
a hash tag, e.g. ``{corral}:``.

Failures: any connection, timeout or server error becomes :class:`StoreError`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from functools import cache
from importlib.resources import files
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio import from_url as redis_from_url
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from corral.limits import leaky
from corral.limits.conn import ConnCall, ConnDecision, ConnLease
from corral.limits.leaky import Node, ReqDecision, ReqZoneCall
from corral.limits.status import LimitStatus, rejected_status
from corral.limits.storage.base import DEFAULT_CONN_LEASE_MS, StoreError, require_distinct
from corral.limits.tokens import MAX_BUDGET, TokenCall, TokenDecision

DEFAULT_PREFIX: Final = "corral:limits:"
# A limiter sits on every request's path: a Redis that hangs must fail fast into
# the configured allow/deny choice rather than stall the gateway.
DEFAULT_TIMEOUT_S: Final = 2.0


@cache
def _script_text(name: str) -> str:
    """The script with the shared prelude (clock, exact integer helpers) in front."""
    here = files("corral.limits.storage")
    return (here.joinpath("prelude.lua").read_text(encoding="utf-8") + "\n"
            + here.joinpath(name).read_text(encoding="utf-8"))


class RedisLimitStore:
    """:class:`~corral.limits.storage.base.LimitStore` on a Redis server."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], int] | None = None,
        conn_lease_ms: int = DEFAULT_CONN_LEASE_MS,
        owns_client: bool = False,
    ) -> None:
        if conn_lease_ms <= 0:
            raise ValueError("conn_lease_ms must be > 0")
        self._client = client
        self._prefix = prefix
        self._clock = clock
        self._lease_ms = conn_lease_ms
        self._owns_client = owns_client
        # Registered once; the client sends EVALSHA and loads the script again
        # only if the server lost it (restart, SCRIPT FLUSH).
        self._limit_req = client.register_script(_script_text("limit_req.lua"))
        self._limit_conn = client.register_script(_script_text("limit_conn.lua"))
        self._tokens = client.register_script(_script_text("tokens.lua"))

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], int] | None = None,
        conn_lease_ms: int = DEFAULT_CONN_LEASE_MS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RedisLimitStore:
        client = redis_from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(
            client, prefix=prefix, clock=clock, conn_lease_ms=conn_lease_ms, owns_client=True
        )

    @property
    def prefix(self) -> str:
        return self._prefix

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(self._clock())

    def _key(self, kind: str, zone: str, key: str) -> str:
        return f"{self._prefix}{kind}:{len(zone)}:{zone}:{key}"

    async def _run(
        self, script: AsyncScript, what: str, keys: Sequence[str], args: Sequence[str | int]
    ) -> list[int]:
        try:
            result: Any = await script(keys=list(keys), args=list(args))
        except (RedisError, OSError) as exc:
            raise StoreError(f"limit store ({what}): {exc}") from exc
        return [int(value) for value in result]

    async def limit_req(
        self, calls: Sequence[ReqZoneCall], *, dry_run: bool = False
    ) -> ReqDecision:
        require_distinct((c.zone for c in calls), "limit_req")
        if not calls:
            return leaky.evaluate([], 0, dry_run=dry_run)
        args: list[str | int] = [self._now_arg()]
        for call in calls:
            args += [call.params.rate, call.params.burst, call.params.delay]
        keys = [self._key("req", c.zone, c.key) for c in calls]
        out = await self._run(self._limit_req, "limit_req", keys, args)
        busy, max_delay, retry = out[0], out[1], out[2]
        pairs = out[4:]
        excess = pairs[0::2]
        nodes = [Node(e, last) for e, last in zip(pairs[0::2], pairs[1::2], strict=True)]
        return leaky.decide(
            busy_index=busy - 1 if busy else None,
            max_delay_ms=max_delay,
            excess=excess,
            nodes=nodes,
            retry_after=retry,
            dry_run=dry_run,
        )

    async def conn_acquire(
        self, calls: Sequence[ConnCall], *, dry_run: bool = False
    ) -> ConnDecision:
        require_distinct((c.zone for c in calls), "limit_conn")
        if not calls:
            return ConnDecision(LimitStatus.PASSED)
        holder = uuid.uuid4().hex
        keys = [self._key("conn", c.zone, c.key) for c in calls]
        args: list[str | int] = [self._now_arg(), "acquire", holder, self._lease_ms]
        args += [c.limit for c in calls]
        out = await self._run(self._limit_conn, "limit_conn acquire", keys, args)
        busy, counts = out[0], tuple(out[1:])
        if busy:
            return ConnDecision(rejected_status(dry_run), busy - 1, counts)
        return ConnDecision(LimitStatus.PASSED, None, counts, ConnLease(holder, tuple(calls)))

    async def conn_refresh(self, lease: ConnLease) -> bool:
        keys = [self._key("conn", c.zone, c.key) for c in lease.calls]
        args: list[str | int] = [self._now_arg(), "refresh", lease.holder, self._lease_ms]
        out = await self._run(self._limit_conn, "limit_conn refresh", keys, args)
        return out[0] == 1

    async def conn_release(self, lease: ConnLease) -> None:
        keys = [self._key("conn", c.zone, c.key) for c in lease.calls]
        args: list[str | int] = [self._now_arg(), "release", lease.holder, self._lease_ms]
        await self._run(self._limit_conn, "limit_conn release", keys, args)

    def _token_keys_args(self, calls: Sequence[TokenCall]) -> tuple[list[str], list[str | int]]:
        require_distinct(((c.zone, c.budget.window_ms) for c in calls), "token")
        # The window is part of the key so a rule's minute and day budgets never share state.
        keys = [self._key(f"tok:{c.budget.window_ms}", c.zone, c.key) for c in calls]
        args: list[str | int] = []
        for call in calls:
            args += [call.budget.tokens, call.budget.tick_ms]
        return keys, args

    async def tokens_check(
        self, calls: Sequence[TokenCall], *, dry_run: bool = False
    ) -> TokenDecision:
        keys, budget_args = self._token_keys_args(calls)
        if not calls:
            return TokenDecision(LimitStatus.PASSED)
        args = [self._now_arg(), "check", 0, *budget_args]
        out = await self._run(self._tokens, "tokens check", keys, args)
        busy, retry, remaining = out[0], out[1], tuple(out[2:])
        if busy:
            return TokenDecision(rejected_status(dry_run), busy - 1, remaining, retry)
        return TokenDecision(LimitStatus.PASSED, None, remaining)

    async def tokens_charge(self, calls: Sequence[TokenCall], tokens: int) -> None:
        keys, budget_args = self._token_keys_args(calls)
        if not 0 <= tokens <= MAX_BUDGET:
            raise ValueError(f"token count must be 0..{MAX_BUDGET}, got {tokens}")
        if tokens == 0 or not calls:
            return  # nothing to take; leave the buckets untouched
        args = [self._now_arg(), "charge", tokens, *budget_args]
        await self._run(self._tokens, "tokens charge", keys, args)
