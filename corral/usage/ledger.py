"""The ledger: each finished request's figures summed in memory, written to the store
in batches off the request path.

``record`` runs on the request path, so it is a few dictionary updates: the UTC day
is recomputed only when the clock passes midnight, and nothing is awaited. A
background task hands the sums to the store every ``usage.flush`` seconds; a batch
the store refuses is merged back and tried again, so a store outage delays figures
and loses none (memory grows with distinct client × model × tier × day only).

What counts, per client (the key's name, else the IP), model, tier and UTC day:
(the model as the fleet knows it: a name no backend has is summed under ``other``,
as in the metrics, so free text from clients never becomes a row of its own):
every request the access log records — refused ones too, as refusals by rule or
cause — except CORS preflights (asking is not using).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from corral.backends.backend import normalize_model
from corral.usage.store import Usage, UsageKey, UsageStore, UsageStoreError

log = logging.getLogger("corral.usage")

_DAY = 86400.0
PRUNE_EVERY = 3600.0          # retention is in days: once an hour is plenty
# Statuses that are a refusal by Corral (a limit, the queue, a missing key or a
# refused origin) rather than an answer; see ``refusal_cause``.
_REFUSALS = frozenset({401, 403, 429, 503})
# Every model name the fleet does not have (the metrics' label for them too).
OTHER_MODEL = "other"


def utc_day(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d")


def refusal_cause(rec: Mapping[str, Any]) -> str | None:
    """The rule or cause that refused this request, None if it was not refused.

    A limit names its rule (or, for the ones without, its outcome); a request the
    queue could not take (full, or waited too long) is ``queue``; a missing key is
    ``unauthorized``; a refused origin ``origin``. A backend's own 503 is an upstream
    error, not a refusal."""
    status = rec.get("status")
    rule = rec.get("rule")
    if rule:
        return str(rule)
    limit = rec.get("limit")
    if limit:
        return str(limit)
    if status == 503 and rec.get("backend") is None and rec.get("error"):
        return "queue"
    return None


class Ledger:
    def __init__(self, store: UsageStore, flush_s: float, keep_days: int,
                 clock: Callable[[], float] = time.time,
                 known_model: Callable[[str], bool] | None = None) -> None:
        self.store = store
        self.known_model = known_model
        self.flush_s = flush_s
        self.keep_days = keep_days
        self._clock = clock
        self._sums: dict[UsageKey, Usage] = {}
        self._day = ""
        self._day_end = 0.0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.flushes = 0
        self.errors = 0
        self.last_error: str | None = None

    # -- on the request path --------------------------------------------------------

    def record(self, rec: Mapping[str, Any]) -> None:
        if rec.get("method") == "OPTIONS" and rec.get("status") == 204:
            return                                   # a CORS preflight
        t = rec.get("time") or self._clock()
        if t >= self._day_end or t < self._day_end - _DAY:
            self._day = utc_day(t)
            self._day_end = (t // _DAY + 1) * _DAY    # UTC days are whole multiples
        name = rec.get("client_name")
        model = normalize_model(str(rec.get("model") or ""))
        if model and self.known_model is not None and not self.known_model(model):
            model = OTHER_MODEL
        key = UsageKey(self._day, str(name if name else rec.get("client") or ""),
                       model, str(rec.get("tier") or ""))
        usage = self._sums.get(key)
        if usage is None:
            usage = self._sums[key] = Usage()
        usage.requests += 1
        usage.tokens_in += rec.get("tokens_in") or 0
        usage.tokens_out += rec.get("tokens_out") or 0
        usage.total_ms += rec.get("duration_ms") or 0.0
        ttfb = rec.get("ttfb_ms")
        if ttfb is not None:
            usage.first_byte_ms += ttfb
            usage.first_bytes += 1
        status = rec.get("status") or 0
        if status in _REFUSALS:
            cause = refusal_cause(rec)
            if cause is not None:
                usage.refusals[cause] = usage.refusals.get(cause, 0) + 1
                return
        if status >= 500 or (status == 0 and rec.get("error")):
            usage.errors += 1

    # -- off it ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="corral-usage")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
        await self.store.close()

    async def flush(self) -> None:
        """Write what has been summed since the last flush (one store call)."""
        async with self._lock:
            if not self._sums:
                return
            batch, self._sums = self._sums, {}
            try:
                await self.store.add(batch)
            except (UsageStoreError, OSError) as exc:
                # Keep it for the next try: a store outage delays figures, loses none.
                for key, usage in batch.items():
                    mine = self._sums.get(key)
                    if mine is None:
                        self._sums[key] = usage
                    else:
                        usage.add(mine)
                        self._sums[key] = usage
                self.errors += 1
                self.last_error = str(exc)
                if not self._failing:
                    log.error("usage ledger: cannot write to the store, keeping the "
                              "figures in memory and retrying: %s", exc)
                self._failing = True
                return
            self.flushes += 1
            if self._failing:
                log.warning("usage ledger: the store answers again; figures written")
            self._failing = False
            self.last_error = None

    async def prune(self) -> None:
        before = utc_day(self._clock() - self.keep_days * _DAY)
        try:
            await self.store.prune(before)
        except (UsageStoreError, OSError) as exc:
            log.warning("usage ledger: pruning days before %s failed: %s", before, exc)

    async def _run(self) -> None:
        since_prune = PRUNE_EVERY        # prune once at start, then hourly
        while True:
            if since_prune >= PRUNE_EVERY:
                await self.prune()
                since_prune = 0.0
            await asyncio.sleep(self.flush_s)
            since_prune += self.flush_s
            await self.flush()

    def pending(self) -> int:
        return len(self._sums)

    def status(self) -> dict[str, Any]:
        return {"store": self.store.describe(), "pending": self.pending(),
                "writes": self.flushes, "write_failures": self.errors,
                "last_error": self.last_error, "flush_s": self.flush_s,
                "keep_days": self.keep_days}
