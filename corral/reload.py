"""Hot reload: SIGHUP or ``POST /corral/reload`` (admin key) re-reads the config.

An invalid configuration is refused whole (the running one stays). A valid one is
swapped in at once, between two steps of the event loop:

- in-flight requests and streams continue untouched;
- limiter state of unchanged zones is kept (the store is kept; zones are keyed by
  name, so a rule that keeps its zone keeps its counters);
- added backends join after their first good probe; removed backends drain: they
  get no new requests and leave once their in-flight requests have finished;
- ``listen``, ``state`` and ``shutdown_grace`` need a restart (reported, not applied).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from corral.config import ConfigError, Settings, load_settings, max_loaded_models
from corral.observe.accesslog import AccessLog
from corral.pipeline.admit import Admission
from corral.pipeline.errors import error_response

if TYPE_CHECKING:
    from corral.app import Gateway
    from corral.backends.backend import Backend

log = logging.getLogger("corral.reload")

_RESTART_ONLY = ("listen", "state", "shutdown_grace")


async def apply(gw: Gateway, new: Settings) -> list[str]:
    """Swap ``new`` in; returns notes for the operator."""
    old = gw.settings
    notes = [f"{key} changed: takes effect after a restart" for key in _RESTART_ONLY
             if getattr(new, key) != getattr(old, key)]
    # Settings that only take effect after a restart keep their running values.
    new = new.model_copy(update={k: getattr(old, k) for k in _RESTART_ONLY})

    current = {b.name: b for b in gw.backends}
    kept: list[Backend] = []
    for cfg in new.backends:
        b = current.pop(cfg.name, None)
        if b is not None and b.url == cfg.url:
            b.max_concurrency, b.weight, b.draining = cfg.max_concurrency, cfg.weight, False
            b.breaker.max_fails = new.health.max_fails
            b.breaker.fail_timeout = new.health.fail_timeout
            kept.append(b)
            continue
        if b is not None:
            current[f"{b.name} (old url)"] = b
        gw.settings = new            # new backends take the new health settings
        kept.append(gw.new_backend(cfg))
        notes.append(f"backend {cfg.name} added: joins after a good probe")
    draining = list(current.values())
    for b in draining:
        b.draining = True
        notes.append(f"backend {b.name} removed: draining {b.in_flight} in-flight request(s)")

    gw.configure(new)
    gw.scheduler.set_backends(kept + draining, max_loaded_models(new))
    gw.health.cfg = new.health
    gw.health.set_backends(gw.backends)
    gw.pools.connect_timeout = gw.timeouts.connect or None

    if new.limits != old.limits:
        previous = gw.admission
        gw.admission = Admission(new, previous.store, gw.metrics.limit_decision)
        gw.admission.adopt(previous)
        notes.append("limits replaced; counters of unchanged zones kept")
    if new.access_log != old.access_log:
        previous_log = gw.access_log
        gw.access_log = AccessLog(new.access_log)
        gw.access_log.start()
        await previous_log.close()
    if new.metrics.path != old.metrics.path:
        gw.install_own_routes()

    if draining:
        asyncio.get_running_loop().create_task(_retire(gw, draining))
    gw.health.refresh_soon(0)
    log.warning("configuration reloaded%s", "".join(f"; {n}" for n in notes))
    return notes


async def _retire(gw: Gateway, draining: list[Backend]) -> None:
    """Forget removed backends once their last in-flight request has finished."""
    while draining:
        await asyncio.sleep(0.2)
        for b in [b for b in draining if b.in_flight == 0]:
            draining.remove(b)
            if b in gw.backends:
                gw.scheduler.set_backends([x for x in gw.backends if x is not b])
                gw.health.set_backends(gw.backends)
                gw.pools.drop(b.url)
            log.warning("backend %s drained and removed", b.name)


async def reload_from_file(gw: Gateway) -> tuple[list[str] | None, list[str]]:
    """(notes, []) on success; (None, errors) when the file is missing or invalid."""
    if gw.config_path is None:
        return None, ["started without --config: there is no file to reload"]
    try:
        new = load_settings(gw.config_path)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("reload refused: %s", line)
        return None, exc.errors
    return await apply(gw, new), []


async def reload_handler(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    client = gw.identifier.identify(request)
    if client is None or client.key_name is None:
        return error_response(401, "an admin API key is required",
                              headers={"WWW-Authenticate": 'Bearer realm="corral"'})
    if not client.admin:
        return error_response(403, f"key {client.key_name!r} is not an admin key")
    notes, errors = await reload_from_file(gw)
    if notes is None:
        return error_response(400, "configuration refused, the running one stays: "
                              + "; ".join(errors))
    return web.Response(body=orjson.dumps({"status": "reloaded", "notes": notes}),
                        content_type="application/json")
