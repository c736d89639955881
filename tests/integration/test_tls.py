"""HTTPS: a certificate authority made in the test, Corral serving HTTPS to clients
that trust it (the official ``ollama`` and ``openai`` clients among them), and plain
HTTP on a second address; certificates re-read on reload; bad handshakes refused."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from cryptography import x509

from corral.bench.certs import Authority, authority, server_cert
from tests.integration.conftest import backends, free_port
from tests.waiting import eventually


class Tls:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = authority(directory)
        self.cert, self.key = server_cert(self.ca, directory)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"

    def client_context(self, *extra: Authority) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        for ca in extra:
            ctx.load_verify_locations(cafile=str(ca.cert))
        return ctx


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls(tmp_path)


def _start(start_sim: Any, start_corral: Any, certs: Tls, *sim_args: str,
           **config: Any) -> tuple[Any, Any]:
    sim = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", *sim_args)
    gw = start_corral({"backends": backends(sim), "tls": {"cert": str(certs.cert),
                                                          "key": str(certs.key)}, **config},
                      extra_listen=(f"127.0.0.1:{certs.port} tls",))
    return sim, gw


async def _served_cert(tls: Tls, ctx: ssl.SSLContext) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", tls.port, ssl=ctx,
                                              server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


async def test_official_clients_stream_over_https(start_sim: Any, start_corral: Any,
                                                  tls: Tls) -> None:
    _start(start_sim, start_corral, tls, "--tps", "200")
    ctx = tls.client_context()
    client = ollama.AsyncClient(host=tls.url, verify=ctx)
    parts = [p async for p in await client.chat(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True,
        options={"num_predict": 12})]
    assert len(parts) == 13 and parts[-1].done and parts[-1].eval_count == 12
    async with httpx.AsyncClient(verify=ctx) as http:
        oai = openai.AsyncOpenAI(base_url=tls.url + "/v1", api_key="none", http_client=http)
        stream = await oai.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True,
            max_tokens=10)
        deltas = [c async for c in stream]
        assert sum(1 for c in deltas if c.choices and c.choices[0].delta.content) == 10
        assert deltas[-1].choices[0].finish_reason == "length" or any(
            c.choices and c.choices[0].finish_reason == "length" for c in deltas)
        models = await oai.models.list()
        assert [m.id for m in models.data] == ["llama3.2:latest"]
    # The certificate names localhost too: clients that connect by name work.
    by_name = ollama.AsyncClient(host=f"https://localhost:{tls.port}", verify=ctx)
    assert (await by_name.list()).models[0].model == "llama3.2:latest"
    # A client that does not trust the CA refuses the certificate.
    with pytest.raises(ConnectionError):
        await ollama.AsyncClient(host=tls.url).list()
    with pytest.raises(ssl.SSLCertVerificationError):
        await _served_cert(tls, ssl.create_default_context())


async def test_keep_alive_and_streaming_as_over_plain_http(start_sim: Any, start_corral: Any,
                                                           tls: Tls) -> None:
    _start(start_sim, start_corral, tls, "--tps", "50")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", tls.port, ssl=tls.client_context(), server_hostname="localhost")
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() in (None, "http/1.1")
    body = json.dumps({"model": "llama3.2", "prompt": "x", "options": {"num_predict": 10}})
    for _ in range(3):                   # three requests on one connection
        writer.write((f"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                      f"{body}").encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
        arrivals = []
        lines = []
        while True:                      # chunked: size line, data, CRLF
            size = int((await reader.readline()).strip(), 16)
            if size == 0:
                await reader.readline()
                break
            lines.append(await reader.readexactly(size))
            arrivals.append(time.monotonic())
            await reader.readline()
        text = b"".join(lines).decode()
        assert text.count('"done":false') == 10 and text.count('"done":true') == 1
        # Token by token: 10 tokens at 50/s arrive over about 0.2 s, not at once.
        assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] > 0.1
    writer.close()


async def test_reload_swaps_the_certificate_without_cutting_a_stream(
        start_sim: Any, start_corral: Any, tls: Tls) -> None:
    _, gw = _start(start_sim, start_corral, tls, "--tps", "20")
    new_dir = tls.dir / "renewed"
    new_dir.mkdir()
    new_ca = authority(new_dir, "Renewed CA")
    new_cert, new_key = server_cert(new_ca, new_dir)
    trust_both = tls.client_context(new_ca)
    old_der = await _served_cert(tls, trust_both)

    async with httpx.AsyncClient(verify=trust_both, timeout=30) as http:
        async with http.stream("POST", tls.url + "/api/generate", json={
                "model": "llama3.2", "prompt": "x", "options": {"num_predict": 40}}) as r:
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if len(lines) == 3:
                    # Renewal: new files at the same paths, then SIGHUP.
                    shutil.copy(new_cert, tls.cert)
                    shutil.copy(new_key, tls.key)
                    gw.proc.send_signal(signal.SIGHUP)
                    await eventually(lambda: "certificate read" in gw.log.read_text(),
                                     "the reload to read the renewed certificate")
                    # A new connection, while the stream goes on, sees the new one.
                    new_der = await _served_cert(tls, trust_both)
                    assert new_der != old_der
                    assert x509.load_der_x509_certificate(new_der).issuer == \
                        new_ca.certificate.subject
    assert len(lines) == 41 and json.loads(lines[-1])["done"] is True
    # The status page and the metrics show the certificate now served.
    served = x509.load_pem_x509_certificates(new_cert.read_bytes())[0]
    assert gw.status()["tls"]["not_after"] == served.not_valid_after_utc.isoformat()
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(gw.url + "/metrics")).text
    line = next(x for x in metrics.splitlines()
                if x.startswith("corral_tls_certificate_expiry_timestamp_seconds "))
    assert float(line.split()[1]) == served.not_valid_after_utc.timestamp()


async def test_a_bad_certificate_on_reload_keeps_the_old_one(start_sim: Any, start_corral: Any,
                                                             tls: Tls) -> None:
    _, gw = _start(start_sim, start_corral, tls, "--instant",
                   keys=[{"name": "ops", "key": "sk-ops", "admin": True}])
    before = await _served_cert(tls, tls.client_context())
    other_cert, other_key = server_cert(tls.ca, tls.dir, stem="other")
    shutil.copy(other_key, tls.key)          # a key that is not the certificate's
    async with httpx.AsyncClient() as http:
        r = await http.post(gw.url + "/corral/reload", headers={"X-API-Key": "sk-ops"})
    assert r.status_code == 400
    assert "tls.key" in r.json()["error"] and "is not the key of" in r.json()["error"]
    assert await _served_cert(tls, tls.client_context()) == before


async def test_plain_http_on_the_https_port_gets_a_clear_refusal(
        start_sim: Any, start_corral: Any, tls: Tls) -> None:
    sim, gw = _start(start_sim, start_corral, tls, "--instant")
    async with httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{tls.port}/api/generate",
                            json={"model": "llama3.2", "prompt": "x"})
    assert r.status_code == 400
    assert "HTTPS" in r.json()["error"] and "https://" in r.json()["error"]
    assert sim.stats()["requests"].get("/api/generate") is None
    assert gw.records() == []                        # nothing reached the pipeline


async def test_silent_and_slow_handshakes_are_cut_at_client_body(
        start_sim: Any, start_corral: Any, tls: Tls) -> None:
    _start(start_sim, start_corral, tls, "--instant", timeouts={"client_body": "1s"})
    silent = await asyncio.open_connection("127.0.0.1", tls.port)
    slow = await asyncio.open_connection("127.0.0.1", tls.port)
    slow[1].write(b"\x16\x03\x01\x02\x00\x01")       # a ClientHello that never finishes
    started = time.monotonic()
    # Meanwhile a real client is served.
    client = ollama.AsyncClient(host=tls.url, verify=tls.client_context())
    assert (await client.generate(model="llama3.2", prompt="x")).done
    for reader, _ in (silent, slow):
        assert await asyncio.wait_for(reader.read(), 10) == b""   # closed by Corral
    assert 0.8 < time.monotonic() - started < 8


async def test_min_version_refuses_older_clients(start_sim: Any, start_corral: Any,
                                                 tls: Tls) -> None:
    _start(start_sim, start_corral, tls, "--instant", tls={
        "cert": str(tls.cert), "key": str(tls.key), "min_version": "1.3"})
    old = tls.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):   # an alert, or a reset
        await _served_cert(tls, old)
    new = tls.client_context()
    assert await _served_cert(tls, new)
