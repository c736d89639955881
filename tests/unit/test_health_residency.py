"""Residency from ``/api/ps``, and what happens when a backend's ``/api/ps`` fails or
lacks fields: the backend stays up, residency rests on what Corral saw itself, and
the operator is told once — never a crash. A real HTTP server on a free port."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from corral.backends.backend import Backend
from corral.backends.health import HealthMonitor
from corral.config import HealthConfig
from corral.fleet.state import Fleet

M1, M2 = "llama3.2:latest", "mistral:latest"


class FakeOllama:
    """``/api/tags`` always answers; ``/api/ps`` answers what the test says."""

    def __init__(self) -> None:
        self.ps: Any = {"models": [{"name": M1, "model": M1, "context_length": 8192}]}
        self.ps_status = 200

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": M1}, {"name": M2}]})

    async def ps_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.ps, status=self.ps_status)


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeOllama, str]]:
    fake = FakeOllama()
    app = web.Application()
    app.router.add_get("/api/tags", fake.tags)
    app.router.add_get("/api/ps", fake.ps_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_ps_failures_keep_the_backend_up_and_own_observations(
        served: tuple[FakeOllama, str], caplog: pytest.LogCaptureFixture) -> None:
    fake, url = served
    b = Backend("gpu0", url, 2)
    fleet = Fleet([b], 10.0)
    changes: list[int] = []
    async with aiohttp.ClientSession() as session:
        health = HealthMonitor([b], session, HealthConfig(), lambda: changes.append(1), fleet)
        assert await health.probe(b)
        assert b.up and fleet.runner(b, M1) is not None
        assert fleet.runner(b, M1).ctx == 8192  # type: ignore[union-attr]

        # Corral itself sees M2 answered there (it was loaded on it directly).
        fleet.on_ready(b, M2, None, now=1.0)
        caplog.set_level(logging.WARNING, logger="corral.health")
        fake.ps_status = 500
        for _ in range(3):
            assert await health.probe(b)              # /api/tags decides health
        assert b.up
        assert {M1, M2} <= set(b.loaded)              # what Corral knew stays
        fake.ps_status, fake.ps = 200, {"models": [{"size": 1}]}     # no names
        assert await health.probe(b)
        assert b.up
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "/api/ps failed" in warnings[0]

        fake.ps = {"models": [{"name": M2}]}          # answers properly again
        assert await health.probe(b)
        assert set(b.loaded) == {M2}
        health.probe_ps_soon(b)                        # the after-a-load probe
        await health.stop()


def test_ps_without_names_is_reported_as_incomplete() -> None:
    b = Backend("gpu0", "http://x:1", 1)
    fleet = Fleet([b], 10.0)
    assert fleet.observe_ps(b, [{"name": M1}], now=0.0)
    assert not fleet.observe_ps(b, [{"name": M1}, {"size_vram": 5}], now=1.0)
    assert fleet.runner(b, M1) is not None


def test_capacity_is_learned_from_ps_unless_configured() -> None:
    b = Backend("gpu0", "http://x:1", 1)
    fleet = Fleet([b], 10.0)
    assert fleet.holding(b).capacity() == 1
    fleet.observe_ps(b, [{"name": M1}, {"name": M2}], now=0.0)
    fleet.observe_ps(b, [{"name": M1}], now=1.0)
    assert fleet.holding(b).capacity() == 2              # the most seen at once
    fleet.set_backends([b], {"gpu0": 4})
    assert fleet.holding(b).capacity() == 4


def test_a_load_evicts_in_corrals_view_at_once_and_answers_make_it_resident() -> None:
    b = Backend("gpu0", "http://x:1", 2, models=frozenset({M1, M2}))
    fleet = Fleet([b], 3.0)
    fleet.observe_ps(b, [{"name": M1}], now=0.0)
    fleet.on_dispatch(b, M2, None, now=10.0, load=True)
    assert fleet.runner(b, M1) is None                   # what Ollama will evict
    r = fleet.runner(b, M2)
    assert r is not None and r.loading and r.ready_at == 13.0
    # /api/ps may not list a model still loading: Corral's own knowledge stays.
    fleet.observe_ps(b, [], now=11.0)
    assert fleet.runner(b, M2) is not None
    assert fleet.on_ready(b, M2, None, now=12.5)          # news: the load finished
    assert not fleet.on_ready(b, M2, None, now=12.6)
    fleet.on_release(b, M2, now=13.0)
    fleet.on_complete(b, M2, held_s=3.0, load_s=2.5, loaded=True, tokens_out=50,
                      eval_s=0.5)
    assert fleet.load_time(b, M2) == 2.5
    assert fleet.service_time(M2) == pytest.approx(0.5)
    assert fleet.model(M2).decode.value == pytest.approx(100.0)


def test_a_load_that_never_finished_is_forgotten_once_overdue() -> None:
    b = Backend("gpu0", "http://x:1", 2, models=frozenset({M1, M2}))
    fleet = Fleet([b], 2.0)
    fleet.observe_ps(b, [{"name": M1}], now=0.0)
    fleet.on_dispatch(b, M2, None, now=10.0, load=True)       # ready at 12.0
    fleet.on_release(b, M2, now=10.5)                         # it failed before an answer
    fleet.observe_ps(b, [], now=13.0)                         # not listed, not yet overdue
    assert fleet.runner(b, M2) is not None
    fleet.observe_ps(b, [], now=14.5)                         # a load time past due
    assert fleet.runner(b, M2) is None and b.loaded == frozenset()


def test_replicas_share_what_they_learn() -> None:
    def fleet() -> tuple[Fleet, Backend]:
        b = Backend("gpu0", "http://x:1", 2, models=frozenset({M1, M2}))
        return Fleet([b], 10.0), b

    a, a0 = fleet()
    for t in range(30):
        a.on_arrival(M1, float(t) / 10)                 # 10 a second here
    a.on_complete(a0, M2, held_s=4.0, load_s=3.0, loaded=True, tokens_out=5, eval_s=0.5)
    for _ in range(4):
        a.on_complete(a0, M1, held_s=0.5, load_s=0.0, loaded=False, tokens_out=5, eval_s=0.4)
    b, b0 = fleet()
    b.on_complete(b0, M1, held_s=1.5, load_s=0.0, loaded=False, tokens_out=5, eval_s=0.4)
    assert b.load_time(b0, M2) == 10.0 and b.demand(M1, 3.0) == 0.0
    b.adopt_remote([a.shareable(3.0)])
    assert b.load_time(b0, M2) == pytest.approx(3.0)          # measured over there
    assert b.demand(M1, 3.0) == pytest.approx(a.demand(M1, 3.0), rel=1e-3)
    # Service time: its own one request and the other's four, weighed by count.
    own, other = b.model(M1).service.value, a.model(M1).service.value
    assert b.service_time(M1) == pytest.approx((own * 1 + other * 4) / 5, rel=1e-3)
    # Malformed snapshots are ignored, never a crash.
    b.adopt_remote([{"models": {M1: "x"}, "loads": {"gpu0": "y"}}])
    assert b.load_time(b0, M2) == 10.0
