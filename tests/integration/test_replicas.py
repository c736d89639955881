"""Several Corral replicas on one Redis behave as one gateway: real processes, a real
redis-server started for the test, stand-in backends."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.integration.conftest import Gateway, backends
from tests.waiting import eventually, wait_until

M1 = "llama3.2:latest"
KEYS = [{"name": "alice", "key": "sk-alice", "tier": "premium"},
        {"name": "hog", "key": "sk-hog", "tier": "basic"},
        {"name": "light", "key": "sk-light", "tier": "basic"},
        {"name": "nightly", "key": "sk-nightly", "tier": "batch"}]


async def generate(s: aiohttp.ClientSession, gw: Gateway, tokens: int,
                   key: str | None = None, stream: bool = False) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.monotonic()
    async with s.post(gw.url + "/api/generate", headers=headers, json={
            "model": "llama3.2", "prompt": "p", "stream": stream,
            "options": {"num_predict": tokens}}) as r:
        raw = await r.read()
        body = orjson.loads(raw.splitlines()[-1]) if raw.strip() else {}
        body["_status"] = r.status
        body["_headers"] = dict(r.headers)
    body["_done_at"] = time.monotonic()
    body["_took"] = body["_done_at"] - started
    return body


async def running(sim: Any, count: int) -> None:
    """Until the stand-in runs ``count`` requests."""
    await eventually(lambda: sim.stats()["in_flight"] == count,
                     f"the stand-in to run {count} request(s)")


async def arrived(sim: Any, gws: list[Gateway], count: int) -> None:
    """Until ``count`` requests have reached the shared queue: waiting there, running
    or done at the stand-in (a fresh one, that serves only this test)."""
    def seen() -> bool:
        # The stand-in first: a request leaving the queue meanwhile is then counted in
        # neither reading, never in both.
        stats = sim.stats()
        served = stats["in_flight"] + stats["completed"]
        waiting = sum(s["waiting"] for s in (g.status()["shared"] for g in gws)
                      if s["leading"])
        return served + waiting >= count

    await eventually(seen, f"{count} request(s) to reach the shared queue")


async def all_shared(gws: list[Gateway], what: str, holds: Callable[[Any], bool]) -> None:
    """Until ``holds`` is true of every replica's shared-state status."""
    await eventually(lambda: all(holds(g.status()["shared"]) for g in gws), what)


def replicas(start_corral: Any, redis_url: str, sims: list[Any], n: int, slots: int,
             **extra: Any) -> list[Gateway]:
    config = {"state": redis_url, "backends": backends(*sims, slots=slots), "keys": KEYS,
              "queue": {"max_wait": "60s"}, **extra}
    return [start_corral(config) for _ in range(n)]


async def test_the_slot_cap_holds_at_the_backend_under_load_from_every_replica(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    # The stand-in would run four at once; Corral's cap is one slot, on all replicas.
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "4", "--tps", "200")
    gws = replicas(start_corral, redis.url, [sim], 3, slots=1)
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(*(generate(s, gws[i % 3], 20) for i in range(18)))
    assert all(a["_status"] == 200 and a["done"] for a in answers), answers
    stats = sim.stats()
    assert stats["completed"] == 18
    assert stats["max_in_flight"] == 1


async def test_a_high_class_job_on_one_replica_goes_before_low_class_work_waiting_on_another(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "1", "--tps", "100")
    a, b = replicas(start_corral, redis.url, [sim], 2, slots=1)
    async with aiohttp.ClientSession() as s:
        # Streamed: once it streams, low-class work is not stopped (no preemption here,
        # only the order of the waiting ones).
        batch = [asyncio.create_task(generate(s, a, 60, "sk-nightly", stream=True))
                 for _ in range(4)]
        await arrived(sim, [a, b], 4)      # one runs (0.6 s), three wait (queued through A)
        person = await generate(s, b, 5, "sk-alice")
        done = await asyncio.gather(*batch)
    assert person["_status"] == 200 and all(d["_status"] == 200 for d in done)
    finished = sorted(d["_done_at"] for d in done)
    # The person went right after the batch request that was running.
    assert finished[0] < person["_done_at"] < finished[1]


