"""The UsageStore contract: the same tests against the SQLite and the Redis store,
then what only one of them promises (opening a file; key expiry and pruning in
Redis).

Each test gets a fresh place to store in: a file under its ``tmp_path``, or a key
prefix of its own on the one Redis server of the run. "Restart" means closing a
store and opening a new one on the same place.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.usage.redis import RedisUsageStore
from corral.usage.sqlite import SqliteUsageStore
from corral.usage.store import Usage, UsageKey, UsageStore, UsageStoreError
from tests.contract.conftest import _free_port

DAY = "2024-03-01"


class Stores:
    """Opens stores of one kind, each on a fresh place or again on an old one, and
    closes them all when the test ends."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None) -> None:
        self.kind = kind
        self._tmp = tmp_path
        self._url = redis_url
        self._open: list[UsageStore] = []

    def fresh(self) -> str:
        if self.kind == "sqlite":
            return str(self._tmp / f"{uuid.uuid4().hex}" / "usage.sqlite3")
        return f"test:{uuid.uuid4().hex}:usage:"

    def open(self, place: str) -> UsageStore:
        store: UsageStore
        if self.kind == "sqlite":
            store = SqliteUsageStore(place)
        else:
            assert self._url is not None
            store = RedisUsageStore.from_url(self._url, prefix=place)
        self._open.append(store)
        return store

    async def close_all(self) -> None:
        for store in self._open:
            await store.close()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    opened = Stores(request.param, tmp_path, url)
    try:
        yield opened
    finally:
        await opened.close_all()


@pytest.fixture
def place(stores: Stores) -> str:
    return stores.fresh()


@pytest.fixture
def store(stores: Stores, place: str) -> UsageStore:
    return stores.open(place)


def key(day: str = DAY, client: str = "alice", model: str = "llama3.2",
        tier: str = "free") -> UsageKey:
    return UsageKey(day, client, model, tier)


def full(n: int = 1) -> Usage:
    """Every counter set, so a counter a store drops or swaps shows."""
    return Usage(requests=3 * n, tokens_in=120 * n, tokens_out=45 * n, errors=n,
                 total_ms=812.25 * n, first_byte_ms=101.5 * n, first_bytes=2 * n,
                 refusals={"rate": 4 * n, "quota:daily": n})


def assert_same(actual: Mapping[UsageKey, Usage], expected: Mapping[UsageKey, Usage]) -> None:
    assert sorted(actual) == sorted(expected)
    for k, want in expected.items():
        got = actual[k]
        assert (got.requests, got.tokens_in, got.tokens_out, got.errors, got.first_bytes) \
            == (want.requests, want.tokens_in, want.tokens_out, want.errors,
                want.first_bytes), k
        assert got.total_ms == pytest.approx(want.total_ms), k
        assert got.first_byte_ms == pytest.approx(want.first_byte_ms), k
        assert got.refusals == want.refusals, k


# --- the contract ------------------------------------------------------------------


async def test_query_returns_what_was_added(store: UsageStore) -> None:
    batch = {key(): full(), key(client="bob", tier="paid"): Usage(requests=1, tokens_in=7)}
    await store.add(batch)
    assert_same(await store.query(DAY, DAY), batch)


async def test_a_key_with_only_refusals_is_kept(store: UsageStore) -> None:
    await store.add({key(model=""): Usage(refusals={"ip-deny": 2})})
    assert_same(await store.query(DAY, DAY), {key(model=""): Usage(refusals={"ip-deny": 2})})


async def test_adds_to_one_key_sum(store: UsageStore) -> None:
    await store.add({key(): full()})
    await store.add({key(): Usage(requests=1, total_ms=0.125, first_byte_ms=0.5,
                                  refusals={"rate": 1, "tokens": 6})})
    await store.add({key(): full(2)})
    want = full(3)
    want.requests += 1
    want.total_ms += 0.125
    want.first_byte_ms += 0.5
    want.refusals = {"rate": 13, "quota:daily": 3, "tokens": 6}
    assert_same(await store.query(DAY, DAY), {key(): want})


