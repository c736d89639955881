"""Real processes on real sockets: stand-in Ollama servers and Corral gateways.

Each fixture starts a subprocess on a free port, waits until it answers, and stops it
at the end of the test, so the tests exercise exactly what an operator runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.simulate.server import RunningSim


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20,
               need_ok: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            if not need_ok:
                return      # it answers; a status is an answer
            time.sleep(0.05)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout}s:\n{log.read_text()}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post_json(url: str, data: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
        return json.loads(body) if body else None


@dataclass
class Proc:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Sim(Proc):
    def stats(self) -> dict[str, Any]:
        return get_json(self.url + "/_sim/stats")  # type: ignore[no-any-return]

    def reset(self) -> None:
        post_json(self.url + "/_sim/reset", {})

    def fault(self, mode: str, **kw: Any) -> None:
        post_json(self.url + "/_sim/fault", {"mode": mode, **kw})


@dataclass
class Gateway(Proc):
    access_log: Path = Path()
    config_path: Path = Path()

    def rewrite_config(self, config: dict[str, Any]) -> None:
        """Replace the config file (listen and access log kept) for a reload."""
        cfg = {"listen": f"127.0.0.1:{self.port}", "access_log": str(self.access_log),
               **config}
        self.config_path.write_text(yaml.safe_dump(cfg))

    def status(self) -> dict[str, Any]:
        return get_json(self.url + "/corral/status")  # type: ignore[no-any-return]

    def records(self) -> list[dict[str, Any]]:
        # The access log is flushed every 100 ms.
        time.sleep(0.25)
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[Any]:
    started: list[Sim] = []

    def start(*args: str) -> Sim:
        port = free_port()
        log = tmp_path / f"sim-{port}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.simulate", "--port", str(port), *args],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=_env())
        sim = Sim(f"http://127.0.0.1:{port}", port, proc, log)
        started.append(sim)
        _wait_http(sim.url + "/api/version", proc, log)
        return sim

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def start_corral(tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def start(config: dict[str, Any], wait_ready: bool = True,
              extra_listen: tuple[str, ...] = ()) -> Gateway:
        """``extra_listen``: more addresses (``host:port tls``, say) besides the plain
        one the fixture waits on."""
        port = free_port()
        access = tmp_path / f"access-{port}.log"
        listen: str | list[str] = f"127.0.0.1:{port}"
        if extra_listen:
            listen = [listen, *extra_listen]
        cfg = {"listen": listen, "access_log": str(access), **config}
        cfg_path = tmp_path / f"corral-{port}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        log = tmp_path / f"corral-{port}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", "--config", str(cfg_path)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=_env())
        gw = Gateway(f"http://127.0.0.1:{port}", port, proc, log, access_log=access,
                     config_path=cfg_path)
        started.append(gw)
        _wait_http(gw.url + "/healthz", proc, log)
        if wait_ready:
            _wait_http(gw.url + "/readyz", proc, log, need_ok=True)
        return gw

    yield start
    for g in started:
        g.stop()


def backends(*sims: Sim, slots: int = 1) -> list[dict[str, Any]]:
    return [{"url": s.url, "name": f"b{i}", "max_concurrency": slots}
            for i, s in enumerate(sims)]


# -- limits: a real nginx to compare with, a real Redis to share state ------------------


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Any]:
    """``start_nginx(http, server)``: nginx with these zone lines (http block) and
    locations (server block) on a free port. Fails, never skips, without nginx."""
    from tests.integration.nginx_support import Nginx, launch_nginx

    started: list[Nginx] = []

    def start(http: str, server: str) -> Nginx:
        nginx = launch_nginx(tmp_path / f"nginx-{len(started)}", http, server)
        started.append(nginx)
        return nginx

    yield start
    for n in started:
        n.stop()


@dataclass
class RedisServer:
    url: str
    port: int
    proc: subprocess.Popen[bytes]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Any]:
    """``start_redis()``: a fresh redis-server on a free port, for this test only (so a
    test may kill it). Fails, never skips, without the binary."""
    import shutil

    from tests.contract.conftest import _start_redis

    started: list[RedisServer] = []

    def start() -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH: the shared-state limit tests need a "
                        "real Redis server (install the redis-server package); they are "
                        "not skipped", pytrace=False)
        proc, port = _start_redis(binary, tmp_path / f"redis-{len(started)}.log")
        server = RedisServer(f"redis://127.0.0.1:{port}/0", port, proc)
        started.append(server)
        return server

    yield start
    for r in started:
        r.kill()


MakeSim = Callable[..., Awaitable["RunningSim"]]
PostHandler = Callable[[Any], Awaitable[Any]]


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[[dict[str, PostHandler]], Awaitable[int]]]:
    """``await receiver({"/hook": handler})``: an HTTP server taking POSTs on those
    paths (a callback receiver), on a free port, which it returns."""
    from aiohttp import web

    runners: list[web.AppRunner] = []

    async def start(routes: dict[str, PostHandler]) -> int:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_post(path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    """Stand-in servers inside the test's own event loop (for the stand-in's tests)."""
    from corral.simulate.server import SimConfig, start_sim

    sims: list[RunningSim] = []

    async def make(**kw: Any) -> RunningSim:
        sim = await start_sim(SimConfig(port=0, **kw))
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()