async def test_a_client_flooding_two_replicas_gets_one_share(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "1", "--tps", "200")
    a, b = replicas(start_corral, redis.url, [sim], 2, slots=1)
    order: list[str] = []
    async with aiohttp.ClientSession() as s:
        async def run(tag: str, gw: Gateway, key: str) -> None:
            answer = await generate(s, gw, 10, key)
            assert answer["_status"] == 200
            order.append(tag)

        hog = [asyncio.create_task(run(f"hog{i}", (a, b)[i % 2], "sk-hog"))
               for i in range(12)]
        await arrived(sim, [a, b], len(hog))
        light = [asyncio.create_task(run(f"light{i}", a, "sk-light")) for i in range(2)]
        await asyncio.gather(*hog, *light)
    # As with one replica: the light client alternates with the hog instead of
    # waiting behind both replicas' backlog.
    first, second = order.index("light0"), order.index("light1")
    assert second - first <= 2, order
    assert len(order) - 1 - second >= 4, order


async def test_a_killed_replicas_slot_comes_back_within_the_lease(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "2", "--tps", "50")
    a, b = replicas(start_corral, redis.url, [sim], 2, slots=1,
                    **{"queue": {"max_wait": "60s", "slot_lease": "3s"}})
    async with aiohttp.ClientSession() as s:
        doomed = asyncio.create_task(generate(s, a, 500, "sk-hog"))      # 10 s
        await running(sim, 1)
        a.proc.kill()                  # SIGKILL: no release, no goodbye
        killed_at = time.monotonic()
        with contextlib.suppress(aiohttp.ClientError):
            await doomed
        answer = await generate(s, b, 5, "sk-light")
    assert answer["_status"] == 200
    waited = answer["_done_at"] - killed_at
    # The lease (3 s) lapses, unrenewed; the slot is free again then, not later.
    assert waited < 3.0 + 1.5, waited
    assert sim.stats()["max_in_flight"] <= 1


async def test_when_the_leader_dies_another_replica_orders_the_queue(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "1", "--tps", "100")
    a, b = replicas(start_corral, redis.url, [sim], 2, slots=1)
    await all_shared([a, b], "both replicas to know the leader", lambda s: s["leader"])
    lead, other = (a, b) if a.status()["shared"]["leading"] else (b, a)
    assert other.status()["shared"]["leader"] == lead.status()["shared"]["replica"]
    async with aiohttp.ClientSession() as s:
        first_task = asyncio.create_task(generate(s, other, 100, "sk-hog"))   # 1 s
        await running(sim, 1)
        second_task = asyncio.create_task(generate(s, other, 5, "sk-light"))
        await arrived(sim, [lead], 2)
        lead.proc.kill()
        first, second = await asyncio.gather(first_task, second_task)
    assert first["_status"] == 200 and second["_status"] == 200
    assert other.status()["shared"]["leading"] is True
    # The dead replica drops out of the list once its heartbeat lapses.
    me = other.status()["shared"]["replica"]

    def only_me() -> list[dict[str, Any]] | None:
        listed: list[dict[str, Any]] = other.status()["shared"]["replicas"]
        return listed if [r["id"] for r in listed] == [me] else None

    listed = await eventually(only_me, "the dead replica to drop out of the list")
    assert listed[0]["address"] == f"127.0.0.1:{other.port}" and listed[0]["seen"] > 0


def _redis_on(port: int, log: Any) -> subprocess.Popen[bytes]:
    import shutil

    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port",
                             str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)
    wait_until(lambda: _accepts(port), f"redis-server to listen again on port {port}")
    return proc


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(("policy", "during"), [("allow", 200), ("deny", 503)])
async def test_redis_restarted_mid_run(start_sim: Any, start_corral: Any, start_redis: Any,
                                       tmp_path: Any, policy: str, during: int) -> None:
    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "8", "--tps", "200")
    gws = replicas(start_corral, redis.url, [sim], 2, slots=2,
                   **{"queue": {"max_wait": "60s", "on_store_error": policy}})
    await all_shared(gws, "each replica to know of the other",
                     lambda s: len(s["replicas"]) == 2)
    async with aiohttp.ClientSession() as s:
        before = await asyncio.gather(*(generate(s, gws[i % 2], 10) for i in range(6)))
        assert [a["_status"] for a in before] == [200] * 6
        # One long request through each replica: each holds one of the two slots when
        # Redis goes away.
        long = [asyncio.create_task(generate(s, g, 600)) for g in gws]     # 3 s each
        await running(sim, 2)
        redis.kill()
        await all_shared(gws, "both replicas to notice the outage (heartbeats fail)",
                         lambda s: s["store"] == "unavailable")
        # Under allow, each carries on with the slot it holds: the requests sent now
        # run there once the long ones end — never more than the two slots at once.
        outage = await asyncio.gather(*(generate(s, gws[i % 2], 10) for i in range(8)))
        assert {a["_status"] for a in outage} == {during}
        assert [x["_status"] for x in await asyncio.gather(*long)] == [200, 200]
        restarted = _redis_on(redis.port, tmp_path / "redis-again.log")
        try:
            await all_shared(gws, "both replicas to share again (heartbeats succeed)",
                             lambda s: s["store"] == "ok" and not s["alone"])
            after = await asyncio.gather(*(generate(s, gws[i % 2], 10) for i in range(8)))
            assert [a["_status"] for a in after] == [200] * 8
            statuses = [g.status()["shared"] for g in gws]
            # Read before this Redis stops too: that would be a second outage.
            logs = [g.log.read_text() for g in gws]
        finally:
            restarted.kill()
            restarted.wait()
    # Never more at the backend than its slots, before, during or after the outage.
    assert sim.stats()["max_in_flight"] <= 2
    assert all(st["store"] == "ok" and st["outages"] == 1 and not st["alone"]
               for st in statuses)
    for log in logs:
        assert log.count("shared slot store unavailable") == 1, log
        assert log.count("shared slot store is back") == 1, log
    if during == 503:
        assert all("cannot be reached" in a["error"] for a in outage)


