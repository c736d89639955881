"""The usage ledger in Redis (``state: redis://…``), shared by every Corral replica.

One hash per UTC day, ``<prefix><YYYY-MM-DD>``; each field is one counter of one
client, model and tier, named by the JSON array ``[client, model, tier, counter]``
(client and model names may hold any character, ':' and '/' included, and JSON
keeps them apart). Counters are ``requests``, ``tokens_in``, ``tokens_out``,
``errors``, ``first_bytes``, the float sums ``total_ms`` and ``first_byte_ms``, and
``refused:<rule>`` per refusal rule.

An ``add`` is one MULTI/EXEC of HINCRBY / HINCRBYFLOAT, so replicas adding at once
sum exactly and a batch is counted whole or not at all. Every day key written gets a
TTL of ``keep_days + 2`` days: Redis forgets old days by itself even if no replica
ever prunes. ``query`` reads every day of the range in one pipeline of HGETALLs.

Failures: any connection, timeout or server error becomes :class:`UsageStoreError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import orjson
from redis.asyncio import Redis
from redis.asyncio import from_url as redis_from_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from corral.usage.store import Usage, UsageKey, UsageStoreError

DEFAULT_PREFIX: Final = "corral:usage:"
DEFAULT_KEEP_DAYS: Final = 400
# Off the request path (a flush every few seconds, a dashboard read), but neither
# may hang on a Redis that does not answer.
DEFAULT_TIMEOUT_S: Final = 5.0

_INTS: Final = ("requests", "tokens_in", "tokens_out", "errors", "first_bytes")
_FLOATS: Final = ("total_ms", "first_byte_ms")
_REFUSED: Final = "refused:"
_DAY: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_DAY_S: Final = 86_400
_DELETE_CHUNK: Final = 500


class RedisUsageStore:
    def __init__(self, client: Redis, prefix: str = DEFAULT_PREFIX,
                 keep_days: int = DEFAULT_KEEP_DAYS, owns_client: bool = False) -> None:
        """``keep_days``: how long Redis keeps a day without being told; at least the
        ledger's retention (``usage.keep``), which it enforces with ``prune``."""
        if keep_days < 1:
            raise ValueError(f"keep_days must be at least 1, not {keep_days}")
        self._client = client
        self._prefix = prefix
        self._keep_days = keep_days
        self._owns = owns_client
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX,
                 keep_days: int = DEFAULT_KEEP_DAYS,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> RedisUsageStore:
        # One immediate retry on a broken connection: after Redis restarts, every
        # pooled connection is stale, and a flush must not fail for that. An add is a
        # MULTI, so a retry can count a batch twice only if the connection died after
        # EXEC ran and before its reply came back.
        client = redis_from_url(url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 1, supported_errors=(
                                    RedisConnectionError,)))
        return cls(client, prefix=prefix, keep_days=keep_days, owns_client=True)

    @property
    def client(self) -> Redis:
        return self._client

    def describe(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"redis:{where}/{kwargs.get('db', 0)} {self._prefix}*"

    def _key(self, day: str) -> str:
        return self._prefix + day

    def _error(self, op: str, exc: BaseException) -> UsageStoreError:
        return UsageStoreError(f"usage store {self._prefix}* ({op}): {exc}")

    async def add(self, batch: Mapping[UsageKey, Usage]) -> None:
        ints: list[tuple[str, bytes, int]] = []
        floats: list[tuple[str, bytes, float]] = []
        for key, usage in batch.items():
            day = self._key(key.day)
            for name in _INTS:
                if value := getattr(usage, name):
                    ints.append((day, _field(key, name), value))
            for name in _FLOATS:
                if value := getattr(usage, name):
                    floats.append((day, _field(key, name), value))
            for rule, n in usage.refusals.items():
                if n:
                    ints.append((day, _field(key, _REFUSED + rule), n))
        touched = {day for day, _, _ in ints} | {day for day, _, _ in floats}
        if not touched:
            return
        ttl_s = (self._keep_days + 2) * _DAY_S
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for day, field, n in ints:
                    pipe.hincrby(day, field, n)
                for day, field, x in floats:
                    pipe.hincrbyfloat(day, field, x)
                for day in sorted(touched):
                    pipe.expire(day, ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._error("add", exc) from exc

    async def query(self, first_day: str, last_day: str,
                    client: str | None = None) -> dict[UsageKey, Usage]:
        days = self._days(first_day, last_day)
        if not days:
            return {}
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(self._key(day))
                hashes: list[dict[Any, Any]] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._error("query", exc) from exc
        out: dict[UsageKey, Usage] = {}
        for day, fields in zip(days, hashes, strict=True):
            for raw, value in fields.items():
                parsed = _parse_field(raw)
                if parsed is None or (client is not None and parsed[0] != client):
                    continue
                name, model, tier, counter = parsed
                usage = out.setdefault(UsageKey(day, name, model, tier), Usage())
                if counter in _INTS:
                    setattr(usage, counter, int(value))
                elif counter in _FLOATS:
                    setattr(usage, counter, float(value))
                elif counter.startswith(_REFUSED):
                    usage.refusals[counter.removeprefix(_REFUSED)] = int(value)
        # A key whose only fields were counters this version does not know stays out.
        return {k: u for k, u in out.items() if u != Usage()}

    def _days(self, first_day: str, last_day: str) -> list[str]:
        """The days of the range whose keys can still exist. A key lives
        ``keep_days + 2`` days after its last write, and a day is written on that day
        (or by a flush just after midnight), so keys older than ``keep_days + 3`` days
        before today are gone: the range is cut there instead of costing one HGETALL
        per day of a range that may be open-ended. A future end is cut at tomorrow
        (a replica's clock may run a little ahead), so ``9999-12-31`` works too."""
        first, last = date.fromisoformat(first_day), date.fromisoformat(last_day)
        last = min(last, datetime.now(UTC).date() + timedelta(days=1))
        span = self._keep_days + 3
        if (last - first).days > span:
            first = last - timedelta(days=span)
        return [(first + timedelta(days=i)).isoformat()
                for i in range((last - first).days + 1)]

    async def prune(self, before_day: str) -> None:
        pattern = _glob_escape(self._prefix) + "*"
        try:
            doomed: list[Any] = []
            async for key in self._client.scan_iter(match=pattern, count=1000):
                day = _text(key)[len(self._prefix):]
                # Only day keys: the prefix may be shared with other keys that merely
                # start like it.
                if _DAY.fullmatch(day) and day < before_day:
                    doomed.append(key)
            for i in range(0, len(doomed), _DELETE_CHUNK):
                await self._client.unlink(*doomed[i:i + _DELETE_CHUNK])
        except (RedisError, OSError) as exc:
            raise self._error("prune", exc) from exc

    async def close(self) -> None:
        if self._owns and not self._closed:
            self._closed = True
            await self._client.aclose()


def _field(key: UsageKey, counter: str) -> bytes:
    return orjson.dumps([key.client, key.model, key.tier, counter])


def _parse_field(raw: Any) -> tuple[str, str, str, str] | None:
    """The field's parts, or None for a field this store did not write."""
    try:
        parts = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if (not isinstance(parts, list) or len(parts) != 4
            or not all(isinstance(p, str) for p in parts)):
        return None
    return parts[0], parts[1], parts[2], parts[3]


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)
