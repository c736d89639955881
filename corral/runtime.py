"""Running Corral's coroutines: one uvloop runner for the server, the demo and the
benchmarks, cancelled cleanly on SIGINT/SIGTERM; and the log format."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any


def _libc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None             # not glibc (musl, macOS): nothing to ask
    return trim


_trim = _libc_trim()


def give_back_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps them otherwise).

    Called after each pass that forgets idle clients' state: Python frees the
    objects, but after a flood the process's resident size would otherwise stay at
    its peak. Off the request path; a few milliseconds at most."""
    if _trim is not None:
        _trim(0)


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
