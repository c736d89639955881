"""CORS answered at the gateway, as Ollama answers it (``OLLAMA_ORIGINS``).

A browser page on another origin asks first (a *preflight*: ``OPTIONS`` with ``Origin``
and ``Access-Control-Request-Method``) and then sends its request with ``Origin``.
Corral answers the preflight itself — no key needed (browsers send none on a
preflight), no limit counts it, no backend sees it — and marks every response to an
allowed origin, streams included, with ``Access-Control-Allow-Origin`` exactly once.
A request from an origin that is not allowed is refused with 403 and no CORS
headers, as Ollama refuses it: a web page elsewhere must not be able to drive the
fleet through a user's browser. ``Origin`` is not passed on to the backends: the
gateway decided, and an Ollama with its own, narrower ``OLLAMA_ORIGINS`` would
otherwise refuse what the operator allowed here.

Origins are Ollama's patterns: ``scheme://host[:port]``, where ``*`` stands for any
run of characters (``http://localhost:*``, ``app://*``); ``*`` alone allows every
origin; ``null`` is allowed only when listed; ``default`` stands for Ollama's own list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from aiohttp import web

from corral.pipeline.errors import error_response

# Ollama's defaults (envconfig.AllowedOrigins): localhost, 127.0.0.1 and 0.0.0.0 on
# any port over http and https, and the schemes of desktop and editor apps.
DEFAULT_ORIGINS: tuple[str, ...] = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
# What Ollama allows (the OpenAI SDKs' own headers included), and Corral's key header
# and conversation header.
ALLOW_HEADERS = ", ".join((
    "Authorization", "Content-Type", "X-API-Key", "X-Session-ID", "User-Agent", "Accept",
    "X-Requested-With", "OpenAI-Beta",
    *(f"x-stainless-{h}" for h in (
        "arch", "async", "custom-poll-interval", "helper-method", "lang", "os",
        "package-version", "poll-helper", "retry-count", "runtime", "runtime-version",
        "timeout")),
))
# A page may read when to come back and what its limits are.
EXPOSE_HEADERS = "Retry-After, RateLimit, RateLimit-Policy, Location"
MAX_AGE = "43200"      # twelve hours, as gin-contrib/cors

_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^\s/?#]*$")   # file:// has no host


def expand(origins: Sequence[str]) -> tuple[str, ...]:
    """The configured list with ``default`` replaced by Ollama's list."""
    out: list[str] = []
    for o in origins:
        out.extend(DEFAULT_ORIGINS if o == "default" else (o,))
    return tuple(dict.fromkeys(out))


class CorsRequest(web.BaseRequest):
    """aiohttp calls ``_prepare_hook`` just before a response's head is written — for
    streams too — the hook its Application uses for ``on_response_prepare``; Corral's
    low-level server has no Application, so the mark goes here."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        origin = self._state.get("cors_origin")
        if origin is not None:
            Cors.mark(response, origin)


class Cors:
    def __init__(self, origins: Sequence[str]) -> None:
        patterns = expand(origins)
        self.enabled = bool(patterns)
        self.any = "*" in patterns
        self._exact = frozenset(p for p in patterns if "*" not in p)
        wild = [p for p in patterns if "*" in p and p != "*"]
        self._wild = (re.compile("^(?:" + "|".join(
            ".*".join(re.escape(part) for part in p.split("*")) for p in wild) + ")$")
            if wild else None)

    @staticmethod
    def same_origin(origin: str, request: web.BaseRequest) -> bool:
        """A page Corral itself served (the dashboard): browsers send ``Origin`` on
        its POSTs too, and it is no cross-origin request, whatever the list says
        (gin-contrib/cors, which Ollama uses, lets it through the same way)."""
        host = request.host
        return origin == f"http://{host}" or origin == f"https://{host}"

    def allowed(self, origin: str) -> bool:
        if origin in self._exact:
            return True          # "null" too, when it is listed
        if origin == "null" or not _ORIGIN.match(origin):
            return False         # sandboxed and malformed origins only when listed
        if self.any:
            return True
        return self._wild is not None and self._wild.match(origin) is not None

    @staticmethod
    def preflight(origin: str) -> web.Response:
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": MAX_AGE,
            "Vary": "Origin",
        })

    @staticmethod
    def refuse(origin: str, openai: bool) -> web.Response:
        return error_response(403, f"origin {origin!r} is not allowed (cors.origins)", openai)

    @staticmethod
    def mark(response: web.StreamResponse, origin: str) -> None:
        """Just before a response's head goes out: this origin may read it. A
        backend's own CORS headers are dropped, so each appears once."""
        headers = response.headers
        for name in [n for n in headers if n.lower().startswith("access-control-")]:
            del headers[name]
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        vary = headers.get("Vary")
        headers["Vary"] = "Origin" if not vary else f"{vary}, Origin"
