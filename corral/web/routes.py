"""Corral's observability endpoints, merged into the Gateway's own routes.

Like ``/healthz``, they answer before identification: a Prometheus scraper or an
operator's browser carries no API key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from corral.observe.metrics import Scraped, metrics_handler
from corral.web.dashboard import asset_paths, dashboard_handler

Handler = Callable[[Scraped, web.BaseRequest], Awaitable[web.StreamResponse]]


def observe_routes(metrics_path: str) -> dict[tuple[str, str], Handler]:
    routes: dict[tuple[str, str], Handler] = {}
    for method in ("GET", "HEAD"):
        routes[(method, metrics_path)] = metrics_handler
        for path in asset_paths():
            routes[(method, path)] = dashboard_handler
    return routes
