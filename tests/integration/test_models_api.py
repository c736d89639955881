"""Model management through Corral, in front of two stand-ins with different models.

Pull goes to every up backend, copy and delete to the backends that hold the model,
show and ``/v1/models/{m}`` to one holder. Health probes are slowed to 30 s, so every
model list Corral knows after an operation comes from the refresh the operation
itself triggers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
import ollama
import pytest

from tests.integration.conftest import Gateway, Sim, backends, get_json
from tests.waiting import eventually

A_MODELS = "llama3.2:latest"
B_MODELS = "mistral:7b"
NEW = "qwen2.5:0.5b"          # on neither stand-in until pulled


@pytest.fixture
def fleet(start_sim: Any, start_corral: Any) -> tuple[Gateway, Sim, Sim]:
    a: Sim = start_sim("--models", A_MODELS, "--instant")
    b: Sim = start_sim("--models", B_MODELS, "--instant")
    gw: Gateway = start_corral({"backends": backends(a, b),
                                "health": {"interval": "30s"}})
    return gw, a, b


def names(url: str) -> list[str]:
    """Model names in one server's own ``/api/tags``."""
    return [m["name"] for m in get_json(url + "/api/tags")["models"]]


# Waits on Corral's model lists end well within the fleet's 30 s probe interval: what
# they see was refreshed by the operation itself, not by the next probe.
REFRESHED_WITHIN = 5.0


async def lists_show(gw: Gateway, what: str, check: Callable[[list[str]], bool]) -> None:
    """Until ``check`` holds of every backend's model list in Corral's status."""
    await eventually(lambda: all(check(bk["models"]) for bk in gw.status()["backends"]),
                     f"Corral's model lists to show {what}", REFRESHED_WITHIN)


async def call(method: str, url: str, data: Any = None) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, json=data) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.read()


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


async def corral_knows(gw: Gateway, model: str) -> bool:
    """Corral routes ``/api/show`` by its own model lists: 200 means it knows a holder."""
    status, _, _ = await call("POST", gw.url + "/api/show", {"model": model})
    return status == 200


async def corral_knows_eventually(gw: Gateway, model: str, expect: bool = True) -> None:
    async def known() -> bool:
        return await corral_knows(gw, model) == expect

    await eventually(known, f"Corral to {'know' if expect else 'forget'} {model}",
                     REFRESHED_WITHIN)


# -- pull -----------------------------------------------------------------------------


async def test_pull_streams_progress_from_every_backend(fleet: Any) -> None:
    gw, a, b = fleet
    status, ctype, raw = await call("POST", gw.url + "/api/pull", {"model": NEW})
    assert status == 200, raw
    assert ctype.startswith("application/x-ndjson"), ctype
    lines = ndjson(raw)
    assert not any("error" in line for line in lines), lines
    # Both backends' progress is relayed; one final success, at the end.
    assert sum(1 for line in lines if line.get("status") == "pulling manifest") == 2, lines
    assert [line for line in lines if line.get("status") == "success"] == [lines[-1]]
    assert lines[-1] == {"status": "success"}
    assert any("completed" in line and "digest" in line for line in lines)

    assert NEW in names(a.url) and NEW in names(b.url)
    fleet_names = names(gw.url)
    assert fleet_names.count(NEW) == 1, fleet_names
    assert sorted(fleet_names) == sorted([A_MODELS, B_MODELS, NEW])
    # Corral refreshed its lists: both backends now count as holders.
    await lists_show(gw, f"{NEW} on every backend", lambda models: NEW in models)
    status, _, raw = await call("POST", gw.url + "/api/generate",
                                {"model": NEW, "prompt": "x", "stream": False})
    assert status == 200, raw


async def test_pull_without_streaming_answers_one_object(fleet: Any) -> None:
    gw, a, b = fleet
    status, ctype, raw = await call("POST", gw.url + "/api/pull",
                                    {"model": NEW, "stream": False})
    assert status == 200, raw
    assert ctype.startswith("application/json"), ctype
    assert json.loads(raw) == {"status": "success"}
    assert NEW in names(a.url) and NEW in names(b.url)


