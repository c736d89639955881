"""A real nginx for differential tests, and a clock-driven request schedule.

nginx runs in the foreground as one process (``master_process off``), entirely
inside a temporary prefix: its configuration, logs, pid and temp directories.
Every test writes its own ``limit_req``/``limit_conn`` lines; this module adds the
boilerplate and proxies to a stand-in Ollama.

The schedule (:func:`fire`) sends each request at a fixed offset from a common
start, so nginx and Corral can be driven with the same requests at the same times,
concurrently, and their answers compared one by one.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

DEBIAN_NGINX = "/usr/sbin/nginx"

# What each request carries unless a shot says otherwise.
GENERATE = {"model": "llama3.2", "prompt": "x", "stream": False}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}], "stream": False}


def nginx_binary() -> str:
    """The nginx to test against; failing (never skipping) when there is none."""
    for candidate in (os.environ.get("NGINX_BINARY"), DEBIAN_NGINX, shutil.which("nginx")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "nginx is not installed: the differential limit tests compare Corral with a real "
        f"nginx and need its binary ({DEBIAN_NGINX}; apt-get install nginx, or set "
        "NGINX_BINARY). They are not skipped.",
        pytrace=False,
    )


def proxy_to(url: str) -> str:
    """Directives that proxy a location to ``url``, streaming as it arrives."""
    return (
        f"proxy_pass {url};\n"
        "proxy_http_version 1.1;\n"
        'proxy_set_header Connection "";\n'
        "proxy_buffering off;\n"
        "proxy_read_timeout 60s;\n"
    )


def render_conf(prefix: Path, port: int, http: str, server: str) -> str:
    """A complete nginx.conf: ``http`` goes in the http block (zones), ``server`` in the
    server block (locations)."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/temp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log info;
pid {prefix}/nginx.pid;
lock_file {prefix}/nginx.lock;

events {{
    worker_connections 1024;
}}

http {{
    log_format limits '$request_method $uri $status req=$limit_req_status '
                      'conn=$limit_conn_status team=$http_x_team seq=$http_x_seq '
                      't=$request_time';
    access_log {prefix}/access.log limits;
{temp}
    limit_req_status 429;
    limit_conn_status 429;
    keepalive_requests 100000;
    client_max_body_size 10m;

{http}

    server {{
        listen 127.0.0.1:{port};
{server}
    }}
}}
"""


@dataclass
class Nginx:
    url: str
    port: int
    prefix: Path
    proc: subprocess.Popen[bytes]

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[str]:
        path = self.prefix / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def logged(self, field: str) -> dict[str, str]:
        """``$limit_req_status`` (``req``) or ``$limit_conn_status`` (``conn``) of each
        request, by its ``X-Seq`` header; "-" when the variable was empty."""
        time.sleep(0.1)     # nginx logs a request just after its last byte has left
        out = {}
        for line in self.access_log():
            seq = re.search(r" seq=(\S+)", line)
            value = re.search(rf" {field}=(\S+)", line)
            if seq and value and seq.group(1) != "-":
                out[seq.group(1)] = value.group(1)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def launch_nginx(prefix: Path, http: str, server: str) -> Nginx:
    """Start nginx in ``prefix`` on a free port; fail the test with its log if it cannot."""
    binary = nginx_binary()
    prefix.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "temp" / kind).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    # A free port can be taken between probing and binding: try a few.
    for _ in range(5):
        port = _free_port()
        conf.write_text(render_conf(prefix, port, http, server))
        with (prefix / "stderr.log").open("wb") as out:
            proc = subprocess.Popen(
                [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if _listening(port):
                return Nginx(f"http://127.0.0.1:{port}", port, prefix, proc)
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log = (prefix / "error.log").read_text(errors="replace") if (
            prefix / "error.log").exists() else ""
        if "Address already in use" not in log:
            break
    stderr = (prefix / "stderr.log").read_text(errors="replace")
    pytest.fail(f"nginx did not start with this configuration:\n{conf.read_text()}\n"
                f"error.log:\n{log[-3000:]}\n{stderr[-2000:]}", pytrace=False)


# -- the request schedule ---------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One request, sent ``at`` seconds after the schedule starts."""

    at: float
    path: str = "/api/generate"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=lambda: GENERATE)


@dataclass(frozen=True)
class Outcome:
    status: int
    sent: float          # seconds after the start, when the request left
    headers_at: float    # when the status line and headers arrived
    done: float          # when the whole body had arrived
    headers: Mapping[str, str]

    @property
    def latency(self) -> float:
        """From sending to the response being complete."""
        return self.done - self.sent


def shots(*offsets: float, **kw: Any) -> list[Shot]:
    return [Shot(at, **kw) for at in offsets]


def rapid(n: int, start: float = 0.0, gap: float = 0.03, **kw: Any) -> list[Shot]:
    """``n`` requests ``gap`` apart: rapid, yet in a known order of arrival."""
    return [Shot(start + i * gap, **kw) for i in range(n)]


async def _one(session: aiohttp.ClientSession, base: str, shot: Shot, start: float) -> Outcome:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + shot.at - loop.time()))
    sent = loop.time() - start
    async with session.post(base + shot.path, json=dict(shot.body),
                            headers=dict(shot.headers)) as resp:
        headers_at = loop.time() - start
        await resp.read()
        return Outcome(resp.status, sent, headers_at, loop.time() - start, dict(resp.headers))


async def fire(targets: Sequence[str], schedule: Sequence[Shot],
               lead: float = 0.3) -> list[list[Outcome]]:
    """Send the same schedule to every target at the same times; outcomes per target, in
    schedule order."""
    sessions = [aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
                for _ in targets]
    try:
        # Open one connection to each target first, outside the schedule, on a path no
        # test limits.
        for session, base in zip(sessions, targets, strict=True):
            async with session.get(base + "/") as resp:
                assert resp.status == 200, f"{base} is not proxying: {resp.status}"
                await resp.read()
        start = asyncio.get_running_loop().time() + lead
        runs = [asyncio.gather(*(_one(session, base, shot, start) for shot in schedule))
                for session, base in zip(sessions, targets, strict=True)]
        return [list(run) for run in await asyncio.gather(*runs)]
    finally:
        for session in sessions:
            await session.close()


def statuses(outcomes: Sequence[Outcome]) -> list[int]:
    return [o.status for o in outcomes]