async def test_query_range_is_inclusive(store: UsageStore) -> None:
    days = ["2023-12-30", "2023-12-31", "2024-01-01", "2024-02-28", "2024-02-29",
            "2024-03-01", "2024-03-02"]
    await store.add({key(day=d): Usage(requests=i + 1) for i, d in enumerate(days)})
    got = await store.query("2023-12-31", "2024-03-01")
    assert sorted(k.day for k in got) == days[1:6]
    assert {k.day: u.requests for k, u in got.items()}["2024-02-29"] == 5
    assert sorted(k.day for k in await store.query("2024-02-29", "2024-02-29")) \
        == ["2024-02-29"]
    assert await store.query("2024-03-03", "2024-12-31") == {}
    assert await store.query("2024-03-02", "2024-03-01") == {}


async def test_an_open_ended_range_finds_today(store: UsageStore) -> None:
    today = datetime.now(UTC).date().isoformat()
    await store.add({key(day=today): Usage(requests=2)})
    assert_same(await store.query("2000-01-01", "9999-12-31"),
                {key(day=today): Usage(requests=2)})


async def test_query_by_client(store: UsageStore) -> None:
    await store.add({key(client="alice"): Usage(requests=1),
                     key(client="alice", day="2024-03-02"): Usage(requests=2),
                     key(client="bob"): Usage(requests=3),
                     key(client="alice2"): Usage(requests=4)})
    assert_same(await store.query(DAY, "2024-03-02", client="alice"),
                {key(client="alice"): Usage(requests=1),
                 key(client="alice", day="2024-03-02"): Usage(requests=2)})
    assert_same(await store.query(DAY, DAY, client="bob"), {key(client="bob"): Usage(requests=3)})
    assert await store.query(DAY, "2024-03-02", client="carol") == {}


async def test_model_and_tier_keep_keys_apart(store: UsageStore) -> None:
    batch = {key(model="a", tier="t"): Usage(requests=1),
             key(model="b", tier="t"): Usage(requests=2),
             key(model="a", tier="u"): Usage(requests=4),
             key(model="", tier=""): Usage(requests=8)}
    await store.add(batch)
    assert_same(await store.query(DAY, DAY), batch)


ODD_NAMES = ["team:a/b|c", "名前 ü", "with space", "", "10.0.0.7", "::1",
             '["a","b"]', 'quote"back\\slash', "refused:rate", "\x1f\t\n", "*?[x]"]


async def test_odd_names_round_trip(store: UsageStore) -> None:
    batch = {key(client=name, model=ODD_NAMES[-1 - i], tier=name[::-1]):
             Usage(requests=i + 1, refusals={name: i + 1} if name else {})
             for i, name in enumerate(ODD_NAMES)}
    await store.add(batch)
    assert_same(await store.query(DAY, DAY), batch)
    for name in ODD_NAMES:
        assert_same(await store.query(DAY, DAY, client=name),
                    {k: u for k, u in batch.items() if k.client == name})


async def test_prune_forgets_the_days_before(store: UsageStore) -> None:
    days = ["2024-02-27", "2024-02-28", "2024-02-29", "2024-03-01"]
    await store.add({key(day=d): full() for d in days})
    await store.prune("2024-02-29")
    assert sorted(k.day for k in await store.query("2000-01-01", "2024-12-31")) \
        == ["2024-02-29", "2024-03-01"]
    assert (await store.query("2024-02-29", "2024-02-29"))[key(day="2024-02-29")].refusals \
        == full().refusals
    await store.prune("2024-01-01")
    assert len(await store.query("2000-01-01", "2024-12-31")) == 2


async def test_figures_survive_a_restart(stores: Stores, place: str) -> None:
    first = stores.open(place)
    await first.add({key(): full(), key(client="bob"): Usage(errors=1)})
    await first.close()
    second = stores.open(place)
    assert_same(await second.query(DAY, DAY), {key(): full(), key(client="bob"): Usage(errors=1)})
    await second.add({key(): full()})
    assert_same(await second.query(DAY, DAY, client="alice"), {key(): full(2)})


