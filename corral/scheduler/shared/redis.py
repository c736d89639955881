"""Backend slots in Redis, shared by every Corral replica (``state: redis://…``).

Every operation is one call of ``slots.lua`` (registered once, run by EVALSHA), so it
is atomic across replicas and costs one round trip. Notifications are Redis pub/sub
messages published by the script itself, so telling the leader or a replica costs
nothing extra either. The script implements ``protocol.py``: epochs, operation ids,
grace periods.

Keys, under a prefix (``corral:slots:`` by default): ``waiting``, ``granted``,
``charges``, ``leader``, ``running``, ``epoch``, ``op:<id>`` (remembered answers),
``lease:<backend>`` per backend, ``replica:<id>`` and ``replicas``; channels
``<prefix>leader``, ``<prefix>fleet`` and ``<prefix>replica:<id>``. On Redis Cluster
the prefix must carry a hash tag, e.g. ``{corral}:slots:``, so all keys share a slot.

Failures: any connection, timeout or server error, and any answer this code does not
expect (a key of another type, say), becomes :class:`SlotStoreError` — an outage to
the replica, never a crash. A store that lost its data answers :class:`EpochChanged`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import cache
from importlib.resources import files
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio import from_url as redis_from_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from corral.scheduler.shared.store import (
    DEFAULT_GRACE_MS,
    FLEET,
    LEADER,
    Acquisition,
    Cancelled,
    Epoch,
    EpochChanged,
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


def _stale(exc: ResponseError) -> EpochChanged | None:
    parts = str(exc).split(" ")
    if len(parts) == 3 and parts[0] == "STALE" and parts[2].isdigit():
        return EpochChanged(parts[1], int(parts[2]))
    return None


Call = tuple[list[str], list[str | int | bytes]]


class RedisSlotStore:
    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX,
                 owns_client: bool = False, clock: Callable[[], int] | None = None,
                 grace_ms: int = DEFAULT_GRACE_MS) -> None:
        """``clock`` (milliseconds) is sent instead of reading Redis ``TIME``: tests
        drive this store and the memory one on one fake schedule with it."""
        self._client = client
        self._clock = clock
        self._prefix = prefix
        self._owns = owns_client
        self._script = client.register_script(_script_text())
        self._fixed = [prefix + "waiting", prefix + "granted", prefix + "charges",
                       prefix + "leader", prefix + "running", prefix + "epoch"]
        self.grace_ms = grace_ms
        self.epoch = ""
        # Operation ids: this handle's name and a counter (unique across replicas).
        self._name = uuid.uuid4().hex[:12]
        self._ops = itertools.count()
        self._candidates = itertools.count()   # names for a new epoch, unique per call

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 clock: Callable[[], int] | None = None,
                 grace_ms: int = DEFAULT_GRACE_MS) -> RedisSlotStore:
        # One immediate retry on a broken connection: after Redis restarts, every
        # pooled connection is stale, and a request must not fail for that. A retry
        # repeats the very command, so it is safe exactly because every operation is
        # idempotent by its id: acquire and grant by their lease, release, cancel and
        # charges by an operation id whose answer the store remembers; the others
        # only read, or set what they set again (renew, adopt, hello, lead).
        client = redis_from_url(url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 1, supported_errors=(
                                    RedisConnectionError,)))
        return cls(client, prefix=prefix, owns_client=True, clock=clock, grace_ms=grace_ms)

    @property
    def client(self) -> Redis:
        return self._client

    def channel(self, name: str) -> str:
        return self._prefix + name

    def _now(self) -> str:
        return "" if self._clock is None else str(self._clock())

    def _lease_key(self, backend: str) -> str:
        return f"{self._prefix}lease:{backend}"

    def _op(self) -> str:
        return f"{self._name}:{next(self._ops)}"

    def _call(self, op: str, memo: str, keys: Sequence[str],
              args: Sequence[str | int | bytes]) -> Call:
        # The remembered answer is kept per operation kind: an acquire and a grant
        # may carry the same lease name.
        return ([*self._fixed, f"{self._prefix}op:{op}:{memo or '-'}", *keys],
                [self._now(), op, self.epoch, self.grace_ms,
                 f"{self._name}~{next(self._candidates)}", *args])

    async def _run(self, op: str, backends: Sequence[str],
                   args: Sequence[str | int | bytes], memo: str = "") -> Any:
        keys, argv = self._call(op, memo, [self._lease_key(b) for b in backends], args)
        return await self._eval(op, keys, argv)

    async def acquire(self, backends: Sequence[tuple[str, int]], lease: str, ttl_ms: int,
                      job_id: str, descriptor: bytes | None, client: str = "",
                      charge: float = 0.0, stoppable: str = "") -> Taken:
        taken = (await self.run([Acquisition(backends, lease, ttl_ms, job_id, descriptor,
                                             client, charge, stoppable)]))[0]
        assert isinstance(taken, Taken)
        return taken

    async def _eval(self, what: str, keys: list[str], args: list[str | int | bytes]) -> Any:
        try:
            return await self._script(keys=keys, args=args)
        except ResponseError as exc:
            stale = _stale(exc)
            if stale is not None:
                raise stale from None
            raise SlotStoreError(f"slot store ({what}): {exc}") from exc
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store ({what}): {exc}") from exc

    def _acquisition(self, a: Acquisition) -> Call:
        return self._call("acquire", a.lease, [self._lease_key(b) for b, _ in a.backends],
                          [a.lease, a.ttl_ms, a.job_id, a.descriptor or b"",
                           self.channel(LEADER), a.client, repr(float(a.charge)),
                           a.stoppable, *(cap for _, cap in a.backends)])

    def _release(self, r: Release) -> Call:
        # Remembered by its lease (a lease is released once): a release sent again
        # after an outage, when its first answer was lost, frees and corrects nothing
        # more.
        return self._call("release", r.lease, [self._lease_key(r.backend)],
                          [r.lease, r.job_id, self.channel(LEADER), r.backend, r.client,
                           repr(float(r.correction))])

    def _grant(self, g: GrantCall) -> Call:
        return self._call("grant", g.lease, [self._lease_key(g.backend)],
                          [g.job_id, g.lease, g.ttl_ms, g.cap,
                           self.channel(replica_channel(g.replica)), g.backend, g.placement,
                           self.channel(FLEET), g.model, "" if g.ctx is None else g.ctx,
                           g.stoppable])

    async def release(self, backend: str, lease: str, job_id: str, client: str = "",
                      correction: float = 0.0) -> Released:
        done = (await self.run([Release(backend, lease, job_id, client, correction)]))[0]
        assert isinstance(done, Released)
        return done

    async def release_many(self, releases: Sequence[Release]) -> list[Released]:
        return [r for r in await self.run(releases) if isinstance(r, Released)]

    async def run(self, ops: Sequence[Acquisition | Release]) -> list[Taken | Released]:
        """One pipeline, in order: Redis runs them one after another as given."""
        calls = [self._release(op) if isinstance(op, Release) else self._acquisition(op)
                 for op in ops]
        if len(calls) == 1:
            out = [await self._eval("batch", *calls[0])]
        else:
            out = await self._pipeline("batch", calls)
        try:
            return [_released(o) if isinstance(op, Release) else _taken(o)
                    for op, o in zip(ops, out, strict=True)]
        except (TypeError, ValueError, IndexError) as exc:
            raise SlotStoreError(f"slot store (batch): unexpected answer {out!r}") from exc

    async def grant(self, job_id: str, backend: str, cap: int, lease: str, ttl_ms: int,
                    replica: str, placement: str = "resident", model: str = "",
                    ctx: int | None = None, stoppable: str = "") -> tuple[int, int]:
        return (await self.grant_many([GrantCall(job_id, backend, cap, lease, ttl_ms,
                                                 replica, placement, model, ctx,
                                                 stoppable)]))[0]

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
        calls = [self._grant(g) for g in grants]
        if len(calls) == 1:
            out = [await self._eval("grant", *calls[0])]
        else:
            out = await self._pipeline("grant", calls)
        try:
            return [(int(o[0]), int(o[1])) for o in out]
        except (TypeError, ValueError, IndexError) as exc:
            raise SlotStoreError(f"slot store (grant): unexpected answer {out!r}") from exc

    async def _pipeline(self, what: str, calls: Sequence[Call]) -> list[Any]:
        sha = self._script.sha
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                try:
                    out = list(await pipe.execute(raise_on_error=False))
                except NoScriptError:
                    out = [NoScriptError()]
                if any(isinstance(o, NoScriptError) for o in out):
                    # The server lost the script (a restart, SCRIPT FLUSH): load it and
                    # run them again (each is idempotent by its id).
                    await self._client.script_load(self._script.script)
                    for keys, args in calls:
                        pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                    out = list(await pipe.execute(raise_on_error=False))
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store ({what}): {exc}") from exc
        for o in out:
            if isinstance(o, ResponseError):
                stale = _stale(o)
                if stale is not None:
                    raise stale
            if isinstance(o, Exception):
                raise SlotStoreError(f"slot store ({what}): {o}")
        return out

    async def job(self, job_id: str) -> bytes | None:
        out = await self._run("job", [], [job_id])
        return out if isinstance(out, bytes) else None

    async def cancel(self, job_id: str) -> Cancelled:
        out = await self._run("cancel", [], [job_id, self.channel(LEADER)], memo=self._op())
        try:
            state = int(out[0])
            if state == 1:
                return Cancelled("left")
            if state == 2:
                return Cancelled("granted", Grant.parse(_text(out[1])))
            return Cancelled("unknown")
        except (TypeError, ValueError, IndexError) as exc:
            raise SlotStoreError(f"slot store (cancel): unexpected answer {out!r}") from exc

    async def renew(self, leases: Sequence[tuple[str, str]], ttl_ms: int) -> list[int]:
        if not leases:
            return []
        out = await self._run("renew", [b for b, _ in leases],
                              [ttl_ms, *(lease for _, lease in leases)])
        return [int(i) - 1 for i in out]

    async def adopt(self, leases: Sequence[tuple[str, str]], ttl_ms: int,
                    epoch: str | None = None) -> None:
        if epoch is not None:
            self.epoch = epoch
        await self._run("adopt", [b for b, _ in leases],
                        [ttl_ms, *(lease for _, lease in leases)])

    async def counts(self, backends: Sequence[str]) -> tuple[list[int], int]:
        out = await self._run("counts", backends, [])
        try:
            return [int(x) for x in out[:-1]], int(out[-1])
        except (TypeError, ValueError, IndexError) as exc:
            raise SlotStoreError(f"slot store (counts): unexpected answer {out!r}") from exc

    async def grace(self) -> int:
        return int(await self._run("grace", [], []))

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
                with contextlib.suppress(ValueError):
                    out[job] = Grant.parse(_text(value))
        return out

    async def lead(self, replica: str, ttl_ms: int) -> tuple[bool, str]:
        out = await self._run("lead", [], [replica, ttl_ms])
        return bool(int(out[0])), _text(out[1])

    async def resign(self, replica: str) -> bool:
        out = await self._run("resign", [], [replica])
        return bool(int(out[0]))

    async def charges(self) -> dict[str, float]:
        out = await self._run("charges", [], [], memo=self._op())
        return {_text(out[i]): float(out[i + 1]) for i in range(0, len(out), 2)}

    async def sweep(self, alive: Sequence[str]) -> int:
        return int(await self._run("sweep", [], [self._prefix + "lease:", *alive]))

    async def announce(self, message: str) -> None:
        try:
            await self._client.publish(self.channel(FLEET), message)
        except (RedisError, OSError) as exc:
            raise SlotStoreError(f"slot store (announce): {exc}") from exc

    async def heartbeat(self, replica: str, info: bytes, ttl_ms: int) -> Epoch:
        keys, args = self._call("hello", "", [f"{self._prefix}replica:{replica}",
                                              self._prefix + "replicas"],
                                [replica, info, ttl_ms])
        out = await self._eval("hello", keys, args)
        try:
            return Epoch(_text(out[0]), int(out[1]))
        except (TypeError, ValueError, IndexError) as exc:
            raise SlotStoreError(f"slot store (hello): unexpected answer {out!r}") from exc

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


def _taken(out: Any) -> Taken:
    index = int(out[0])
    return Taken(index - 1 if index > 0 else None, int(out[1]))


def _released(out: Any) -> Released:
    return Released(bool(int(out[0])), int(out[1]), int(out[2]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)
