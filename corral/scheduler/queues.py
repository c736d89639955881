"""Waiting jobs and the order in which they get a slot (pure: no I/O, no clock).

Order: priority class first (high, normal, low); inside a class, the client with the
least service received (a Virtual Token Counter); inside a client, first come first
served. With ``fairness: fifo`` a class is served strictly in arrival order.

A job that is retried after a failed attempt goes back to the *front* of its client's
line (``push(job, front=True)``) so a backend failure never costs it its place.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

Fairness = Literal["tokens", "requests", "fifo"]

_seq = itertools.count()


class Priority(IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, name: str) -> Priority:
        return cls[name.upper()]


@dataclass(eq=False, slots=True)
class Job:
    model: str
    client: str = ""
    priority: Priority = Priority.NORMAL
    weight: float = 1.0
    cost: float = 1.0          # estimated service (tokens) charged at dispatch
    enqueued_at: float = 0.0
    exclude: frozenset[str] = frozenset()   # backends this job already failed on
    affinity: str | None = None             # backend that served this conversation before
    seq: int = field(default_factory=lambda: next(_seq))


class JobQueue:
    def __init__(self, fairness: Fairness = "tokens") -> None:
        self.fairness = fairness
        # class → client → jobs in order (dicts keep insertion order; removal is O(1)).
        self._classes: list[dict[str, dict[int, Job]]] = [{} for _ in Priority]
        self._fifo: list[dict[int, Job]] = [{} for _ in Priority]
        self._fronts: list[dict[int, Job]] = [{} for _ in Priority]
        self.counters: dict[str, float] = {}
        self._last_served_counter = 0.0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def depth_by_class(self) -> dict[str, int]:
        return {p.name.lower(): len(self._fifo[p]) + len(self._fronts[p]) for p in Priority}

    def push(self, job: Job, front: bool = False) -> None:
        p = job.priority
        if front:
            self._fronts[p][job.seq] = job
        else:
            self._fifo[p][job.seq] = job
        clients = self._classes[p]
        line = clients.get(job.client)
        if line is None:
            self._lift(job.client)
            line = clients[job.client] = {}
        if front:
            # Rebuild the client's line with this job first: retries are rare.
            rest = dict(line)
            line.clear()
            line[job.seq] = job
            line.update(rest)
        else:
            line[job.seq] = job
        self._len += 1

    def remove(self, job: Job) -> bool:
        p = job.priority
        found = self._fifo[p].pop(job.seq, None) or self._fronts[p].pop(job.seq, None)
        if found is None:
            return False
        line = self._classes[p].get(job.client)
        if line is not None:
            line.pop(job.seq, None)
            if not line:
                del self._classes[p][job.client]
        self._len -= 1
        return True

    def ordered(self) -> Iterator[Job]:
        """Every waiting job, best first. Callers stop early once nothing can be served."""
        for p in Priority:
            yield from list(self._fronts[p].values())
            if self.fairness == "fifo":
                yield from list(self._fifo[p].values())
                continue
            clients = self._classes[p]
            if not clients:
                continue
            order = sorted(clients, key=lambda c: self.counters.get(c, 0.0))
            for client in order:
                for job in list(clients[client].values()):
                    if job.seq not in self._fronts[p]:
                        yield job

    # -- Virtual Token Counter ------------------------------------------------------

    def _backlogged_min(self) -> float | None:
        values = [self.counters.get(c, 0.0) for cls in self._classes for c in cls]
        return min(values) if values else None

    def _lift(self, client: str) -> None:
        """A client returning from idle starts level with the least-served backlogged
        client, so saved-up idleness cannot be spent as a monopoly later."""
        floor = self._backlogged_min()
        if floor is None:
            floor = self._last_served_counter
        self.counters[client] = max(self.counters.get(client, 0.0), floor)

    def charge(self, job: Job, service: float) -> None:
        """Charge ``service`` (tokens in ×1 + out ×2, or 1 per request) to the client.

        Called with the estimate at dispatch and with ``actual - estimate`` at
        completion, so the counter ends up exact while fairness acts at once.
        """
        if self.fairness == "fifo":
            return
        value = self.counters.get(job.client, 0.0) + service / job.weight
        self.counters[job.client] = value
        self._last_served_counter = value

    def forget_idle_clients(self, keep: int = 10_000) -> None:
        """Bound memory: drop counters of clients not waiting, oldest first."""
        if len(self.counters) <= keep:
            return
        waiting = {c for cls in self._classes for c in cls}
        for client in list(self.counters)[: len(self.counters) - keep]:
            if client not in waiting:
                del self.counters[client]
