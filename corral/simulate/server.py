"""HTTP front of the stand-in Ollama server: app assembly and lifecycle."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from corral.pipeline.cors import Cors
from corral.simulate import compat, control, manage, native
from corral.simulate.config import SimConfig
from corral.simulate.engine import SimEngine
from corral.simulate.faults import cut
from corral.simulate.keys import ENGINE

__all__ = ["RunningSim", "SimConfig", "build_sim_app", "start_sim"]

# Ollama has no body limit; prompts with images easily pass aiohttp's 1 MiB default.
_MAX_BODY = 256 * 1024 * 1024
# Shutdown should not wait for hung or endless streams: a stand-in just goes away.
_SHUTDOWN_TIMEOUT = 0.25


_OLLAMA_CORS = Cors(("default",))
_ORIGIN = "sim_origin"


def _plain(status: int, text: str) -> web.Response:
    # gin's default 404/405 bodies, content type without charset.
    return web.Response(status=status, body=text.encode(), headers={"Content-Type": "text/plain"})


@web.middleware
async def _gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse fault, gin-style 404/405, and per-route request counts."""
    match = request.match_info
    route = match.route
    resource = route.resource
    canonical = resource.canonical if resource is not None else request.path
    if canonical.startswith("/_sim/"):
        return await handler(request)
    engine = request.app[ENGINE]
    if engine.fault == "refuse":
        cut(request)
        return web.Response()
    origin = request.headers.get("Origin")
    if origin is not None and not Cors.same_origin(origin, request):
        # Ollama's CORS (gin-contrib/cors with OLLAMA_ORIGINS' defaults): what a
        # gateway that forwarded a browser's Origin would meet.
        if not _OLLAMA_CORS.allowed(origin):
            return web.Response(status=403)
        if request.method == "OPTIONS":
            return Cors.preflight(origin)
        request[_ORIGIN] = origin
    exc = match.http_exception
    if exc is not None:
        if exc.status == 405:
            return _plain(405, "405 method not allowed")
        return _plain(404, "404 page not found")
    counts = engine.stats.requests
    counts[canonical] = counts.get(canonical, 0) + 1
    return await handler(request)


async def _mark(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.get(_ORIGIN)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


def build_sim_app(cfg: SimConfig) -> web.Application:
    app = web.Application(middlewares=[_gate], client_max_size=_MAX_BODY)
    engine = SimEngine(cfg)
    app[ENGINE] = engine
    app.on_response_prepare.append(_mark)
    manage.add_routes(app)
    native.add_routes(app)
    compat.add_routes(app)
    control.add_routes(app)

    async def _close(_app: web.Application) -> None:
        await engine.close()

    app.on_cleanup.append(_close)
    return app


@dataclass
class RunningSim:
    port: int
    url: str
    state: SimEngine
    _runner: web.AppRunner

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start_sim(cfg: SimConfig) -> RunningSim:
    """Serve cfg on its host/port (port 0 picks a free one) in the running loop."""
    app = build_sim_app(cfg)
    # handler_cancellation: a client that goes away cancels its handler, which
    # frees the slot at once (Ollama's intended behaviour).
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return RunningSim(port=port, url=f"http://{host}:{port}", state=app[ENGINE], _runner=runner)
