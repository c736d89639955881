"""Reading the ledger: the query's parameters, and the rows grouped as asked.

Pure functions; ``api.py`` and ``corral usage`` use them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.usage.store import Usage, UsageKey

FIELDS = ("client", "model", "tier", "day")
DEFAULT_BY = ("client",)
DEFAULT_DAYS = 7            # without ``from``: the last week, today included


class QueryError(ValueError):
    """A bad parameter; the message names it (answered with 400)."""


@dataclass(frozen=True)
class Query:
    first: str
    last: str
    by: tuple[str, ...]
    client: str | None = None


def _day(name: str, value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        raise QueryError(f"{name}: {value!r} is not a date (YYYY-MM-DD, UTC)") from None


def parse_query(params: Mapping[str, str], today: dt.date) -> Query:
    unknown = sorted(set(params) - {"from", "to", "by", "client"})
    if unknown:
        raise QueryError(f"unknown parameter(s) {', '.join(unknown)} "
                         "(use from, to, by, client)")
    last = _day("to", params["to"]) if params.get("to") else today
    first = (_day("from", params["from"]) if params.get("from")
             else last - dt.timedelta(days=DEFAULT_DAYS - 1))
    if first > last:
        raise QueryError(f"from ({first}) is after to ({last})")
    by_text = params.get("by", "")
    by = tuple(f.strip() for f in by_text.split(",") if f.strip()) or DEFAULT_BY
    bad = [f for f in by if f not in FIELDS]
    if bad:
        raise QueryError(f"by: unknown field(s) {', '.join(repr(f) for f in bad)} "
                         f"(use {', '.join(FIELDS)})")
    if len(set(by)) != len(by):
        raise QueryError(f"by: a field is named twice in {by_text!r}")
    return Query(first.isoformat(), last.isoformat(), by, params.get("client") or None)


def row(group: Mapping[str, str], u: Usage) -> dict[str, Any]:
    refused = sum(u.refusals.values())
    served = u.requests - refused
    return {
        **group,
        "requests": u.requests,
        "tokens_in": u.tokens_in,
        "tokens_out": u.tokens_out,
        "refused": refused,
        "refusals": dict(sorted(u.refusals.items())),
        "errors": u.errors,
        "total_ms": round(u.total_ms, 3),
        "first_byte_ms": round(u.first_byte_ms, 3),
        # Averages over what was served: a refusal takes no time worth averaging.
        "avg_ms": round(u.total_ms / served, 1) if served > 0 else None,
        "avg_first_byte_ms": (round(u.first_byte_ms / u.first_bytes, 1)
                              if u.first_bytes else None),
    }


def group(kept: Mapping[UsageKey, Usage], by: Sequence[str]) -> list[dict[str, Any]]:
    """Rows summed over the fields not in ``by``: most tokens first, then by name
    (days in order when grouped by day)."""
    sums: dict[tuple[str, ...], Usage] = {}
    for key, usage in kept.items():
        k = tuple(getattr(key, f) for f in by)
        total = sums.get(k)
        if total is None:
            total = sums[k] = Usage()
        total.add(usage)
    rows = [row(dict(zip(by, k, strict=True)), u) for k, u in sums.items()]
    day_first = "day" in by
    rows.sort(key=lambda r: (r["day"] if day_first else "",
                             -(r["tokens_in"] + r["tokens_out"]), -r["requests"],
                             tuple(r[f] for f in by)))
    return rows


def totals(kept: Mapping[UsageKey, Usage]) -> dict[str, Any]:
    total = Usage()
    for usage in kept.values():
        total.add(usage)
    return row({}, total)
