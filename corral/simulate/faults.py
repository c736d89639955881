"""Fault injection: how a misbehaving Ollama looks from the outside.

- ``oom``: inference answers 500 at once, as when a model does not fit.
- ``hang``: inference requests never get a byte back until the client leaves.
- ``drop``: the connection is cut after ``drop_after`` chunks, no final chunk.
- ``refuse``: every request except ``/_sim/*`` has its connection aborted
  without an answer. The server keeps listening (so the mode can be switched
  off again at runtime); clients see a reset connection, whether the mode
  was set at start or later.

Non-inference endpoints keep answering under oom/hang/drop, so health probes
see the backend as up unless it refuses.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

OOM_MESSAGE = "model requires more system memory (12.0 GiB) than is available (4.1 GiB)"


async def hang_forever() -> None:
    # Only the client going away (handler cancellation) ends this.
    await asyncio.get_running_loop().create_future()


def cut(request: web.BaseRequest) -> None:
    """Abort the connection: RST, no chunk terminator, no final line."""
    transport = request.transport
    if transport is not None:
        transport.abort()