async def test_replicas_with_another_configuration_are_named_loudly(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--instant")
    a = start_corral({"state": redis.url, "backends": backends(sim, slots=2), "keys": KEYS})
    b = start_corral({"state": redis.url, "backends": backends(sim, slots=2), "keys": KEYS,
                      "limits": [{"name": "per-ip", "key": "ip", "rate": "10r/s"}]})
    c = start_corral({"state": redis.url, "backends": backends(sim, slots=2), "keys": KEYS})
    await all_shared([a, b, c], "each replica to know of the other two",
                     lambda s: len(s["replicas"]) == 3)
    # A heartbeat after that compares their configurations: B differs from A and C.
    odd = b.status()["shared"]["replica"]
    await all_shared([a, b, c], "each replica to name the ones configured otherwise",
                     lambda s: len(s["config_mismatch"]) == (2 if s["replica"] == odd else 1))
    ids = {g.status()["shared"]["replica"] for g in (a, b, c)}
    sa, sb, sc = (g.status()["shared"] for g in (a, b, c))
    assert sa["config"] == sc["config"] != sb["config"]
    assert sa["config_mismatch"] == [sb["replica"]] == sc["config_mismatch"]
    assert sorted(sb["config_mismatch"]) == sorted([sa["replica"], sc["replica"]])
    assert f"replica {sb['replica']} runs another configuration" in a.log.read_text()
    async with aiohttp.ClientSession() as s, s.get(a.url + "/metrics") as r:
        assert "corral_replica_config_mismatch 1.0" in await r.text()
    assert len(ids) == 3


def _tls_redis(tmp_path: Any, password: str) -> tuple[subprocess.Popen[bytes], int, Any]:
    """A redis-server that speaks only TLS and wants a password; its CA certificate."""
    import shutil

    from tests.integration.conftest import free_port

    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to make the test's certificates"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=tmp_path, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
        "ca.crt", "-days", "2", "-subj", "/CN=corral-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
        "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port",
         str(port), "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--requirepass",
         password, "--save", "", "--appendonly", "no"], cwd=tmp_path,
        stdout=(tmp_path / "redis-tls.log").open("wb"), stderr=subprocess.STDOUT)
    wait_until(lambda: _accepts(port), f"redis-server to listen (TLS) on port {port}")
    return proc, port, tmp_path / "ca.crt"


async def test_replicas_on_a_redis_with_a_password_over_tls(
        start_sim: Any, start_corral: Any, tmp_path: Any) -> None:
    proc, port, ca = _tls_redis(tmp_path, "s3cret")
    try:
        url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "4", "--tps", "200")
        gws = replicas(start_corral, url, [sim], 2, slots=1)
        async with aiohttp.ClientSession() as s:
            answers = await asyncio.gather(*(generate(s, gws[i % 2], 20) for i in range(8)))
        assert all(a["_status"] == 200 for a in answers)
        assert sim.stats()["max_in_flight"] == 1
        assert all(g.status()["shared"]["store"] == "ok" for g in gws)
        # The password never shows: not in the status, not in the log.
        assert "s3cret" not in str(gws[0].status()) and "s3cret" not in gws[0].log.read_text()
    finally:
        proc.kill()
        proc.wait()


