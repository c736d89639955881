"""Which callback URLs are allowed, what is sent, and retry timing (pure)."""

from __future__ import annotations

import orjson
import pytest

from corral.jobs.callbacks import callback_refusal, payload
from corral.jobs.delivery import backoff_ms
from corral.jobs.store import CallbackState, JobRecord, JobStatus

# --- allowed hosts -----------------------------------------------------------------------


@pytest.mark.parametrize(("url", "hosts"), [
    ("http://hooks.internal/done", ("hooks.internal",)),
    ("https://HOOKS.internal:8443/x", ("hooks.internal",)),
    ("http://127.0.0.1:9000/cb", ("127.0.0.1:9000",)),
    ("http://[::1]:9000/cb", ("[::1]:9000",)),
    ("http://[::1]/cb", ("::1",)),
    ("https://hooks.internal/x", ("hooks.internal:443",)),
])
def test_allowed_callbacks(url: str, hosts: tuple[str, ...]) -> None:
    assert callback_refusal(url, hosts) is None


@pytest.mark.parametrize(("url", "hosts", "why"), [
    ("http://x/cb", (), "not enabled"),
    ("http://evil.example/cb", ("hooks.internal",), "not in jobs.callback_hosts"),
    ("http://hooks.internal.evil.example/", ("hooks.internal",), "not in"),
    ("http://127.0.0.1:9001/cb", ("127.0.0.1:9000",), "not in"),
    ("http://hooks.internal/x", ("hooks.internal:443",), "not in"),
    ("ftp://hooks.internal/x", ("hooks.internal",), "http:// or https://"),
    ("hooks.internal/x", ("hooks.internal",), "http:// or https://"),
    ("http://user:pw@hooks.internal/x", ("hooks.internal",), "credentials"),
    ("http://hooks.internal:99999/x", ("hooks.internal",), "invalid callback_url"),
])
def test_refused_callbacks(url: str, hosts: tuple[str, ...], why: str) -> None:
    refusal = callback_refusal(url, hosts)
    assert refusal is not None and why in refusal


def test_callback_payload_is_the_job_document_without_delivery_state() -> None:
    done = JobRecord(id="j" * 32, owner="alice", priority=1, endpoint="/api/generate",
                     model="llama3.2", status=JobStatus.SUCCEEDED, created_ms=0,
                     result=b'{"response":"hi"}', callback=CallbackState("pending"),
                     credentials=(("X-API-Key", "sk-alice"),))
    doc = orjson.loads(payload(done))
    assert doc["id"] == "j" * 32 and doc["status"] == "succeeded"
    assert doc["result"] == {"response": "hi"}
    assert "callback" not in doc and "sk-alice" not in str(doc)


def test_callback_backoff_doubles_up_to_30s() -> None:
    assert [backoff_ms(n) for n in (1, 2, 3, 10)] == [1000, 2000, 4000, 30_000]
