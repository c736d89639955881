"""Limits end to end, Corral only: who is counted, what the client and the access log
are told, token budgets, and limit state shared through a real Redis.

Rates are slow (r/m) wherever only the order of requests matters, so no decision
depends on timing; where time matters the margins are hundreds of milliseconds.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import Gateway, Sim, backends
from tests.integration.nginx_support import fire, rapid, statuses
from tests.waiting import eventually

SIM_ARGS = ("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant",
            "--parallel", "64")
GEN = "/api/generate"


def seed_rule(name: str = "per_ip", burst: int = 1, **kw: Any) -> dict[str, Any]:
    """10r/m, nodelay: only the order of requests matters, never their timing."""
    return {"name": name, "paths": [GEN], "rate": "10r/m", "burst": burst, "nodelay": True,
            **kw}


@pytest.fixture
def sim(start_sim: Any) -> Sim:
    sim: Sim = start_sim(*SIM_ARGS)
    return sim


@pytest.fixture
def corral(sim: Sim, start_corral: Any) -> Any:
    """``corral(limits, **config)``: a gateway in front of ``sim`` with these limits."""

    def start(limits: Any, **config: Any) -> Gateway:
        gw: Gateway = start_corral({"backends": backends(sim, slots=64),
                                    "queue": {"max_wait": "60s"}, "limits": limits,
                                    **config})
        return gw

    return start


async def gen(s: aiohttp.ClientSession, gw: Gateway, ip: str | None = None,
              key: str | None = None, body: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    """POST /api/generate; the response is read and released."""
    h = dict(headers or {})
    if ip is not None:
        h["X-Forwarded-For"] = ip
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    async with s.post(gw.url + GEN, headers=h, json=body or {
            "model": "llama3.2", "prompt": "x", "stream": False}) as r:
        await r.read()
        return r


def _logged(gw: Gateway) -> int:
    """Records in the access log so far, read without waiting for a flush."""
    if not gw.access_log.exists():
        return 0
    return len(gw.access_log.read_text().splitlines())


async def codes(s: aiohttp.ClientSession, gw: Gateway, n: int, **kw: Any) -> list[int]:
    return [(await gen(s, gw, **kw)).status for _ in range(n)]


TRUST_LOCAL = {"trusted_proxies": ["127.0.0.0/8"]}


# -- who is counted -----------------------------------------------------------------------


async def test_per_ip_budgets_are_separate(corral: Any) -> None:
    gw = corral([seed_rule()], clients=TRUST_LOCAL)
    async with aiohttp.ClientSession() as s:
        assert await codes(s, gw, 3, ip="10.0.0.1") == [200, 200, 429]
        assert await codes(s, gw, 3, ip="10.0.0.2") == [200, 200, 429]
        # Without a trusted proxy's word, the peer's own address is the key.
        assert await codes(s, gw, 3) == [200, 200, 429]
    recs = gw.records()
    assert [(r["client"], r["status"]) for r in recs] == [
        (ip, status) for ip in ("10.0.0.1", "10.0.0.2", "127.0.0.1")
        for status in (200, 200, 429)]


KEYS = [{"name": "alice", "key": "sk-alice"},
        {"name": "bob", "key": "sk-bob"},
        {"name": "vip", "key": "sk-vip", "tier": "premium"}]


async def test_per_key_budget_follows_the_key_across_ips(corral: Any) -> None:
    gw = corral([seed_rule("per_key", key="api_key")], clients=TRUST_LOCAL, keys=KEYS)
    async with aiohttp.ClientSession() as s:
        assert (await gen(s, gw, ip="10.0.0.1", key="sk-alice")).status == 200
        assert (await gen(s, gw, ip="10.0.0.2", key="sk-alice")).status == 200
        assert (await gen(s, gw, ip="10.0.0.3", key="sk-alice")).status == 429
        # Another key from the same address has a budget of its own …
        assert await codes(s, gw, 3, ip="10.0.0.3", key="sk-bob") == [200, 200, 429]
        # … and so has an anonymous client there: its address stands in for a key.
        assert await codes(s, gw, 3, ip="10.0.0.3") == [200, 200, 429]
    refused = [r for r in gw.records() if r["status"] == 429]
    assert [(r["client_name"], r["rule"]) for r in refused] == [
        ("alice", "per_key"), ("bob", "per_key"), (None, "per_key")]


async def test_tiers_select_their_rules(corral: Any) -> None:
    gw = corral([seed_rule("basic_only", burst=0, tiers=["basic"])], keys=KEYS)
    async with aiohttp.ClientSession() as s:
        assert await codes(s, gw, 2) == [200, 429]                    # anonymous: basic
        assert await codes(s, gw, 6, key="sk-vip") == [200] * 6       # premium: no rule
        assert await codes(s, gw, 1, key="sk-alice") == [429]         # basic key, same IP


# -- what the client and the log are told -------------------------------------------------


def _fields(value: str) -> tuple[str, dict[str, int]]:
    name, *params = value.split(";")
    return name, {k: int(v) for k, v in (p.split("=") for p in params)}


async def test_rejection_headers_retry_after_and_log(corral: Any) -> None:
    """30r/m burst=1: a request every 2 s. The refusal says when to come back, and
    coming back then works; RateLimit fields are on accepted and refused answers."""
    gw = corral([{"name": "per_ip", "paths": [GEN], "rate": "30r/m", "burst": 1,
                  "nodelay": True}])
    async with aiohttp.ClientSession() as s:
        first, second, refused = [await gen(s, gw) for _ in range(3)]
        t_refused = time.monotonic()
        assert [first.status, second.status, refused.status] == [200, 200, 429]
        for r in (first, second, refused):
            # quota 1 + burst, over the 4 s it takes to drain
            assert r.headers["RateLimit-Policy"] == '"per_ip";q=2;w=4'
            assert "RateLimit" in r.headers
        assert _fields(first.headers["RateLimit"]) == ('"per_ip"', {"r": 1, "t": 0})
        assert _fields(second.headers["RateLimit"]) == ('"per_ip"', {"r": 0, "t": 2})
        # Excess 1 of burst 1: one more request's worth must drain, 2 s at 30r/m.
        assert refused.headers["Retry-After"] == "2"
        assert _fields(refused.headers["RateLimit"]) == ('"per_ip"', {"r": 0, "t": 2})

        await asyncio.sleep(1.4 - (time.monotonic() - t_refused))
        early = await gen(s, gw)
        assert early.status == 429
        assert early.headers["Retry-After"] == "1"      # 0.6 s left, rounded up
        await asyncio.sleep(2.15 - (time.monotonic() - t_refused))
        assert (await gen(s, gw)).status == 200          # as promised
    recs = gw.records()
    refused_recs = [r for r in recs if r["status"] == 429]
    assert len(refused_recs) == 2
    assert all(r["rule"] == "per_ip" and r["limit"] == "rejected" for r in refused_recs)
    assert all(r.get("rule") is None for r in recs if r["status"] == 200)


async def test_retry_after_is_at_least_one_second_and_status_is_the_rules(
        corral: Any) -> None:
    """10r/s: what is left to wait is well under a second, yet Retry-After says 1; the
    rule's ``status`` (like limit_req_status) is what the refusal answers."""
    gw = corral([{"name": "fast", "paths": [GEN], "rate": "10r/s", "nodelay": True,
                  "status": 503}])
    async with aiohttp.ClientSession() as s:
        r1, r2 = await gen(s, gw), await gen(s, gw)
        assert (r1.status, r2.status) == (200, 503)
        assert r2.headers["Retry-After"] == "1"
        await asyncio.sleep(0.2)        # time under test: 10r/s drains one in 0.1 s
        assert (await gen(s, gw)).status == 200


