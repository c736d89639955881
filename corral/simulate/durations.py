"""Go-compatible duration parsing and timestamp formatting.

Ollama decodes ``keep_alive`` with Go's ``time.ParseDuration`` and prints
times with ``time.RFC3339Nano``; clients (and gateways) parse both, so the
stand-in reproduces them exactly, error texts included.
"""

from __future__ import annotations

import math
import time

FOREVER = math.inf
# Go's largest Duration (~292 years): what Ollama stores for "forever" and
# therefore what /api/ps reports in expires_at.
MAX_DURATION_NS = (1 << 63) - 1

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_go_duration(text: str) -> int:
    """Return nanoseconds for a Go duration string such as ``1h30m`` or ``-1s``.

    Raises ValueError with the message Go would give, since Ollama returns it
    verbatim in a 400.
    """
    orig = text
    s = text
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError("time: invalid duration " + _quote(orig))
    total = 0
    while s:
        if not (s[0] == "." or (s[0].isascii() and s[0].isdigit())):
            raise ValueError("time: invalid duration " + _quote(orig))
        i = 0
        while i < len(s) and s[i].isascii() and s[i].isdigit():
            i += 1
        whole, s = s[:i], s[i:]
        frac = ""
        if s and s[0] == ".":
            s = s[1:]
            j = 0
            while j < len(s) and s[j].isascii() and s[j].isdigit():
                j += 1
            frac, s = s[:j], s[j:]
            if not whole and not frac:
                raise ValueError("time: invalid duration " + _quote(orig))
        elif not whole:
            raise ValueError("time: invalid duration " + _quote(orig))
        k = 0
        while k < len(s) and not (s[k] == "." or (s[k].isascii() and s[k].isdigit())):
            k += 1
        if k == 0:
            raise ValueError("time: missing unit in duration " + _quote(orig))
        unit_name, s = s[:k], s[k:]
        unit = _UNITS_NS.get(unit_name)
        if unit is None:
            raise ValueError(
                "time: unknown unit " + _quote(unit_name) + " in duration " + _quote(orig)
            )
        total += int(whole or "0") * unit
        if frac:
            total += int(frac) * unit // 10 ** len(frac)
        if total > 1 << 63:
            raise ValueError("time: invalid duration " + _quote(orig))
    if not neg and total > MAX_DURATION_NS:
        raise ValueError("time: invalid duration " + _quote(orig))
    return -total if neg else total


# Go's reflect names for the JSON types a keep_alive could arrive as.
_GO_TYPE_NAMES = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}


def parse_keep_alive(value: object) -> float | None:
    """Seconds from a request's ``keep_alive`` (``api.Duration.UnmarshalJSON``).

    None when absent/null (the runner keeps its current duration); FOREVER for
    any negative value. Raises ValueError with Ollama's 400 message.
    """
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int in Python, not in JSON
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        return FOREVER if value < 0 else float(value)
    if isinstance(value, str):
        ns = parse_go_duration(value)
        return FOREVER if ns < 0 else ns / 1e9
    raise ValueError(f"Unsupported type: '{_GO_TYPE_NAMES.get(type(value), 'interface {}')}'")


def parse_keep_alive_setting(text: str) -> float:
    """OLLAMA_KEEP_ALIVE-style value: a bare number of seconds or a Go duration."""
    try:
        seconds = float(text)
    except ValueError:
        ns = parse_go_duration(text)
        return FOREVER if ns < 0 else ns / 1e9
    return FOREVER if seconds < 0 else seconds


_second_cache: tuple[int, str] = (-1, "")


def rfc3339_nano(ns: int | None = None) -> str:
    """UTC time as Go's RFC3339Nano prints it: trailing zeros of the fraction trimmed."""
    global _second_cache
    if ns is None:
        ns = time.time_ns()
    sec, frac = divmod(ns, 1_000_000_000)
    # One strftime per second: chunks are stamped individually, so this is hot.
    cached_sec, prefix = _second_cache
    if cached_sec != sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _second_cache = (sec, prefix)
    if frac:
        return f"{prefix}.{frac:09d}".rstrip("0") + "Z"
    return prefix + "Z"
