"""Test-only control endpoints under /_sim/ (not part of Ollama's API).

They are never refused nor counted, so a test can inspect the server and
switch faults off again whatever mode it is in.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from corral.simulate.config import FAULT_MODES
from corral.simulate.keys import ENGINE
from corral.simulate.wire import ApiError, error_response, json_response, read_body


def _snapshot(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = engine.stats.as_dict()
    body["fault"] = engine.fault
    body["drop_after"] = engine.drop_after
    body["loaded"] = [r.info.name for r in engine.loaded()]
    return json_response(body)


async def stats(request: web.Request) -> web.Response:
    return _snapshot(request)


async def fault(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    try:
        body = await read_body(request, "fault")
    except ApiError as exc:
        return error_response(exc.status, exc.message)
    mode = body.get("mode")
    drop_after = body.get("drop_after")
    if mode not in FAULT_MODES:
        return error_response(400, f"mode must be one of {', '.join(FAULT_MODES)}")
    if drop_after is not None and (
        isinstance(drop_after, bool) or not isinstance(drop_after, int) or drop_after < 0
    ):
        return error_response(400, "drop_after must be a non-negative integer")
    engine.set_fault(str(mode), drop_after)
    return web.Response(
        body=orjson.dumps({"mode": engine.fault, "drop_after": engine.drop_after}),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )


async def reset(request: web.Request) -> web.Response:
    request.app[ENGINE].stats.reset()
    return _snapshot(request)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/_sim/stats", stats)
    app.router.add_post("/_sim/fault", fault)
    app.router.add_post("/_sim/reset", reset)
