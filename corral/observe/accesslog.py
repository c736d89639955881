"""One JSON line per request, written in one place.

Records are appended to a list on the request path and written by a background task
every 100 ms (or when many are waiting), so the hot path never does a syscall for
logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import IO, Any

import orjson

_FLUSH_EVERY = 0.1
_FLUSH_AT = 512


class AccessLog:
    def __init__(self, target: str) -> None:
        self.target = target
        self._pending: list[bytes] = []
        self._stream: IO[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        if target == "off":
            return
        if target == "stdout":
            self._stream = sys.stdout.buffer
        elif target == "stderr":
            self._stream = sys.stderr.buffer
        else:
            self._stream = open(target, "ab")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._stream is None:
            return
        self._pending.append(orjson.dumps(record) + b"\n")
        if len(self._pending) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self._stream is None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            self._stream.write(data)
            self._stream.flush()
        except OSError:
            pass  # a full disk must not take requests down with it

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_EVERY)
            self.flush()

    def start(self) -> None:
        if self._stream is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.flush()
        if self._stream is not None and self.target not in ("stdout", "stderr"):
            self._stream.close()
