"""Prometheus metrics: bounded labels, one record → every request metric, scrape-time
gauges, and isolation between gateways in one process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from corral.backends.backend import Backend
from corral.observe.metrics import (
    ANONYMOUS,
    OTHER,
    Metrics,
    client_label,
    outcome_label,
    route_label,
)
from corral.observe.status import Activity
from corral.scheduler.queues import Job, JobQueue, Priority


@dataclass
class Fleet:
    backends: list[Backend] = field(default_factory=list)
    queue: JobQueue = field(default_factory=JobQueue)


def fleet() -> Fleet:
    a = Backend("gpu0", "http://a", 2, up=True, models=frozenset({"llama3.2:latest"}),
                loaded=frozenset({"llama3.2:latest"}), in_flight=1)
    b = Backend("gpu1", "http://b", 4, up=False,
                models=frozenset({"llama3.2:latest", "mistral:7b"}))
    return Fleet([a, b])


def record(**kw: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "time": 1.0, "client": "10.0.0.7", "client_name": None, "tier": "basic",
        "method": "POST", "path": "/api/chat", "model": "llama3.2", "backend": "gpu0",
        "status": 200, "queue_wait_ms": 12.0, "ttfb_ms": 35.0, "duration_ms": 900.0,
        "bytes": 100, "retries": 0, "tokens_in": 26, "tokens_out": 259,
    }
    rec.update(kw)
    return rec


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_route_label_keeps_known_routes_only() -> None:
    assert route_label("/api/chat") == "/api/chat"
    assert route_label("/v1/chat/completions") == "/v1/chat/completions"
    assert route_label("/api/tags") == "/api/tags"
    assert route_label("/api/chat/../../etc") == OTHER
    assert route_label("/random/123") == OTHER


def test_client_label_never_an_ip() -> None:
    assert client_label("alice") == "alice"
    assert client_label(None) == ANONYMOUS
    assert client_label("") == ANONYMOUS


def test_outcome_label_accepts_both_spellings() -> None:
    assert outcome_label("passed") == "passed"
    assert outcome_label("REJECTED") == "rejected"
    assert outcome_label("REJECTED_DRY_RUN") == "dry_run_rejected"
    assert outcome_label("DELAYED_DRY_RUN") == "dry_run_delayed"
    assert outcome_label("dry_run_delayed") == "dry_run_delayed"
    assert outcome_label("store_error") == "store_error"
    assert outcome_label("whatever") == OTHER


def test_model_label_is_bounded_by_the_fleet() -> None:
    m = Metrics(fleet())
    assert m.model_label("llama3.2") == "llama3.2:latest"
    assert m.model_label("mistral:7b") == "mistral:7b"   # installed on a down backend
    assert m.model_label("made-up-model-123") == OTHER
    assert m.model_label(None) == OTHER


def test_one_record_feeds_every_request_metric() -> None:
    m = Metrics(fleet())
    m.observe_request(record(client_name="alice", tier="premium"), Priority.HIGH)
    assert value(m, "corral_requests_total", route="/api/chat", status="200",
                 tier="premium") == 1
    assert value(m, "corral_request_duration_seconds_count", route="/api/chat") == 1
    assert value(m, "corral_request_duration_seconds_sum", route="/api/chat") == 0.9
    assert value(m, "corral_time_to_first_byte_seconds_count", route="/api/chat",
                 backend="gpu0") == 1
    assert value(m, "corral_time_to_first_byte_seconds_bucket", route="/api/chat",
                 backend="gpu0", le="0.05") == 1
    assert value(m, "corral_time_to_first_byte_seconds_bucket", route="/api/chat",
                 backend="gpu0", le="0.025") == 0
    assert value(m, "corral_queue_wait_seconds_count", priority="high") == 1
    assert value(m, "corral_tokens_total", client="alice", model="llama3.2:latest",
                 direction="in") == 26
    assert value(m, "corral_tokens_total", client="alice", model="llama3.2:latest",
                 direction="out") == 259


def test_anonymous_clients_and_unknown_models_share_one_series() -> None:
    m = Metrics(fleet())
    for ip in ("10.0.0.1", "10.0.0.2"):
        m.observe_request(record(client=ip, model="custom-thing"), Priority.NORMAL)
    assert value(m, "corral_tokens_total", client=ANONYMOUS, model=OTHER, direction="out") == 518
    text = m.exposition(None)[0].decode()
    assert "10.0.0.1" not in text and "custom-thing" not in text


def test_requests_that_never_queued_add_no_wait_and_no_ttfb() -> None:
    m = Metrics(fleet())
    m.observe_request(record(status=400, backend=None, queue_wait_ms=0.0, ttfb_ms=None,
                             tokens_in=None, tokens_out=None, path="/nope"), Priority.NORMAL)
    assert value(m, "corral_requests_total", route=OTHER, status="400", tier="basic") == 1
    assert value(m, "corral_queue_wait_seconds_count", priority="normal") is None
    assert value(m, "corral_time_to_first_byte_seconds_count", route=OTHER,
                 backend="none") is None
    # A queue timeout did wait, although no backend was ever assigned.
    m.observe_request(record(status=503, backend=None, queue_wait_ms=2000.0, ttfb_ms=None),
                      Priority.LOW)
    assert value(m, "corral_queue_wait_seconds_sum", priority="low") == 2.0


def test_decisions_errors_and_retries() -> None:
    m = Metrics(fleet())
    m.limit_decision("generate-per-ip", "PASSED")
    m.limit_decision("generate-per-ip", "rejected")
    m.limit_decision("generate-per-ip", "rejected")
    m.upstream_error("gpu0", "timeout")
    m.retry("gpu0")
    assert value(m, "corral_limit_decisions_total", rule="generate-per-ip",
                 outcome="passed") == 1
    assert value(m, "corral_limit_decisions_total", rule="generate-per-ip",
                 outcome="rejected") == 2
    assert value(m, "corral_upstream_errors_total", backend="gpu0", kind="timeout") == 1
    assert value(m, "corral_retries_total", backend="gpu0") == 1


def test_gauges_are_read_from_the_fleet_at_scrape_time() -> None:
    f = fleet()
    m = Metrics(f)
    assert value(m, "corral_backend_up", backend="gpu0") == 1
    assert value(m, "corral_backend_up", backend="gpu1") == 0
    assert value(m, "corral_backend_routable", backend="gpu1") == 0
    assert value(m, "corral_backend_slots", backend="gpu1") == 4
    assert value(m, "corral_backend_in_flight", backend="gpu0") == 1
    assert value(m, "corral_backend_loaded_models", backend="gpu0") == 1
    assert value(m, "corral_backend_model_loaded", backend="gpu0", model="llama3.2:latest") == 1
    assert value(m, "corral_backend_model_loaded", backend="gpu1", model="mistral:7b") == 0
    assert value(m, "corral_queue_depth", priority="normal") == 0
    f.backends[0].in_flight = 2
    f.queue.push(Job(model="llama3.2:latest", client="x", priority=Priority.LOW))
    assert value(m, "corral_backend_in_flight", backend="gpu0") == 2
    assert value(m, "corral_queue_depth", priority="low") == 1


def test_exposition_is_valid_and_every_name_is_prefixed() -> None:
    m = Metrics(fleet())
    m.observe_request(record(), Priority.NORMAL)
    body, content_type = m.exposition(None)
    assert content_type.startswith("text/plain")
    families = list(text_string_to_metric_families(body.decode()))
    assert families and all(f.name.startswith("corral_") or f.name == "corral"
                            for f in families)
    assert "_created" not in body.decode()
    om_body, om_type = m.exposition("application/openmetrics-text; version=1.0.0")
    assert om_type.startswith("application/openmetrics-text")
    assert om_body.rstrip().endswith(b"# EOF")


def test_gateways_in_one_process_do_not_share_metrics() -> None:
    one, two = Metrics(fleet()), Metrics(fleet())
    one.observe_request(record(), Priority.NORMAL)
    assert value(one, "corral_requests_total", route="/api/chat", status="200",
                 tier="basic") == 1
    assert value(two, "corral_requests_total", route="/api/chat", status="200",
                 tier="basic") is None


def test_records_are_handed_to_the_activity_window() -> None:
    activity = Activity()
    m = Metrics(fleet(), activity)
    m.observe_request(record(), Priority.NORMAL)
    activity.sample(10.0, 1000.0, {"high": 0, "normal": 0, "low": 0}, {"gpu0": 0})
    assert activity.totals["requests"] == 1


def test_scheduler_knowledge_and_preemptions_are_exported() -> None:
    from corral.fleet.state import Fleet as Knowledge

    view = fleet()
    known = Knowledge(view.backends, 10.0)
    known.observe_ps(view.backends[0], [{"name": "llama3.2:latest"}], now=0.0)
    known.on_arrival("llama3.2:latest", 1.0)
    known.on_queue("llama3.2:latest", 3)
    known.on_complete(view.backends[0], "llama3.2:latest", held_s=2.5, load_s=2.0,
                      loaded=True, tokens_out=10, eval_s=0.5)
    view.fleet = known  # type: ignore[attr-defined]
    m = Metrics(view)
    assert value(m, "corral_model_queued", model="llama3.2:latest") == 3
    assert value(m, "corral_model_service_seconds", model="llama3.2:latest") == 0.5
    assert value(m, "corral_backend_model_load_seconds", backend="gpu0",
                 model="llama3.2:latest") == 2.0
    assert value(m, "corral_backend_model_load_seconds", backend="gpu1",
                 model="mistral:7b") == 10.0
    job = Job("llama3.2:latest", tier="batch")
    m.preempted(job, 42.0)
    m.observe_request(record(placement="load"), Priority.NORMAL)
    assert value(m, "corral_preemptions_total", tier="batch") == 1
    assert value(m, "corral_preempted_tokens_total", model="llama3.2:latest") == 42.0
    assert value(m, "corral_model_loads_total", backend="gpu0", model="llama3.2:latest") == 1
