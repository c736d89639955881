"""Active probes: each backend's ``/api/tags`` (installed models) and ``/api/ps``
(resident models), concurrently, in the background, never on a request's path.

A backend is taken out after ``fall`` failed probes in a row and put back after
``rise`` good ones. At start a backend is unknown, and its first good probe puts it in
at once: waiting ``rise`` intervals before serving anything would help nobody.

``/api/tags`` decides health. ``/api/ps`` only informs residency: when it fails or
its entries lack names, the backend stays up and residency rests on what Corral saw
itself (one warning per backend, until ``/api/ps`` answers properly again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
import orjson

from corral.backends.backend import Backend, normalize_model
from corral.config import HealthConfig

if TYPE_CHECKING:
    from corral.fleet.state import Fleet

log = logging.getLogger("corral.health")


@dataclass
class ProbeState:
    good: int = 0
    bad: int = 0
    probed: bool = False
    last_error: str | None = None
    last_probe: float = 0.0
    latency: float | None = None
    ps: list[dict[str, object]] = field(default_factory=list)
    tags: list[dict[str, object]] = field(default_factory=list)


class HealthMonitor:
    def __init__(self, backends: Sequence[Backend], session: aiohttp.ClientSession,
                 cfg: HealthConfig, on_change: Callable[[], None],
                 fleet: Fleet | None = None) -> None:
        self.backends = list(backends)
        self.fleet = fleet
        self.session = session
        self.cfg = cfg
        self.on_change = on_change
        self.states: dict[str, ProbeState] = {b.name: ProbeState() for b in self.backends}
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._ps_tasks: dict[str, asyncio.Task[None]] = {}
        self._ps_warned: set[str] = set()

    def set_backends(self, backends: Sequence[Backend]) -> None:
        self.backends = list(backends)
        for b in self.backends:
            self.states.setdefault(b.name, ProbeState())

    async def _get(self, backend: Backend, path: str) -> list[dict[str, object]]:
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout)
        async with self.session.get(backend.url + path, timeout=timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {path} answered {resp.status}")
            data = orjson.loads(await resp.read())
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise RuntimeError(f"GET {path}: no models list in the answer")
        return [m for m in models if isinstance(m, dict)]

    async def probe(self, backend: Backend) -> bool:
        state = self.states.setdefault(backend.name, ProbeState())
        started = time.monotonic()
        tags, ps = await asyncio.gather(self._get(backend, "/api/tags"),
                                        self._get(backend, "/api/ps"),
                                        return_exceptions=True)
        if isinstance(tags, BaseException):
            if not isinstance(tags, _PROBE_ERRORS):
                raise tags
            ok = False
            state.last_error = str(tags) or type(tags).__name__
        else:
            ok = True
            state.last_error = None
            state.tags = tags
            backend.models = frozenset(_names(tags))
            self._residency(backend, state, ps)
            state.latency = time.monotonic() - started
        state.last_probe = time.time()
        self._record(backend, state, ok)
        return ok

    def _residency(self, backend: Backend, state: ProbeState,
                   ps: list[dict[str, object]] | BaseException) -> None:
        if isinstance(ps, BaseException):
            if not isinstance(ps, _PROBE_ERRORS):
                raise ps
            self._ps_problem(backend, f"/api/ps failed: {ps or type(ps).__name__}")
            return
        state.ps = ps
        backend.vram_bytes = sum(int(v) for m in ps
                                 if isinstance(v := m.get("size_vram"), int | float))
        if self.fleet is None:
            backend.loaded = frozenset(_names(ps))
            return
        if self.fleet.observe_ps(backend, ps, time.monotonic()):
            if backend.name in self._ps_warned:
                self._ps_warned.discard(backend.name)
                log.info("backend %s: /api/ps answers properly again", backend.name)
        else:
            self._ps_problem(backend, "/api/ps entries lack a model name")

    def _ps_problem(self, backend: Backend, what: str) -> None:
        if backend.name not in self._ps_warned:
            self._ps_warned.add(backend.name)
            log.warning("backend %s: %s; residency rests on what Corral sees itself",
                        backend.name, what)

    def probe_ps_soon(self, backend: Backend) -> None:
        """Ask one backend's ``/api/ps`` now (after a load: to see what it evicted),
        without waiting for the next interval; one such probe at a time per backend."""
        running = self._ps_tasks.get(backend.name)
        if running is not None and not running.done():
            return
        self._ps_tasks[backend.name] = asyncio.get_running_loop().create_task(
            self._probe_ps(backend))

    async def _probe_ps(self, backend: Backend) -> None:
        state = self.states.setdefault(backend.name, ProbeState())
        try:
            ps: list[dict[str, object]] | BaseException = await self._get(backend, "/api/ps")
        except _PROBE_ERRORS as exc:
            ps = exc
        self._residency(backend, state, ps)
        self.on_change()

    def _record(self, backend: Backend, state: ProbeState, ok: bool) -> None:
        first = not state.probed
        state.probed = True
        if ok:
            state.good, state.bad = state.good + 1, 0
            if not backend.up and (first or state.good >= self.cfg.rise):
                backend.up = True
                log.info("backend %s is up (%d models)", backend.name, len(backend.models))
        else:
            state.good, state.bad = 0, state.bad + 1
            if backend.up and state.bad >= self.cfg.fall:
                backend.up = False
                log.warning("backend %s is down: %s", backend.name, state.last_error)
            elif first:
                log.warning("backend %s not reachable: %s", backend.name, state.last_error)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(b) for b in self.backends))
        self.on_change()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval)
            with contextlib.suppress(Exception):
                await self.probe_all()

    def refresh_soon(self, min_interval: float = 1.0) -> asyncio.Task[None] | None:
        """Probe now (at most once per ``min_interval``): used when a request names a
        model nobody is known to have — it may have been pulled on a backend directly."""
        now = time.monotonic()
        if self._refreshing is not None and not self._refreshing.done():
            return self._refreshing
        if now - self._last_refresh < min_interval:
            return None
        self._last_refresh = now
        self._refreshing = asyncio.get_running_loop().create_task(self.probe_all())
        return self._refreshing

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        for task in (self._task, self._refreshing, *self._ps_tasks.values()):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None


_PROBE_ERRORS = (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError)


def _names(models: list[dict[str, object]]) -> list[str]:
    out = []
    for m in models:
        name = m.get("name") or m.get("model")
        if isinstance(name, str) and name:
            out.append(normalize_model(name))
    return out
