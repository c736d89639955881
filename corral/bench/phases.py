"""Pure logic of the failover scenario: classifying outcomes, bucketing them into
phases, reading Corral's status transitions and judging the run (no I/O, no clock)."""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.bench import load

A, B = "A", "B"

OK = "ok"
CUT = "cut"                  # 200, then the stream ended with an {"error": ...} line
INCOMPLETE = "incomplete"    # 200, but the stream ended with neither a done nor an error line
_STATUS = "status "          # a non-200 answer: "status 503"
_CONNECTION = "connection: "  # no complete answer: "connection: reset"




@dataclass(frozen=True)
class PhaseSpec:
    name: str
    what: str
    # "fault": Corral should stop routing to A; "recovery": it should route to A again.
    kind: str


PHASES = (
    PhaseSpec("baseline", "A and B healthy", "baseline"),
    PhaseSpec("oom", "A answers 500 out of memory", "fault"),
    PhaseSpec("oom cleared", "A answers normally again", "recovery"),
    PhaseSpec("hang", "A hangs before the first byte", "fault"),
    PhaseSpec("hang cleared", "A answers normally again", "recovery"),
    PhaseSpec("killed", "A's process killed (SIGKILL)", "fault"),
    PhaseSpec("restarted", "a fresh A started on the same port", "recovery"),
)
KILLED = next(i for i, p in enumerate(PHASES) if p.name == "killed")


# -- pure logic: outcomes, phases, status transitions ------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One client request. ``start``/``end`` are wall-clock seconds (comparable with
    Corral's access log and the status polls); ``latency`` is from a monotonic clock."""

    start: float
    end: float
    outcome: str
    latency: float
    ttft: float | None = None
    error_lines: int = 0


@dataclass(frozen=True, slots=True)
class Poll:
    """Backend A as ``/corral/status`` showed it at wall-clock time ``t``."""

    t: float
    up: bool
    routable: bool
    breaker: str | None
    in_flight: int


def classify(status: int, last_line: bytes) -> str:
    """The outcome of a complete HTTP response to a streaming request."""
    if status != 200:
        return f"{_STATUS}{status}"
    compact = last_line.replace(b" ", b"")
    if b'"done":true' in compact:
        return OK
    if b'{"error"' in compact:
        return CUT
    return INCOMPLETE


def connection_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed mid-response"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return type(exc).__name__


