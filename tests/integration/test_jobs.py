"""Batch jobs end to end: real Corral processes, stand-in backends, a real Redis, a
real callback receiver.

A job's request goes through Corral itself, so these tests also check what only the
whole path can show: the job runs as its submitter (key, tier, limits, access log),
is retried when limited or when the backend fails, and survives the replica that
held it being killed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.integration.conftest import Gateway, Sim, backends
from tests.waiting import eventually

MODEL = "llama3.2:latest"
FAST = ("--models", MODEL, "--loaded", MODEL, "--instant", "--parallel", "8")
KEYS = [{"name": "alice", "key": "sk-alice", "tier": "premium"},
        {"name": "bob", "key": "sk-bob", "tier": "basic"},
        {"name": "ops", "key": "sk-ops", "admin": True}]
GENERATE = {"endpoint": "/api/generate",
            "body": {"model": "llama3.2", "prompt": "hello", "options": {"num_predict": 8}}}


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def call(s: aiohttp.ClientSession, method: str, url: str, key: str | None = None,
               body: Any = None) -> tuple[int, Any]:
    async with s.request(method, url, json=body, headers=auth(key)) as r:
        return r.status, await r.json(content_type=None)


async def submit(s: aiohttp.ClientSession, gw: Gateway, job: dict[str, Any],
                 key: str | None = None) -> str:
    status, doc = await call(s, "POST", gw.url + "/corral/jobs", key, job)
    assert status == 202, doc
    assert doc["status"] == "queued"
    return str(doc["id"])


async def wait_for(s: aiohttp.ClientSession, gw: Gateway, job_id: str, key: str | None,
                   done: Any, timeout: float = 15) -> dict[str, Any]:
    """Poll until ``done(doc)``; the last document seen."""
    doc: dict[str, Any] = {}

    async def there() -> bool:
        nonlocal doc
        status, doc = await call(s, "GET", f"{gw.url}/corral/jobs/{job_id}", key)
        assert status == 200, doc
        return bool(done(doc))

    await eventually(there, lambda: f"job {job_id} to get there: {doc}", timeout)
    return doc


def finished(doc: dict[str, Any]) -> bool:
    return doc["status"] in ("succeeded", "failed", "cancelled")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# --- the happy path, identity, visibility ----------------------------------------------


async def test_a_job_runs_as_its_submitter_and_keeps_the_answer(
        start_sim: Any, start_corral: Any, session: aiohttp.ClientSession) -> None:
    sim: Sim = start_sim(*FAST)
    gw: Gateway = start_corral({"backends": backends(sim, slots=8), "keys": KEYS})
    s = session
    job_id = await submit(s, gw, GENERATE, "sk-alice")
    doc = await wait_for(s, gw, job_id, "sk-alice", finished)
    assert doc["status"] == "succeeded", doc
    assert doc["client"] == "alice" and doc["priority"] == "high"
    assert doc["attempts"] == 1 and doc["http_status"] == 200 and doc["error"] is None
    assert doc["result"]["done"] is True and doc["result"]["response"]
    assert doc["started_at"] >= doc["created_at"] and doc["finished_at"] >= doc["started_at"]

    chat = await submit(s, gw, {"endpoint": "/v1/chat/completions", "body": {
        "model": "llama3.2", "stream": True,
        "messages": [{"role": "user", "content": "hi"}]}}, "sk-alice")
    doc = await wait_for(s, gw, chat, "sk-alice", finished)
    # stream was forced off: one JSON answer, not server-sent events
    assert doc["status"] == "succeeded" and doc["result"]["choices"][0]["message"]["content"]

    # The runs went through the normal path, as alice, in her tier.
    runs = [r for r in gw.records() if r["path"] in ("/api/generate", "/v1/chat/completions")]
    assert [(r["client_name"], r["tier"], r["status"]) for r in runs] == [
        ("alice", "premium", 200)] * 2

    # Only alice (and an admin key) can see the job; to anyone else it does not exist.
    for key in ("sk-bob", None, "sk-unknown"):
        assert (await call(s, "GET", f"{gw.url}/corral/jobs/{job_id}", key))[0] == 404
        assert (await call(s, "DELETE", f"{gw.url}/corral/jobs/{job_id}", key))[0] == 404
    assert (await call(s, "GET", f"{gw.url}/corral/jobs/{job_id}", "sk-ops"))[0] == 200
    _, listed = await call(s, "GET", gw.url + "/corral/jobs", "sk-alice")
    assert [j["id"] for j in listed["jobs"]] == [chat, job_id]
    assert "result" not in listed["jobs"][0]
    _, theirs = await call(s, "GET", gw.url + "/corral/jobs?status=succeeded", "sk-bob")
    assert theirs == {"jobs": []}
    # Finished: cancelling is refused, the job is left as it was.
    status, err = await call(s, "DELETE", f"{gw.url}/corral/jobs/{job_id}", "sk-alice")
    assert status == 409 and "already finished" in err["error"]
    # No credential anywhere in what a client can read.
    async with s.get(f"{gw.url}/corral/jobs/{job_id}", headers=auth("sk-alice")) as r:
        assert "sk-alice" not in await r.text()


async def test_bad_submissions_are_refused_in_ollamas_shape(
        start_sim: Any, start_corral: Any, session: aiohttp.ClientSession) -> None:
    sim: Sim = start_sim(*FAST)
    gw: Gateway = start_corral({"backends": backends(sim), "max_body_size": 4096,
                                "jobs": {"callback_hosts": ["127.0.0.1"]}})
    url = gw.url + "/corral/jobs"
    cases: list[tuple[Any, int, str]] = [
        ({"endpoint": "/api/pull", "body": {"model": "llama3.2"}}, 400, "endpoint must be"),
        ({"endpoint": "/api/generate", "body": {"prompt": "x"}}, 400, "model is required"),
        ({"endpoint": "/api/generate", "body": [1]}, 400, "body must be a JSON object"),
        ({**GENERATE, "callback_url": "http://example.com/hook"}, 400,
         "not in jobs.callback_hosts"),
        ({"endpoint": "/api/generate", "body": {"model": "nope"}}, 404,
         "model 'nope' not found"),
        ({"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "x" * 5000}},
         413, "too large"),
    ]
    for body, status, why in cases:
        got, doc = await call(session, "POST", url, None, body)
        assert (got, why in doc["error"]) == (status, True), (body, doc)
    async with session.post(url, data=b"{oops") as r:
        assert r.status == 400 and "invalid JSON" in (await r.json())["error"]


# --- callbacks ------------------------------------------------------------------------


async def test_callbacks_are_delivered_and_their_outcome_recorded(
        start_sim: Any, start_corral: Any, session: aiohttp.ClientSession,
        receiver: Any) -> None:
    received: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append({"body": await request.json(), "job": request.headers["X-Corral-Job"],
                         "delivery": request.headers["X-Corral-Delivery"]})
        arrived.set()
        return web.Response(status=204)

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    port = await receiver({"/hook": hook, "/broken": broken})
    sim: Sim = start_sim(*FAST)
    gw: Gateway = start_corral({"backends": backends(sim), "keys": KEYS, "jobs": {
        "callback_hosts": [f"127.0.0.1:{port}"], "callback_tries": 2}})
    s = session
    job_id = await submit(s, gw, {**GENERATE,
                                  "callback_url": f"http://127.0.0.1:{port}/hook"},
                          "sk-bob")
    await asyncio.wait_for(arrived.wait(), 15)
    [got] = received
    assert got["job"] == job_id
    assert got["body"]["id"] == job_id and got["body"]["status"] == "succeeded"
    assert got["body"]["result"]["done"] is True
    doc = await wait_for(s, gw, job_id, "sk-bob",
                         lambda d: (d["callback"] or {}).get("status") == "delivered")
    assert doc["callback"] == {"status": "delivered", "attempts": 1, "error": None,
                               "delivery_id": got["delivery"]}

    failing = await submit(s, gw, {**GENERATE,
                                   "callback_url": f"http://127.0.0.1:{port}/broken"})
    doc = await wait_for(s, gw, failing, None,
                         lambda d: (d["callback"] or {}).get("status") == "failed")
    assert doc["status"] == "succeeded"         # the job did; only its callback failed
    assert doc["callback"]["status"] == "failed" and doc["callback"]["attempts"] == 2
    assert doc["callback"]["error"] == "the receiver answered 500"


# --- retries --------------------------------------------------------------------------


async def test_a_limited_job_waits_for_its_turn(
        start_sim: Any, start_corral: Any, session: aiohttp.ClientSession) -> None:
    """A 429 from the submitter's own limits puts the job back until Retry-After."""
    sim: Sim = start_sim(*FAST)
    gw: Gateway = start_corral({"backends": backends(sim), "limits": [
        {"name": "gen", "paths": ["/api/generate"], "key": "ip", "rate": "60r/m",
         "nodelay": True}]})
    s = session
    async with s.post(gw.url + "/api/generate", json={"model": "llama3.2", "prompt": "x",
                                                      "stream": False}) as r:
        assert r.status == 200          # the only request allowed this second
    job_id = await submit(s, gw, GENERATE)
    doc = await wait_for(s, gw, job_id, None, lambda d: d["http_status"] == 429)
    assert doc["status"] == "queued" and doc["retry_at"] is not None
    doc = await wait_for(s, gw, job_id, None, finished)
    assert doc["status"] == "succeeded" and doc["attempts"] == 2 and doc["error"] is None
    statuses = [r["status"] for r in gw.records() if r["path"] == "/api/generate"]
    assert statuses == [200, 429, 200]