async def test_a_late_release_after_a_pause_is_ignored_and_logged(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    """A replica paused longer than the lease (SIGSTOP) loses its slot to another; when
    it wakes up, neither its release nor its renewal may free the slot the other one
    now holds."""
    import signal

    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "4", "--tps", "100")
    a, b = replicas(start_corral, redis.url, [sim], 2, slots=1,
                    **{"queue": {"max_wait": "60s", "slot_lease": "3s"}})
    async with aiohttp.ClientSession() as s:
        paused = asyncio.create_task(generate(s, a, 150, "sk-hog"))        # 1.5 s
        await running(sim, 1)
        a.proc.send_signal(signal.SIGSTOP)
        # A's lease lapses while it sleeps: B takes the slot (its request starts).
        taker = asyncio.create_task(generate(s, b, 500, "sk-light"))       # 5 s

        def b_started() -> bool:
            st = sim.stats()
            # A's request has ended at the backend, and B's has started there.
            return bool(st["completed"] >= 1 and st["in_flight"] >= 1)

        await eventually(b_started, lambda: f"B's request to start: {sim.stats()}")
        a.proc.send_signal(signal.SIGCONT)
        first = await paused              # A's request ends; its release is late
        third = asyncio.create_task(generate(s, a, 5, "sk-alice"))
        second = await taker
        done = await third
    assert first["_status"] == second["_status"] == done["_status"] == 200
    # B's slot was not freed by A's late release or renewal: the third request
    # started only once B's had ended.
    assert done["_done_at"] > second["_done_at"]
    shared = a.status()["shared"]
    # A woke up to a lapsed lease: either its release came late (ignored), or its
    # renewal found the lease gone first and recorded it again — never dropped.
    assert shared["late_releases"] + shared["leases_lost"] >= 1, shared
    log = a.log.read_text()
    assert ("late release of a slot on b0 ignored" in log
            or "had lapsed (a pause longer than 3s?): recorded again" in log), log


async def test_a_person_on_one_replica_preempts_batch_work_running_on_another(
        start_sim: Any, start_corral: Any, start_redis: Any) -> None:
    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "1", "--tps", "100")
    a, b = replicas(start_corral, redis.url, [sim], 2, slots=1)
    async with aiohttp.ClientSession() as s:
        batch = asyncio.create_task(generate(s, a, 200, "sk-nightly"))   # 2 s, not streamed
        await running(sim, 1)
        person = await generate(s, b, 10, "sk-alice")
        done = await batch
    assert person["_status"] == done["_status"] == 200
    assert person["_done_at"] < done["_done_at"]
    assert done["done"] is True and done["eval_count"] == 200       # a whole answer
    [run] = [r for r in a.records() if r.get("client_name") == "nightly"]
    assert run["preemptions"] == 1
    assert sim.stats()["cancelled"] == 1 and sim.stats()["max_in_flight"] == 1


async def test_a_quick_redis_restart_never_gives_a_running_requests_slot_again(
        start_sim: Any, start_corral: Any, start_redis: Any, tmp_path: Any) -> None:
    """Redis killed and started again at once (its data gone) while a request runs: the
    pooled connections' one retry hides the outage, but the store's new epoch does
    not — the replica records its running lease again, and no other request gets
    that slot while it runs; then the full capacity is back."""
    redis = start_redis()
    sim = start_sim("--models", M1, "--loaded", M1, "--parallel", "4", "--tps", "100")
    a, b = replicas(start_corral, redis.url, [sim], 2, slots=1,
                    **{"queue": {"max_wait": "10s"}})
    async with aiohttp.ClientSession() as s:
        long = asyncio.create_task(generate(s, a, 300, "sk-hog"))          # 3 s
        await running(sim, 1)
        redis.kill()
        restarted = _redis_on(redis.port, tmp_path / "redis-again.log")
        try:
            second = await generate(s, b, 5, "sk-light")
            first = await long
            after = await asyncio.gather(*(generate(s, (a, b)[i % 2], 5) for i in range(4)))
            shared = a.status()["shared"]
        finally:
            restarted.kill()
            restarted.wait()
    assert first["_status"] == 200
    # Sent while the store came back: answered, or refused in a way clients retry.
    assert second["_status"] == 200 or (second["_status"] == 503
                                        and "Retry-After" in second["_headers"]), second
    assert [x["_status"] for x in after] == [200] * 4
    # The backend never ran two at once: the running request's slot was not given again.
    assert sim.stats()["max_in_flight"] == 1
    assert shared["rejoins"] >= 1 and shared["store"] == "ok"
