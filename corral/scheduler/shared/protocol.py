"""The shared slot protocol, as a pure state machine: the specification that the
memory store runs as it is and that ``slots.lua`` implements operation for operation.

Nothing here does I/O or reads a clock: ``now`` (milliseconds) is a parameter, and
what an operation publishes is returned to the caller, who sends it.

The store's state: per backend, the leases that hold its slots (a lease is a name and
an expiry; a backend's use is the number of unexpired ones); the jobs waiting for a
slot; the grants made to waiting jobs; the preemptible requests running; fair-share
charges not yet taken in by the leader; the leader; the replicas alive; and two
things that make faults visible and retries harmless:

- **the epoch** — a name created at first use. A store that restarted without its
  data, or failed over to a replica that had not seen the last writes, has no epoch
  or another one. Every operation that changes slots carries the epoch its caller
  knows; a mismatch (or a missing epoch, which is then created) refuses the operation
  with :class:`EpochChanged`, and the caller records its running leases again and
  queues its waiting jobs again (``adopt``, ``acquire``) before it asks for anything
  else. A new epoch opens a **grace period** of ``grace_ms``: no slot is given
  (``acquire`` queues, ``grant`` answers "full") until every live replica — each
  talks to the store at least once per renewal interval — has recorded what runs.
- **operation ids** — every operation that is not naturally idempotent carries an id,
  and the store remembers the answer to each id for ``MEMO_MS``. The same operation
  delivered twice (a client library's retry after a lost answer, a duplicated
  message) gets the first answer again and has no second effect.

Invariants (checked after every step by ``tests/contract/test_slot_protocol.py``, a
model-based test that drives several replicas and one store — memory and Redis —
through acquire, release, renew, grant, cancel, replica pause past its lease,
replica crash, store restart with data loss, store unreachable and duplicated
delivery):

- **I1** For every backend, the store never gives a slot while its live leases are
  at ``max_concurrency``: live leases ≤ ``max_concurrency`` at every instant, except
  leases recorded again by ``renew`` for a replica that was paused past its lease
  while another request took the slot (the documented exception: such a backend
  gets no new slot until it is under its cap again). During an outage, each
  replica's local limit is the slots it held when the store went away, less any
  excess over the cap (:func:`outage_limit`), so the limits add up to at most
  ``max_concurrency`` whatever the replicas' views; only a replica the store listed
  alone for a whole lease takes them all.
- **I2** A request running at a backend holds a live lease, or is counted in its
  replica's local share while the store is away, or (after a new epoch) is recorded
  again before its replica takes any new slot.
- **I3** After a fault heals, the whole capacity is back within two leases (a grace
  period is at most one lease), and never less than before the fault: local limits
  are kept apart from the configured slots, which an outage never changes.
- **I4** The queue's order (class, fair share, arrival) survives a leader change:
  each waiting job's arrival time is stored and the new leader rebuilds its queue in
  arrival order.
- **I5** A fair-share charge is made once per run (when its slot is taken: by
  ``acquire`` or by the leader's grant) and refunded when the run is abandoned (a
  grant that finds the job gone or the backend full); a retried operation has no
  second effect (operation ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

LEADER: Final = "leader"
FLEET: Final = "fleet"   # loads the leader decided (``load <backend> <model> <num_ctx>``)
                         # and loads that finished (``ready …``): every replica's view
MEMO_MS: Final = 60_000  # how long the answer to an operation id is remembered: far
                         # longer than any retry of it (a socket timeout or two)


# Epochs this process created (the memory store's; Redis names them from a call id
# unique to the call): kept outside the state, which a data loss wipes.
_created = [0]


def replica_channel(replica: str) -> str:
    return f"replica:{replica}"


class EpochChanged(Exception):
    """The store restarted without its data (or is not the store the caller knew):
    the caller records what runs again, then repeats the operation."""

    def __init__(self, epoch: str, grace_until: int) -> None:
        super().__init__(f"the slot store's epoch is now {epoch}")
        self.epoch = epoch
        self.grace_until = grace_until


@dataclass(frozen=True, slots=True)
class Taken:
    index: int | None      # the backend taken (0-based, in the order given); None: queued
    used: int              # its slots in use now (or, queued, the jobs waiting)


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


@dataclass(frozen=True, slots=True)
class Epoch:
    name: str
    grace_until: int       # ms; no slot is given before it


Published = list[tuple[str, str]]     # (channel, message) to send after the operation


@dataclass
class SlotState:
    """Everything the store keeps. ``epoch`` is None in a store that has never been
    used or that lost its data."""

    epoch: str | None = None
    epoch_at: int = 0                    # when it was created
    grace_until: int = 0
    leases: dict[str, dict[str, int]] = field(default_factory=dict)  # backend -> lease -> expiry
    waiting: dict[str, bytes] = field(default_factory=dict)          # job id -> descriptor
    granted: dict[str, Grant] = field(default_factory=dict)
    running: dict[str, tuple[str, str]] = field(default_factory=dict)  # lease -> (backend, what)
    charges: dict[str, float] = field(default_factory=dict)
    leader: tuple[str, int] | None = None                            # (replica, expiry)
    replicas: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    memo: dict[str, tuple[object, int]] = field(default_factory=dict)  # op id -> (answer, until)

    # -- the epoch ------------------------------------------------------------------

    def ensure_epoch(self, now: int, known: str, candidate: str, grace_ms: int) -> Epoch:
        """The epoch, created when the store has none, with a grace period: whoever
        reaches an empty store first — even a replica that knew no epoch — cannot tell
        a store used for the first time from one that lost its data, while requests of
        other replicas may still run unrecorded. ``candidate`` is unique per call, so
        two epochs never share a name (not even two created in one millisecond)."""
        if self.epoch is None:
            _created[0] += 1
            self.epoch, self.epoch_at = f"{now}-{candidate}-{_created[0]}", now
            self.grace_until = now + grace_ms
        return Epoch(self.epoch, self.grace_until)

    def check(self, now: int, epoch: str, candidate: str, grace_ms: int) -> None:
        current = self.ensure_epoch(now, epoch, candidate, grace_ms)
        if current.name != epoch:
            raise EpochChanged(current.name, current.grace_until)

    def in_grace(self, now: int) -> bool:
        return now < self.grace_until

    # -- operation ids ----------------------------------------------------------------

    def recall(self, op: str, now: int) -> object | None:
        if not op:
            return None
        for key in [k for k, (_, until) in self.memo.items() if until <= now]:
            del self.memo[key]
        entry = self.memo.get(op)
        return entry[0] if entry is not None else None

    def remember(self, op: str, answer: object, now: int) -> None:
        if op:
            self.memo[op] = (answer, now + MEMO_MS)

    # -- slots --------------------------------------------------------------------------

    def used(self, backend: str, now: int) -> int:
        held = self.leases.setdefault(backend, {})
        for lease in [k for k, expiry in held.items() if expiry <= now]:
            del held[lease]         # its preemptible entry goes with the leader's sweep
        return len(held)

    def _charge(self, client: str, amount: float) -> None:
        if client and amount:
            self.charges[client] = self.charges.get(client, 0.0) + amount

    def acquire(self, now: int, epoch: str, grace_ms: int,
                backends: Sequence[tuple[str, int]], lease: str, ttl_ms: int,
                job_id: str, descriptor: bytes | None, client: str = "",
                charge: float = 0.0, stoppable: str = "") -> tuple[Taken, Published]:
        """Nobody waiting and no grace period: the first backend with a free slot is
        taken (and the client charged). Otherwise the job is queued (once) and the
        leader told. The lease names the operation: a repeat answers as the first."""
        self.check(now, epoch, lease, grace_ms)
        seen = self.recall(f"acquire:{lease}", now)
        if isinstance(seen, Taken):
            return seen, []
        out: Published = []
        taken: Taken | None = None
        if not self.waiting and not self.in_grace(now):
            for i, (backend, cap) in enumerate(backends):
                n = self.used(backend, now)
                if n < cap:
                    self.leases[backend][lease] = now + ttl_ms
                    self._charge(client, charge)
                    if stoppable:
                        self.running[lease] = (backend, stoppable)
                    taken = Taken(i, n + 1)
                    break
        if taken is None:
            if descriptor is None or job_id in self.granted:
                # Granted already (a repeat after the leader was quick): not queued again.
                taken = Taken(None, len(self.waiting))
            else:
                if job_id not in self.waiting:
                    self.waiting[job_id] = descriptor
                    out.append((LEADER, f"enq {job_id}"))
                taken = Taken(None, len(self.waiting))
        self.remember(f"acquire:{lease}", taken, now)
        return taken, out

    def release(self, now: int, epoch: str, grace_ms: int, op: str, backend: str,
                lease: str, job_id: str, client: str = "",
                correction: float = 0.0) -> tuple[Released, Published]:
        """The slot goes back (a lapsed lease is not freed twice: another request may
        hold the slot now); the correction of the client's charge is made once."""
        self.check(now, epoch, op, grace_ms)
        seen = self.recall(f"release:{op}", now)
        if isinstance(seen, Released):
            return seen, []
        removed = self.leases.setdefault(backend, {}).pop(lease, None) is not None
        self.granted.pop(job_id, None)
        self.running.pop(lease, None)
        self._charge(client, correction)
        n = self.used(backend, now)
        out: Published = []
        if removed and self.waiting:
            out.append((LEADER, f"rel {backend}"))
        done = Released(removed, n, len(self.waiting))
        self.remember(f"release:{op}", done, now)
        return done, out

    def grant(self, now: int, epoch: str, grace_ms: int, job_id: str, backend: str,
              cap: int, lease: str, ttl_ms: int, replica: str,
              placement: str = "resident", model: str = "", ctx: int | None = None,
              stoppable: str = "") -> tuple[tuple[int, int], Published]:
        """The leader gives a waiting job a slot: (1, use) granted; (0, -1) the job
        no longer waits; (-1, use) no free slot (or a grace period)."""
        self.check(now, epoch, lease, grace_ms)
        seen = self.recall(f"grant:{lease}", now)
        if isinstance(seen, tuple):
            return (int(seen[0]), int(seen[1])), []
        out: Published = []
        answer: tuple[int, int]
        if job_id not in self.waiting:
            answer = (0, -1)
        else:
            n = self.used(backend, now)
            if n >= cap or self.in_grace(now):
                answer = (-1, max(n, cap) if self.in_grace(now) else n)
            else:
                self.leases[backend][lease] = now + ttl_ms
                if stoppable:
                    self.running[lease] = (backend, stoppable)
                del self.waiting[job_id]
                made = Grant(backend, lease, placement)
                self.granted[job_id] = made
                out.append((replica_channel(replica), f"grant {job_id} {made.text()}"))
                if placement == "load":
                    out.append((FLEET, f"load {backend} {model} {'' if ctx is None else ctx}"))
                answer = (1, n + 1)
        self.remember(f"grant:{lease}", answer, now)
        return answer, out

    def cancel(self, now: int, epoch: str, grace_ms: int, op: str,
               job_id: str) -> tuple[Cancelled, Published]:
        """A job leaves the queue, or learns the slot it was granted meanwhile (which
        its caller then gives back or uses): told once, however often it is asked."""
        self.check(now, epoch, op, grace_ms)
        seen = self.recall(f"cancel:{op}", now)
        if isinstance(seen, Cancelled):
            return seen, []
        out: Published = []
        if self.waiting.pop(job_id, None) is not None:
            done = Cancelled("left")
            out.append((LEADER, f"cancel {job_id}"))
        elif (made := self.granted.pop(job_id, None)) is not None:
            done = Cancelled("granted", made)
        else:
            done = Cancelled("unknown")
        self.remember(f"cancel:{op}", done, now)
        return done, out

    def renew(self, now: int, epoch: str, grace_ms: int,
              leases: Sequence[tuple[str, str]], ttl_ms: int) -> list[int]:
        """Leases of requests still running are extended. One the store no longer has
        (it lapsed during a pause) is recorded again — the request runs at the backend
        whatever the counts say — and named in the answer. Never frees anything."""
        self.check(now, epoch, "renew", grace_ms)
        lost = []
        for i, (backend, lease) in enumerate(leases):
            held = self.leases.setdefault(backend, {})
            if lease not in held or held[lease] <= now:
                lost.append(i)
            held[lease] = now + ttl_ms
        return lost

    def adopt(self, now: int, epoch: str, grace_ms: int,
              leases: Sequence[tuple[str, str]], ttl_ms: int) -> None:
        """Requests that run at the backends are recorded as they are (after a new
        epoch, or after running while the store was away)."""
        self.renew(now, epoch, grace_ms, leases, ttl_ms)

    def counts(self, now: int, backends: Sequence[str]) -> tuple[list[int], int]:
        return [self.used(b, now) for b in backends], len(self.waiting)

    def take_charges(self, now: int, op: str) -> dict[str, float]:
        seen = self.recall(f"charges:{op}", now)
        if isinstance(seen, dict):
            return dict(seen)
        taken, self.charges = self.charges, {}
        self.remember(f"charges:{op}", dict(taken), now)
        return taken

    # -- leadership and membership ------------------------------------------------------

    def lead(self, now: int, replica: str, ttl_ms: int) -> tuple[bool, str]:
        if self.leader is None or self.leader[1] <= now or self.leader[0] == replica:
            self.leader = (replica, now + ttl_ms)
            return True, replica
        return False, self.leader[0]

    def resign(self, replica: str) -> bool:
        if self.leader is not None and self.leader[0] == replica:
            self.leader = None
            return True
        return False

    def heartbeat(self, now: int, epoch: str, grace_ms: int, replica: str, info: bytes,
                  ttl_ms: int) -> Epoch:
        """A replica says it is alive; the answer is the epoch (a new one is created
        when the store lost its data: the replica then records what runs again)."""
        self.replicas[replica] = (info, now + ttl_ms)
        return self.ensure_epoch(now, epoch, replica, grace_ms)

    def alive(self, now: int) -> dict[str, bytes]:
        for gone in [r for r, (_, until) in self.replicas.items() if until <= now]:
            del self.replicas[gone]
        return {r: info for r, (info, _) in self.replicas.items()}

    def sweep(self, now: int, alive: Sequence[str]) -> int:
        """The leader's housekeeping: preemptible entries whose lease is gone, and
        grants to replicas that are gone (nobody will take them; their leases lapse
        or were released), are forgotten. -> how many entries went."""
        live = {lease for held in self.leases.values() for lease, exp in held.items()
                if exp > now}
        gone = [lease for lease in self.running if lease not in live]
        for lease in gone:
            del self.running[lease]
        replicas = set(alive)
        stale = [j for j, g in self.granted.items()
                 if g.lease not in live and job_replica(j) not in replicas]
        for job_id in stale:
            del self.granted[job_id]
        return len(gone) + len(stale)


