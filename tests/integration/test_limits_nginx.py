"""Differential tests: the same limits in a real nginx and in Corral, the same requests
at the same times, the same answers.

Each test writes one limit configuration twice: as nginx ``limit_req``/``limit_conn``
lines and as Corral ``limits:`` rules. nginx and Corral proxy to the same stand-in
Ollama; the schedule is sent to both at once and every request's status must match
(and, where requests are delayed, both must hold them for the expected time).

Timing: every request is sent at least ~50 ms away from any boundary of the
algorithm (a multiple of the spacing 1/rate), so scheduling jitter cannot flip a
decision. "Rapid" requests go out 10-30 ms apart so that their order of arrival is
known; at the rates used that decays at most a few percent of a request.

Without nginx these tests fail (they are never skipped): see ``nginx_support``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from tests.integration.conftest import Gateway, Sim, backends
from tests.integration.nginx_support import (
    CHAT,
    Nginx,
    Outcome,
    Shot,
    fire,
    proxy_to,
    rapid,
    shots,
    statuses,
)

pytestmark = pytest.mark.nginx

SIM_ARGS = ("--models", "llama3.2:latest", "--loaded", "llama3.2:latest", "--instant",
            "--parallel", "64")

# What the README quotes: the seed configuration (10r/m, burst=3 nodelay), 15 rapid
# requests, in nginx and in Corral alike.
SEED_SEQUENCE = [200] * 4 + [429] * 11

# A delayed request completes within [expected - EARLY, expected + LATE] of being sent.
# On a loaded two-core machine nginx itself was seen 0.13 s early (it reads its clock
# once per event-loop turn); the cases these tests tell apart differ by 0.4 s or more.
EARLY = 0.15
LATE = 0.25
# An undelayed answer (or a rejection) arrives within this.
PROMPT = 0.2


@pytest.fixture
def sim(start_sim: Any) -> Sim:
    sim: Sim = start_sim(*SIM_ARGS)
    return sim


@pytest.fixture
def pair(start_nginx: Any, start_corral: Any) -> Any:
    """``pair(upstream, zones, locations, rules)`` → (nginx, Corral).

    ``zones`` are nginx http-level lines; ``locations`` maps an exact path to its limit
    lines and ``prefixes`` a prefix location to its lines (every other path is proxied
    without limits); ``rules`` are Corral's equivalent. Corral has slots to spare and a
    long queue wait, so only the limits can refuse anything.
    """

    def start(upstream: Sim, zones: str, locations: Mapping[str, str],
              rules: list[dict[str, Any]],
              prefixes: Mapping[str, str] | None = None) -> tuple[Nginx, Gateway]:
        proxy = proxy_to(upstream.url)
        server = "".join(f"        location = {path} {{\n{limits}\n{proxy}        }}\n"
                         for path, limits in locations.items())
        server += "".join(f"        location {path} {{\n{limits}\n{proxy}        }}\n"
                          for path, limits in (prefixes or {}).items())
        server += f"        location / {{\n{proxy}        }}\n"
        nginx: Nginx = start_nginx(zones, server)
        gw: Gateway = start_corral({"backends": backends(upstream, slots=64),
                                    "queue": {"max_wait": "60s"},
                                    "limits": rules})
        return nginx, gw

    return start


async def run_both(both: tuple[Nginx, Gateway], schedule: Sequence[Shot]) -> tuple[
        list[Outcome], list[Outcome]]:
    nginx, corral = await fire([both[0].url, both[1].url], schedule)
    return nginx, corral


def assert_statuses(nginx: Sequence[Outcome], corral: Sequence[Outcome],
                    expected: Sequence[int]) -> None:
    got = {"nginx": statuses(nginx), "corral": statuses(corral)}
    assert got == {"nginx": list(expected), "corral": list(expected)}


def assert_delays(nginx: Sequence[Outcome], corral: Sequence[Outcome],
                  expected: Sequence[float]) -> None:
    """Each request completes ``expected[i]`` seconds after it was sent, in both."""
    for who, outcomes in (("nginx", nginx), ("corral", corral)):
        got = [round(o.latency, 3) for o in outcomes]
        for i, (latency, want) in enumerate(zip(got, expected, strict=True)):
            if want == 0:
                assert latency < PROMPT, f"{who}: request {i} was held: {got} vs {expected}"
            else:
                assert want - EARLY <= latency <= want + LATE, (
                    f"{who}: request {i} took {latency}s, expected {want}s: "
                    f"{got} vs {expected}")


GEN = "/api/generate"


async def test_seed_per_ip_burst_nodelay(sim: Sim, pair: Any) -> None:
    """The seed's own configuration: 10r/m per IP, burst=3 nodelay on /api/generate.
    15 rapid requests: 1 + burst pass, then everything is refused."""
    both = pair(
        sim,
        "limit_req_zone $binary_remote_addr zone=ollama_per_ip:10m rate=10r/m;",
        {GEN: "limit_req zone=ollama_per_ip burst=3 nodelay;"},
        [{"name": "ollama_per_ip", "paths": [GEN], "rate": "10r/m", "burst": 3,
          "nodelay": True}],
    )
    nginx, corral = await run_both(both, rapid(15))
    print("seed sequence, nginx: ", statuses(nginx))
    print("seed sequence, corral:", statuses(corral))
    assert_statuses(nginx, corral, SEED_SEQUENCE)
    assert_delays(nginx, corral, [0] * 15)
    # Only Corral's refusal says when to come back: the next request is 6.025 s away.
    assert all(int(o.headers["Retry-After"]) in (6, 7) for o in corral if o.status == 429)


async def test_burst_without_nodelay_delays_each_excess_request(sim: Sim, pair: Any) -> None:
    """2r/s burst=5: of 7 simultaneous requests 1+burst are admitted, held 0, 0.5 … 2.5 s;
    the 7th is refused at once (REFERENCE A1's worked example, at twice the rate)."""
    both = pair(
        sim,
        "limit_req_zone $binary_remote_addr zone=per_ip:1m rate=2r/s;",
        {GEN: "limit_req zone=per_ip burst=5;"},
        [{"name": "per_ip", "paths": [GEN], "rate": "2r/s", "burst": 5}],
    )
    nginx, corral = await run_both(both, rapid(7, gap=0.01))
    assert_statuses(nginx, corral, [200] * 6 + [429])
    assert_delays(nginx, corral, [0, 0.5, 1.0, 1.5, 2.0, 2.5, 0])


async def test_delay_parameter_lets_the_first_requests_through(sim: Sim, pair: Any) -> None:
    """2r/s burst=5 delay=2: requests 1-3 at once, 4-6 held 0.5, 1 and 1.5 s, 7 refused."""
    both = pair(
        sim,
        "limit_req_zone $binary_remote_addr zone=per_ip:1m rate=2r/s;",
        {GEN: "limit_req zone=per_ip burst=5 delay=2;"},
        [{"name": "per_ip", "paths": [GEN], "rate": "2r/s", "burst": 5, "delay": 2}],
    )
    nginx, corral = await run_both(both, rapid(7, gap=0.01))
    assert_statuses(nginx, corral, [200] * 6 + [429])
    assert_delays(nginx, corral, [0, 0, 0, 0.5, 1.0, 1.5, 0])


async def test_burst_zero_enforces_the_spacing(sim: Sim, pair: Any) -> None:
    """1r/s without burst: a request closer than 1 s to the last accepted one is refused
    (and a refused one does not reset the clock)."""
    both = pair(
        sim,
        "limit_req_zone $binary_remote_addr zone=per_ip:1m rate=1r/s;",
        {GEN: "limit_req zone=per_ip;"},
        [{"name": "per_ip", "paths": [GEN], "rate": "1r/s"}],
    )
    nginx, corral = await run_both(both, shots(0, 0.6, 1.1, 1.5, 2.2))
    assert_statuses(nginx, corral, [200, 429, 200, 429, 200])
    assert_delays(nginx, corral, [0] * 5)


TWO_ZONES = ("limit_req_zone $binary_remote_addr zone=per_ip:1m rate={ip_rate};\n"
             "limit_req_zone $http_x_team zone=per_team:1m rate={team_rate};")


def team(name: str) -> dict[str, str]:
    return {"X-Team": name}


async def test_first_busy_zone_rejects_and_charges_no_zone(sim: Sim, pair: Any) -> None:
    """Per IP (1r/s burst=3) then per team (1r/s, no burst). Team A's repeats are refused
    by the team zone; they must not use up the IP zone, which they passed. Had they been
    charged, team B's request at 0.2 s would already be refused."""
    both = pair(
        sim,
        TWO_ZONES.format(ip_rate="1r/s", team_rate="1r/s"),
        {GEN: "limit_req zone=per_ip burst=3 nodelay;\nlimit_req zone=per_team nodelay;"},
        [{"name": "per_ip", "paths": [GEN], "rate": "1r/s", "burst": 3, "nodelay": True},
         {"name": "per_team", "paths": [GEN], "key": "header:X-Team", "rate": "1r/s",
          "nodelay": True}],
    )
    schedule = [
        Shot(0.0, headers=team("a")),
        Shot(0.05, headers=team("a")),      # team zone busy
        Shot(0.10, headers=team("a")),      # team zone busy
        Shot(0.15, headers=team("a")),      # team zone busy
        Shot(0.20, headers=team("b")),      # IP excess 0.8
        Shot(0.25, headers=team("c")),      # 1.75
        Shot(0.30, headers=team("d")),      # 2.7
        Shot(0.35, headers=team("e")),      # 3.65 > burst 3: the IP zone is busy
    ]
    nginx, corral = await run_both(both, schedule)
    assert_statuses(nginx, corral, [200, 429, 429, 429, 200, 200, 200, 429])


async def test_delay_is_the_longest_over_zones(sim: Sim, pair: Any) -> None:
    """Per IP 2r/s burst=5 and per team 1r/s burst=2, both delaying. Each request waits
    for its slowest zone; a request refused by the team zone charges the IP zone
    nothing (the last request would otherwise wait 2.35 s, not 1.85 s)."""
    both = pair(
        sim,
        TWO_ZONES.format(ip_rate="2r/s", team_rate="1r/s"),
        {GEN: "limit_req zone=per_ip burst=5;\nlimit_req zone=per_team burst=2;"},
        [{"name": "per_ip", "paths": [GEN], "rate": "2r/s", "burst": 5},
         {"name": "per_team", "paths": [GEN], "key": "header:X-Team", "rate": "1r/s",
          "burst": 2}],
    )
    schedule = [
        Shot(0.0, headers=team("a")),     # ip 0,    team 0      → 0
        Shot(0.03, headers=team("a")),    # ip 0.94, team 0.97   → 0.97 s (team)
        Shot(0.06, headers=team("a")),    # ip 1.88, team 1.94   → 1.94 s (team)
        Shot(0.09, headers=team("b")),    # ip 2.82, team 0      → 1.41 s (ip)
        Shot(0.12, headers=team("a")),    # team 2.88 > 2: refused, nothing charged
        Shot(0.15, headers=team("c")),    # ip 3.70, team 0      → 1.85 s (ip)
    ]
    nginx, corral = await run_both(both, schedule)
    assert_statuses(nginx, corral, [200, 200, 200, 200, 429, 200])
    assert_delays(nginx, corral, [0, 0.97, 1.94, 1.41, 0, 1.85])


async def test_one_zone_with_a_burst_per_location(sim: Sim, pair: Any) -> None:
    """One per-IP zone (10r/m), burst=3 on /api/generate and burst=5 on /api/chat: both
    locations draw on the same excess, each judged against its own burst."""
    both = pair(
        sim,
        "limit_req_zone $binary_remote_addr zone=per_ip:10m rate=10r/m;",
        {GEN: "limit_req zone=per_ip burst=3 nodelay;",
         "/api/chat": "limit_req zone=per_ip burst=5 nodelay;"},
        [{"name": "generate", "zone": "per_ip", "paths": [GEN], "rate": "10r/m",
          "burst": 3, "nodelay": True},
         {"name": "chat", "zone": "per_ip", "paths": ["/api/chat"], "rate": "10r/m",
          "burst": 5, "nodelay": True}],
    )
    schedule = [
        *rapid(5),                                        # excess 0..3, then 4 > 3
        *rapid(3, start=0.2, path="/api/chat", body=CHAT),  # 4, 5 ≤ 5, then 6 > 5
        Shot(0.35),                                       # 6 > 3
    ]
    nginx, corral = await run_both(both, schedule)
    assert_statuses(nginx, corral, [200, 200, 200, 200, 429, 200, 200, 429, 429])


async def test_empty_key_is_not_counted(sim: Sim, pair: Any) -> None:
    """Per IP (10r/m burst=5) and per team (10r/m, no burst). Without X-Team the team
    zone does not apply at all (nginx: an empty key is not accounted), so only the IP
    zone counts those requests; with X-Team both zones do."""
    both = pair(
        sim,
        TWO_ZONES.format(ip_rate="10r/m", team_rate="10r/m"),
        {GEN: "limit_req zone=per_ip burst=5 nodelay;\nlimit_req zone=per_team nodelay;"},
        [{"name": "per_ip", "paths": [GEN], "rate": "10r/m", "burst": 5, "nodelay": True},
         {"name": "per_team", "paths": [GEN], "key": "header:X-Team", "rate": "10r/m",
          "nodelay": True}],
    )
    schedule = [
        *rapid(3),                                    # no header: ip 0, 1, 2
        Shot(0.09, headers=team("a")),                # ip 3, team 0
        Shot(0.12, headers=team("a")),                # team busy: nothing charged
        *rapid(2, start=0.15),                        # ip 4, 5
        Shot(0.21),                                   # ip 6 > 5
    ]
    nginx, corral = await run_both(both, schedule)
    assert_statuses(nginx, corral, [200, 200, 200, 200, 429, 200, 200, 429])


def stream(n: int) -> dict[str, Any]:
    return {"model": "llama3.2", "prompt": "x", "stream": True,
            "options": {"num_predict": n}}


async def test_limit_conn_counts_streams_in_flight(start_sim: Any, pair: Any) -> None:
    """limit_conn 2 per IP with slow streams (10 tokens/s): the third concurrent stream
    is refused; once the first has ended a new one passes, while two are open again
    the next is refused."""
    slow = start_sim("--models", "llama3.2:latest", "--loaded", "llama3.2:latest",
                     "--tps", "10", "--prompt-tps", "0", "--load-time", "0",
                     "--parallel", "64")
    both = pair(
        slow,
        "limit_conn_zone $binary_remote_addr zone=conn_ip:1m;",
        {GEN: "limit_conn conn_ip 2;"},
        [{"name": "conn_ip", "paths": [GEN], "max_concurrent": 2}],
    )
    schedule = [
        Shot(0.0, body=stream(6)),      # A: ~0.6 s
        Shot(0.05, body=stream(25)),    # B: ~2.5 s
        Shot(0.10, body=stream(5)),     # C: A and B are open
        Shot(1.20, body=stream(8)),     # D: A has ended
        Shot(1.40, body=stream(5)),     # E: B and D are open
    ]
    nginx, corral = await run_both(both, schedule)
    assert_statuses(nginx, corral, [200, 200, 429, 200, 429])
    for who, outcomes in (("nginx", nginx), ("corral", corral)):
        a, b, c, d, e = outcomes
        # The schedule's premises, checked rather than assumed.
        assert a.done < d.sent - 0.1, f"{who}: A had not ended before D: {outcomes}"
        assert b.done > e.sent + 0.1 and d.done > e.sent + 0.1, f"{who}: {outcomes}"
        assert c.latency < PROMPT and e.latency < PROMPT, f"{who}: {outcomes}"


async def test_most_specific_rule_of_a_zone_wins(sim: Sim, pair: Any) -> None:
    """Prefix rules: ``location /api/`` (burst=3) and the more specific ``location =
    /api/chat`` (burst=5) on one zone ↔ Corral's rule for /api/chat listed before the
    rule for the /api/ prefix."""
    both = pair(
        sim,
        "limit_req_zone $binary_remote_addr zone=per_ip:10m rate=10r/m;",
        {"/api/chat": "limit_req zone=per_ip burst=5 nodelay;"},
        [{"name": "chat", "zone": "per_ip", "paths": ["/api/chat"], "rate": "10r/m",
          "burst": 5, "nodelay": True},
         {"name": "api", "zone": "per_ip", "paths": ["/api/"], "rate": "10r/m",
          "burst": 3, "nodelay": True}],
        prefixes={"/api/": "limit_req zone=per_ip burst=3 nodelay;"},
    )
    schedule = [
        *rapid(5),                                          # excess 0..3, then 4 > 3
        *rapid(3, start=0.2, path="/api/chat", body=CHAT),  # 4, 5 ≤ 5, then 6 > 5
        Shot(0.35, path="/api/show", body={"model": "llama3.2"}),   # 6 > 3
    ]
    nginx, corral = await run_both(both, schedule)
    assert_statuses(nginx, corral, [200, 200, 200, 200, 429, 200, 200, 429, 429])


async def test_delayed_request_is_not_counted_by_limit_conn_while_it_waits(
        sim: Sim, pair: Any) -> None:
    """limit_req runs before limit_conn, and a delayed request enters limit_conn only
    when its delay ends (REFERENCE A1, phase order). 2r/s burst=3 and limit_conn 1:
    B and C wait 0.49 s and 0.9 s; each then runs alone (the stand-in answers at once),
    so neither is refused for concurrency."""
    both = pair(
        sim,
        "limit_req_zone $binary_remote_addr zone=per_ip:1m rate=2r/s;\n"
        "limit_conn_zone $binary_remote_addr zone=conn_ip:1m;",
        {GEN: "limit_req zone=per_ip burst=3;\nlimit_conn conn_ip 1;"},
        [{"name": "per_ip", "paths": [GEN], "rate": "2r/s", "burst": 3},
         {"name": "conn_ip", "paths": [GEN], "max_concurrent": 1}],
    )
    nginx, corral = await run_both(both, shots(0, 0.02, 0.1))
    assert_statuses(nginx, corral, [200, 200, 200])
    assert_delays(nginx, corral, [0, 0.49, 0.9])


def seq(n: int) -> dict[str, str]:
    return {"X-Seq": str(n)}


async def test_dry_run_decides_like_nginx(sim: Sim, pair: Any) -> None:
    """``limit_req_dry_run on`` ↔ ``dry_run: true``, 1r/s burst=1: nothing is held or
    refused, state is kept exactly as in real mode (a would-be refusal charges
    nothing), and each request's would-be outcome is logged: nginx's
    $limit_req_status, Corral's access log ``limit``."""
    both = pair(
        sim,
        "limit_req_zone $binary_remote_addr zone=per_ip:1m rate=1r/s;",
        {GEN: "limit_req zone=per_ip burst=1;\nlimit_req_dry_run on;"},
        [{"name": "per_ip", "paths": [GEN], "rate": "1r/s", "burst": 1, "dry_run": True}],
    )
    schedule = [Shot(at, headers=seq(i)) for i, at in enumerate((0, 0.02, 0.04, 0.06, 1.2))]
    nginx, corral = await run_both(both, schedule)
    assert_statuses(nginx, corral, [200] * 5)
    assert_delays(nginx, corral, [0] * 5)
    # At 1.2 s the excess is 0.98 - 1.2 + 1 = 0.78 ≤ burst: only because the refusals
    # at 0.04 and 0.06 s charged nothing.
    expected = ["PASSED", "DELAYED_DRY_RUN", "REJECTED_DRY_RUN", "REJECTED_DRY_RUN",
                "DELAYED_DRY_RUN"]
    logged = both[0].logged("req")
    assert [logged[str(i)] for i in range(5)] == expected
    as_corral_logs = {"PASSED": None, "DELAYED_DRY_RUN": "dry_run_delayed",
                      "REJECTED_DRY_RUN": "dry_run_rejected"}
    records = [r for r in both[1].records() if r["path"] == GEN]
    assert [r.get("limit") for r in records] == [as_corral_logs[e] for e in expected]
