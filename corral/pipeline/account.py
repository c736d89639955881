"""Token accounting from the tail of a response (pure).

Ollama puts ``prompt_eval_count``/``eval_count`` in the final NDJSON object (and at
the end of a non-streamed body); the /v1 layer puts ``usage`` in its last chunks. Both
sit at the end, so the relay keeps only a bounded tail of the stream and never parses
the body as it flows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NATIVE_IN = re.compile(rb'"prompt_eval_count"\s*:\s*(\d+)')
_NATIVE_OUT = re.compile(rb'"eval_count"\s*:\s*(\d+)')
_OPENAI_IN = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_OPENAI_OUT = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_LOAD_NS = re.compile(rb'"load_duration"\s*:\s*(\d+)')
_EVAL_NS = re.compile(rb'"eval_duration"\s*:\s*(\d+)')

TAIL_BYTES = 16384


@dataclass(frozen=True)
class Usage:
    tokens_in: int
    tokens_out: int
    exact: bool          # False: counted from streamed chunks, the backend gave no usage

    @property
    def service(self) -> int:
        """Fair-share cost: generating a token costs about twice reading one."""
        return self.tokens_in + 2 * self.tokens_out


def _last(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    found = None
    for found in pattern.finditer(data):  # noqa: B007 - we want the last match
        pass
    return int(found.group(1)) if found else None


def usage_from_tail(tail: bytes, openai: bool, chunks: int) -> Usage | None:
    """Usage from the response's tail; ``chunks`` streamed events are the fallback."""
    if openai:
        tin, tout = _last(_OPENAI_IN, tail), _last(_OPENAI_OUT, tail)
        # Streamed /v1/completions carries zeroed usage on every chunk; the real one is last.
    else:
        tin, tout = _last(_NATIVE_IN, tail), _last(_NATIVE_OUT, tail)
    if tin is not None or tout is not None:
        return Usage(tin or 0, tout or 0, True)
    if chunks > 0:
        # No usage block (e.g. /v1 stream without include_usage): each streamed event
        # carries about one token. ``chunks`` counts newlines: an SSE event has two,
        # and the finish event and [DONE] carry no token; the final NDJSON line neither.
        return Usage(0, max(chunks // 2 - 2, 0) if openai else max(chunks - 1, 0), False)
    return None


@dataclass(frozen=True)
class Timings:
    """Ollama's own timings of a run, in seconds (None where the answer has none:
    the /v1 layer drops them)."""

    load_s: float | None
    eval_s: float | None


def timings_from_tail(tail: bytes) -> Timings:
    """``load_duration`` and ``eval_duration`` (nanoseconds) of the final object: what
    the fleet learns load times and decode speed from."""
    load, ev = _last(_LOAD_NS, tail), _last(_EVAL_NS, tail)
    return Timings(None if load is None else load / 1e9, None if ev is None else ev / 1e9)