async def test_a_busy_gateway_makes_jobs_wait_not_fail(
        start_sim: Any, start_corral: Any, session: aiohttp.ClientSession) -> None:
    """503 (Corral's queue full) is retried after Retry-After, never counted as a try."""
    sim: Sim = start_sim("--models", MODEL, "--loaded", MODEL, "--tps", "40")
    gw: Gateway = start_corral({"backends": backends(sim, slots=1), "queue": {
        "max_depth": 0, "max_wait": "4s"}, "jobs": {"max_attempts": 1}})
    s = session
    slow = asyncio.create_task(call(s, "POST", gw.url + "/api/generate", None, {
        "model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 60}}))
    await eventually(lambda: sim.stats()["in_flight"], "the stand-in to run a request")
    job_id = await submit(s, gw, GENERATE)
    doc = await wait_for(s, gw, job_id, None, lambda d: d["http_status"] == 503)
    assert doc["status"] == "queued" and "queue is full" in doc["error"]
    assert (await slow)[0] == 200
    doc = await wait_for(s, gw, job_id, None, finished)
    assert doc["status"] == "succeeded" and doc["attempts"] >= 2


async def test_backend_failures_are_retried_up_to_max_attempts(
        start_sim: Any, start_corral: Any, session: aiohttp.ClientSession) -> None:
    sim: Sim = start_sim(*FAST)
    gw: Gateway = start_corral({"backends": backends(sim), "retry": {"tries": 1},
                                "jobs": {"max_attempts": 3}})
    s = session
    sim.fault("oom")
    doomed = await submit(s, gw, GENERATE)
    doc = await wait_for(s, gw, doomed, None, finished)
    # Three tries, one and two seconds apart, then it gives up with Ollama's words.
    assert doc["status"] == "failed" and doc["attempts"] == 3 and doc["http_status"] == 500
    assert "more system memory" in doc["error"]

    saved = await submit(s, gw, GENERATE)
    await wait_for(s, gw, saved, None, lambda d: d["attempts"] == 1 and d["status"] == "queued")
    sim.fault("none")                     # the backend recovers before the next try
    doc = await wait_for(s, gw, saved, None, finished)
    assert doc["status"] == "succeeded" and doc["attempts"] == 2 and doc["error"] is None


# --- cancel ---------------------------------------------------------------------------


async def test_delete_cancels_queued_and_running_jobs(
        start_sim: Any, start_corral: Any, session: aiohttp.ClientSession) -> None:
    sim: Sim = start_sim("--models", MODEL, "--loaded", MODEL, "--tps", "20")
    gw: Gateway = start_corral({"backends": backends(sim), "keys": KEYS,
                                "jobs": {"workers": 1}})
    s = session
    long = {"endpoint": "/api/generate",
            "body": {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 2000}}}
    running = await submit(s, gw, long, "sk-alice")
    await wait_for(s, gw, running, "sk-alice", lambda d: d["status"] == "running")
    queued = await submit(s, gw, long, "sk-alice")    # the one worker is busy
    status, doc = await call(s, "DELETE", f"{gw.url}/corral/jobs/{queued}", "sk-alice")
    assert status == 200 and doc["status"] == "cancelled" and doc["attempts"] == 0

    await eventually(lambda: sim.stats()["in_flight"], "the stand-in to run a request")
    status, doc = await call(s, "DELETE", f"{gw.url}/corral/jobs/{running}", "sk-alice")
    assert status == 200 and doc["status"] == "cancelled"
    # Its request is aborted at once: the backend stops generating.
    await eventually(lambda: sim.stats()["in_flight"] == 0,
                     "the backend to stop generating for the cancelled job")
    # And once the worker has let go of it, the job is still cancelled, with no result.
    await eventually(lambda: gw.status()["jobs"]["busy_workers"] == 0,
                     "the worker to let go of the cancelled job")
    doc = (await call(s, "GET", f"{gw.url}/corral/jobs/{running}", "sk-alice"))[1]
    assert doc["status"] == "cancelled" and doc["result"] is None
    status, _ = await call(s, "GET", f"{gw.url}/corral/jobs/{queued}", "sk-alice")
    assert status == 200
    # /corral/status counts the jobs (as of the last poll of the store).
    idle = {"workers": 1, "busy_workers": 0, "queued": 0, "running": 0}
    await eventually(lambda: gw.status()["jobs"] == idle,
                     lambda: f"/corral/status to count no job: {gw.status()['jobs']}")


# --- Redis: a replica dies holding a job ---------------------------------------------


@pytest.mark.redis
async def test_a_job_outlives_the_replica_that_was_running_it(
        start_sim: Any, start_corral: Any, start_redis: Any,
        session: aiohttp.ClientSession) -> None:
    redis = start_redis()
    sim: Sim = start_sim("--models", MODEL, "--loaded", MODEL, "--tps", "50")
    config = {"backends": backends(sim), "state": redis.url, "keys": KEYS,
              "jobs": {"lease": "1s", "workers": 1}}
    first: Gateway = start_corral(config)
    s = session
    job = {"endpoint": "/api/generate",
           "body": {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 100}}}
    job_id = await submit(s, first, job, "sk-alice")
    await wait_for(s, first, job_id, "sk-alice", lambda d: d["status"] == "running")
    first.proc.kill()                       # SIGKILL: no chance to hand the job back
    first.proc.wait()

    second: Gateway = start_corral(config)
    doc = await wait_for(s, second, job_id, "sk-alice", finished, timeout=20)
    assert doc["status"] == "succeeded", doc
    assert doc["attempts"] == 2 and doc["client"] == "alice"
    assert doc["result"]["eval_count"] == 100


@pytest.mark.redis
async def test_a_stopping_replica_hands_its_job_back_at_once(
        start_sim: Any, start_corral: Any, start_redis: Any,
        session: aiohttp.ClientSession) -> None:
    """SIGTERM: once shutdown_grace is over the running job goes back to the queue
    uncounted, without waiting for its (long) lease to lapse."""
    redis = start_redis()
    sim: Sim = start_sim("--models", MODEL, "--loaded", MODEL, "--tps", "50")
    config = {"backends": backends(sim), "state": redis.url, "shutdown_grace": "200ms",
              "jobs": {"lease": "60s", "workers": 1}}
    first: Gateway = start_corral(config)
    second: Gateway = start_corral({**config, "jobs": {"lease": "60s", "workers": 0}})
    s = session
    job = {"endpoint": "/api/generate",
           "body": {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 100}}}
    job_id = await submit(s, second, job)           # accepted by one, run by the other
    await wait_for(s, second, job_id, None, lambda d: d["status"] == "running")
    first.stop()                                    # SIGTERM, and wait for the exit
    assert first.proc.returncode == 0
    doc = await wait_for(s, second, job_id, None, lambda d: d["status"] == "queued",
                         timeout=5)
    # Handed back by the worker itself (shutting down), not by a lapsed lease.
    assert doc["attempts"] == 1 and "lease" not in doc["error"]
    third: Gateway = start_corral(config)
    doc = await wait_for(s, third, job_id, None, finished, timeout=15)
    assert doc["status"] == "succeeded" and doc["attempts"] == 2


