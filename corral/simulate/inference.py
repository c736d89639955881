"""The life of one inference request: fault, queue, load, slot, paced output.

Shared by the native and OpenAI layers; each supplies an Encoder that turns
tokens into its wire format.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from corral.simulate.config import RUN_ID_HEADER
from corral.simulate.engine import Busy, SimEngine, Ticket
from corral.simulate.faults import OOM_MESSAGE, cut, hang_forever
from corral.simulate.models import ModelInfo
from corral.simulate.wire import BUSY_MESSAGE, ApiError


@dataclass(slots=True)
class Job:
    info: ModelInfo
    keep_alive: float | None
    num_ctx: int
    prompt_tokens: int
    words: list[str]
    reason: str  # done_reason once every word is out: "stop" or "length"
    started_ns: int  # handler start (perf_counter_ns), the origin of load/total durations


@dataclass(slots=True)
class Timing:
    """Durations in integer nanoseconds, as Ollama reports them."""

    total: int = 0
    load: int = 0
    prompt_eval: int = 0
    eval: int = 0


class Encoder(Protocol):
    stream_content_type: str
    whole_content_type: str

    def chunk(self, word: str, index: int) -> bytes: ...

    def final(self, job: Job, t: Timing) -> bytes: ...

    def whole(self, job: Job, t: Timing, text: str) -> bytes: ...


def metrics(job: Job, t: Timing) -> dict[str, int]:
    """Metric fields of a final chunk; all are omitempty in Ollama, so zeros are left out."""
    m: dict[str, int] = {}
    for key, value in (
        ("total_duration", t.total),
        ("load_duration", t.load),
        ("prompt_eval_count", job.prompt_tokens),
        ("prompt_eval_duration", t.prompt_eval),
        ("eval_count", len(job.words)),
        ("eval_duration", t.eval),
    ):
        if value:
            m[key] = value
    return m


def check_fault(engine: SimEngine) -> str:
    """The fault in force for a new inference request; oom fails it at once."""
    fault = engine.fault
    if fault == "oom":
        raise ApiError(500, OOM_MESSAGE)
    return fault


async def _admit(ticket: Ticket, engine: SimEngine, job: Job, fault: str) -> None:
    if fault == "hang":
        await hang_forever()
    try:
        await ticket.load(job.info, job.keep_alive, job.num_ctx)
    except Busy:
        raise ApiError(503, BUSY_MESSAGE) from None


async def load_only(engine: SimEngine, job: Job) -> None:
    """An empty prompt: wait until the model is loaded, take no slot."""
    fault = check_fault(engine)
    ticket = Ticket(engine)
    try:
        await _admit(ticket, engine, job, fault)
    finally:
        ticket.close(None)


async def drive(
    request: web.Request, engine: SimEngine, job: Job, enc: Encoder, stream: bool
) -> web.StreamResponse:
    """Run a generation and answer it; raises ApiError while nothing has been sent."""
    fault = check_fault(engine)
    ticket = Ticket(engine, request.headers.get(RUN_ID_HEADER))
    outcome: str | None = None
    resp: web.StreamResponse | None = None
    try:
        await _admit(ticket, engine, job, fault)
        ready = time.perf_counter_ns()
        await ticket.slot()
        cfg = engine.cfg
        loop = asyncio.get_running_loop()
        prompt_start = time.perf_counter_ns()
        if cfg.prompt_tokens_per_second > 0:
            await asyncio.sleep(job.prompt_tokens / cfg.prompt_tokens_per_second)
        eval_start = time.perf_counter_ns()
        eval_start_loop = loop.time()
        t = Timing(load=ready - job.started_ns, prompt_eval=eval_start - prompt_start)
        drop = engine.drop_after if fault == "drop" else -1
        tps = cfg.tokens_per_second
        words = job.words

        def finish() -> Timing:
            end = time.perf_counter_ns()
            t.eval = end - eval_start
            t.total = end - job.started_ns
            return t

        if not stream:
            if tps > 0 and words:
                await asyncio.sleep(len(words) / tps)
            if drop >= 0:
                cut(request)
                outcome = "dropped"
                return web.Response()
            body = enc.whole(job, finish(), "".join(words))
            outcome = "completed"
            return web.Response(body=body, headers={"Content-Type": enc.whole_content_type})

        resp = web.StreamResponse(headers={"Content-Type": enc.stream_content_type})
        await resp.prepare(request)
        if tps == 0 and drop < 0:
            # Instant: one write for the whole stream keeps the per-request cost
            # negligible; the bytes are the same NDJSON/SSE lines.
            parts = [enc.chunk(w, i) for i, w in enumerate(words)]
            parts.append(enc.final(job, finish()))
            await resp.write(b"".join(parts))
        else:
            for i, w in enumerate(words):
                if i == drop:
                    break
                if tps > 0:
                    # Absolute deadlines so per-token overheads do not add up.
                    delay = eval_start_loop + (i + 1) / tps - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await resp.write(enc.chunk(w, i))
            if drop >= 0:
                cut(request)
                outcome = "dropped"
                return resp
            await resp.write(enc.final(job, finish()))
        outcome = "completed"
        return resp
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except ConnectionResetError:
        # Writing to a connection the client closed; aiohttp tolerates the return.
        outcome = "cancelled"
        return resp if resp is not None else web.Response()
    finally:
        ticket.close(outcome)


async def embed_pass(
    request: web.Request, engine: SimEngine, info: ModelInfo, keep_alive: float | None,
    num_ctx: int, prompt_tokens: int, started_ns: int, run: bool = True,
) -> Timing | None:
    """Queue, load and hold a slot for an embedding; None when the drop fault cut it.

    ``run=False`` only loads the model (empty input), as Ollama still does.
    """
    fault = check_fault(engine)
    job = Job(info, keep_alive, num_ctx, prompt_tokens, [], "stop", started_ns)
    ticket = Ticket(engine)
    outcome: str | None = None
    try:
        await _admit(ticket, engine, job, fault)
        t = Timing(load=time.perf_counter_ns() - started_ns)
        if run:
            await ticket.slot()
            pps = engine.cfg.prompt_tokens_per_second
            if pps > 0:
                await asyncio.sleep(prompt_tokens / pps)
        if fault == "drop":
            cut(request)
            outcome = "dropped"
            return None
        t.total = time.perf_counter_ns() - started_ns
        outcome = "completed"
        return t
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        ticket.close(outcome)
