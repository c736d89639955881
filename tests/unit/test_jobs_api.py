"""Job submission checks, the status document and the job routes (pure)."""

from __future__ import annotations

import orjson
import pytest

from corral.config import Settings
from corral.jobs.api import (
    ITEM_PREFIX,
    JOBS_PATH,
    cancel_job,
    job_item,
    job_routes,
    list_jobs,
    parse_submission,
    submit_job,
)
from corral.jobs.service import own_url
from corral.jobs.store import CallbackState, JobRecord, JobStatus, document
from corral.pipeline.inference import INFERENCE_PATHS, BadRequest

HOSTS = ("hooks.internal",)


def refused(raw: bytes, hosts: tuple[str, ...] = HOSTS) -> str:
    with pytest.raises(BadRequest) as info:
        parse_submission(raw, hosts)
    assert info.value.status == 400
    return str(info.value)


def test_a_valid_submission_forces_stream_off() -> None:
    s = parse_submission(orjson.dumps({
        "endpoint": "/api/chat", "callback_url": "http://hooks.internal/done",
        "body": {"model": "llama3.2", "messages": [], "stream": True}}), HOSTS)
    assert (s.endpoint, s.model, s.callback_url) == (
        "/api/chat", "llama3.2", "http://hooks.internal/done")
    assert orjson.loads(s.body) == {"model": "llama3.2", "messages": [], "stream": False}


def test_embedding_bodies_are_left_as_given() -> None:
    s = parse_submission(orjson.dumps({
        "endpoint": "/api/embed", "body": {"model": "nomic", "input": ["a"]}}), ())
    assert orjson.loads(s.body) == {"model": "nomic", "input": ["a"]}
    assert s.callback_url is None


# Every inference endpoint, and the request a job runs there: generating ones without a
# stream (a job keeps one answer), embedding ones as given (they have no stream field).
RUN_AS = {
    "/api/generate": {"model": "m", "stream": False},
    "/api/chat": {"model": "m", "stream": False},
    "/api/embed": {"model": "m"},
    "/api/embeddings": {"model": "m"},
    "/v1/chat/completions": {"model": "m", "stream": False},
    "/v1/completions": {"model": "m", "stream": False},
    "/v1/embeddings": {"model": "m"},
    "/v1/responses": {"model": "m", "stream": False},
    "/v1/messages": {"model": "m", "stream": False},
}


@pytest.mark.parametrize("endpoint", sorted(INFERENCE_PATHS))
def test_every_inference_endpoint_is_accepted(endpoint: str) -> None:
    s = parse_submission(orjson.dumps({"endpoint": endpoint, "body": {"model": "m"}}), HOSTS)
    assert (s.endpoint, s.model, s.callback_url) == (endpoint, "m", None)
    assert orjson.loads(s.body) == RUN_AS[endpoint]


@pytest.mark.parametrize(("raw", "why"), [
    (b"", "missing request body"),
    (b"{nope", "invalid JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"endpoint": "/api/tags", "body": {"model": "m"}}', "endpoint must be one of"),
    (b'{"endpoint": "/api/pull", "body": {"model": "m"}}', "endpoint must be one of"),
    (b'{"body": {"model": "m"}}', "endpoint must be one of"),
    (b'{"endpoint": "/api/generate"}', "body must be a JSON object"),
    (b'{"endpoint": "/api/generate", "body": "hi"}', "body must be a JSON object"),
    (b'{"endpoint": "/api/generate", "body": {}}', "model is required"),
    (b'{"endpoint": "/api/generate", "body": {"model": 3}}', "model must be a string"),
    (b'{"endpoint": "/api/generate", "body": {"model": "m"}, "callback": "x"}',
     "unknown field(s) callback"),
    (b'{"endpoint": "/api/generate", "body": {"model": "m"}, "callback_url": 3}',
     "callback_url must be a string"),
])
def test_bad_submissions_are_refused(raw: bytes, why: str) -> None:
    assert why in refused(raw)


def test_callback_urls_are_checked_against_the_allowed_hosts() -> None:
    raw = orjson.dumps({"endpoint": "/api/generate", "body": {"model": "m"},
                        "callback_url": "http://169.254.169.254/latest"})
    assert "not in jobs.callback_hosts" in refused(raw)
    assert "not enabled" in refused(raw, ())


def test_document_shows_no_secret_and_embeds_the_result() -> None:
    record = JobRecord(
        id="a" * 32, owner="alice", priority=2, endpoint="/api/generate", model="llama3.2",
        status=JobStatus.SUCCEEDED, created_ms=1_000, started_ms=1_500, finished_ms=2_250,
        attempts=2, result=b'{"response":"hi","done":true}', body=b'{"secret":1}',
        credentials=(("Authorization", "Bearer sk-alice"),), http_status=200,
        callback=CallbackState("delivered", 1, delivery_id="d" * 32, holder="r1"))
    raw = orjson.dumps(document(record))
    assert b"sk-alice" not in raw and b"secret" not in raw
    doc = orjson.loads(raw)
    assert doc == {
        "id": "a" * 32, "status": "succeeded", "client": "alice",
        "endpoint": "/api/generate", "model": "llama3.2", "priority": "low",
        "created_at": 1.0, "started_at": 1.5, "finished_at": 2.25, "attempts": 2,
        "retry_at": None, "http_status": 200, "error": None, "callback_url": None,
        "callback": {"status": "delivered", "attempts": 1, "error": None,
                     "delivery_id": "d" * 32},
        "result": {"response": "hi", "done": True}}
    assert "result" not in document(record, with_result=False)


def test_job_routes_match_exact_paths() -> None:
    routes = job_routes()
    assert routes[("POST", JOBS_PATH)] is submit_job
    assert routes[("GET", JOBS_PATH)] is list_jobs
    # A job's own path is matched by prefix in the Gateway, not in this table.
    assert ("GET", JOBS_PATH + "/x") not in routes
    assert ITEM_PREFIX == JOBS_PATH + "/"
    assert cancel_job is not job_item         # one entry point, dispatching on the method


def test_own_url_reaches_a_wildcard_listener_on_loopback() -> None:
    def url(listen: object, tls: bool = False) -> str:
        extra = {"tls": {"cert": "/c.pem", "key": "/k.pem"}} if tls else {}
        return own_url(Settings.model_validate({"listen": listen, **extra}))

    assert url("0.0.0.0:8080") == "http://127.0.0.1:8080"
    assert url("[::]:8080") == "http://[::1]:8080"
    assert url("10.0.0.5:9000") == "http://10.0.0.5:9000"
    assert url("[fd00::5]:9000") == "http://[fd00::5]:9000"
    # Over plain HTTP when the process has such a listener, else over its HTTPS one.
    assert url(["0.0.0.0:8443 tls", "127.0.0.1:8080"], tls=True) == "http://127.0.0.1:8080"
    assert url("0.0.0.0:8443", tls=True) == "https://127.0.0.1:8443"
