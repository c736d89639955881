"""The chaos benchmark's bookkeeping: what a complete answer is, and which stretches
over the backend's slots belong to a replica paused past its lease."""

from __future__ import annotations

import pytest

from corral.bench import chaos
from corral.bench.chaos import Fault


def test_a_complete_answer_ends_with_done_and_has_no_error_line() -> None:
    assert chaos._complete(b'{"response":"a","done":false}\n{"response":"","done":true}\n')
    assert not chaos._complete(b'{"response":"a","done":false}\n')
    assert not chaos._complete(b'{"response":"a","done":false}\n{"error":"cut"}\n')
    assert not chaos._complete(b"")
    assert not chaos._complete(b"not json\n")


def test_only_a_stretch_begun_in_a_pause_with_the_paused_replicas_request_is_excused() -> None:
    pause = Fault(chaos.REPLICA_PAUSED, "replica 1", 110.0, 113.0, replica=1)
    kill = Fault(chaos.REPLICA_KILLED, "replica 2", 115.0, 117.0, replica=2)
    episodes = [
        {"start": 111.0, "end": 111.5, "peak": 3, "ids": ["r0.c1.4", "r1.c2.9"]},
        {"start": 112.0, "end": 112.1, "peak": 3, "ids": ["r0.c1.5", "r2.c2.9"]},
        {"start": 113.5, "end": None, "peak": 4, "ids": ["r1.c1.6"]},   # within a lease
        {"start": 114.5, "end": 114.6, "peak": 3, "ids": ["r1.c1.7"]},  # past it
        {"start": 116.0, "end": 116.2, "peak": 3, "ids": ["r2.c0.1"]},
    ]
    documented, other = chaos._attribute(episodes, [pause, kill], 100.0, 1.0)
    assert [(e["at_s"], e["after_resume_s"]) for e in documented] == [(11.0, None),
                                                                      (13.5, 0.5)]
    assert documented[0]["pause_at_s"] == 10.0
    assert [(e["at_s"], e["seconds"], e["after"]) for e in other] == [
        (12.0, 0.1, "replica paused (replica 1)"), (14.5, 0.1, "replica paused (replica 1)"),
        (16.0, 0.2, "replica killed (replica 2)")]


def test_a_pause_must_outlast_the_lease() -> None:
    with pytest.raises(ValueError, match="slot_lease"):
        chaos.Options(slot_lease=3.0, replica_pause=2.0)


def test_busy_share_interpolates_between_samples() -> None:
    # Two slots; busy slot-seconds sampled at t = 0, 1, 2: both busy, then one.
    samples = [(0.0, 0.0), (1.0, 2.0), (2.0, 3.0)]
    assert chaos.busy_share(samples, 0.0, 1.0, 2) == 1.0
    assert chaos.busy_share(samples, 1.0, 2.0, 2) == 0.5
    assert chaos.busy_share(samples, 0.5, 1.5, 2) == 0.75
    assert chaos.busy_share(samples, 1.5, 2.5, 2) is None      # past the last sample
    assert chaos.busy_share(samples, -0.5, 0.5, 2) is None     # before the first
    assert chaos.busy_share(samples, 1.0, 1.0, 2) is None


def test_faults_come_in_whole_rounds_ending_with_a_replica_killed() -> None:
    assert chaos.fault_count(chaos.Options(duration=15.0, fault_every=5.0)) == 4
    assert chaos.fault_count(chaos.Options(duration=20.0, fault_every=5.0)) == 8
    assert chaos.fault_count(chaos.Options(duration=600.0, fault_every=5.0)) == 124
    assert chaos.KINDS[-1] == chaos.REPLICA_KILLED
