"""``corral bench overhead --tls`` and ``--ledger``: the configurations they render,
the TLS client they measure with, and the comparison math. Nothing here is timed."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from corral.bench import harness, load, overhead
from corral.bench.command import bench_command
from corral.bench.load import LatencyResult as Latency
from corral.bench.overhead import LEDGER_OFF, LEDGER_ON
from corral.config import load_settings_text


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> harness.TlsFiles:
    return harness.make_tls(tmp_path_factory.mktemp("tls"))


def _target(port: int, name: str = "standin") -> harness.Target:
    return harness.Target(name, port, proc=None, log=Path("/dev/null"))  # type: ignore[arg-type]


# -- configurations -----------------------------------------------------------------


def test_nginx_config_serves_https_with_the_given_files(
        tmp_path: Path, tls: harness.TlsFiles) -> None:
    plain = harness.nginx_config(tmp_path, 8443, _target(9000), "1")
    assert "listen 127.0.0.1:8443 backlog=4096;" in plain
    assert "ssl" not in plain

    text = harness.nginx_config(tmp_path, 8443, _target(9000), "1", tls=tls)
    assert "listen 127.0.0.1:8443 ssl backlog=4096;" in text
    assert f"ssl_certificate {tls.cert};" in text
    assert f"ssl_certificate_key {tls.key};" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    # Everything else as in the plain config: client and upstream keep-alive.
    assert text.count("keepalive_requests 1000000;") == 2
    assert "keepalive 256;" in text and "server 127.0.0.1:9000;" in text
    assert text.replace(" ssl backlog", " backlog").replace(
        f"        ssl_certificate {tls.cert};\n        ssl_certificate_key {tls.key};\n"
        "        ssl_protocols TLSv1.2 TLSv1.3;\n", "") == plain


def _nginx() -> str:
    """The nginx the benchmark runs; failing (never skipping) when there is none."""
    binary = harness.nginx_binary()
    if binary is None:
        pytest.fail("nginx is not installed: apt-get install nginx. The benchmark's "
                    "nginx configuration is checked by nginx itself; this test is not "
                    "skipped.", pytrace=False)
    return binary


def test_nginx_accepts_the_tls_config(tmp_path: Path, tls: harness.TlsFiles) -> None:
    binary = _nginx()
    (tmp_path / "tmp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(harness.nginx_config(tmp_path, harness.free_port(), _target(9000), "1",
                                         tls=tls))
    out = subprocess.run([binary, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "err.log"),
                          "-c", str(conf)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_corral_config_tls_and_usage(tls: harness.TlsFiles) -> None:
    base = harness.corral_config(8443, "http://127.0.0.1:9000", max_concurrency=64)
    assert "tls" not in base and "usage" not in base       # the default run: unchanged

    config = harness.corral_config(8443, "http://127.0.0.1:9000", max_concurrency=64,
                                   tls=tls, usage={"enabled": True, "path": "/x/u.sqlite3"})
    settings = load_settings_text(yaml.safe_dump(config))
    assert [(a.port, a.tls) for a in settings.listeners] == [(8443, True)]
    assert settings.tls is not None and settings.tls.min_version == "1.2"
    assert settings.tls.cert == str(tls.cert) and settings.tls.key == str(tls.key)
    assert settings.usage.enabled and settings.usage.path == "/x/u.sqlite3"

    off = harness.corral_config(8443, "http://127.0.0.1:9000", max_concurrency=64,
                                usage={"enabled": False})
    settings = load_settings_text(yaml.safe_dump(off))
    assert not settings.usage.enabled
    assert [a.tls for a in settings.listeners] == [False]


# -- the TLS client -------------------------------------------------------------------


async def _https_server(tls: harness.TlsFiles) -> asyncio.Server:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.set_alpn_protocols(["http/1.1"])
    body = b'{"done":true}'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)


async def test_tls_connections_trust_the_ca_and_report_the_handshake(
        tls: harness.TlsFiles) -> None:
    server = await _https_server(tls)
    port = server.sockets[0].getsockname()[1]
    target = harness.Target("https", port, proc=None, log=Path("/dev/null"),  # type: ignore[arg-type]
                            client_tls=tls.client_context())
    assert target.url == f"https://127.0.0.1:{port}"
    request = load.generate_request(target.host, port, "m", 1, stream=False)
    try:
        info = await overhead.tls_negotiated(target)
        assert info is not None
        assert info["version"] in ("TLSv1.2", "TLSv1.3")
        assert info["cipher"] and info["alpn"] == "http/1.1"

        # Keep-alive: one handshake for every request of the leg.
        res = await overhead.sequential(target, request, 20, warmup=2)
        assert (res.requests, res.errors, res.reconnects, res.statuses) == (20, 0, 0, {200: 20})
        fresh = await overhead.new_connections(target, request, 5)
        assert (fresh.errors, fresh.statuses) == (0, {200: 5})

        # A client that does not trust the CA cannot measure anything.
        untrusting = harness.Target("https", port, proc=None,  # type: ignore[arg-type]
                                    log=Path("/dev/null"),
                                    client_tls=ssl.create_default_context())
        bad = await overhead.new_connections(untrusting, request, 1)
        assert bad.errors == 1 and bad.statuses == {}
    finally:
        server.close()
        await server.wait_closed()


async def test_plain_targets_get_plain_connections() -> None:
    target = _target(1)
    assert target.url == "http://127.0.0.1:1"
    conn = target.connection()
    assert not isinstance(conn, harness.TlsConnection)
    assert await overhead.tls_negotiated(target) is None


# -- summaries --------------------------------------------------------------------------


def _lat(p50: float, p95: float | None = None) -> Latency:
    return Latency(requests=100, errors=0, p50_ms=p50, p95_ms=p95 if p95 is not None else 2 * p50,
                   p99_ms=3 * p50, mean_ms=p50, reconnects=0, statuses={200: 100})


def test_latency_stats() -> None:
    res = load.latency_result(100, [i / 1000 for i in range(1, 101)], 1, 0, {200: 99})
    assert (res.p50_ms, res.p95_ms, res.p99_ms) == (50.0, 95.0, 99.0)
    assert res.mean_ms == pytest.approx(50.5)
    empty = load.latency_result(3, [], 3, 0, {})
    assert empty.errors == 3 and empty.p50_ms != empty.p50_ms       # NaN


def test_latency_summary_adds_against_direct() -> None:
    direct = [_lat(0.10), _lat(0.12), _lat(0.11)]
    proxy = [_lat(0.30), _lat(0.35), _lat(0.31)]
    row = overhead.latency_summary(proxy, direct)
    assert row["p50_ms"] == pytest.approx(0.31)
    assert row["added_p50_ms"] == pytest.approx(0.31 - 0.11)
    assert row["added_p95_ms"] == pytest.approx(0.62 - 0.22)
    assert len(row["rounds"]) == 3
    assert overhead.latency_summary(direct, None)["added_p50_ms"] == 0.0


def test_compare_corral_https_against_nginx_https() -> None:
    lat = {"corral-https": {"added_p50_ms": 0.2}, "nginx-https": {"added_p50_ms": 0.05}}
    tput = {"corral-https": {"rps": 4000.0}, "nginx-https": {"rps": 8000.0}}
    fresh = {"corral-https": {"added_p50_ms": 1.5}, "nginx-https": {"added_p50_ms": 0.5}}
    v = overhead.compare(lat, tput, "corral-https", "nginx-https", fresh)
    assert v["added_latency"]["ratio"] == pytest.approx(4.0)
    assert v["added_latency"]["pass"] is False
    assert v["throughput"]["ratio"] == pytest.approx(0.5)
    assert v["throughput"]["pass"] is False
    assert v["new_connection_latency"]["ratio"] == pytest.approx(3.0)
    assert v["new_connection_latency"]["pass"] is None             # information only

    lat["corral-https"]["added_p50_ms"] = 0.1
    tput["corral-https"]["rps"] = 7000.0
    v = overhead.compare(lat, tput, "corral-https", "nginx-https")
    assert v["added_latency"]["pass"] and v["throughput"]["pass"]
    assert "new_connection_latency" not in v
    # nginx adding nothing measurable: no ratio, and Corral must add nothing either.
    lat["nginx-https"]["added_p50_ms"] = -0.01
    v = overhead.compare(lat, tput, "corral-https", "nginx-https")
    assert v["added_latency"]["ratio"] is None and v["added_latency"]["pass"] is False


def test_round_orders() -> None:
    names = ["a", "b", "c"]
    assert [overhead.rotation(names, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    orders = [overhead.ledger_order(r) for r in range(4)]
    assert all(o[0] == "direct" for o in orders)
    assert [o[1:] for o in orders] == [[LEDGER_ON, LEDGER_OFF], [LEDGER_OFF, LEDGER_ON]] * 2


def test_sign_test() -> None:
    assert overhead.sign_test(0, 0) == 1.0
    assert overhead.sign_test(3, 3) == 1.0
    assert overhead.sign_test(6, 0) == pytest.approx(2 / 64)
    assert overhead.sign_test(0, 6) == pytest.approx(2 / 64)
    assert overhead.sign_test(5, 1) == pytest.approx(2 * 7 / 64)
    assert overhead.sign_test(3, 0) == pytest.approx(0.25)


def test_paired_difference_within_and_beyond_the_noise() -> None:
    # On and off alike: differences of both signs, smaller than the spread.
    same = overhead.paired([0.30, 0.34, 0.31, 0.33], [0.31, 0.32, 0.33, 0.30])
    assert same["differences"] == pytest.approx([-0.01, 0.02, -0.02, 0.03])
    assert same["median_difference"] == pytest.approx(0.005)
    assert same["spread_on"] == pytest.approx(0.04) and same["spread_off"] == pytest.approx(0.03)
    assert (same["rounds_on_higher"], same["rounds_off_higher"]) == (2, 2)
    assert same["within_noise"] is True and same["sign_test_p"] == 1.0

    # On always 0.1 ms slower, rounds steady: a real difference.
    slower = overhead.paired([0.41, 0.42, 0.40, 0.41], [0.31, 0.32, 0.30, 0.31])
    assert slower["median_difference"] == pytest.approx(0.10)
    assert slower["within_noise"] is False
    assert slower["rounds_on_higher"] == 4 and slower["sign_test_p"] == pytest.approx(0.125)

    # One round: no spread to judge against.
    assert overhead.paired([0.3], [0.3])["within_noise"] is None


def test_ledger_summary() -> None:
    lat = {LEDGER_ON: [_lat(0.30, 0.40), _lat(0.32, 0.45)],
           LEDGER_OFF: [_lat(0.31, 0.41), _lat(0.30, 0.50)]}
    tput = {name: [load.ThroughputResult(64, 2.0, int(2 * rps), 0, rps, 1.0, 2.0, 64)
                   for rps in rates]
            for name, rates in ((LEDGER_ON, (5000.0, 5200.0)), (LEDGER_OFF, (5100.0, 5000.0)))}
    s = overhead.ledger_summary(lat, tput)
    assert s["p50_ms"]["differences"] == pytest.approx([-0.01, 0.02])
    assert s["p95_ms"]["differences"] == pytest.approx([-0.01, -0.05])
    assert s["rps"]["differences"] == pytest.approx([-100.0, 200.0])
    assert s["rps"]["ratio_on_off"] == pytest.approx(5100 / 5050)
    assert s["verdict"]["median_difference_ms"] == pytest.approx(0.005)
    assert s["verdict"]["noise_ms"] == pytest.approx(0.02)
    assert s["verdict"]["pass"] is True


def test_ledger_rows(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "usage.sqlite3"
    assert overhead._ledger_rows(path) is None
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE other (x)")
    assert overhead._ledger_rows(path) is None          # no usage table yet
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE usage (day, client, model, tier, requests)")
        db.executemany("INSERT INTO usage VALUES ('d', ?, 'm', 't', ?)", [("a", 3), ("b", 4)])
    assert overhead._ledger_rows(path) == 7


# -- the command line ----------------------------------------------------------------------


def test_tls_and_ledger_are_separate_runs() -> None:
    runner = CliRunner()
    out = runner.invoke(bench_command, ["overhead", "--tls", "--ledger"])
    assert out.exit_code == 2 and "--tls and --ledger" in out.output
    out = runner.invoke(bench_command, ["overhead", "--handshakes", "10"])
    assert out.exit_code == 2 and "--handshakes is for --tls" in out.output
