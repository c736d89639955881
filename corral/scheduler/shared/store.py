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
- ``renew`` — leases of requests still running are extended; lost ones are named.
- ``adopt`` — leases of requests that started while the store was away are recorded
  as they are (they run at the backend whatever the counts say).
- ``counts`` — each backend's use and the number of jobs waiting.
- ``lead`` / ``resign`` — one replica at a time orders the queue (a lease on
  leadership, kept by calling ``lead`` again before it lapses).
- ``heartbeat`` / ``replicas`` — each replica says it is alive (with what it is) and
  is forgotten once it stops; the leader drops the waiting jobs of replicas gone.
- ``stoppable`` / ``tell`` — the preemptible requests running (registered as they
  take a slot, gone with the release), and a word to one replica (``preempt <lease>``).
- ``charges`` — fair-share service charged by replicas on their own (a slot taken
  without the leader; the correction once a request's real token counts are known),
  taken in by the leader; ``acquire`` and ``release`` record them at no extra cost.

Notifications go to channels: ``leader`` (``enq <job>``, ``rel <backend>``,
``cancel <job>``), ``replica:<id>`` (``grant <job> <backend> <lease> <placement>``) and
``fleet``; ``listen`` yields them. ``MemorySlotStore`` keeps all of it in the process
(the contract tests' reference); ``RedisSlotStore`` keeps it in Redis for every
replica.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

LEADER = "leader"
FLEET = "fleet"      # loads the leader decided (``load <backend> <model> <num_ctx>``) and
                     # loads that finished (``ready …``): every replica's residency view


def replica_channel(replica: str) -> str:
    return f"replica:{replica}"


class SlotStoreError(Exception):
    """The shared store could not be reached or answered an error."""


@dataclass(frozen=True, slots=True)
class Taken:
    index: int | None      # the backend taken (0-based, in the order given); None: queued
    used: int              # its slots in use now (or, queued, the jobs waiting)


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


@dataclass(frozen=True, slots=True)
class Released:
    released: bool         # False: the lease had lapsed and the slot was taken back
    used: int
    waiting: int


@dataclass(frozen=True, slots=True)
class Grant:
    backend: str
    lease: str
    placement: str        # "resident" or "load"

    def text(self) -> str:
        return f"{self.backend} {self.lease} {self.placement}"

    @classmethod
    def parse(cls, text: str) -> Grant:
        backend, lease, placement = text.split(" ", 2)
        return cls(backend, lease, placement)


@dataclass(frozen=True, slots=True)
class Cancelled:
    state: Literal["left", "granted", "unknown"]
    grant: Grant | None = None    # granted: the slot it had been given meanwhile


class SlotStore(Protocol):
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

    async def adopt(self, leases: Sequence[tuple[str, str]], ttl_ms: int) -> None: ...

    async def counts(self, backends: Sequence[str]) -> tuple[list[int], int]: ...

    async def waiting(self) -> dict[str, bytes]: ...

    async def granted(self, job_ids: Sequence[str]) -> dict[str, Grant]: ...

    async def lead(self, replica: str, ttl_ms: int) -> tuple[bool, str]: ...

    async def resign(self, replica: str) -> bool: ...

    async def charges(self) -> dict[str, float]: ...

    async def announce(self, message: str) -> None: ...

    async def heartbeat(self, replica: str, info: bytes, ttl_ms: int) -> None: ...

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


class MemorySlotStore:
    """:class:`SlotStore` in the process; ``clock`` gives milliseconds."""

    def __init__(self, clock: Callable[[], int] = _ms) -> None:
        self.clock = clock
        self._leases: dict[str, dict[str, int]] = {}     # backend -> lease -> expiry
        self._waiting: dict[str, bytes] = {}
        self._granted: dict[str, Grant] = {}
        self._charges: dict[str, float] = {}
        self._leader: tuple[str, int] | None = None     # (replica, expiry)
        self._replicas: dict[str, tuple[bytes, int]] = {}  # replica -> (info, alive until)
        self._running: dict[str, tuple[str, str]] = {}     # lease -> (backend, descriptor)
        self._bus = _Bus()

    def _charge(self, client: str, amount: float) -> None:
        if client and amount:
            self._charges[client] = self._charges.get(client, 0.0) + amount

    def _used(self, backend: str, now: int) -> int:
        leases = self._leases.setdefault(backend, {})
        for lease in [k for k, expiry in leases.items() if expiry <= now]:
            del leases[lease]
        return len(leases)

    async def acquire(self, backends: Sequence[tuple[str, int]], lease: str, ttl_ms: int,
                      job_id: str, descriptor: bytes | None, client: str = "",
                      charge: float = 0.0, stoppable: str = "") -> Taken:
        now = self.clock()
        if not self._waiting:
            for i, (backend, cap) in enumerate(backends):
                n = self._used(backend, now)
                if n < cap:
                    self._leases[backend][lease] = now + ttl_ms
                    self._charge(client, charge)
                    if stoppable:
                        self._running[lease] = (backend, stoppable)
                    return Taken(i, n + 1)
        if descriptor is None:
            return Taken(None, len(self._waiting))
        if job_id not in self._waiting:
            self._waiting[job_id] = descriptor
            self._bus.publish(LEADER, f"enq {job_id}")
        return Taken(None, len(self._waiting))

    async def release(self, backend: str, lease: str, job_id: str, client: str = "",
                      correction: float = 0.0) -> Released:
        now = self.clock()
        removed = self._leases.setdefault(backend, {}).pop(lease, None) is not None
        self._granted.pop(job_id, None)
        self._running.pop(lease, None)
        self._charge(client, correction)
        n = self._used(backend, now)
        if removed and self._waiting:
            self._bus.publish(LEADER, f"rel {backend}")
        return Released(removed, n, len(self._waiting))

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
        now = self.clock()
        if job_id not in self._waiting:
            return 0, -1
        n = self._used(backend, now)
        if n >= cap:
            return -1, n
        self._leases[backend][lease] = now + ttl_ms
        if stoppable:
            self._running[lease] = (backend, stoppable)
        del self._waiting[job_id]
        grant = Grant(backend, lease, placement)
        self._granted[job_id] = grant
        self._bus.publish(replica_channel(replica), f"grant {job_id} {grant.text()}")
        if placement == "load":
            self._bus.publish(FLEET, f"load {backend} {model} {'' if ctx is None else ctx}")
        return 1, n + 1

    async def grant_many(self, grants: Sequence[GrantCall]) -> list[tuple[int, int]]:
        return [await self.grant(g.job_id, g.backend, g.cap, g.lease, g.ttl_ms, g.replica,
                                 g.placement, g.model, g.ctx, g.stoppable) for g in grants]

    async def stoppable(self) -> dict[str, tuple[str, str]]:
        return dict(self._running)

    async def tell(self, replica: str, message: str) -> None:
        self._bus.publish(replica_channel(replica), message)

    async def job(self, job_id: str) -> bytes | None:
        return self._waiting.get(job_id)

    async def cancel(self, job_id: str) -> Cancelled:
        if self._waiting.pop(job_id, None) is not None:
            self._bus.publish(LEADER, f"cancel {job_id}")
            return Cancelled("left")
        grant = self._granted.pop(job_id, None)
        if grant is not None:
            return Cancelled("granted", grant)
        return Cancelled("unknown")

    async def renew(self, leases: Sequence[tuple[str, str]], ttl_ms: int) -> list[int]:
        now = self.clock()
        lost = []
        for i, (backend, lease) in enumerate(leases):
            held = self._leases.setdefault(backend, {})
            if lease in held:
                held[lease] = now + ttl_ms
            else:
                lost.append(i)
        return lost

    async def adopt(self, leases: Sequence[tuple[str, str]], ttl_ms: int) -> None:
        now = self.clock()
        for backend, lease in leases:
            self._leases.setdefault(backend, {})[lease] = now + ttl_ms

    async def counts(self, backends: Sequence[str]) -> tuple[list[int], int]:
        now = self.clock()
        return [self._used(b, now) for b in backends], len(self._waiting)

    async def waiting(self) -> dict[str, bytes]:
        return dict(self._waiting)

    async def granted(self, job_ids: Sequence[str]) -> dict[str, Grant]:
        return {j: self._granted[j] for j in job_ids if j in self._granted}

    async def lead(self, replica: str, ttl_ms: int) -> tuple[bool, str]:
        now = self.clock()
        if self._leader is None or self._leader[1] <= now or self._leader[0] == replica:
            self._leader = (replica, now + ttl_ms)
            return True, replica
        return False, self._leader[0]

    async def resign(self, replica: str) -> bool:
        if self._leader is not None and self._leader[0] == replica:
            self._leader = None
            return True
        return False

    async def charges(self) -> dict[str, float]:
        taken, self._charges = self._charges, {}
        return taken

    async def announce(self, message: str) -> None:
        self._bus.publish(FLEET, message)

    async def heartbeat(self, replica: str, info: bytes, ttl_ms: int) -> None:
        self._replicas[replica] = (info, self.clock() + ttl_ms)

    async def replicas(self) -> dict[str, bytes]:
        now = self.clock()
        return {r: info for r, (info, until) in self._replicas.items() if until > now}

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
