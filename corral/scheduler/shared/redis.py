"""Backend slots in Redis, shared by every Corral replica (``state: redis://…``).

Every operation is one call of ``slots.lua`` (registered once, run by EVALSHA), so it
is atomic across replicas and costs one round trip. Notifications are Redis pub/sub
messages published by the script itself, so telling the leader or a replica costs
nothing extra either.

Keys, under a prefix (``corral:slots:`` by default): ``waiting``, ``granted`` and
``lease:<backend>`` per backend; channels ``<prefix>leader`` and
``<prefix>replica:<id>``. On Redis Cluster the prefix must carry a hash tag, e.g.
``{corral}:slots:``, so all keys share a slot.

Failures: any connection, timeout or server error becomes :class:`SlotStoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import cache
from importlib.resources import files
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio import from_url as redis_from_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from corral.scheduler.shared.store import (
    FLEET,
    LEADER,
    Acquisition,
    Cancelled,
    Grant,
    GrantCall,
    Release,
    Released,
    SlotStoreError,
    Taken,
    replica_channel,
)

log = logging.getLogger("corral.slots")

DEFAULT_PREFIX: Final = "corral:slots:"
# On the request path: a Redis that hangs must fail fast into the configured choice
# (carry on with a local share of the slots, or refuse) rather than stall requests.
DEFAULT_TIMEOUT_S: Final = 1.0


@cache
def _script_text() -> str:
    prelude = files("corral.limits.storage").joinpath("prelude.lua")
    return (prelude.read_text(encoding="utf-8") + "\n"
            + files("corral.scheduler.shared").joinpath("slots.lua")
            .read_text(encoding="utf-8"))


class RedisSlotStore:
    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX,
                 owns_client: bool = False, clock: Callable[[], int] | None = None) -> None:
        """``clock`` (milliseconds) is sent instead of reading Redis ``TIME``: tests
        drive this store and the memory one on one fake schedule with it."""
        self._client = client
        self._clock = clock
        self._prefix = prefix
        self._owns = owns_client
        self._script = client.register_script(_script_text())
        self._fixed = [prefix + "waiting", prefix + "granted", prefix + "charges",
                       prefix + "leader", prefix + "running"]

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 clock: Callable[[], int] | None = None) -> RedisSlotStore:
        # One immediate retry on a broken connection: after Redis restarts, every
        # pooled connection is stale, and a request must not fail for that (every
        # operation is safe to run twice: leases are named, queueing is idempotent).
        client = redis_from_url(url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 1, supported_errors=(
                                    RedisConnectionError,)))
        return cls(client, prefix=prefix, owns_client=True, clock=clock)

    @property
    def client(self) -> Redis:
        return self._client

    def channel(self, name: str) -> str:
        return self._prefix + name

    def _now(self) -> str:
        return "" if self._clock is None else str(self._clock())

    def _lease_key(self, backend: str) -> str:
        return f"{self._prefix}lease:{backend}"

    async def _run(self, op: str, backends: Sequence[str],
                   args: Sequence[str | int | bytes]) -> Any:
        keys = self._fixed + [self._lease_key(b) for b in backends]
        try:
            return await self._script(keys=keys, args=[self._now(), op, *args])
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store ({op}): {exc}") from exc

    async def acquire(self, backends: Sequence[tuple[str, int]], lease: str, ttl_ms: int,
                      job_id: str, descriptor: bytes | None, client: str = "",
                      charge: float = 0.0, stoppable: str = "") -> Taken:
        out = await self._run("acquire", [b for b, _ in backends],
                              [lease, ttl_ms, job_id, descriptor or b"",
                               self.channel(LEADER), client, repr(float(charge)), stoppable,
                               *(cap for _, cap in backends)])
        index, used = int(out[0]), int(out[1])
        return Taken(index - 1 if index > 0 else None, used)

    async def release(self, backend: str, lease: str, job_id: str, client: str = "",
                      correction: float = 0.0) -> Released:
        out = await self._run("release", [backend],
                              [lease, job_id, self.channel(LEADER), backend, client,
                               repr(float(correction))])
        return Released(bool(int(out[0])), int(out[1]), int(out[2]))

    async def release_many(self, releases: Sequence[Release]) -> list[Released]:
        return [r for r in await self.run(releases) if isinstance(r, Released)]

    async def run(self, ops: Sequence[Acquisition | Release]) -> list[Taken | Released]:
        """One pipeline, in order: Redis runs them one after another as given."""
        if len(ops) == 1:
            op = ops[0]
            if isinstance(op, Release):
                return [await self.release(op.backend, op.lease, op.job_id, op.client,
                                           op.correction)]
            return [await self.acquire(op.backends, op.lease, op.ttl_ms, op.job_id,
                                       op.descriptor, op.client, op.charge, op.stoppable)]
        out = await self._pipeline("batch", [self._call(op) for op in ops])
        results: list[Taken | Released] = []
        for op, o in zip(ops, out, strict=True):
            if isinstance(op, Release):
                results.append(Released(bool(int(o[0])), int(o[1]), int(o[2])))
            else:
                index = int(o[0])
                results.append(Taken(index - 1 if index > 0 else None, int(o[1])))
        return results

    def _call(self, op: Acquisition | Release) -> tuple[list[str], list[str | int | bytes]]:
        if isinstance(op, Release):
            return ([*self._fixed, self._lease_key(op.backend)],
                    [self._now(), "release", op.lease, op.job_id, self.channel(LEADER),
                     op.backend, op.client, repr(float(op.correction))])
        return ([*self._fixed, *(self._lease_key(b) for b, _ in op.backends)],
                [self._now(), "acquire", op.lease, op.ttl_ms, op.job_id,
                 op.descriptor or b"", self.channel(LEADER), op.client,
                 repr(float(op.charge)), op.stoppable, *(cap for _, cap in op.backends)])

    async def grant(self, job_id: str, backend: str, cap: int, lease: str, ttl_ms: int,
                    replica: str, placement: str = "resident", model: str = "",
                    ctx: int | None = None, stoppable: str = "") -> tuple[int, int]:
        out = await self._run("grant", [backend],
                              [job_id, lease, ttl_ms, cap,
                               self.channel(replica_channel(replica)), backend, placement,
                               self.channel(FLEET), model, "" if ctx is None else ctx,
                               stoppable])
        return int(out[0]), int(out[1])

    async def stoppable(self) -> dict[str, tuple[str, str]]:
        out = await self._run("stoppable", [], [])
        pairs = {}
        for i in range(0, len(out), 2):
            backend, _, desc = _text(out[i + 1]).partition("|")
            pairs[_text(out[i])] = (backend, desc)
        return pairs

    async def tell(self, replica: str, message: str) -> None:
        try:
            await self._client.publish(self.channel(replica_channel(replica)), message)
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store (tell): {exc}") from exc

    async def grant_many(self, grants: Sequence[GrantCall]) -> list[tuple[int, int]]:
        """The grants of one leader's pass, in one round trip."""
        if len(grants) == 1:
            g = grants[0]
            return [await self.grant(g.job_id, g.backend, g.cap, g.lease, g.ttl_ms,
                                     g.replica, g.placement, g.model, g.ctx, g.stoppable)]
        calls: list[tuple[list[str], list[str | int | bytes]]] = [
                 ([*self._fixed, self._lease_key(g.backend)],
                  [self._now(), "grant", g.job_id, g.lease, g.ttl_ms, g.cap,
                   self.channel(replica_channel(g.replica)), g.backend, g.placement,
                   self.channel(FLEET), g.model, "" if g.ctx is None else g.ctx,
                   g.stoppable])
                 for g in grants]
        out = await self._pipeline("grant", calls)
        return [(int(o[0]), int(o[1])) for o in out]

    async def _pipeline(self, what: str,
                        calls: Sequence[tuple[list[str], list[str | int | bytes]]]) -> list[Any]:
        sha = self._script.sha
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                try:
                    return list(await pipe.execute())
                except NoScriptError:
                    # The server lost the script (a restart): load it, then once more.
                    await self._client.script_load(self._script.script)
                    for keys, args in calls:
                        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                    return list(await pipe.execute())
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store ({what}): {exc}") from exc

    async def job(self, job_id: str) -> bytes | None:
        out = await self._run("job", [], [job_id])
        return out if isinstance(out, bytes) else None

    async def cancel(self, job_id: str) -> Cancelled:
        out = await self._run("cancel", [], [job_id, self.channel(LEADER)])
        state = int(out[0])
        if state == 1:
            return Cancelled("left")
        if state == 2:
            return Cancelled("granted", Grant.parse(_text(out[1])))
        return Cancelled("unknown")

    async def renew(self, leases: Sequence[tuple[str, str]], ttl_ms: int) -> list[int]:
        if not leases:
            return []
        out = await self._run("renew", [b for b, _ in leases],
                              [ttl_ms, *(lease for _, lease in leases)])
        return [int(i) - 1 for i in out]

    async def adopt(self, leases: Sequence[tuple[str, str]], ttl_ms: int) -> None:
        if leases:
            await self._run("adopt", [b for b, _ in leases],
                            [ttl_ms, *(lease for _, lease in leases)])

    async def counts(self, backends: Sequence[str]) -> tuple[list[int], int]:
        out = await self._run("counts", backends, [])
        return [int(x) for x in out[:-1]], int(out[-1])

    async def waiting(self) -> dict[str, bytes]:
        try:
            raw = await self._client.hgetall(self._fixed[0])
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store (waiting): {exc}") from exc
        return {_text(k): v if isinstance(v, bytes) else str(v).encode()
                for k, v in raw.items()}

    async def granted(self, job_ids: Sequence[str]) -> dict[str, Grant]:
        if not job_ids:
            return {}
        try:
            values = await self._client.hmget(self._fixed[1], list(job_ids))
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store (granted): {exc}") from exc
        out = {}
        for job, value in zip(job_ids, values, strict=True):
            if value is not None:
                out[job] = Grant.parse(_text(value))
        return out

    async def lead(self, replica: str, ttl_ms: int) -> tuple[bool, str]:
        out = await self._run("lead", [], [replica, ttl_ms])
        return bool(int(out[0])), _text(out[1])

    async def resign(self, replica: str) -> bool:
        out = await self._run("resign", [], [replica])
        return bool(int(out[0]))

    async def charges(self) -> dict[str, float]:
        out = await self._run("charges", [], [])
        return {_text(out[i]): float(out[i + 1]) for i in range(0, len(out), 2)}

    async def announce(self, message: str) -> None:
        try:
            await self._client.publish(self.channel(FLEET), message)
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store (announce): {exc}") from exc

    async def heartbeat(self, replica: str, info: bytes, ttl_ms: int) -> None:
        key = f"{self._prefix}replica:{replica}"
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(key, info, px=ttl_ms)
                pipe.sadd(self._prefix + "replicas", replica)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store (heartbeat): {exc}") from exc

    async def replicas(self) -> dict[str, bytes]:
        """Replicas alive now (their heartbeat has not lapsed); the set of names
        forgets the others as it goes."""
        try:
            names = [_text(n) for n in await self._client.smembers(self._prefix + "replicas")]
            if not names:
                return {}
            values = await self._client.mget([f"{self._prefix}replica:{n}" for n in names])
            gone = [n for n, v in zip(names, values, strict=True) if v is None]
            if gone:
                await self._client.srem(self._prefix + "replicas", *gone)
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store (replicas): {exc}") from exc
        return {n: v if isinstance(v, bytes) else str(v).encode()
                for n, v in zip(names, values, strict=True) if v is not None}

    async def listen(self, channels: Sequence[str]) -> AsyncIterator[tuple[str, str]]:
        """Messages of ``channels`` as (channel, text); after a lost connection it
        reconnects and yields ``("", "resync")`` first: messages sent meanwhile are
        lost, so the consumer re-reads the state."""
        names = {self.channel(c): c for c in channels}
        backoff = 0.1
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*names)
                backoff = 0.1
                yield "", "resync"
                quiet = 0.0
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        # A link that died silently would block forever: ping it.
                        quiet += 1.0
                        if quiet >= 5.0:
                            quiet = 0.0
                            await pubsub.ping()
                        continue
                    quiet = 0.0
                    if message.get("type") != "message":
                        continue
                    channel = names.get(_text(message["channel"]))
                    if channel is not None:
                        yield channel, _text(message["data"])
            except (RedisError, OSError) as exc:
                log.debug("slot notifications lost (%s); reconnecting", exc)
            finally:
                # Bound through a typed name: redis-py < 8.2 leaves aclose untyped and
                # 8.2 types it, so a call site "type: ignore" is wrong on one of them.
                close_pubsub: Callable[[], Awaitable[None]] = pubsub.aclose
                with contextlib.suppress(RedisError, OSError):
                    await close_pubsub()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def close(self) -> None:
        if self._owns:
            await self._client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)