def phase_of(starts: Sequence[float], start: float, end: float) -> int | None:
    """The phase a request counts in: the one in which it ended; the last phase has no
    end, so it also takes the stragglers. None for a request started before the first
    phase (the warm-up). ``starts`` holds each phase's start, ascending."""
    if not starts or start < starts[0]:
        return None
    return max(0, bisect.bisect_right(starts, end) - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    value = load.percentile(list(values), q)
    return None if math.isnan(value) else round(value, 1)


def summarize_clients(samples: Iterable[Sample], starts: Sequence[float]) -> list[dict[str, Any]]:
    """Per phase: outcomes by kind, latency and time to first token of the OK ones."""
    groups: list[list[Sample]] = [[] for _ in starts]
    for s in samples:
        i = phase_of(starts, s.start, s.end)
        if i is not None:
            groups[i].append(s)
    out = []
    for group in groups:
        ok = [s for s in group if s.outcome == OK]
        non_200: Counter[str] = Counter()
        connection: Counter[str] = Counter()
        cut = incomplete = 0
        for s in group:
            if s.outcome.startswith(_STATUS):
                non_200[s.outcome.removeprefix(_STATUS)] += 1
            elif s.outcome.startswith(_CONNECTION):
                connection[s.outcome.removeprefix(_CONNECTION)] += 1
            elif s.outcome == CUT:
                cut += 1
            elif s.outcome == INCOMPLETE:
                incomplete += 1
        lat = [s.latency * 1000 for s in ok]
        ttft = [s.ttft * 1000 for s in ok if s.ttft is not None]
        cut_samples = [s for s in group if s.outcome == CUT]
        out.append({
            "requests": len(group),
            "ok": len(ok),
            "failures": len(group) - len(ok),
            "non_200": dict(sorted(non_200.items())),
            "cut": cut,
            # Each cut stream should carry exactly one error line, its last.
            "cut_with_one_error_line": sum(1 for s in cut_samples if s.error_lines == 1),
            "incomplete": incomplete,
            "connection_errors": dict(sorted(connection.items())),
            "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                           "max": round(max(lat), 1) if lat else None},
            "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        })
    return out


def record_span(rec: dict[str, Any]) -> tuple[float, float]:
    """An access-log record's (start, end) in wall-clock seconds."""
    start = float(rec.get("time") or 0.0)
    return start, start + float(rec.get("duration_ms") or 0.0) / 1000


def summarize_access_log(records: Iterable[dict[str, Any]],
                         starts: Sequence[float]) -> list[dict[str, Any]]:
    """Per phase, from Corral's side: statuses, which backend served the successful
    requests, how many requests were retried (and how many retries in all), and the
    streams that broke mid-way, by backend."""
    groups: list[list[dict[str, Any]]] = [[] for _ in starts]
    for rec in records:
        start, end = record_span(rec)
        i = phase_of(starts, start, end)
        if i is not None:
            groups[i].append(rec)
    out = []
    for group in groups:
        statuses: Counter[str] = Counter()
        served: Counter[str] = Counter()
        mid_stream: Counter[str] = Counter()
        retried = retries = 0
        for rec in group:
            status = rec.get("status")
            statuses[str(status)] += 1
            backend = str(rec.get("backend"))
            if status == 200:
                if rec.get("error"):
                    mid_stream[backend] += 1
                else:
                    served[backend] += 1
            n = int(rec.get("retries") or 0)
            if n:
                retried += 1
                retries += n
        out.append({
            "requests": len(group),
            "statuses": dict(sorted(statuses.items())),
            "served_by": dict(sorted(served.items())),
            "retried_requests": retried,
            "retries": retries,
            "mid_stream_errors": dict(sorted(mid_stream.items())),
        })
    return out


def first_out(polls: Sequence[Poll], since: float, until: float = math.inf) -> Poll | None:
    """The first poll in [since, until) that shows A not routable."""
    return next((p for p in polls if since <= p.t < until and not p.routable), None)


def first_back(polls: Sequence[Poll], since: float, until: float = math.inf) -> Poll | None:
    """The first poll in [since, until) that shows A fully back: up, routable and its
    breaker closed (an open breaker is briefly routable when it lets one trial through)."""
    return next((p for p in polls if since <= p.t < until and p.up and p.routable
                 and p.breaker in (None, "closed")), None)


def changes(polls: Sequence[Poll]) -> list[Poll]:
    """The polls at which A's (up, routable, breaker) differed from the poll before."""
    out: list[Poll] = []
    for p in polls:
        if not out or (p.up, p.routable, p.breaker) != (
                out[-1].up, out[-1].routable, out[-1].breaker):
            out.append(p)
    return out


def first_served(records: Iterable[dict[str, Any]], backend: str,
                 since: float) -> float | None:
    """When the first request that ``backend`` served successfully ended after ``since``."""
    ends = [record_span(r)[1] for r in records
            if r.get("backend") == backend and r.get("status") == 200 and not r.get("error")]
    return min((e for e in ends if e >= since), default=None)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def transitions(polls: Sequence[Poll], records: Sequence[dict[str, Any]],
                starts: Sequence[float], stop: float) -> list[dict[str, Any]]:
    """For each fault, how soon Corral stopped routing to A (and why: its breaker, i.e.
    failed requests, or its health probes); for each recovery, how soon Corral routed
    to A again and when A's first successful answer ended."""
    out = []
    for i, spec in enumerate(PHASES):
        if spec.kind == "baseline" or i >= len(starts):
            continue
        since = starts[i]
        until = starts[i + 1] if i + 1 < len(starts) else stop
        row: dict[str, Any] = {"phase": spec.name, "kind": spec.kind}
        if spec.kind == "fault":
            p = first_out(polls, since, until)
            row["out_after_s"] = _seconds(p.t - since if p else None)
            row["taken_out_by"] = (None if p is None else
                                   "health probes" if not p.up else "breaker")
        else:
            p = first_back(polls, since, until)
            row["back_after_s"] = _seconds(p.t - since if p else None)
            served = first_served(records, A, since)
            row["first_ok_from_a_after_s"] = _seconds(
                served - since if served is not None else None)
        out.append(row)
    return out


def verdict(clients: Sequence[dict[str, Any]], corral: Sequence[dict[str, Any]],
            moves: Sequence[dict[str, Any]], in_flight_at_kill: int | None,
            a_slots: int | None = None) -> dict[str, Any]:
    """Corral's promise, checked: nothing but the streams cut by A's death fails."""
    other = sum(c["failures"] - (c["cut"] if i == KILLED else 0)
                for i, c in enumerate(clients))
    killed = clients[KILLED] if len(clients) > KILLED else None
    cut = killed["cut"] if killed else 0
    one_line = killed["cut_with_one_error_line"] if killed else 0
    corral_cut = (corral[KILLED]["mid_stream_errors"].get(A, 0)
                  if len(corral) > KILLED else 0)
    # The stand-in's in-flight count is sampled just before the kill, and requests
    # keep starting meanwhile; what Corral guarantees is at most A's slots in flight.
    bound = a_slots if a_slots is not None else in_flight_at_kill
    within = bound is None or cut <= bound
    out_ok = all(m.get("out_after_s") is not None for m in moves if m["kind"] == "fault")
    back_ok = all(m.get("back_after_s") is not None for m in moves if m["kind"] == "recovery")
    return {
        "failures_other_than_cut_by_kill": other,
        "cut_by_kill": cut,
        "cut_by_kill_with_one_error_line": one_line,
        "cut_on_a_per_access_log": corral_cut,
        "a_in_flight_at_kill": in_flight_at_kill,
        "a_taken_out_after_each_fault": out_ok,
        "a_back_after_each_recovery": back_ok,
        # The promise itself; whether A was taken out and came back is reported beside it.
        "pass": other == 0 and one_line == cut and within and corral_cut == cut,
    }