def job_replica(job_id: str) -> str:
    """A job id is ``<replica>.<seq>``; replica ids may hold dots, seq never does."""
    return job_id.rpartition(".")[0]


def outage_limit(cap: int, held: int, used: int, alone: bool) -> int:
    """This replica's limit on a backend while the shared store is away (I1).

    ``held`` is the slots its own requests hold when the store goes away; ``used`` the
    backend's use the store last reported (all replicas). A replica that has been the
    only one the store listed for a whole lease (or never reached it) is alone: all
    the slots are its. Otherwise it keeps the slots it holds — less any excess of the
    backend over its cap, the mark of a replica that was paused past its lease — and
    gives them, as its requests end, to its next waiting ones; it takes no free slot.

    Why no free slot: the replicas' views of the use are up to a renewal interval
    apart, and a slot another took since its last view would be given twice. What the
    replicas hold adds up to at most the cap, whatever their views: each knows its own
    exactly, and the store gave every one of them under the cap."""
    if alone:
        return cap
    return max(held - max(used - cap, 0), 0)


def sole(members: Sequence[str], me: str, listed_alone_since: float | None, now: float,
         lease_s: float) -> bool:
    """Whether a replica may take every slot while the store is away: it never reached
    the store (it knows of no other), or the store has listed it alone at every
    heartbeat for a whole lease — long enough for any other live replica to have shown
    up, since a heartbeat lasts one lease. A replica back from an outage longer than a
    lease is listed alone at first; it is not alone for that."""
    if not members:
        return True
    return (list(members) == [me] and listed_alone_since is not None
            and now - listed_alone_since >= lease_s)