@pytest.mark.parametrize("how", ["refuse", "stopped"])
async def test_pull_names_the_backend_that_failed(fleet: Any, how: str) -> None:
    """b1 fails right after Corral last saw it up: the pull still reaches b0, and the
    stream ends with one error line naming b1 instead of a success."""
    gw, a, b = fleet
    if how == "refuse":
        b.fault("refuse")
    else:
        b.stop()
    status, _, raw = await call("POST", gw.url + "/api/pull", {"model": NEW})
    assert status == 200, raw          # the stream had begun before b1's failure was known
    lines = ndjson(raw)
    assert not any(line.get("status") == "success" for line in lines), lines
    errors = [line for line in lines if "error" in line]
    assert errors == [lines[-1]], lines
    assert set(lines[-1]) == {"error"} and "b1" in lines[-1]["error"], lines[-1]
    assert "b0" not in lines[-1]["error"], lines[-1]
    assert NEW in names(a.url)


async def test_pull_without_streaming_names_the_backend_that_failed(fleet: Any) -> None:
    gw, a, b = fleet
    b.fault("refuse")
    status, ctype, raw = await call("POST", gw.url + "/api/pull",
                                    {"model": NEW, "stream": False})
    assert status >= 500, raw
    assert ctype.startswith("application/json"), ctype
    body = json.loads(raw)
    assert set(body) == {"error"} and "b1" in body["error"], body
    assert NEW in names(a.url)


# -- show, copy, delete -----------------------------------------------------------------


async def test_show_goes_to_a_backend_that_has_the_model(fleet: Any) -> None:
    gw, a, b = fleet
    status, _, raw = await call("POST", gw.url + "/api/show", {"model": "mistral:7b"})
    assert status == 200, raw
    direct = await call("POST", b.url + "/api/show", {"model": "mistral:7b"})
    shown = json.loads(raw)
    assert shown["details"] == json.loads(direct[2])["details"]
    assert "capabilities" in shown and "model_info" in shown
    # Only b1 has it: b0 was never asked.
    assert a.stats()["requests"].get("/api/show", 0) == 0
    assert b.stats()["requests"].get("/api/show", 0) == 2
    status, _, raw = await call("POST", gw.url + "/api/show", {"model": "llama3.2"})
    assert status == 200, raw


async def test_copy_and_delete_go_to_the_holders(fleet: Any) -> None:
    gw, a, b = fleet
    # A model only b0 has: the copy lands on b0 alone.
    status, _, raw = await call("POST", gw.url + "/api/copy",
                                {"source": "llama3.2", "destination": "llama-copy"})
    assert (status, raw) == (200, b"")
    assert "llama-copy:latest" in names(a.url)
    assert "llama-copy:latest" not in names(b.url)
    assert names(gw.url).count("llama-copy:latest") == 1
    await corral_knows_eventually(gw, "llama-copy")
    assert b.stats()["requests"].get("/api/copy", 0) == 0

    # A model on both (after a pull): copy and delete reach both.
    status, _, raw = await call("POST", gw.url + "/api/pull", {"model": NEW, "stream": False})
    assert status == 200, raw
    await lists_show(gw, f"{NEW} on every backend", lambda models: NEW in models)
    status, _, raw = await call("POST", gw.url + "/api/copy",
                                {"source": NEW, "destination": "shared-copy"})
    assert (status, raw) == (200, b"")
    assert "shared-copy:latest" in names(a.url) and "shared-copy:latest" in names(b.url)
    await lists_show(gw, "the copy on every backend",
                     lambda models: "shared-copy:latest" in models)

    status, _, raw = await call("DELETE", gw.url + "/api/delete", {"model": "shared-copy"})
    assert (status, raw) == (200, b"")
    assert "shared-copy:latest" not in names(a.url) + names(b.url)
    assert "shared-copy:latest" not in names(gw.url)
    await lists_show(gw, "the copy gone from every backend",
                     lambda models: "shared-copy:latest" not in models)

    status, _, raw = await call("DELETE", gw.url + "/api/delete", {"model": "llama-copy"})
    assert (status, raw) == (200, b"")
    assert "llama-copy:latest" not in names(a.url)
    await corral_knows_eventually(gw, "llama-copy", expect=False)
    status, _, raw = await call("POST", gw.url + "/api/generate",
                                {"model": "llama-copy", "prompt": "x", "stream": False})
    assert status == 404, raw


