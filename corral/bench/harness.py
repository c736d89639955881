"""Start and stop the benchmark's targets: stand-in Ollama servers, Corral, nginx.

Every target is a real subprocess on a free port, started the way an operator would
start it, so the benchmark measures what runs in production and not an in-process
shortcut. Each starter is an async context manager: the process is stopped (SIGTERM,
then SIGKILL) however the benchmark ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import resource
import shutil
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from corral.bench import certs
from corral.bench.load import Connection, ProtocolError, encode_request

MODEL = "llama3.2"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class TargetError(RuntimeError):
    """A target failed to start or died; the message carries its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(wanted: int = 65536) -> int:
    """Lift the soft open-files limit towards the hard one.

    A thousand streams through a proxy hold two thousand sockets in the proxy and a
    thousand in this process; children inherit the limit, so doing it here once
    covers the stand-in, Corral and nginx too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's workers), found through /proc."""
    kids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2:].split()
    # utime and stime are fields 14 and 15 of the full line (11 and 12 after the name).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass
class Target:
    """A running process that answers HTTP on 127.0.0.1:port."""

    name: str
    port: int
    proc: asyncio.subprocess.Process
    log: Path
    # nginx does the work in its workers, so its memory and CPU are theirs too.
    include_children: bool = False
    # Set when the target serves HTTPS: the context a client trusts it with.
    client_tls: ssl.SSLContext | None = None

    host = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"{'https' if self.client_tls else 'http'}://{self.host}:{self.port}"

    def connection(self) -> Connection:
        """A keep-alive client connection to this target, over TLS when it serves HTTPS."""
        if self.client_tls is None:
            return Connection(self.host, self.port)
        return TlsConnection(self.host, self.port, self.client_tls)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """One new connection (TCP, and the TLS handshake when it serves HTTPS)."""
        return await asyncio.open_connection(
            self.host, self.port, limit=_READ_LIMIT, ssl=self.client_tls,
            server_hostname=self.host if self.client_tls else None)

    def pids(self) -> list[int]:
        pids = [self.proc.pid]
        if self.include_children:
            pids += _children(self.proc.pid)
        return pids

    def rss_mb(self) -> float:
        return sum(_status_kb(p, "VmRSS") for p in self.pids()) / 1024

    def peak_rss_mb(self) -> float:
        """VmHWM: the kernel's own high-water mark, so no sampling can miss a peak."""
        return sum(_status_kb(p, "VmHWM") for p in self.pids()) / 1024

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(p) for p in self.pids())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.returncode is not None:
            raise TargetError(
                f"{self.name} exited with status {self.proc.returncode}; log tail:\n"
                f"{self.log_tail()}"
            )


_READ_LIMIT = 1024 * 1024     # as the load generator's own connections


@dataclass(frozen=True)
class TlsFiles:
    """One throwaway authority and one server certificate, shared by every HTTPS
    target of a run, so Corral and nginx serve the very same certificate."""

    ca: Path
    cert: Path      # the certificate, then the CA (a chain)
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts the CA uses: verification on, HTTP/1.1 by ALPN."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def make_tls(workdir: Path) -> TlsFiles:
    directory = workdir / "tls"
    directory.mkdir(parents=True, exist_ok=True)
    ca = certs.authority(directory)
    cert, key = certs.server_cert(ca, directory)
    return TlsFiles(ca.cert, cert, key)


def tls_description(writer: asyncio.StreamWriter) -> dict[str, Any] | None:
    """The protocol version, cipher and ALPN a TLS connection negotiated."""
    obj = writer.get_extra_info("ssl_object")
    if obj is None:
        return None
    cipher = obj.cipher()
    return {"version": obj.version(), "cipher": cipher[0] if cipher else None,
            "bits": cipher[2] if cipher else None,
            "alpn": obj.selected_alpn_protocol()}


