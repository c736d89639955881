"""Running Corral's coroutines: one uvloop runner for the server, the demo and the
benchmarks, cancelled cleanly on SIGINT/SIGTERM; and the log format."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any


def new_runner() -> asyncio.Runner:
    """An asyncio runner on uvloop when available (it halves the loop's own cost)."""
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.Runner()


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` until it ends or SIGINT/SIGTERM."""
    with new_runner() as runner:
        loop = runner.get_loop()
        task = loop.create_task(main)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            runner.run(_await(task))


async def _await(task: asyncio.Task[None]) -> None:
    await task


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
