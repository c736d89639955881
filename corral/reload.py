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

import logging
from typing import Protocol

import orjson
from aiohttp import web

from corral.config import ConfigError, Settings, load_settings
from corral.pipeline.errors import error_response
from corral.pipeline.identify import Identifier

log = logging.getLogger("corral.reload")


class Reloadable(Protocol):
    """What a reload needs: where the file is, who may ask, and the swap itself
    (``Gateway.apply`` in ``app.py``, which owns what is swapped)."""

    config_path: str | None
    identifier: Identifier

    async def apply(self, new: Settings) -> list[str]: ...


async def reload_from_file(gw: Reloadable) -> tuple[list[str] | None, list[str]]:
    """(notes, []) on success; (None, errors) when the file is missing or invalid."""
    if gw.config_path is None:
        return None, ["started without --config: there is no file to reload"]
    try:
        new = load_settings(gw.config_path)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("reload refused: %s", line)
        return None, exc.errors
    try:
        return await gw.apply(new), []
    except ConfigError as exc:          # found while applying: a certificate, say
        for line in exc.errors:
            log.error("reload refused: %s", line)
        return None, exc.errors


async def reload_handler(gw: Reloadable, request: web.BaseRequest) -> web.StreamResponse:
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