async def test_dry_run_never_refuses_but_logs_the_decision(corral: Any) -> None:
    """1r/s burst=1 in dry run: the 2nd request would be delayed and the 3rd refused.
    Nothing is held or refused; the access log says what would have happened."""
    gw = corral([{"name": "trial", "paths": [GEN], "rate": "1r/s", "burst": 1,
                  "dry_run": True}])
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            t0 = time.monotonic()
            assert (await gen(s, gw)).status == 200
            assert time.monotonic() - t0 < 0.3                 # never held
    recs = gw.records()
    assert [r["status"] for r in recs] == [200, 200, 200]
    assert [(r.get("rule"), r.get("limit")) for r in recs[1:]] == [
        ("trial", "dry_run_delayed"), ("trial", "dry_run_rejected")]


async def test_dry_run_limit_conn_never_refuses_but_logs_the_decision(
        start_sim: Any, start_corral: Any) -> None:
    """limit_conn 1 in dry run: a second concurrent stream passes, and the access log
    says it would have been refused (nginx: $limit_conn_status REJECTED_DRY_RUN)."""
    slow = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                     "--tps", "10", "--prompt-tps", "0", "--load-time", "0")
    gw = start_corral({"backends": backends(slow, slots=8),
                       "limits": [{"name": "one_stream", "paths": [GEN],
                                   "max_concurrent": 1, "dry_run": True}]})
    async with aiohttp.ClientSession() as s:
        long = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 10}}
        async with s.post(gw.url + GEN, json=long) as first:
            await first.content.readline()
            second = await gen(s, gw, body={**long, "options": {"num_predict": 1}})
            assert second.status == 200
            await first.read()
    recs = gw.records()
    assert [r["status"] for r in recs] == [200, 200]
    decisions = sorted((r.get("rule") or "", r.get("limit") or "") for r in recs)
    assert decisions == [("", ""), ("one_stream", "dry_run_rejected")]


