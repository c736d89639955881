"""Request decoding and response helpers shared by the route modules.

Error texts copy what Ollama's Go decoder and handlers print, because
clients and gateways match on them.
"""

from __future__ import annotations

from typing import Any, NoReturn

import orjson
from aiohttp import web

JSON_CT = "application/json; charset=utf-8"
NDJSON_CT = "application/x-ndjson"
SSE_CT = "text/event-stream"
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


class ApiError(Exception):
    """An error answered with a status and a message (shape chosen by the layer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, headers={"Content-Type": JSON_CT})


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


def empty_response(status: int = 200) -> web.Response:
    # gin's c.Status(200): no body, no content type.
    return web.Response(status=status)


def go_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _go_json_error(doc: str, pos: int) -> str:
    if pos >= len(doc.rstrip()):
        return "unexpected EOF"
    ch = doc[pos]
    shown = repr(ch)[1:-1] if ch != "'" else "\\'"
    return f"invalid character '{shown}' looking for beginning of value"


async def read_body(
    request: web.Request, go_type: str, empty_message: str = "missing request body"
) -> dict[str, Any]:
    """Decode a JSON object body as gin's ShouldBindJSON would, or raise a 400."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, empty_message)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, _go_json_error(exc.doc, exc.pos)) from None
    if obj is None:
        return {}  # JSON null decodes into an empty Go struct without error
    if not isinstance(obj, dict):
        raise ApiError(
            400, f"json: cannot unmarshal {go_kind(obj)} into Go value of type {go_type}"
        )
    return obj


def _type_error(value: Any, struct: str, key: str, go_type: str) -> NoReturn:
    raise ApiError(
        400,
        f"json: cannot unmarshal {go_kind(value)} into Go struct field "
        f"{struct}.{key} of type {go_type}",
    )


def get_str(body: dict[str, Any], key: str, struct: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        _type_error(value, struct, key, "string")
    return value


def get_bool(body: dict[str, Any], key: str, struct: str) -> bool | None:
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return value
    _type_error(value, struct, key, "bool")


def get_list(body: dict[str, Any], key: str, struct: str, go_type: str) -> list[Any]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        _type_error(value, struct, key, go_type)
    return value


def get_options(body: dict[str, Any], struct: str) -> dict[str, Any]:
    value = body.get("options")
    if value is None:
        return {}
    if not isinstance(value, dict):
        _type_error(value, struct, "options", "map[string]interface {}")
    return value


def int_option(options: dict[str, Any], key: str) -> int | None:
    """An integer option; Ollama answers a wrongly typed one with a 500, not a 400."""
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(500, f'option "{key}" must be of type integer')
    return int(value)
