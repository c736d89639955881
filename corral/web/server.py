"""aiohttp's low-level server, with errors of malformed HTTP answered as JSON.

aiohttp answers a request it cannot parse (a header too large, a bad request line)
itself, in text/plain; Ollama clients expect ``{"error": "..."}``. Those are client
mistakes, so they are logged at debug level, not as server errors.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from corral.pipeline.errors import error_response

log = logging.getLogger("corral.http")


class _Handler(RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if isinstance(exc, LineTooLong):
            status, text = 431, "request header fields too large"
        elif status >= 500:
            log.error("error handling a request", exc_info=exc)
            text = "internal error in the gateway"
        else:
            log.debug("bad request: %s", exc)
            text = f"bad request: {getattr(exc, 'message', None) or message or exc}"
        resp = error_response(status, text)
        resp.force_close()
        return resp


class Server(web.Server):
    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return _Handler(self, loop=self._loop, **kwargs)
