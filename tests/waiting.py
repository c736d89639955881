"""Waiting on a condition in a test: poll it until it holds, or fail the test saying
what was awaited and what was last seen.

A wait that merely ends when its time is up lets the test carry on with a world it did
not expect, and fail later with a confusing message or, worse, pass. A fixed sleep is a
guess at how long something takes, which a loaded machine proves wrong. So the tests
wait on what they need, with a deadline generous enough for a slow machine: a wait
that is met returns at once, so the deadline only costs time when the test fails.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 20.0


Awaited = str | Callable[[], str]


def _failure(what: Awaited, timeout: float, last: object) -> AssertionError:
    # ``what`` may be a function, to say at the end how far things got ("3 of 5 seen").
    told = what() if callable(what) else what
    seen = "" if last is None or isinstance(last, bool) else f"; last seen: {last!r}"
    return AssertionError(f"waited {timeout:g}s for {told}{seen}")


async def eventually(check: Callable[[], T | Awaitable[T]], what: Awaited,
                     timeout: float = DEFAULT_TIMEOUT, every: float = 0.05) -> T:
    """Poll ``check`` (plain or async) until it returns something true, and return
    that; fail the test when ``timeout`` seconds pass first. ``what`` names the awaited
    condition in the failure ("the stand-in runs one request")."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        last: T = await value if inspect.isawaitable(value) else value
        if last:
            return last
        if time.monotonic() > deadline:
            raise _failure(what, timeout, last)
        await asyncio.sleep(every)


def wait_until(check: Callable[[], T], what: Awaited, timeout: float = DEFAULT_TIMEOUT,
               every: float = 0.05) -> T:
    """``eventually`` for code outside an event loop: blocks while it polls."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise _failure(what, timeout, last)
        time.sleep(every)
