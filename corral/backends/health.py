"""Active probes: each backend's ``/api/tags`` (installed models) and ``/api/ps``
(resident models), concurrently, in the background, never on a request's path.

A backend is taken out after ``fall`` failed probes in a row and put back after
``rise`` good ones. At start a backend is unknown, and its first good probe puts it in
at once: waiting ``rise`` intervals before serving anything would help nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from corral.backends.backend import Backend, normalize_model
from corral.config import HealthConfig

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
                 cfg: HealthConfig, on_change: Callable[[], None]) -> None:
        self.backends = list(backends)
        self.session = session
        self.cfg = cfg
        self.on_change = on_change
        self.states: dict[str, ProbeState] = {b.name: ProbeState() for b in self.backends}
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = 0.0

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
        try:
            tags, ps = await asyncio.gather(self._get(backend, "/api/tags"),
                                            self._get(backend, "/api/ps"))
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError) as exc:
            ok = False
            state.last_error = str(exc) or type(exc).__name__
        else:
            ok = True
            state.last_error = None
            state.tags, state.ps = tags, ps
            backend.models = frozenset(_names(tags))
            backend.loaded = frozenset(_names(ps))
            backend.vram_bytes = sum(int(v) for m in ps
                                     if isinstance(v := m.get("size_vram"), int | float))
            state.latency = time.monotonic() - started
        state.last_probe = time.time()
        self._record(backend, state, ok)
        return ok

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
        for task in (self._task, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None


def _names(models: list[dict[str, object]]) -> list[str]:
    out = []
    for m in models:
        name = m.get("name") or m.get("model")
        if isinstance(name, str) and name:
            out.append(normalize_model(name))
    return out
