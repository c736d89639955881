"""The usage ledger in a SQLite file (``usage.path``), when state is kept in memory.

``sqlite3`` blocks, so every statement runs on one worker thread of this store, on
the one connection opened in that thread; the event loop only awaits it. The file is
opened when the store is built (waiting for that thread), so a bad path fails at
startup rather than at the first flush.

Tables: ``usage`` (one row per day, client, model and tier) and ``refusals`` (one
row per those and the rule). An ``add`` is one transaction of UPSERTs, so a batch is
counted whole or not at all. WAL mode and a busy timeout let several processes
share one file: writers queue for the lock instead of failing.

Failures: a file that cannot be opened, read or written becomes
:class:`UsageStoreError` naming the file and the cause.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypeVar

from corral.usage.store import Usage, UsageKey, UsageStoreError

SCHEMA_VERSION: Final = 1
# Another process may hold the write lock for a flush of its own: wait for it.
BUSY_TIMEOUT_MS: Final = 5000

_COUNTERS: Final = ("requests", "tokens_in", "tokens_out", "errors", "total_ms",
                    "first_byte_ms", "first_bytes")

# WITHOUT ROWID: the primary key is the only lookup path, so the table is the index.
# The (client, day) indexes serve one client's history without reading every
# client's rows of the range.
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL, tier TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, tokens_in INTEGER NOT NULL DEFAULT 0,
    tokens_out INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    total_ms REAL NOT NULL DEFAULT 0, first_byte_ms REAL NOT NULL DEFAULT 0,
    first_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, client, model, tier)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_client ON usage (client, day);
CREATE TABLE IF NOT EXISTS refusals (
    day TEXT NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL, tier TEXT NOT NULL,
    rule TEXT NOT NULL, count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, client, model, tier, rule)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refusals_by_client ON refusals (client, day);
"""

_ADD_USAGE: Final = (
    "INSERT INTO usage (day, client, model, tier, " + ", ".join(_COUNTERS) + ") "
    "VALUES (?, ?, ?, ?, " + ", ".join("?" for _ in _COUNTERS) + ") "
    "ON CONFLICT (day, client, model, tier) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in _COUNTERS))
_ADD_REFUSAL: Final = (
    "INSERT INTO refusals (day, client, model, tier, rule, count) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, client, model, tier, rule) DO UPDATE SET count = count + excluded.count")

_T = TypeVar("_T")
_UsageRow = tuple[str, str, str, str, int, int, int, int, float, float, int]
_RefusalRow = tuple[str, str, str, str, str, int]


class SqliteUsageStore:
    def __init__(self, path: str | Path) -> None:
        """Opens (creating when missing) the file and its tables; raises
        :class:`UsageStoreError` when it cannot."""
        self._path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="corral-usage-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        try:
            self._executor.submit(self._open).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            raise

    @property
    def path(self) -> Path:
        return self._path

    def describe(self) -> str:
        return f"sqlite:{self._path}"

    # --- worker thread -------------------------------------------------------------

    def _open(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: transactions are explicit (BEGIN IMMEDIATE), so a batch never
            # shares one with whatever ran before it. ``timeout`` is the busy timeout.
            conn = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise UsageStoreError(f"usage store {self._path}: cannot open: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL cannot corrupt the file; a power cut loses at most the
            # last flushes, which a usage ledger can afford.
            conn.execute("PRAGMA synchronous = NORMAL")
            with _transaction(conn):
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise UsageStoreError(
                        f"usage store {self._path}: schema version {version} is newer "
                        f"than this Corral's ({SCHEMA_VERSION}); upgrade Corral")
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            conn.close()
            raise UsageStoreError(
                f"usage store {self._path}: cannot open: {exc} "
                "(is it a Corral usage database, and is its directory writable?)") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _add(self, batch: list[tuple[UsageKey, Usage]]) -> None:
        usage_rows = [
            (k.day, k.client, k.model, k.tier, u.requests, u.tokens_in, u.tokens_out,
             u.errors, u.total_ms, u.first_byte_ms, u.first_bytes)
            for k, u in batch if _counts(u)]
        refusal_rows = [
            (k.day, k.client, k.model, k.tier, rule, n)
            for k, u in batch for rule, n in u.refusals.items() if n]
        if not usage_rows and not refusal_rows:
            return
        conn = self._connection()
        with _transaction(conn):
            if usage_rows:
                conn.executemany(_ADD_USAGE, usage_rows)
            if refusal_rows:
                conn.executemany(_ADD_REFUSAL, refusal_rows)

    def _query(self, first_day: str, last_day: str,
               client: str | None) -> dict[UsageKey, Usage]:
        conn = self._connection()
        where = "day BETWEEN ? AND ?"
        args: tuple[str, ...] = (first_day, last_day)
        if client is not None:
            where += " AND client = ?"
            args += (client,)
        out: dict[UsageKey, Usage] = {}
        # One read transaction: both tables from the same snapshot, so a flush landing
        # in between cannot show its refusals without its requests.
        with _transaction(conn, "BEGIN"):
            rows: list[_UsageRow] = conn.execute(
                "SELECT day, client, model, tier, " + ", ".join(_COUNTERS)
                + f" FROM usage WHERE {where}", args).fetchall()
            refusals: list[_RefusalRow] = conn.execute(
                "SELECT day, client, model, tier, rule, count "
                f"FROM refusals WHERE {where}", args).fetchall()
        for day, name, model, tier, req, t_in, t_out, err, total, fb_ms, fb in rows:
            out[UsageKey(day, name, model, tier)] = Usage(
                requests=req, tokens_in=t_in, tokens_out=t_out, errors=err,
                total_ms=float(total), first_byte_ms=float(fb_ms), first_bytes=fb)
        for day, name, model, tier, rule, count in refusals:
            usage = out.setdefault(UsageKey(day, name, model, tier), Usage())
            usage.refusals[rule] = count
        return out

    def _prune(self, before_day: str) -> None:
        conn = self._connection()
        with _transaction(conn):
            conn.execute("DELETE FROM usage WHERE day < ?", (before_day,))
            conn.execute("DELETE FROM refusals WHERE day < ?", (before_day,))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UsageStoreError(f"usage store {self._path}: closed")
        return self._conn

    # --- event loop ----------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., _T], *args: object) -> _T:
        if self._closed:
            raise UsageStoreError(f"usage store {self._path}: closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise UsageStoreError(f"usage store {self._path} ({what}): {exc}") from exc

    async def add(self, batch: Mapping[UsageKey, Usage]) -> None:
        """Counted whole or not at all. A caller cancelled while waiting does not stop
        the worker thread: the batch may still be counted."""
        if batch:
            await self._call("add", self._add, list(batch.items()))

    async def query(self, first_day: str, last_day: str,
                    client: str | None = None) -> dict[UsageKey, Usage]:
        return await self._call("query", self._query, first_day, last_day, client)

    async def prune(self, before_day: str) -> None:
        await self._call("prune", self._prune, before_day)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close)
        finally:
            # The queue is empty now (the close ran last), so the thread ends at once.
            self._executor.shutdown(wait=False)


def _counts(usage: Usage) -> bool:
    """Whether the entry carries any counter besides refusals; a row of zeros would
    only make a key appear that the Redis store (which skips zeros) never shows."""
    return bool(usage.requests or usage.tokens_in or usage.tokens_out or usage.errors
                or usage.total_ms or usage.first_byte_ms or usage.first_bytes)


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    # IMMEDIATE takes the write lock up front: a deferred transaction that reads then
    # writes can fail with SQLITE_BUSY at once instead of waiting out the busy timeout.
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