async def test_models_and_methods_select_rules(start_sim: Any, start_corral: Any) -> None:
    """``models`` matches the model however it is spelt (llama3.2 = llama3.2:latest);
    ``methods`` and ``paths`` narrow a rule further."""
    sim = start_sim("--models", "llama3.2:latest,mistral:7b",
                    "--loaded", "llama3.2:latest,mistral:7b", "--instant", "--max-loaded", "2")
    gw = start_corral({"backends": backends(sim, slots=8), "limits": [
        seed_rule("llama_only", burst=0, models=["llama3.2"], paths=[]),
        seed_rule("tags", burst=0, methods=["GET"], paths=["/api/tags"])]})
    llama, latest, mistral = ({"model": m, "prompt": "x", "stream": False}
                              for m in ("llama3.2", "llama3.2:latest", "mistral:7b"))
    async with aiohttp.ClientSession() as s:
        assert (await gen(s, gw, body=llama)).status == 200
        assert (await gen(s, gw, body=latest)).status == 429       # the same model
        assert await codes(s, gw, 3, body=mistral) == [200] * 3
        tags = []
        for _ in range(2):
            async with s.get(gw.url + "/api/tags") as r:
                tags.append(r.status)
        assert tags == [200, 429]
        async with s.get(gw.url + "/api/ps") as r:                 # another path
            assert r.status == 200


# -- concurrency --------------------------------------------------------------------------


async def test_limit_conn_is_released_when_the_client_leaves(start_sim: Any,
                                                             start_corral: Any) -> None:
    slow = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                     "--tps", "5", "--prompt-tps", "0", "--load-time", "0")
    gw = start_corral({"backends": backends(slow, slots=8),
                       "limits": [{"name": "one_stream", "paths": [GEN],
                                   "max_concurrent": 1}]})
    body = {"model": "llama3.2", "prompt": "x", "options": {"num_predict": 200}}  # ~40 s
    async with aiohttp.ClientSession() as s:
        first = await s.post(gw.url + GEN, json=body)
        assert first.status == 200
        await first.content.readline()                 # it is streaming
        second = await gen(s, gw, body=body)
        assert second.status == 429
        first.close()                                  # the client leaves mid-stream
        # Corral logs a request once it has released what it held for it.
        await eventually(lambda: any(r.get("error") == "client closed the request"
                                     for r in gw.records()),
                         "Corral to log the departed client's request")
        t0 = time.monotonic()
        async with s.post(gw.url + GEN, json={**body, "options": {"num_predict": 2}}) as r:
            assert r.status == 200
            await r.read()
        assert time.monotonic() - t0 < 2
    recs = gw.records()
    # The aborted stream had already answered 200 (nginx logs the same); it is marked.
    assert [(r["status"], r.get("error")) for r in recs] == [
        (429, None), (200, "client closed the request"), (200, None)]


# -- token budgets ------------------------------------------------------------------------


async def test_token_budget_refuses_once_spent(corral: Any) -> None:
    """tokens_per_minute: 30. Each answer's prompt_eval_count + eval_count is charged
    after it; a request is admitted while anything is left, the next one is refused
    with the time it takes the budget (0.5 tokens/s) to become positive again."""
    gw = corral([{"name": "tpm", "paths": [GEN], "tokens_per_minute": 30}])
    body = {"model": "llama3.2", "prompt": "x", "stream": False,
            "options": {"num_predict": 10}}
    spent, seen = 0, []
    refusal: aiohttp.ClientResponse | None = None
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(gw.url + GEN, json=body) as r:
                data = await r.json()
                seen.append((spent, r.status))
                if r.status == 200:
                    spent += data["prompt_eval_count"] + data["eval_count"]
                elif refusal is None:
                    refusal = r
            # The charge lands when the answer has ended, before Corral logs it.
            await eventually(lambda n=i + 1: _logged(gw) >= n,
                             f"Corral to log request {i + 1}")
    # Admitted exactly while the budget was not yet spent.
    assert [status for _, status in seen] == [200 if before < 30 else 429
                                              for before, _ in seen], seen
    assert refusal is not None, seen
    retry = int(refusal.headers["Retry-After"])
    debt = spent - 30
    assert retry >= 1 and abs(retry - math.ceil(debt / 0.5)) <= 1, (retry, spent)
    refused = [r for r in gw.records() if r["status"] == 429]
    assert refused and all(r["rule"] == "tpm" for r in refused)