async def test_two_stores_adding_at_once_sum_exactly(stores: Stores, place: str) -> None:
    a, b = stores.open(place), stores.open(place)
    rounds = 40

    async def flush(store: UsageStore, i: int) -> None:
        await store.add({key(): Usage(requests=1, total_ms=0.5, refusals={"rate": 1}),
                         key(day="2024-03-02", client=f"c{i % 3}"): Usage(tokens_out=i)})

    await asyncio.gather(*(flush(s, i) for i in range(rounds) for s in (a, b)))
    want = {key(): Usage(requests=2 * rounds, total_ms=rounds * 1.0,
                         refusals={"rate": 2 * rounds})}
    for c in range(3):
        want[key(day="2024-03-02", client=f"c{c}")] = Usage(
            tokens_out=2 * sum(i for i in range(rounds) if i % 3 == c))
    assert_same(await a.query(DAY, "2024-03-02"), want)
    assert_same(await b.query(DAY, "2024-03-02"), want)


async def test_an_empty_batch_changes_nothing(store: UsageStore) -> None:
    await store.add({})
    assert await store.query("2000-01-01", "2099-12-31") == {}
    # Zeros are not usage: a key never shows up for them.
    await store.add({key(): Usage(refusals={"rate": 0})})
    assert await store.query(DAY, DAY) == {}
    await store.add({key(): full()})
    await store.add({})
    await store.add({key(): Usage()})
    assert_same(await store.query(DAY, DAY), {key(): full()})


_days = st.sampled_from(["2024-02-28", "2024-02-29", "2024-03-01"])
_keys = st.builds(UsageKey, _days, st.sampled_from(["alice", "bob:2", "10.0.0.7"]),
                  st.sampled_from(["", "llama3.2", "org/m:7b"]),
                  st.sampled_from(["free", "paid"]))
_counts = st.integers(0, 1000)
_ms = st.floats(0, 1000, allow_nan=False, allow_infinity=False)
_usage = st.builds(Usage, requests=_counts, tokens_in=_counts, tokens_out=_counts,
                   errors=_counts, total_ms=_ms, first_byte_ms=_ms, first_bytes=_counts,
                   refusals=st.dictionaries(st.sampled_from(["rate", "quota", "ip"]), _counts,
                                            max_size=2))
_batches = st.lists(st.dictionaries(_keys, _usage, max_size=4), max_size=6)


def python_sum(batches: list[dict[UsageKey, Usage]]) -> dict[UsageKey, Usage]:
    total: dict[UsageKey, Usage] = {}
    for batch in batches:
        for k, u in batch.items():
            total.setdefault(k, Usage()).add(u)
    for u in total.values():
        u.refusals = {rule: n for rule, n in u.refusals.items() if n}
    return {k: u for k, u in total.items() if u != Usage()}


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batches=_batches)
async def test_any_batches_sum_like_python(stores: Stores,
                                           batches: list[dict[UsageKey, Usage]]) -> None:
    # A fresh place per example: the fixture is shared by all of them.
    store = stores.open(stores.fresh())
    try:
        for batch in batches:
            await store.add(batch)
        want = python_sum(batches)
        assert_same(await store.query("2024-02-28", "2024-03-01"), want)
        assert_same(await store.query("2024-02-29", "2024-02-29", client="bob:2"),
                    {k: u for k, u in want.items()
                     if k.day == "2024-02-29" and k.client == "bob:2"})
    finally:
        await store.close()


# --- SQLite only -------------------------------------------------------------------


def test_sqlite_under_a_regular_file_fails_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a directory")
    path = tmp_path / "plain" / "usage.sqlite3"
    with pytest.raises(UsageStoreError) as caught:
        SqliteUsageStore(path)
    assert str(path) in str(caught.value)


