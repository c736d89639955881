"""``/dashboard``: one static page, served from the package, live from ``/corral/status``.

No build step and nothing fetched from elsewhere: the page, its script and its style
sheet are read from ``corral/web/static`` once, then served from memory. Only the
names listed here are served, so no request can reach another file.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

PAGE = "/dashboard"
_ASSETS = {
    PAGE: ("index.html", "text/html"),
    f"{PAGE}/dashboard.js": ("dashboard.js", "text/javascript"),
    f"{PAGE}/dashboard.css": ("dashboard.css", "text/css"),
}
# The page talks only to the gateway it came from: nothing external can load.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return (resources.files("corral.web") / "static" / name).read_bytes()


async def dashboard_handler(gw: object, request: web.BaseRequest) -> web.StreamResponse:
    name, content_type = _ASSETS[request.path]
    return web.Response(body=_read(name), content_type=content_type, charset="utf-8",
                        headers=_HEADERS)


def asset_paths() -> list[str]:
    return list(_ASSETS)
