"""What only one store can show: memory's cleanup, Redis' TTLs, clock and failures."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio import from_url as redis_from_url

from corral.limits.conn import ConnCall
from corral.limits.leaky import ReqZoneCall, ReqZoneParams
from corral.limits.status import LimitStatus
from corral.limits.storage.base import StoreError
from corral.limits.storage.memory import MemoryLimitStore
from corral.limits.storage.redis import RedisLimitStore
from corral.limits.tokens import TokenBudget, TokenCall
from tests.contract.limit_store_support import LEASE_MS, FakeClock

ONE_PER_SECOND = ReqZoneParams.from_config("1r/s", burst=3)


# --- memory --------------------------------------------------------------------------


async def test_memory_drops_idle_keys(clock: FakeClock) -> None:
    store = MemoryLimitStore(clock=clock, conn_lease_ms=LEASE_MS)
    for i in range(50):
        await store.limit_req([ReqZoneCall("z", f"k{i}", ONE_PER_SECOND)])
        await store.tokens_charge([TokenCall("t", f"k{i}", TokenBudget.per_minute(10))], 5)
    await store.conn_acquire([ConnCall("c", "k", 1)])
    assert store.key_count() == 101
    # 1r/s at excess 0 is indistinguishable from new after 1 s; the buckets refill
    # in 30 s; the lease lapses after LEASE_MS.
    clock.advance(max(30_000, LEASE_MS))
    for i in range(2000):  # enough operations to trigger the amortised sweep
        await store.tokens_check([TokenCall("t", f"other{i}", TokenBudget.per_minute(10))])
    assert store.key_count() == 0


async def test_memory_sweep_drops_expired_keys_without_traffic(clock: FakeClock) -> None:
    """A flood of keys that then stops: the periodic sweep (every queue.forget_idle)
    drops them although no operation follows; live keys stay and keep their state."""
    store = MemoryLimitStore(clock=clock, conn_lease_ms=LEASE_MS)
    for i in range(5000):
        await store.limit_req([ReqZoneCall("z", f"10.0.{i >> 8}.{i & 255}",
                                           ONE_PER_SECOND)])
    clock.advance(2_000)
    busy = await store.limit_req([ReqZoneCall("z", "busy", ONE_PER_SECOND)])
    assert store.sweep() == 5000
    assert store.key_count() == 1
    again = await store.limit_req([ReqZoneCall("z", "busy", ONE_PER_SECOND)])
    assert (busy.status, again.status) == (LimitStatus.PASSED, LimitStatus.DELAYED)


# --- redis ---------------------------------------------------------------------------

needs_redis = pytest.mark.redis


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = redis_from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_store(redis_url: str, clock: FakeClock) -> AsyncIterator[RedisLimitStore]:
    store = RedisLimitStore.from_url(
        redis_url, prefix=f"t:{uuid.uuid4().hex}:", clock=clock, conn_lease_ms=LEASE_MS
    )
    try:
        yield store
    finally:
        await store.close()


@needs_redis
async def test_redis_keys_carry_ttls_until_state_is_void(
    redis_store: RedisLimitStore, raw: Redis, clock: FakeClock
) -> None:
    prefix = redis_store.prefix
    await redis_store.limit_req([ReqZoneCall("zone", "k", ONE_PER_SECOND)])
    await redis_store.limit_req([ReqZoneCall("zone", "k", ONE_PER_SECOND)])
    # excess 1000 at 1r/s: void after 2 s, plus 1 s of slack
    ttl = await raw.pttl(f"{prefix}req:4:zone:k")
    assert 2900 < ttl <= 3000

    lease = (await redis_store.conn_acquire([ConnCall("zone", "k", 1)])).lease
    assert lease is not None
    assert 0 < await raw.pttl(f"{prefix}conn:4:zone:k") <= LEASE_MS + 1000
    await redis_store.conn_release(lease)
    assert await raw.exists(f"{prefix}conn:4:zone:k") == 0

    await redis_store.tokens_charge([TokenCall("zone", "k", TokenBudget.per_minute(60))], 30)
    # half the bucket at 1 token a second: full in 30 s
    ttl = await raw.pttl(f"{prefix}tok:60000:4:zone:k")
    assert 30_900 < ttl <= 31_000


@needs_redis
async def test_redis_uses_server_time_by_default(redis_url: str) -> None:
    store = RedisLimitStore.from_url(redis_url, prefix=f"t:{uuid.uuid4().hex}:")
    try:
        call = ReqZoneCall("z", "k", ReqZoneParams.from_config("1r/m"))
        first = await store.limit_req([call])
        assert abs(first.nodes[0].last_ms - time.time() * 1000) < 5000
        second = await store.limit_req([call])
        assert second.rejected
        # 1r/m is 16 milli-requests per second: 62.5 s to pass again
        assert 60_000 < second.retry_after_ms <= 62_500
    finally:
        await store.close()


@needs_redis
async def test_redis_reloads_scripts_the_server_lost(
    redis_store: RedisLimitStore, raw: Redis
) -> None:
    call = ReqZoneCall("z", "k", ONE_PER_SECOND)
    await redis_store.limit_req([call])
    await raw.script_flush()
    assert (await redis_store.limit_req([call])).status is LimitStatus.DELAYED


async def test_unreachable_redis_raises_store_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # nothing listens on the port any more
    store = RedisLimitStore.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    try:
        with pytest.raises(StoreError, match="limit store"):
            await store.limit_req([ReqZoneCall("z", "k", ONE_PER_SECOND)])
        with pytest.raises(StoreError):
            await store.conn_acquire([ConnCall("z", "k", 1)])
        with pytest.raises(StoreError):
            await store.tokens_check([TokenCall("z", "k", TokenBudget.per_minute(1))])
    finally:
        await store.close()


@needs_redis
async def test_redis_replicas_share_limits_atomically(redis_url: str, clock: FakeClock) -> None:
    prefix = f"t:{uuid.uuid4().hex}:"
    replicas = [RedisLimitStore.from_url(redis_url, prefix=prefix, clock=clock) for _ in range(3)]
    try:
        call = ReqZoneCall("z", "k", ReqZoneParams.from_config("1r/s", burst=5, nodelay=True))
        slots = ConnCall("c", "k", 4)
        req_results, conn_results = await asyncio.gather(
            asyncio.gather(*(replicas[i % 3].limit_req([call]) for i in range(60))),
            asyncio.gather(*(replicas[i % 3].conn_acquire([slots]) for i in range(60))),
        )
        # one request at a time, whichever replica it came through: 1 + burst pass
        assert sum(not d.rejected for d in req_results) == 6
        assert sum(not d.rejected for d in conn_results) == 4
    finally:
        for replica in replicas:
            await replica.close()
