"""How a job's answer is judged and when it is tried again (pure)."""

from __future__ import annotations

import email.utils

import orjson
import pytest

from corral.jobs.store import Ending, JobRecord, JobStatus, Retry
from corral.jobs.worker import Reply, backoff_s, error_message, judge, retry_after_s

NOW = 1_800_000_000.0


def record(attempts: int = 1, failures: int = 0) -> JobRecord:
    return JobRecord(id="j" * 32, owner="alice", priority=1, endpoint="/api/generate",
                     model="llama3.2", status=JobStatus.RUNNING, created_ms=0,
                     attempts=attempts, failures=failures, callback_url="http://h/cb")


def err(message: str) -> bytes:
    return orjson.dumps({"error": message})


# --- judge ------------------------------------------------------------------------------


def test_a_2xx_json_answer_succeeds_with_the_answer_as_result() -> None:
    body = b'{"response":"hi","done":true}'
    assert judge(Reply(200, body), record(), 3, NOW) == Ending(
        JobStatus.SUCCEEDED, result=body, http_status=200)


def test_a_2xx_answer_that_is_not_json_fails() -> None:
    out = judge(Reply(200, b"data: {}\n\n"), record(), 3, NOW)
    assert isinstance(out, Ending) and out.status is JobStatus.FAILED


@pytest.mark.parametrize("status", [429, 503])
def test_busy_answers_are_retried_after_retry_after_without_counting(status: int) -> None:
    out = judge(Reply(status, err("slow down"), "7"), record(attempts=5, failures=2), 3, NOW)
    assert out == Retry(delay_ms=7000, failed=False, error="slow down", http_status=status)


def test_busy_without_retry_after_backs_off_with_the_attempts() -> None:
    out = judge(Reply(503, err("queue full")), record(attempts=3), 3, NOW)
    assert isinstance(out, Retry) and out.delay_ms == 4000 and not out.failed


@pytest.mark.parametrize("status", [400, 401, 404, 413])
def test_other_4xx_fail_the_job_at_once(status: int) -> None:
    out = judge(Reply(status, err("model 'x' not found")), record(), 3, NOW)
    assert out == Ending(JobStatus.FAILED, error="model 'x' not found", http_status=status)


def test_5xx_is_retried_with_backoff_until_max_attempts() -> None:
    first = judge(Reply(500, err("out of memory")), record(failures=0), 3, NOW)
    assert first == Retry(1000, True, "out of memory", 500)
    second = judge(Reply(502, err("backend b0: refused")), record(failures=1), 3, NOW)
    assert second == Retry(2000, True, "backend b0: refused", 502)
    last = judge(Reply(504, err("timeout")), record(failures=2), 3, NOW)
    assert last == Ending(JobStatus.FAILED, error="timeout", http_status=504)


def test_corral_not_answering_hands_the_job_back_uncounted() -> None:
    out = judge(Reply(0, error="connection refused"), record(failures=2), 3, NOW)
    assert isinstance(out, Retry) and not out.failed and out.delay_ms == 0


def test_a_fatal_reply_fails_whatever_its_status() -> None:
    out = judge(Reply(200, error="too large", fatal=True), record(), 3, NOW)
    assert out == Ending(JobStatus.FAILED, error="too large", http_status=200)


# --- helpers ----------------------------------------------------------------------------


def test_retry_after_as_seconds_or_date() -> None:
    assert retry_after_s("12", NOW) == 12.0
    assert retry_after_s(email.utils.formatdate(NOW + 30, usegmt=True), NOW) == 30.0
    assert retry_after_s(email.utils.formatdate(NOW - 30, usegmt=True), NOW) == 0.0
    assert retry_after_s(None, NOW) is None
    assert retry_after_s("soon", NOW) is None


def test_backoff_doubles_up_to_a_minute() -> None:
    assert [backoff_s(n) for n in (1, 2, 3, 4, 7, 8, 50)] == [1, 2, 4, 8, 60, 60, 60]


def test_error_message_reads_both_error_shapes() -> None:
    assert error_message(err("nope"), 400) == "nope"
    openai = orjson.dumps({"error": {"message": "bad", "type": "invalid_request_error"}})
    assert error_message(openai, 400) == "bad"
    assert error_message(b"<html>gateway</html>", 502) == "HTTP 502: <html>gateway</html>"
    assert error_message(b"", 500) == "HTTP 500"
