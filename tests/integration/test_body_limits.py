"""What a client's body costs before Corral agrees to serve it: nothing, when a limit
on its address or a missing key refuses it (the answer comes before the body is
read), and never more than ``max_body_size`` (refused with 413 as it arrives).

Raw sockets, so the test controls exactly how much of the body has been sent when
the answer arrives.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.integration.conftest import Gateway, backends

SIM_ARGS = ("--models", "llama3.2:latest,qwen2.5:0.5b", "--instant")
HUGE = 50 * 1024 * 1024            # declared, never sent
MAX_BODY = 64 * 1024


async def open_request(gw: Gateway, head: dict[str, str],
                       path: str = "/api/generate") -> tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    lines = [f"POST {path} HTTP/1.1", "Host: corral", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in head.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader,
                      timeout: float = 30.0) -> tuple[int, dict[str, str], Any]:
    """One answer with a Content-Length body: status, headers, JSON body."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, json.loads(body) if body else None


async def closed(reader: asyncio.StreamReader, timeout: float = 30.0) -> bool:
    async with asyncio.timeout(timeout):
        return await reader.read(1) == b""


def small(model: str = "llama3.2") -> bytes:
    return json.dumps({"model": model, "prompt": "hi", "stream": False}).encode()


async def post(gw: Gateway, body: bytes,
               head: dict[str, str] | None = None) -> tuple[int, str | None]:
    """Status, and the rule named in a refusal."""
    reader, writer = await open_request(gw, {"Content-Length": str(len(body)),
                                             **(head or {})})
    writer.write(body)
    status, _, answer = await read_answer(reader)
    writer.close()
    rule = None
    if status == 429:
        rule = answer["error"].partition("(")[2].partition(")")[0]
    return status, rule


async def test_a_client_its_ip_limit_refuses_is_answered_before_sending_its_body(
        start_sim: Any, start_corral: Any) -> None:
    sim = start_sim(*SIM_ARGS)
    gw: Gateway = start_corral({
        "backends": backends(sim),
        "limits": [{"name": "per-ip", "key": "ip", "rate": "1r/m", "nodelay": True}]})
    assert await post(gw, small()) == (200, None)  # the address's one request a minute
    reader, writer = await open_request(gw, {"Content-Length": str(HUGE)})
    # Not a byte of the 50 MB sent: the refusal must come anyway.
    status, headers, body = await read_answer(reader)
    assert status == 429 and "per-ip" in body["error"], (status, body)
    assert int(headers["retry-after"]) >= 1
    assert await closed(reader)     # the unread body is not taken for a next request
    writer.close()


async def test_a_missing_key_is_refused_before_the_body(start_sim: Any,
                                                        start_corral: Any) -> None:
    sim = start_sim(*SIM_ARGS)
    gw: Gateway = start_corral({
        "backends": backends(sim), "clients": {"require_api_key": True},
        "keys": [{"name": "alice", "key": "sk-alice"}]})
    for head in ({}, {"Authorization": "Bearer sk-wrong"}):
        reader, writer = await open_request(gw, {"Content-Length": str(HUGE), **head})
        status, _, body = await read_answer(reader)
        assert status == 401 and "API key" in body["error"], (status, body)
        writer.close()
    assert await post(gw, small(), {"Authorization": "Bearer sk-alice"}) == (200, None)


async def test_a_rule_for_some_models_still_judges_by_the_model(
        start_sim: Any, start_corral: Any) -> None:
    """Rules naming models wait for the body; the first matching rule of a zone still
    wins, as in nginx: llama3.2 gets the rule that names it, other models the next
    rule of the same zone, decided before their body."""
    sim = start_sim(*SIM_ARGS)
    gw: Gateway = start_corral({
        "backends": backends(sim),
        "limits": [
            {"name": "llama-per-ip", "zone": "per-ip", "key": "ip", "models": ["llama3.2"],
             "rate": "1r/m", "nodelay": True},
            {"name": "others-per-ip", "zone": "per-ip", "key": "ip", "rate": "1r/m",
             "nodelay": True},
        ]})
    assert await post(gw, small("llama3.2")) == (200, None)
    assert await post(gw, small("llama3.2")) == (429, "llama-per-ip")
    assert await post(gw, small("qwen2.5:0.5b")) == (429, "others-per-ip")


async def test_a_declared_body_over_the_cap_is_refused_before_it_is_sent(
        start_sim: Any, start_corral: Any) -> None:
    sim = start_sim(*SIM_ARGS)
    gw: Gateway = start_corral({"backends": backends(sim), "max_body_size": MAX_BODY})
    reader, writer = await open_request(gw, {"Content-Length": str(HUGE)})
    status, _, body = await read_answer(reader)
    assert status == 413 and str(MAX_BODY) in body["error"], (status, body)
    assert await closed(reader)
    writer.close()


@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions"])
async def test_a_streamed_body_is_refused_once_it_passes_the_cap(
        start_sim: Any, start_corral: Any, path: str) -> None:
    """Chunked, so no length is declared: the 413 comes while the body is still being
    sent, after about the cap, not after the whole of it."""
    sim = start_sim(*SIM_ARGS)
    gw: Gateway = start_corral({"backends": backends(sim), "max_body_size": MAX_BODY})
    reader, writer = await open_request(gw, {"Transfer-Encoding": "chunked"}, path)
    opening = b'{"model": "llama3.2", "x": "'
    writer.write(f"{len(opening):x}\r\n".encode() + opening + b"\r\n")
    chunk = b"x" * 8192
    sent = 0
    answer = asyncio.ensure_future(read_answer(reader))
    # Up to ten times the cap, a chunk at a time, until the answer arrives.
    while not answer.done() and sent < 10 * MAX_BODY:
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        try:
            await writer.drain()
        except ConnectionError:
            break                   # closed after the 413: the answer is there
        sent += len(chunk)
        await asyncio.sleep(0.01)   # paced, so the answer can overtake the body
    status, _, body = await answer
    assert status == 413, (status, body)
    text = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert str(MAX_BODY) in text, body
    assert sent < 10 * MAX_BODY, "the whole body was taken before the refusal"
    writer.close()