class TlsConnection(Connection):
    """The load generator's keep-alive connection, over TLS; ``tls`` describes what
    its first handshake negotiated."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(host, port)
        self.context = context
        self.tls: dict[str, Any] | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, limit=_READ_LIMIT, ssl=self.context,
            server_hostname=self.host)
        self.opened += 1
        if self.tls is None:
            self.tls = tls_description(self._writer)


async def _stop(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        # nginx: SIGTERM is its fast shutdown; Python targets cancel their main task.
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _wait_ready(target: Target, within: float = 30.0) -> None:
    """Poll ``GET /readyz`` until it answers 200 (Corral: up, and with shared state past
    the store's first grace period), or ``GET /api/tags`` where there is no such page
    (the stand-in, nginx in front of it)."""
    ready = encode_request(target.host, target.port, "GET", "/readyz")
    tags = encode_request(target.host, target.port, "GET", "/api/tags")
    request = ready
    deadline = time.monotonic() + within
    last = "no answer"
    while time.monotonic() < deadline:
        target.check_alive()
        conn = target.connection()
        try:
            resp = await asyncio.wait_for(conn.exchange(request), 2.0)
            if resp.status == 404 and request is ready:
                request = tags
                continue
            if resp.status == 200:
                return
            last = f"status {resp.status}"
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ProtocolError,
                ssl.SSLError) as exc:
            last = type(exc).__name__
        finally:
            conn.close()
        await asyncio.sleep(0.05)
    raise TargetError(
        f"{target.name} not ready after {within:.0f}s ({last}); log tail:\n{target.log_tail()}"
    )


@contextlib.asynccontextmanager
async def spawn(
    name: str, argv: list[str], port: int, workdir: Path, *, include_children: bool = False,
    client_tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Target]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT, cwd=workdir,
            start_new_session=True,  # a ^C in the terminal reaches us only; we stop them
        )
    target = Target(name, port, proc, log, include_children, client_tls)
    try:
        await _wait_ready(target)
        yield target
    finally:
        # Shielded: a cancelled benchmark (^C) must still reap what it started.
        await asyncio.shield(_stop(proc))


def simulator(
    workdir: Path, *, parallel: int, tps: float | None, name: str = "standin"
) -> contextlib.AbstractAsyncContextManager[Target]:
    """A stand-in Ollama with the benchmark's model loaded. ``tps=None`` is
    ``--instant``: no token delays, so the backend's own time is near zero."""
    port = free_port()
    argv = [
        sys.executable, "-m", "corral.simulate", "--port", str(port),
        "--models", MODEL, "--loaded", MODEL, "--parallel", str(parallel),
        # The stand-in must never refuse a burst the benchmark itself creates.
        "--max-queue", str(max(512, parallel * 2)),
    ]
    argv += ["--instant"] if tps is None else ["--tps", str(tps)]
    return spawn(name, argv, port, workdir)


def corral_config(
    port: int, backend_url: str, *, max_concurrency: int, state: str = "memory",
    tls: TlsFiles | None = None, usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The benchmark's Corral configuration (see :func:`corral`). ``tls``: every
    address serves HTTPS with these files; ``usage``: the ledger's section, left out
    (Corral's default) when None."""
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "state": state,
        "backends": [{"url": backend_url, "name": "b0", "max_concurrency": max_concurrency}],
        "access_log": "off",
        "queue": {"max_depth": 100000, "max_wait": "600s"},
        "health": {"interval": "30s"},
    }
    if tls is not None:
        config["tls"] = {"cert": str(tls.cert), "key": str(tls.key), "min_version": "1.2"}
    if usage is not None:
        config["usage"] = usage
    return config


def corral(
    workdir: Path, backend: Target, *, max_concurrency: int, name: str = "corral",
    state: str = "memory", tls: TlsFiles | None = None, usage: dict[str, Any] | None = None,
) -> contextlib.AbstractAsyncContextManager[Target]:
    """Corral with one backend whose slot cap equals the stand-in's parallelism, so
    Corral never queues what the backend could take; the queue bounds are wide enough
    that no benchmark request is refused. ``state``: memory, or a Redis URL that
    several such processes share."""
    port = free_port()
    config = corral_config(port, backend.url, max_concurrency=max_concurrency, state=state,
                           tls=tls, usage=usage)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "corral.cli", "serve", "--config", str(path),
            "--log-level", "warning"]
    return spawn(name, argv, port, workdir,
                 client_tls=tls.client_context() if tls is not None else None)


@contextlib.asynccontextmanager
async def redis_server(workdir: Path, name: str = "redis") -> AsyncIterator[Target]:
    """A redis-server of the benchmark's own on a free port, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise TargetError("redis-server is not installed")
    port = free_port()
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT, cwd=workdir, start_new_session=True)
    target = Target(name, port, proc, log)
    try:
        deadline = time.monotonic() + 10
        while True:
            target.check_alive()
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            if time.monotonic() > deadline:
                raise TargetError(f"redis-server not ready; log tail:\n{target.log_tail()}")
            await asyncio.sleep(0.05)
        yield target
    finally:
        await asyncio.shield(_stop(proc))


def nginx_binary() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def nginx_config(prefix: Path, port: int, backend: Target | Sequence[Target], workers: str,
                 balance: str = "", tls: TlsFiles | None = None) -> str:
    """The proxy config an operator would write in front of Ollama: upstream keep-alive,
    no buffering either way (tokens must flow as they are produced), long read timeout.
    ``balance`` is the upstream's method line (``least_conn``) for several backends.
    ``tls``: the listener serves HTTPS with these files, TLS 1.2 and 1.3 (what Corral's
    ``min_version: "1.2"`` allows), nginx's other TLS settings left at their defaults."""
    targets = [backend] if isinstance(backend, Target) else list(backend)
    servers = "".join(f"        server {t.host}:{t.port};\n" for t in targets)
    method = f"        {balance};\n" if balance else ""
    # Workers started by a root master drop to ``nobody``, which could not write the
    # temp paths in our private directory; as root, keep them as root.
    user = f"user {pwd.getpwuid(0).pw_name};\n" if os.geteuid() == 0 else ""
    tmp = prefix / "tmp"
    # The workers inherit our (raised) limit; asking for more than the hard limit would
    # only log an alert.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY or nofile > 1 << 20:
        nofile = 1 << 20
    ssl_flag = " ssl" if tls is not None else ""
    ssl_lines = (f"""        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;
""" if tls is not None else "")
    return f"""{user}worker_processes {workers};
worker_rlimit_nofile {nofile};
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream ollama {{
{method}{servers}        keepalive 256;
        # nginx closes a keep-alive connection after 1000 requests by default; Corral
        # and the load generator never do, so neither side pays for reconnects.
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl_flag} backlog=4096;
{ssl_lines}        keepalive_requests 1000000;
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx(
    workdir: Path, backend: Target | Sequence[Target], *, workers: str = "1",
    name: str = "nginx", balance: str = "", tls: TlsFiles | None = None,
) -> contextlib.AbstractAsyncContextManager[Target]:
    binary = nginx_binary()
    if binary is None:
        raise TargetError("nginx is not installed")
    prefix = workdir / name
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    (prefix / "nginx.conf").write_text(nginx_config(prefix, port, backend, workers,
                                                    balance, tls))
    # -e: startup errors go to our directory too, not to the system's log.
    argv = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
            "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
    return spawn(name, argv, port, workdir, include_children=True,
                 client_tls=tls.client_context() if tls is not None else None)
