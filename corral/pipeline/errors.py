"""Error answers in the shape the client expects.

Native Ollama routes answer ``{"error": "..."}``; the OpenAI-compatible ``/v1`` routes
answer ``{"error": {"message", "type", "param", "code"}}`` as Ollama's own /v1 layer
does, so official OpenAI clients raise their usual exception types.
"""

from __future__ import annotations

import orjson
from aiohttp import web

_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(status: int, message: str, openai: bool) -> bytes:
    if openai:
        kind = _OPENAI_TYPES.get(status, "api_error")
        return orjson.dumps(
            {"error": {"message": message, "type": kind, "param": None, "code": None}}
        )
    return orjson.dumps({"error": message})


def error_response(status: int, message: str, openai: bool = False,
                   headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, body=error_body(status, message, openai),
                        content_type="application/json", headers=headers)
    if status in (408, 413, 431):
        # The rest of the request was never read: the connection cannot carry another.
        resp.force_close()
    return resp


def not_found_model(path: str, model: str) -> str:
    """Ollama's own words for an unknown model, per endpoint (REFERENCE B3)."""
    if path in ("/api/embed", "/api/embeddings"):
        return f'model "{model}" not found, try pulling it first'
    if path == "/api/copy":
        return f"model {orjson.dumps(model).decode()} not found"   # Go's %q
    return f"model '{model}' not found"