@pytest.mark.parametrize(("method", "path", "data"), [
    ("POST", "/api/show", {"model": "nosuch"}),
    ("DELETE", "/api/delete", {"model": "nosuch"}),
    ("POST", "/api/copy", {"source": "nosuch", "destination": "other"}),
])
async def test_unknown_model_is_404_in_ollamas_words(fleet: Any, method: str, path: str,
                                                     data: dict[str, str]) -> None:
    """Corral's answer is what one Ollama would have said (the stand-in, asked directly)."""
    gw, a, _ = fleet
    status, ctype, raw = await call(method, gw.url + path, data)
    d_status, _, d_raw = await call(method, a.url + path, data)
    assert d_status == 404
    assert status == 404, raw
    assert ctype.startswith("application/json"), ctype
    assert json.loads(raw) == json.loads(d_raw)


# -- /v1/models/{id} ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mistral:7b", "llama3.2", "llama3.2:latest"])
async def test_v1_model_known(fleet: Any, model: str) -> None:
    gw, a, b = fleet
    holder = b if model.startswith("mistral") else a
    status, ctype, raw = await call("GET", gw.url + f"/v1/models/{model}")
    assert status == 200, raw
    assert ctype.startswith("application/json"), ctype
    body = json.loads(raw)
    _, _, direct = await call("GET", holder.url + f"/v1/models/{model}")
    assert body == json.loads(direct)
    assert body["object"] == "model"


async def test_v1_model_unknown_is_an_openai_404(fleet: Any) -> None:
    gw, a, _ = fleet
    status, ctype, raw = await call("GET", gw.url + "/v1/models/nosuch")
    assert status == 404, raw
    assert ctype.startswith("application/json"), ctype
    body = json.loads(raw)
    _, _, direct = await call("GET", a.url + "/v1/models/nosuch")
    assert body == json.loads(direct)
    assert "nosuch" in body["error"]["message"]


# -- the official client ----------------------------------------------------------------


async def test_official_ollama_client_manages_models(fleet: Any) -> None:
    gw, a, b = fleet
    client = ollama.AsyncClient(host=gw.url)

    progress = [p async for p in await client.pull(NEW, stream=True)]
    assert progress[-1].status == "success"
    assert sum(1 for p in progress if p.status == "success") == 1
    assert NEW in names(a.url) and NEW in names(b.url)
    done = await client.pull("phi3:mini")
    assert done.status == "success"

    shown = await client.show("mistral:7b")
    assert shown.details is not None and shown.details.family

    copied = await client.copy("mistral:7b", "mistral-copy")
    assert copied.status == "success"
    assert "mistral-copy:latest" in names(b.url)
    assert "mistral-copy:latest" not in names(a.url)
    await corral_knows_eventually(gw, "mistral-copy")
    assert (await client.show("mistral-copy")).details is not None

    deleted = await client.delete("mistral-copy")
    assert deleted.status == "success"
    assert "mistral-copy:latest" not in names(b.url)
    listed = await client.list()
    assert "mistral-copy:latest" not in [m.model for m in listed.models]

    with pytest.raises(ollama.ResponseError) as exc:
        await client.delete("nosuch")
    assert exc.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as exc:
        await client.show("nosuch")
    assert exc.value.status_code == 404 and "not found" in str(exc.value.error)
