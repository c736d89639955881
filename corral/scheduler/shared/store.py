"""Backend slots shared by replicas: the storage protocol and its in-memory form.

One atomic operation per step of a slot's life, the same on every store:

- ``acquire`` — when nobody waits, take a free slot on the first of the given backends
  that has one; otherwise (or when none is free) queue the job and tell the leader.
  A job never overtakes one that waits, whichever replica it came through.
- ``release`` — give a slot back; tell the leader when jobs wait. A lease that had
  lapsed and was taken back is not freed twice (a *late* release). ``release_many``
  gives several back in one round trip (the releases of one moment, coalesced), and
  ``run`` sends acquisitions and releases together, in order, in one round trip.
- ``grant`` — the leader gives a waiting job a slot; the job's replica is told.
- ``cancel`` — a job leaves the queue (its client left, it timed out), or learns the
  slot it was granted meanwhile.
- ``renew`` — leases of requests still running are extended; lost ones (lapsed in a
  pause) are recorded again and named — never dropped: the request still runs.
- ``adopt`` — leases of requests that started while the store was away, or that ran
  when it lost its data, are recorded as they are (under the new epoch).
- ``counts`` / ``grace`` — each backend's use and the number of jobs waiting; the end
  of the grace period after the store lost its data.
- ``sweep`` — the leader's housekeeping (entries of leases and replicas gone).
- ``lead`` / ``resign`` — one replica at a time orders the queue (a lease on
  leadership, kept by calling ``lead`` again before it lapses).
- ``heartbeat`` / ``replicas`` — each replica says it is alive (with what it is) and
  learns the store's epoch; it is forgotten once it stops; the leader drops the
  waiting jobs of replicas gone.
- ``stoppable`` / ``tell`` — the preemptible requests running (registered as they
  take a slot, gone with the release), and a word to one replica (``preempt <lease>``).
- ``charges`` — fair-share service charged by replicas on their own (a slot taken
  without the leader; the correction once a request's real token counts are known),
  taken in by the leader; ``acquire`` and ``release`` record them at no extra cost.

The rules every store follows — epochs, operation ids, grace periods, and the
invariants they keep — are written, and run, in ``protocol.py``.

Notifications go to channels: ``leader`` (``enq <job>``, ``rel <backend>``,
``cancel <job>``), ``replica:<id>`` (``grant <job> <backend> <lease> <placement>``) and
``fleet``; ``listen`` yields them. ``MemorySlotStore`` keeps all of it in the process
(the contract tests' reference); ``RedisSlotStore`` keeps it in Redis for every
replica.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from corral.scheduler.shared.protocol import (
    FLEET,
    LEADER,
    Cancelled,
    Epoch,
    EpochChanged,
    Grant,
    Published,
    Released,
    SlotState,
    Taken,
    replica_channel,
)

__all__ = ["FLEET", "LEADER", "Acquisition", "Cancelled", "Epoch", "EpochChanged", "Grant",
           "GrantCall", "MemorySlotStore", "Release", "Released", "SlotStore",
           "SlotStoreError", "Taken", "replica_channel"]

DEFAULT_GRACE_MS = 3_000     # three renewal intervals: every live replica talks to the
                             # store within it and records what it runs


class SlotStoreError(Exception):
    """The shared store could not be reached or answered an error."""


@dataclass(frozen=True, slots=True)
class Acquisition:
    """One slot to ask for (``acquire``'s arguments)."""

    backends: Sequence[tuple[str, int]]
    lease: str
    ttl_ms: int
    job_id: str
    descriptor: bytes | None
    client: str = ""
    charge: float = 0.0
    stoppable: str = ""         # what a preemption needs ("" = not preemptible)


@dataclass(frozen=True, slots=True)
class GrantCall:
    """One waiting job to give a slot (``grant``'s arguments)."""

    job_id: str
    backend: str
    cap: int
    lease: str
    ttl_ms: int
    replica: str
    placement: str = "resident"
    model: str = ""
    ctx: int | None = None
    stoppable: str = ""


@dataclass(frozen=True, slots=True)
class Release:
    """One slot to give back (``release``'s arguments)."""

    backend: str
    lease: str
    job_id: str
    client: str = ""
    correction: float = 0.0


class SlotStore(Protocol):
    """One replica's handle on the store. It knows the epoch its replica last learnt
    (``epoch``, set by ``heartbeat`` and ``adopt``) and sends it with every operation
    that changes slots; such an operation raises :class:`EpochChanged` when the store
    is not the one its replica knew."""

    epoch: str

    async def acquire(self, backends: Sequence[tuple[str, int]], lease: str, ttl_ms: int,
                      job_id: str, descriptor: bytes | None, client: str = "",
                      charge: float = 0.0, stoppable: str = "") -> Taken: ...

    async def release(self, backend: str, lease: str, job_id: str, client: str = "",
                      correction: float = 0.0) -> Released: ...

    async def release_many(self, releases: Sequence[Release]) -> list[Released]: ...

    async def run(self, ops: Sequence[Acquisition | Release]) -> list[Taken | Released]: ...

    async def grant(self, job_id: str, backend: str, cap: int, lease: str, ttl_ms: int,
                    replica: str, placement: str = "resident", model: str = "",
                    ctx: int | None = None, stoppable: str = "") -> tuple[int, int]: ...

    async def stoppable(self) -> dict[str, tuple[str, str]]: ...

    async def tell(self, replica: str, message: str) -> None: ...

    async def grant_many(self, grants: Sequence[GrantCall]) -> list[tuple[int, int]]: ...

    async def job(self, job_id: str) -> bytes | None: ...

    async def cancel(self, job_id: str) -> Cancelled: ...

    async def renew(self, leases: Sequence[tuple[str, str]], ttl_ms: int) -> list[int]: ...

    async def adopt(self, leases: Sequence[tuple[str, str]], ttl_ms: int,
                    epoch: str | None = None) -> None: ...

    async def counts(self, backends: Sequence[str]) -> tuple[list[int], int]: ...

    async def grace(self) -> int: ...

    async def waiting(self) -> dict[str, bytes]: ...

    async def granted(self, job_ids: Sequence[str]) -> dict[str, Grant]: ...

    async def lead(self, replica: str, ttl_ms: int) -> tuple[bool, str]: ...

    async def resign(self, replica: str) -> bool: ...

    async def charges(self) -> dict[str, float]: ...

    async def sweep(self, alive: Sequence[str]) -> int: ...

    async def announce(self, message: str) -> None: ...

    async def heartbeat(self, replica: str, info: bytes, ttl_ms: int) -> Epoch: ...

    async def replicas(self) -> dict[str, bytes]: ...

    def listen(self, channels: Sequence[str]) -> AsyncIterator[tuple[str, str]]: ...

    async def close(self) -> None: ...


def _ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Bus:
    subscribers: list[tuple[frozenset[str], asyncio.Queue[tuple[str, str]]]] = field(
        default_factory=list)

    def publish(self, channel: str, message: str) -> None:
        for channels, queue in self.subscribers:
            if channel in channels:
                queue.put_nowait((channel, message))


_handles = itertools.count()


class MemorySlotStore:
    """:class:`SlotStore` in the process: the protocol's :class:`SlotState` as it is.
    Several handles may share one state and bus (``share``), as replicas share Redis;
    ``clock`` gives milliseconds."""

    def __init__(self, clock: Callable[[], int] = _ms, *, state: SlotState | None = None,
                 bus: _Bus | None = None, grace_ms: int = DEFAULT_GRACE_MS) -> None:
        self.clock = clock
        self.state = state if state is not None else SlotState()
        self._bus = bus if bus is not None else _Bus()
        self.grace_ms = grace_ms
        self.epoch = ""
        self._name = f"m{next(_handles)}"
        self._ops = itertools.count()

    def share(self) -> MemorySlotStore:
        """Another replica's handle on the same store."""
        return MemorySlotStore(self.clock, state=self.state, bus=self._bus,
                               grace_ms=self.grace_ms)

    def _op(self) -> str:
        return f"{self._name}:{next(self._ops)}"

    def _send(self, published: Published) -> None:
        for channel, message in published:
            self._bus.publish(channel, message)

    async def acquire(self, backends: Sequence[tuple[str, int]], lease: str, ttl_ms: int,
                      job_id: str, descriptor: bytes | None, client: str = "",
                      charge: float = 0.0, stoppable: str = "") -> Taken:
        taken, out = self.state.acquire(self.clock(), self.epoch, self.grace_ms, backends,
                                        lease, ttl_ms, job_id, descriptor, client, charge,
                                        stoppable)
        self._send(out)
        return taken

    async def release(self, backend: str, lease: str, job_id: str, client: str = "",
                      correction: float = 0.0) -> Released:
        # Remembered by its lease, as in Redis: a lease is released once.
        done, out = self.state.release(self.clock(), self.epoch, self.grace_ms, lease,
                                       backend, lease, job_id, client, correction)
        self._send(out)
        return done

    async def release_many(self, releases: Sequence[Release]) -> list[Released]:
        return [await self.release(r.backend, r.lease, r.job_id, r.client, r.correction)
                for r in releases]

    async def run(self, ops: Sequence[Acquisition | Release]) -> list[Taken | Released]:
        out: list[Taken | Released] = []
        for op in ops:
            if isinstance(op, Release):
                out.append(await self.release(op.backend, op.lease, op.job_id, op.client,
                                              op.correction))
            else:
                out.append(await self.acquire(op.backends, op.lease, op.ttl_ms, op.job_id,
                                              op.descriptor, op.client, op.charge,
                                              op.stoppable))
        return out

    async def grant(self, job_id: str, backend: str, cap: int, lease: str, ttl_ms: int,
                    replica: str, placement: str = "resident", model: str = "",
                    ctx: int | None = None, stoppable: str = "") -> tuple[int, int]:
        answer, out = self.state.grant(self.clock(), self.epoch, self.grace_ms, job_id,
                                       backend, cap, lease, ttl_ms, replica, placement,
                                       model, ctx, stoppable)
        self._send(out)
        return answer

    async def grant_many(self, grants: Sequence[GrantCall]) -> list[tuple[int, int]]:
        return [await self.grant(g.job_id, g.backend, g.cap, g.lease, g.ttl_ms, g.replica,
                                 g.placement, g.model, g.ctx, g.stoppable) for g in grants]

    async def stoppable(self) -> dict[str, tuple[str, str]]:
        return dict(self.state.running)

    async def tell(self, replica: str, message: str) -> None:
        self._bus.publish(replica_channel(replica), message)

    async def job(self, job_id: str) -> bytes | None:
        return self.state.waiting.get(job_id)

    async def cancel(self, job_id: str) -> Cancelled:
        done, out = self.state.cancel(self.clock(), self.epoch, self.grace_ms, self._op(),
                                      job_id)
        self._send(out)
        return done

    async def renew(self, leases: Sequence[tuple[str, str]], ttl_ms: int) -> list[int]:
        return self.state.renew(self.clock(), self.epoch, self.grace_ms, leases, ttl_ms)

    async def adopt(self, leases: Sequence[tuple[str, str]], ttl_ms: int,
                    epoch: str | None = None) -> None:
        if epoch is not None:
            self.epoch = epoch
        self.state.adopt(self.clock(), self.epoch, self.grace_ms, leases, ttl_ms)

    async def counts(self, backends: Sequence[str]) -> tuple[list[int], int]:
        return self.state.counts(self.clock(), backends)

    async def grace(self) -> int:
        return self.state.grace_until

    async def waiting(self) -> dict[str, bytes]:
        return dict(self.state.waiting)

    async def granted(self, job_ids: Sequence[str]) -> dict[str, Grant]:
        return {j: self.state.granted[j] for j in job_ids if j in self.state.granted}

    async def lead(self, replica: str, ttl_ms: int) -> tuple[bool, str]:
        return self.state.lead(self.clock(), replica, ttl_ms)

    async def resign(self, replica: str) -> bool:
        return self.state.resign(replica)

    async def charges(self) -> dict[str, float]:
        return self.state.take_charges(self.clock(), self._op())

    async def sweep(self, alive: Sequence[str]) -> int:
        return self.state.sweep(self.clock(), alive)

    async def announce(self, message: str) -> None:
        self._bus.publish(FLEET, message)

    async def heartbeat(self, replica: str, info: bytes, ttl_ms: int) -> Epoch:
        return self.state.heartbeat(self.clock(), self.epoch, self.grace_ms, replica, info,
                                    ttl_ms)

    async def replicas(self) -> dict[str, bytes]:
        return self.state.alive(self.clock())

    async def listen(self, channels: Sequence[str]) -> AsyncIterator[tuple[str, str]]:
        yield "", "resync"     # as the Redis store does once subscribed
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        entry = (frozenset(channels), queue)
        self._bus.subscribers.append(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            self._bus.subscribers.remove(entry)

    async def close(self) -> None:
        return None