def test_sqlite_on_a_directory_fails_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(UsageStoreError) as caught:
        SqliteUsageStore(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_sqlite_on_a_file_that_is_no_database_fails_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    path.write_bytes(b"this is a text file, not a database\n" * 200)
    with pytest.raises(UsageStoreError) as caught:
        SqliteUsageStore(path)
    assert str(path) in str(caught.value)
    assert "not a database" in str(caught.value)


def test_sqlite_from_a_newer_schema_fails(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(UsageStoreError, match="schema version 99"):
        SqliteUsageStore(path)


async def test_sqlite_creates_missing_directories_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "usage.sqlite3"
    store = SqliteUsageStore(path)
    try:
        await store.add({key(): Usage(requests=1)})
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        finally:
            conn.close()
    finally:
        await store.close()


async def test_sqlite_stores_on_one_file_sum_exactly(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    sharing = [SqliteUsageStore(path) for _ in range(3)]
    try:
        await asyncio.gather(*(s.add({key(): Usage(requests=1, first_byte_ms=0.25),
                                      key(tier=f"t{i % 2}"): Usage(tokens_in=1)})
                               for i in range(60) for s in sharing))
        assert_same(await sharing[0].query(DAY, DAY),
                    {key(): Usage(requests=180, first_byte_ms=45.0),
                     key(tier="t0"): Usage(tokens_in=90), key(tier="t1"): Usage(tokens_in=90)})
    finally:
        for s in sharing:
            await s.close()


async def test_sqlite_refuses_work_once_closed(tmp_path: Path) -> None:
    store = SqliteUsageStore(tmp_path / "usage.sqlite3")
    await store.close()
    await store.close()
    with pytest.raises(UsageStoreError, match="closed"):
        await store.add({key(): Usage(requests=1)})


# --- Redis only --------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_day_keys_expire_after_keep_days(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:usage:"
    store = RedisUsageStore.from_url(redis_url, prefix=prefix, keep_days=10)
    try:
        await store.add({key(): Usage(requests=1), key(day="2024-03-02"): Usage(errors=1)})
        for day in (DAY, "2024-03-02"):
            ttl = await store.client.ttl(prefix + day)
            assert 12 * 86_400 - 60 < ttl <= 12 * 86_400
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_range_stops_where_keys_cannot_exist(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:usage:"
    store = RedisUsageStore.from_url(redis_url, prefix=prefix, keep_days=10)
    today = datetime.now(UTC).date()
    old, recent = (today - timedelta(days=20)).isoformat(), (today - timedelta(days=5)).isoformat()
    try:
        # A day this old would have expired by now had it been written on its day.
        await store.add({key(day=old): Usage(requests=1), key(day=recent): Usage(requests=2)})
        assert_same(await store.query("2000-01-01", "9999-12-31"),
                    {key(day=recent): Usage(requests=2)})
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_prune_touches_only_its_day_keys(redis_url: str) -> None:
    base = f"test:{uuid.uuid4().hex}:"
    prefix = base + "u[1]*?:"
    store = RedisUsageStore.from_url(redis_url, prefix=prefix)
    neighbour = RedisUsageStore.from_url(redis_url, prefix=base + "u1x:")
    try:
        await store.add({key(day="2024-01-01"): Usage(requests=1), key(): Usage(requests=2)})
        await neighbour.add({key(day="2024-01-01"): Usage(requests=3)})
        await store.client.set(prefix + "notes", "kept")
        await store.prune(DAY)
        assert_same(await store.query("2024-01-01", DAY), {key(): Usage(requests=2)})
        assert_same(await neighbour.query("2024-01-01", "2024-01-01"),
                    {key(day="2024-01-01"): Usage(requests=3)})
        assert await store.client.get(prefix + "notes") == b"kept"
    finally:
        await store.client.delete(prefix + "notes")
        await store.close()
        await neighbour.close()


@pytest.mark.redis
async def test_redis_ignores_fields_it_did_not_write(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:usage:"
    store = RedisUsageStore.from_url(redis_url, prefix=prefix)
    try:
        await store.add({key(): Usage(requests=1)})
        await store.client.hset(prefix + DAY, mapping={
            "plain": "1", '["a","b"]': "2", '["bob","m","t","future_counter"]': "3"})
        assert_same(await store.query(DAY, DAY), {key(): Usage(requests=1)})
    finally:
        await store.close()


async def test_redis_unreachable_raises_usage_store_error() -> None:
    store = RedisUsageStore.from_url(f"redis://127.0.0.1:{_free_port()}/0", timeout_s=0.5)
    try:
        with pytest.raises(UsageStoreError, match=r"\(add\)"):
            await store.add({key(): Usage(requests=1)})
        with pytest.raises(UsageStoreError, match=r"\(query\)"):
            await store.query(DAY, DAY)
        with pytest.raises(UsageStoreError, match=r"\(prune\)"):
            await store.prune(DAY)
    finally:
        await store.close()
