"""Fixtures that run one set of contract tests against every limit store.

The Redis store runs against a real ``redis-server`` started here, once per
test run, on a free port, without persistence. If the binary is missing the Redis
tests fail with a message saying so: they are never skipped silently.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.limits.storage.base import LimitStore
from tests.contract.limit_store_support import FakeClock, make_store

_NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(binary: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    # A free port can be taken between probing and binding; try a few.
    for _ in range(5):
        port = _free_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", *_NO_PERSISTENCE],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers_ping(port):
                return proc, port
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    tail = log.read_text(errors="replace")[-2000:]
    pytest.fail(f"redis-server did not start; its log ends with:\n{tail}", pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH: the Redis limit store tests need a real Redis "
            "server (install the redis-server package); they are not skipped",
            pytrace=False,
        )
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = _start_redis(binary, Path(tmp) / "redis.log")
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    """``memory``, or the URL of the Redis started for this test run."""
    if request.param == "memory":
        return "memory"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
async def store(backend: str, clock: FakeClock) -> AsyncIterator[LimitStore]:
    limit_store = make_store(backend, clock)
    try:
        yield limit_store
    finally:
        await limit_store.close()
