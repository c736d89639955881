"""A short chaos run against real processes: three replicas on one redis-server, a
stand-in with two slots, steady load, and each fault at least once — Redis killed and
started again (data lost), Redis paused past the slot store's timeout, a replica paused
past its lease, a replica killed. What must hold whatever the machine's speed: no
request lost, none run twice, never more at the backend than its slots (but for the
documented case of a replica paused past its lease). The served rate after the faults
is a performance figure: ``corral bench chaos`` measures it."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.bench import chaos


@pytest.mark.timeout(300)
async def test_a_short_chaos_run_loses_nothing_runs_nothing_twice_and_keeps_the_cap(
        tmp_path: Path) -> None:
    opts = chaos.Options(duration=15.0, fault_every=5.0, clients=8, warmup=2.0, window=4.0,
                         # A stuck request ends as a 503 within the test, not after
                         # Corral's default two minutes.
                         max_wait=20.0, request_deadline=30.0)
    notes: list[str] = []
    result = await chaos.run(opts, tmp_path, notes.append)

    assert {k: v["count"] >= 1 for k, v in result["faults_by_kind"].items()} == \
        dict.fromkeys(chaos.KINDS, True), result["faults"]
    backend = result["backend"]
    # The run ids reached the stand-in through Corral, so "run twice" means something.
    assert backend["run_ids"] >= result["tries"].get(chaos.ANSWERED, 0) > 0
    # Every miss at once: one run shows all that is wrong, not the first thing only.
    misses = {
        "lost": result["lost"],
        "run twice": backend["runs_repeated"],
        "over the slots outside a lease pause": backend["over_slots_other"],
        "replicas that exited on their own": result["replica_exits"],
    }
    assert {k: v for k, v in misses.items() if v} == {}
