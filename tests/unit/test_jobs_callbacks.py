"""Which callback URLs are allowed, what is sent, retry timing (pure); and the sender
on a real receiver: what it does when the host is no longer allowed, and when another
replica has taken its attempt over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiohttp import web

from corral.config import JobsConfig
from corral.jobs.callbacks import CallbackSender, callback_refusal, payload
from corral.jobs.delivery import backoff_ms
from corral.jobs.memory import MemoryJobStore
from corral.jobs.store import (
    Bounds,
    CallbackState,
    Ending,
    JobRecord,
    JobStatus,
    NewJob,
    Outcome,
)
from tests.contract.limit_store_support import FakeClock

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


# --- the sender, on a real receiver ---------------------------------------------------

RECEIVED_WITHIN_S = 20.0


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = asyncio.get_running_loop().time() + RECEIVED_WITHIN_S
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {RECEIVED_WITHIN_S}s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def hook() -> AsyncIterator[tuple[str, list[web.Request], asyncio.Event]]:
    """A receiver that holds every POST open until the event is set."""
    seen: list[web.Request] = []
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        await release.wait()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook", seen, release
    finally:
        release.set()
        await runner.cleanup()


async def _finished(store: MemoryJobStore, url: str) -> JobRecord:
    await store.submit(NewJob(id="c" * 32, owner="alice", priority=1,
                              endpoint="/api/generate", model="llama3.2", body=b"{}",
                              callback_url=url, delivery_id="d" * 32),
                       Bounds(10, 10))
    await store.claim("worker", 60_000)
    done = await store.finish("c" * 32, "worker", Ending(JobStatus.SUCCEEDED, b"{}"),
                              60_000)
    assert done is not None
    return done


async def test_a_host_no_longer_allowed_fails_the_callback_at_once(
        hook: tuple[str, list[web.Request], asyncio.Event]) -> None:
    url, seen, _ = hook
    store = MemoryJobStore()
    config = JobsConfig(callback_hosts=("elsewhere",), poll_interval=0.05)  # reloaded
    sender = CallbackSender(store, lambda: config)
    sender.start()
    try:
        sender.send(await _finished(store, url))

        async def ended() -> bool:
            record = await store.get("c" * 32)
            return record is not None and record.callback is not None \
                and record.callback.final

        await _until("the callback ends", ended)
    finally:
        await sender.stop()
    record = await store.get("c" * 32)
    assert record is not None and record.callback is not None
    assert (record.callback.status, record.callback.attempts) == ("failed", 1)
    assert "not in jobs.callback_hosts" in (record.callback.error or "")
    assert seen == []                   # nothing was sent


async def test_an_attempt_taken_over_by_another_replica_is_abandoned(
        hook: tuple[str, list[web.Request], asyncio.Event]) -> None:
    """This replica was paused past its lease and another took the callback over: at
    its next refresh it stops its own attempt, which records nothing."""
    url, seen, release = hook
    clock = FakeClock()
    store = MemoryJobStore(clock=clock)
    config = JobsConfig(callback_hosts=("127.0.0.1",), lease=0.3, poll_interval=0.05,
                        callback_timeout=60)
    sender = CallbackSender(store, lambda: config)
    sender.start()
    try:
        sender.send(await _finished(store, url))

        async def arrived() -> bool:
            return len(seen) == 1

        await _until("the first attempt reaches the receiver", arrived)
        assert seen[0].headers["X-Corral-Delivery"] == "d" * 32
        assert seen[0].headers["X-Corral-Job"] == "c" * 32
        clock.advance(300)                  # the lease lapses on the store's clock
        other = await store.claim_callback("other", 300, 3)
        assert other is not None and other.callback is not None

        async def dropped() -> bool:
            transport = seen[0].transport
            return transport is None or transport.is_closing()

        await _until("the abandoned attempt's connection is dropped", dropped)
        release.set()
        after = await store.report_callback("c" * 32, "other", 2, Outcome(True), 3)
        assert after is not None and (after.status, after.attempts) == ("delivered", 2)
    finally:
        await sender.stop()
