"""``GET /corral/usage?from=&to=&by=&client=``: the ledger, grouped.

Who may read what: an admin key reads everyone's (``client=`` narrows it); any other
key reads only its own; a request without a key reads everyone's only when no admin
key is configured and it comes from this machine (an operator with ``curl`` on a
box without keys), and is refused otherwise. Figures include what this replica has
not flushed yet (it flushes first); other replicas' last ``usage.flush`` seconds
arrive with their next flush.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol

import orjson
from aiohttp import web

from corral.config import Settings
from corral.pipeline.errors import error_response
from corral.pipeline.identify import Client, Identifier
from corral.usage.ledger import Ledger
from corral.usage.report import QueryError, group, parse_query, totals
from corral.usage.store import UsageStoreError

USAGE_PATH = "/corral/usage"
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class Gateway(Protocol):
    settings: Settings
    identifier: Identifier
    ledger: Ledger | None


def _reader(gw: Gateway, request: web.BaseRequest) -> Client | web.StreamResponse | None:
    """Who is asking: a client with a key, None for a keyless caller allowed to read
    everyone's, or the 401. Asked first, so a caller without a key learns nothing,
    not even whether its query was well formed."""
    client = gw.identifier.identify(request)
    if client is not None and (client.admin or client.key_name is not None):
        return client
    if not any(k.admin for k in gw.settings.keys) and request.remote in _LOOPBACK:
        return None
    return error_response(401, "an API key is needed to read usage (an admin key reads "
                               "everyone's, any other key its own)",
                          headers={"WWW-Authenticate": 'Bearer realm="corral"'})


def _scope(reader: Client | None, asked: str | None) -> str | web.StreamResponse | None:
    """Whose usage this reader may see (None: everyone's), or the 403."""
    if reader is None or reader.admin:
        return asked
    if asked is not None and asked != reader.key_name:
        return error_response(403, f"key {reader.key_name!r} may read only its own "
                                   "usage (an admin key reads everyone's)")
    return reader.key_name


async def usage_handler(gw: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    if gw.ledger is None:
        return error_response(404, "the usage ledger is off (usage.enabled: false)")
    reader = _reader(gw, request)
    if isinstance(reader, web.StreamResponse):
        return reader
    try:
        query = parse_query(request.query, dt.datetime.now(dt.UTC).date())
    except QueryError as exc:
        return error_response(400, str(exc))
    scope = _scope(reader, query.client)
    if isinstance(scope, web.StreamResponse):
        return scope
    try:
        await gw.ledger.flush()
        kept = await gw.ledger.store.query(query.first, query.last, scope)
    except UsageStoreError as exc:
        return error_response(503, f"the usage store cannot be read now: {exc}",
                              headers={"Retry-After": "5"})
    body = {"from": query.first, "to": query.last, "by": list(query.by), "client": scope,
            "rows": group(kept, query.by), "totals": totals(kept)}
    return web.Response(body=orjson.dumps(body), content_type="application/json")