# -- shared state in Redis ----------------------------------------------------------------


async def test_redis_and_memory_decide_alike(sim: Sim, start_corral: Any,
                                             start_redis: Any) -> None:
    """2r/s burst=3 delay=1 in both stores: the same statuses and the same delays."""
    redis = start_redis()
    rules = [{"name": "per_ip", "paths": [GEN], "rate": "2r/s", "burst": 3, "delay": 1}]
    common = {"backends": backends(sim, slots=64), "queue": {"max_wait": "60s"},
              "limits": rules}
    memory = start_corral(common)
    shared = start_corral({**common, "state": redis.url})
    in_memory, in_redis = await fire([memory.url, shared.url], rapid(5, gap=0.01))
    assert {"memory": statuses(in_memory), "redis": statuses(in_redis)} == {
        "memory": [200, 200, 200, 200, 429], "redis": [200, 200, 200, 200, 429]}
    for who, outcomes in (("memory", in_memory), ("redis", in_redis)):
        got = [round(o.latency, 3) for o in outcomes]
        for latency, want in zip(got, [0, 0, 0.5, 1.0, 0], strict=True):
            assert want - 0.08 <= latency <= want + 0.25, (who, got)


async def test_two_gateways_share_one_limit_through_redis(sim: Sim, start_corral: Any,
                                                          start_redis: Any) -> None:
    redis = start_redis()
    config = {"backends": backends(sim, slots=64), "state": redis.url,
              "limits": [seed_rule(burst=3)]}
    a, b = start_corral(config), start_corral(config)
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(gen(s, gw) for gw in [a, b] * 5))
    assert sorted(r.status for r in results) == [200] * 4 + [429] * 6
    # Both gateways took part in admitting and in refusing.
    logged = [rec["status"] for gw in (a, b) for rec in gw.records()]
    assert sorted(logged) == [200] * 4 + [429] * 6


@pytest.mark.parametrize(("policy", "after"), [("allow", 200), ("deny", 503)])
async def test_redis_lost_mid_run(sim: Sim, start_corral: Any, start_redis: Any,
                                  policy: str, after: int) -> None:
    redis = start_redis()
    gw = start_corral({"backends": backends(sim, slots=64), "state": redis.url,
                       "queue": {"slot_lease": "3s"},
                       "limits": {"on_store_error": policy, "rules": [seed_rule()]}})
    # The only replica, for a whole lease: should the store go away, every slot is its.
    await eventually(lambda: gw.status()["shared"]["sole"],
                     "the replica to know it is the only one")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        assert await codes(s, gw, 3) == [200, 200, 429]
        redis.kill()
        for _ in range(4):
            t0 = time.monotonic()
            r = await gen(s, gw)
            assert r.status == after
            assert time.monotonic() - t0 < 3          # fails fast, never hangs
            if after == 503:
                assert r.headers["Retry-After"] == "1"
        async with s.get(gw.url + "/healthz") as h:
            assert h.status == 200
    assert gw.proc.poll() is None
    recs = gw.records()
    if after == 503:
        assert [r.get("limit") for r in recs[3:]] == ["store_error"] * 4
    assert re.search(r"limit store unavailable", gw.log.read_text())


@pytest.mark.parametrize(("policy", "expected"), [("allow", 200), ("deny", 503)])
async def test_redis_unreachable_from_the_start(sim: Sim, start_corral: Any, policy: str,
                                                expected: int) -> None:
    """Redis down before Corral starts: Corral starts anyway, applies on_store_error,
    and warns once per outage, not once per request."""
    from tests.integration.conftest import free_port

    gw = start_corral({"backends": backends(sim, slots=8),
                       "state": f"redis://127.0.0.1:{free_port()}/0",
                       "limits": {"on_store_error": policy, "rules": [seed_rule()]}})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        assert await codes(s, gw, 4) == [expected] * 4
    assert gw.proc.poll() is None
    assert len(re.findall(r"limit store unavailable", gw.log.read_text())) == 1