@pytest.mark.redis
async def test_a_callback_outlives_the_replica_that_was_delivering_it(
        start_sim: Any, start_corral: Any, start_redis: Any, receiver: Any,
        session: aiohttp.ClientSession) -> None:
    """The replica that finished the job is killed while its first attempt hangs at
    the receiver; the other replica makes the next attempt, with the same ids."""
    attempts: list[tuple[str, str, dict[str, Any]]] = []
    first_arrived, release = asyncio.Event(), asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        attempts.append((request.headers["X-Corral-Job"],
                         request.headers["X-Corral-Delivery"], await request.json()))
        if len(attempts) == 1:
            first_arrived.set()
            await release.wait()        # hangs until its sender is killed
        return web.Response(status=204)

    port = await receiver({"/hook": hook})
    redis = start_redis()
    sim: Sim = start_sim(*FAST)
    jobs = {"lease": "1s", "poll_interval": "200ms", "callback_timeout": "60s",
            "callback_tries": 3, "callback_hosts": [f"127.0.0.1:{port}"]}
    config = {"backends": backends(sim), "state": redis.url, "keys": KEYS, "jobs": jobs}
    first: Gateway = start_corral(config)
    s = session
    job_id = await submit(s, first, {**GENERATE,
                                     "callback_url": f"http://127.0.0.1:{port}/hook"},
                          "sk-alice")
    try:
        await asyncio.wait_for(first_arrived.wait(), 20)
        # Only now the second replica: the first attempt was surely the first's.
        second: Gateway = start_corral({**config, "jobs": {**jobs, "workers": 0}})
        doc = await wait_for(s, second, job_id, "sk-alice", finished)
        assert doc["status"] == "succeeded" and doc["attempts"] == 1
        assert doc["callback"]["status"] == "pending" and doc["callback"]["attempts"] == 1
        first.proc.kill()                   # SIGKILL, mid-attempt: no report, no handback
        first.proc.wait()
        doc = await wait_for(
            s, second, job_id, "sk-alice",
            lambda d: d["callback"]["status"] != "pending", timeout=20)
    finally:
        release.set()
    assert doc["callback"]["status"] == "delivered", doc
    assert doc["callback"]["attempts"] == 2
    delivery_id = doc["callback"]["delivery_id"]
    # Twice the same callback, as at-least-once allows: the same job, the same delivery
    # id on both (so the receiver can drop the repeat), the same document.
    assert [(job, delivery) for job, delivery, _ in attempts] == [(job_id, delivery_id)] * 2
    assert attempts[0][2] == attempts[1][2]
    assert attempts[1][2]["status"] == "succeeded" and attempts[1][2]["result"]["done"]
