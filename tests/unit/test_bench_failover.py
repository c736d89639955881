"""The failover benchmark's bookkeeping: outcomes, phase bucketing, Corral's side from
its access log, and the status transitions that time detection and recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import yaml

from corral.bench import failover
from corral.bench import phases as pure
from corral.bench.phases import KILLED, PHASES, A, B, Poll, Sample
from corral.config import load_settings_text

STARTS = [100.0 + 4 * i for i in range(len(PHASES))]   # seven 4-second phases
STOP = STARTS[-1] + 4


def test_classify() -> None:
    assert pure.classify(200, b'{"response":"","done":true,"eval_count":10}') == "ok"
    assert pure.classify(200, b'{"response": "", "done": true}') == "ok"
    assert pure.classify(200, b'{"error":"upstream connection lost mid-stream"}') == "cut"
    assert pure.classify(200, b'{"response":"a","done":false}') == "incomplete"
    assert pure.classify(503, b'{"error":"queue full"}') == "status 503"


def test_connection_kind() -> None:
    assert pure.connection_kind(ConnectionRefusedError()) == "refused"
    assert pure.connection_kind(ConnectionResetError()) == "reset"
    assert pure.connection_kind(TimeoutError()) == "timeout"
    assert pure.connection_kind(asyncio.IncompleteReadError(b"", 10)) == \
        "closed mid-response"


def test_phase_of_counts_a_request_where_it_ended() -> None:
    starts = [10.0, 14.0, 18.0]
    assert pure.phase_of(starts, 9.9, 10.5) is None       # started in the warm-up
    assert pure.phase_of(starts, 10.0, 10.5) == 0
    assert pure.phase_of(starts, 13.5, 14.0) == 1          # a phase starts inclusive
    assert pure.phase_of(starts, 13.5, 15.2) == 1
    assert pure.phase_of(starts, 17.0, 30.0) == 2          # the last phase has no end
    assert pure.phase_of([], 11.0, 12.0) is None


def test_stream_tail_follows_lines_across_chunks() -> None:
    tail = failover._StreamTail()
    for chunk in (b'{"response":"a","do', b'ne":false}\n{"resp', b'onse":"b","done":false}\n',
                  b'{"error":"upstream connection lost mid-stream"}\n'):
        tail(chunk)
    assert tail.lines == 3
    assert tail.error_lines == 1
    assert tail.first_line_at is not None
    assert pure.classify(200, tail.final_line()) == "cut"

    unterminated = failover._StreamTail()
    unterminated(b'{"response":"a","done":false}\n{"done":true}')
    assert pure.classify(200, unterminated.final_line()) == "ok"


def _sample(end: float, outcome: str = "ok", latency: float = 0.4,
            error_lines: int = 0) -> Sample:
    return Sample(end - latency, end, outcome, latency, 0.01, error_lines)


def test_summarize_clients() -> None:
    samples = [
        _sample(99.9),                          # warm-up: not counted
        _sample(101.0, latency=0.4), _sample(102.0, latency=0.5),
        _sample(105.0, "status 503"), _sample(105.5, "status 503"),
        _sample(106.0, "status 502"), _sample(107.0, "connection: reset"),
        _sample(STARTS[KILLED] + 0.1, "cut", error_lines=1),
        _sample(STARTS[KILLED] + 0.1, "cut", error_lines=2),
        _sample(STARTS[KILLED] + 0.2, "incomplete"),
        _sample(STOP + 1.0),                    # a straggler: the last phase
    ]
    phases = pure.summarize_clients(samples, STARTS)
    assert len(phases) == len(PHASES)
    assert phases[0]["requests"] == 2 and phases[0]["ok"] == 2
    assert phases[0]["latency_ms"] == {"p50": 400.0, "p99": 500.0, "max": 500.0}
    assert phases[1]["failures"] == 4
    assert phases[1]["non_200"] == {"502": 1, "503": 2}
    assert phases[1]["connection_errors"] == {"reset": 1}
    assert phases[1]["latency_ms"]["p50"] is None
    killed = phases[KILLED]
    assert (killed["cut"], killed["cut_with_one_error_line"], killed["incomplete"]) == (2, 1, 1)
    assert phases[-1]["ok"] == 1


def _rec(start: float, duration_ms: float, backend: str | None, status: int = 200,
         retries: int = 0, error: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"time": start, "duration_ms": duration_ms, "backend": backend,
                           "status": status, "retries": retries, "path": "/api/generate"}
    if error:
        rec["error"] = error
    return rec


def test_summarize_access_log() -> None:
    records = [
        _rec(99.0, 500, A),                     # ended in phase 0, started in the warm-up
        _rec(100.5, 400, A), _rec(100.5, 400, B),
        _rec(104.2, 400, B, retries=1), _rec(104.3, 300, B, retries=1),
        _rec(STARTS[KILLED] - 0.2, 300, A, error="upstream connection lost mid-stream"),
        _rec(STARTS[KILLED] + 0.5, 100, None, status=503, retries=1, error="no backend"),
    ]
    phases = pure.summarize_access_log(records, STARTS)
    assert phases[0]["served_by"] == {A: 1, B: 1}
    assert phases[1] == {"requests": 2, "statuses": {"200": 2}, "served_by": {B: 2},
                         "retried_requests": 2, "retries": 2, "mid_stream_errors": {}}
    assert phases[KILLED]["mid_stream_errors"] == {A: 1}
    assert phases[KILLED]["statuses"] == {"200": 1, "503": 1}


def _poll(t: float, up: bool = True, routable: bool = True,
          breaker: str | None = "closed") -> Poll:
    return Poll(t, up, routable, breaker, 0)


def test_detection_and_recovery_from_polls() -> None:
    polls = [
        _poll(100.0), _poll(104.05),
        _poll(104.10, routable=False, breaker="open"),           # oom: breaker
        _poll(106.1, breaker="open"),                            # a trial let through
        _poll(106.15, routable=False, breaker="open"),           # the trial failed
        _poll(108.05, routable=False, breaker="open"),           # oom cleared, still open
        _poll(108.4, breaker="open"),
        _poll(108.45),                                           # back
        _poll(STARTS[KILLED] + 0.5, up=False, routable=False),   # killed: probes
        _poll(STARTS[KILLED + 1] + 0.2, up=False, routable=False),
        _poll(STARTS[KILLED + 1] + 1.1),                         # restarted: back
    ]
    assert pure.first_out(polls, STARTS[1]) == polls[2]
    assert pure.first_back(polls, STARTS[2]) == polls[7]
    assert pure.changes(polls) == [polls[0], polls[2], polls[3], polls[4], polls[6],
                                       polls[7], polls[8], polls[10]]
    records = [_rec(108.3, 200, A), _rec(STARTS[-1] + 1.0, 250, A)]
    moves = {m["phase"]: m for m in pure.transitions(polls, records, STARTS, STOP)}
    assert [m for m in moves] == [p.name for p in PHASES[1:]]
    assert moves["oom"]["out_after_s"] == 0.1
    assert moves["oom"]["taken_out_by"] == "breaker"
    assert moves["oom cleared"]["back_after_s"] == 0.45
    assert moves["oom cleared"]["first_ok_from_a_after_s"] == 0.5
    assert moves["hang"]["out_after_s"] is None                 # no poll showed it out
    assert moves["killed"]["out_after_s"] == 0.5
    assert moves["killed"]["taken_out_by"] == "health probes"
    assert moves["restarted"]["back_after_s"] == 1.1
    assert moves["restarted"]["first_ok_from_a_after_s"] == 1.25


def _phases(**killed: int) -> list[dict[str, Any]]:
    clean = {"failures": 0, "cut": 0, "cut_with_one_error_line": 0}
    out = [dict(clean) for _ in PHASES]
    out[KILLED].update(killed)
    return out


def _corral(cut_on_a: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"mid_stream_errors": {}} for _ in PHASES]
    out[KILLED] = {"mid_stream_errors": {A: cut_on_a} if cut_on_a else {}}
    return out


MOVES = [{"kind": "fault", "out_after_s": 0.1}, {"kind": "recovery", "back_after_s": 1.0}]


def test_verdict_passes_when_only_the_streams_on_a_are_cut() -> None:
    v = pure.verdict(_phases(failures=3, cut=3, cut_with_one_error_line=3),
                         _corral(3), MOVES, in_flight_at_kill=4)
    assert v["pass"] is True
    assert v["a_taken_out_after_each_fault"] and v["a_back_after_each_recovery"]


def test_verdict_misses() -> None:
    # A failure in another phase.
    clients = _phases()
    clients[1]["failures"] = 1
    assert pure.verdict(clients, _corral(0), MOVES, 4)["pass"] is False
    # A failure at the kill that is not a cut stream.
    assert pure.verdict(_phases(failures=1), _corral(0), MOVES, 4)["pass"] is False
    # More streams cut than A had in flight.
    assert pure.verdict(_phases(failures=5, cut=5, cut_with_one_error_line=5),
                            _corral(5), MOVES, 4)["pass"] is False
    # A cut stream that carried two error lines.
    assert pure.verdict(_phases(failures=1, cut=1, cut_with_one_error_line=0),
                            _corral(1), MOVES, 4)["pass"] is False
    # A not taken out is reported, but is not the promise.
    v = pure.verdict(_phases(), _corral(0), [{"kind": "fault", "out_after_s": None}], 4)
    assert v["pass"] is True and v["a_taken_out_after_each_fault"] is False


def test_corral_config_is_valid(tmp_path: Path) -> None:
    opts = failover.Options()
    config = failover.corral_config(8080, ["http://127.0.0.1:1", "http://127.0.0.1:2"], opts,
                                    tmp_path / "access.log")
    settings = load_settings_text(yaml.safe_dump(config))
    assert [b.name for b in settings.backends] == [A, B]
    assert [b.max_concurrency for b in settings.backends] == [4, 4]
    assert settings.health.interval == 0.5 and settings.health.fail_timeout == 2.0
    assert settings.health.max_fails == 2 and settings.retry.tries == 2
    assert settings.timeouts.first_byte == 1.0
    assert settings.queue.max_depth == 1000 and settings.queue.max_wait == 30.0
