"""Callback delivery as a protocol: a finished job's callback is leased like the job.

When a job finishes (succeeded, failed, cancelled) and has a ``callback_url``, the
same atomic store operation that finishes it makes its callback *deliverable*:
``pending``, no attempt yet, due at once, with the delivery id fixed at submission.
From then on any replica may take it:

    pending, due ─claim→ pending, held (lease) ─report delivered→ delivered
       ▲    ▲                  │   │  └──report failed, attempts left──┐
       │    └──lease lapses────┘   └──report failed, none left→ failed │
       └────────────────────────(due again after a backoff)────────────┘

One attempt is one ``claim``: it counts the attempt, names the holder (a replica)
and leases the callback to it until ``due`` (the holder refreshes the lease while it
POSTs). A lease that lapses (the holder died, hung, or was paused past it) makes the
callback claimable again by anyone; the lapsed attempt counts, so a callback whose
every holder dies still ends. The attempt number is the fence: a report or refresh
names the attempt it is about, and only the current one may change the state.

Invariants (checked by ``tests/contract/test_callback_delivery.py``, a stateful
test with crashes, pauses past the lease and duplicated messages, against the memory
and the Redis store):

1. **One holder.** A callback is never claimed while another holder's lease is live:
   at any moment at most one replica may be delivering it as the holder.
2. **One delivery id.** Every attempt of a job's callback, on every replica, carries
   the delivery id chosen when the job was submitted.
3. **Bounded.** ``attempts`` never decreases and never exceeds ``callback_tries``
   (read at each claim); no attempt is made once the callback is final.
4. **Final is final.** ``delivered`` and ``failed`` never change again; a report
   repeated (a retried store call whose answer was lost) has no second effect.
5. **Truthful.** ``delivered`` means some attempt was answered 2xx. A 2xx reported by
   a former holder (paused past its lease) still counts: the receiver has it.
6. **Progress.** A pending callback is always either held under a lease or due at a
   known time, so as long as one replica runs, it ends ``delivered`` or ``failed``.

Delivery is therefore *at least once*: a holder that dies after the receiver got the
POST but before its report is recorded is followed by another attempt with the same
delivery id, which the receiver can drop.

Pure: every function takes ``now`` (ms of the store's clock) and returns the new
state, or None when nothing changes. ``memory.py`` applies these functions; the
``claim_callback``/``refresh_callback``/``report_callback`` operations of
``jobs.lua`` mirror them line for line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"

LAPSED: Final = "the replica delivering this callback stopped refreshing its lease"
_MAX_BACKOFF_MS = 30_000


@dataclass(frozen=True, slots=True)
class CallbackState:
    """How delivery of the finished job to its ``callback_url`` goes."""

    status: str                 # pending | delivered | failed
    attempts: int = 0           # attempts started (claims), on any replica
    error: str | None = None    # why the last attempt did not deliver
    delivery_id: str = ""       # the same on every attempt: a receiver drops repeats
    holder: str | None = None   # the replica making the current attempt
    due_ms: int | None = None   # pending: when it may be claimed (lease end, or retry)

    @property
    def final(self) -> bool:
        return self.status != PENDING


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to, as its replica reports it."""

    delivered: bool
    error: str | None = None
    give_up: bool = False       # no point trying again (the host is no longer allowed)


def backoff_ms(attempt: int) -> int:
    """1 s, 2 s, 4 s, … after the 1st, 2nd, 3rd failed attempt; at most 30 s."""
    return int(min(_MAX_BACKOFF_MS, 1000 * 2 ** max(0, attempt - 1)))


def deliverable(delivery_id: str, now: int) -> CallbackState:
    """The callback of a job that has just finished: pending, due at once."""
    return CallbackState(PENDING, 0, None, delivery_id, None, now)


def claimable(state: CallbackState, now: int) -> bool:
    return state.status == PENDING and state.due_ms is not None and state.due_ms <= now


def claim(state: CallbackState, holder: str, now: int, lease_ms: int,
          tries: int) -> CallbackState | None:
    """Take the next attempt, leased to ``holder`` until ``now + lease_ms``. A callback
    whose attempts are used up (its last holder's lease lapsed) fails instead; the
    caller checks ``status``. None when it is not claimable."""
    if not claimable(state, now):
        return None
    # A holder still named here never reported: its lease lapsed mid-attempt.
    error = LAPSED if state.holder is not None else state.error
    if state.attempts >= tries:
        return dataclasses.replace(state, status=FAILED, error=error, holder=None,
                                   due_ms=None)
    return dataclasses.replace(state, attempts=state.attempts + 1, error=error,
                               holder=holder, due_ms=now + lease_ms)


def holds(state: CallbackState, holder: str, attempt: int) -> bool:
    """``holder`` is making attempt ``attempt`` and nobody has claimed it since. (A
    lapsed lease that nobody has claimed yet is still held: no one else is at it.)"""
    return (state.status == PENDING and state.holder == holder
            and state.attempts == attempt)


def refresh(state: CallbackState, holder: str, attempt: int, now: int,
            lease_ms: int) -> CallbackState | None:
    """Extend the holder's lease; None when the attempt is no longer the holder's."""
    if not holds(state, holder, attempt):
        return None
    return dataclasses.replace(state, due_ms=now + lease_ms)


def report(state: CallbackState, holder: str, attempt: int, outcome: Outcome, now: int,
           tries: int) -> CallbackState | None:
    """Record an attempt's outcome; None when it changes nothing (final already, or a
    failure reported by an attempt that is no longer the current one)."""
    if state.final:
        return None
    if outcome.delivered:
        # Whoever got the 2xx: the receiver has the callback, even if this holder's
        # lease lapsed meanwhile and another attempt is under way.
        return dataclasses.replace(state, status=DELIVERED, error=None, holder=None,
                                   due_ms=None)
    if not holds(state, holder, attempt):
        return None
    if outcome.give_up or attempt >= tries:
        return dataclasses.replace(state, status=FAILED, error=outcome.error,
                                   holder=None, due_ms=None)
    return dataclasses.replace(state, error=outcome.error, holder=None,
                               due_ms=now + backoff_ms(attempt))
