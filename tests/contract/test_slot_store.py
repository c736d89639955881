"""One contract for every slot store: the in-memory one and Redis (a real server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from corral.scheduler.shared.protocol import SlotState
from corral.scheduler.shared.redis import RedisSlotStore
from corral.scheduler.shared.store import (
    DEFAULT_GRACE_MS,
    FLEET,
    LEADER,
    EpochChanged,
    Grant,
    MemorySlotStore,
    SlotStore,
    Taken,
    replica_channel,
)
from tests.contract.limit_store_support import FakeClock
from tests.waiting import eventually

TTL = 10_000


@pytest.fixture
async def slots(backend: str, clock: FakeClock) -> AsyncIterator[SlotStore]:
    if backend == "memory":
        store: SlotStore = MemorySlotStore(clock)
    else:
        # A prefix of its own per test: nothing leaks from one test into another.
        store = RedisSlotStore.from_url(backend, prefix=f"t{uuid.uuid4().hex[:8]}:",
                                        clock=clock)
        # Only the clock of operations is faked: key TTLs still run on Redis's own.
    try:
        await join(store)
        # A new epoch always opens a grace period (nobody can tell a first use from a
        # data loss); these tests start once it is over.
        clock.advance(DEFAULT_GRACE_MS)
        yield store
    finally:
        await store.close()


async def join(store: SlotStore) -> str:
    """Learn the store's epoch, as a replica does before it asks for a slot."""
    try:
        await store.adopt([], TTL)
    except EpochChanged as changed:
        await store.adopt([], TTL, epoch=changed.epoch)
    return store.epoch


class Listener:
    """Collects what a channel receives, in the background."""

    def __init__(self, store: SlotStore, channel: str) -> None:
        self.messages: list[str] = []
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(store, channel))

    async def _run(self, store: SlotStore, channel: str) -> None:
        async for _, message in store.listen([channel]):
            if message == "resync":
                self._ready.set()
                continue
            self.messages.append(message)

    async def wait_for(self, count: int) -> list[str]:
        await eventually(lambda: len(self.messages) >= count,
                         lambda: f"{count} message(s); only {self.messages} arrived",
                         every=0.01)
        return self.messages

    async def stop(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


async def listen(store: SlotStore, channel: str) -> Listener:
    listener = Listener(store, channel)
    if isinstance(store, RedisSlotStore):
        await asyncio.wait_for(listener._ready.wait(), 5)
    else:
        await asyncio.sleep(0)
    return listener


async def test_free_slots_are_taken_in_the_order_given_up_to_each_cap(slots: SlotStore) -> None:
    backends = [("a", 1), ("b", 2)]
    taken = [await slots.acquire(backends, f"l{i}", TTL, f"j{i}", None) for i in range(4)]
    assert taken == [Taken(0, 1), Taken(1, 1), Taken(1, 2), Taken(None, 0)]
    assert await slots.counts(["a", "b"]) == ([1, 2], 0)


async def test_a_released_slot_is_free_again_and_a_late_release_frees_nothing(
        slots: SlotStore, clock: FakeClock) -> None:
    await slots.acquire([("a", 1)], "l1", TTL, "j1", None)
    released = await slots.release("a", "l1", "j1")
    assert released.released and released.used == 0
    assert (await slots.acquire([("a", 1)], "l2", TTL, "j2", None)).index == 0
    clock.advance(TTL + 1)                      # l2 lapses: the slot comes back by itself
    assert (await slots.acquire([("a", 1)], "l3", TTL, "j3", None)).index == 0
    late = await slots.release("a", "l2", "j2")      # l2's request ends after all
    assert not late.released and late.used == 1     # l3 keeps its slot
    assert await slots.counts(["a"]) == ([1], 0)


async def test_renewal_keeps_a_running_request_and_names_lost_leases(
        slots: SlotStore, clock: FakeClock) -> None:
    await slots.acquire([("a", 2)], "kept", TTL, "j1", None)
    await slots.acquire([("a", 2)], "lost", TTL, "j2", None)
    clock.advance(TTL - 1)
    assert await slots.renew([("a", "kept")], TTL) == []
    clock.advance(2)                            # "lost" lapsed; another replica takes it
    assert (await slots.acquire([("a", 2)], "other", TTL, "j3", None)).index == 0
    # Its request still runs at the backend: the lease is recorded again (over the
    # cap, the documented case of a pause past the lease), never dropped.
    assert await slots.renew([("a", "kept"), ("a", "lost")], TTL) == [1]
    assert await slots.counts(["a"]) == ([3], 0)
    assert (await slots.acquire([("a", 2)], "next", TTL, "j4", None)).index is None


async def test_a_waiting_job_is_never_overtaken_and_the_leader_is_told(
        slots: SlotStore) -> None:
    leader = await listen(slots, LEADER)
    await slots.acquire([("a", 1)], "l1", TTL, "j1", b"{}")
    queued = await slots.acquire([("a", 1)], "l2", TTL, "j2", b'{"n":2}')
    assert queued == Taken(None, 1)
    # The same job queued twice is one waiting job.
    assert (await slots.acquire([("a", 1)], "l2b", TTL, "j2", b'{"n":2}')) == Taken(None, 1)
    # A backend with room does not let a newcomer past a waiting job either.
    assert (await slots.acquire([("b", 5)], "l3", TTL, "j3", b'{"n":3}')) == Taken(None, 2)
    assert await slots.waiting() == {"j2": b'{"n":2}', "j3": b'{"n":3}'}
    released = await slots.release("a", "l1", "j1")
    assert released.released and released.waiting == 2
    assert await leader.wait_for(3) == ["enq j2", "enq j3", "rel a"]
    await leader.stop()


async def test_grant_gives_a_waiting_job_its_slot_and_tells_its_replica(
        slots: SlotStore) -> None:
    replica = await listen(slots, replica_channel("r1"))
    await slots.acquire([("a", 1)], "busy", TTL, "j0", None)
    await slots.acquire([("a", 1)], "l1", TTL, "j1", b"{}")
    assert await slots.grant("j1", "a", 1, "g0", TTL, "r1") == (-1, 1)     # still full
    await slots.release("a", "busy", "j0")
    assert await slots.grant("j1", "a", 1, "l1", TTL, "r1") == (1, 1)
    # The same grant delivered twice answers the same and takes nothing more.
    assert await slots.grant("j1", "a", 1, "l1", TTL, "r1") == (1, 1)
    assert await slots.counts(["a"]) == ([1], 0)
    assert await slots.grant("j1", "a", 1, "g2", TTL, "r1") == (0, -1)     # not waiting
    assert await replica.wait_for(1) == ["grant j1 a l1 resident"]
    assert await slots.waiting() == {}
    # The grant is kept until the replica takes the slot (a lost message is recovered).
    assert await slots.granted(["j1", "jx"]) == {"j1": Grant("a", "l1", "resident")}
    await slots.release("a", "l1", "j1")
    assert await slots.granted(["j1"]) == {}
    await replica.stop()


async def test_cancel_leaves_the_queue_or_returns_the_slot_granted_meanwhile(
        slots: SlotStore) -> None:
    await slots.acquire([("a", 1)], "busy", TTL, "j0", None)
    await slots.acquire([("a", 1)], "l1", TTL, "j1", b"{}")
    await slots.acquire([("a", 1)], "l2", TTL, "j2", b"{}")
    left = await slots.cancel("j1")
    assert left.state == "left" and await slots.waiting() == {"j2": b"{}"}
    await slots.release("a", "busy", "j0")
    assert (await slots.grant("j2", "a", 1, "l2", TTL, "r1"))[0] == 1
    granted = await slots.cancel("j2")
    assert (granted.state, granted.grant) == ("granted", Grant("a", "l2", "resident"))
    assert (await slots.cancel("j2")).state == "unknown"
    assert (await slots.release("a", "l2", "j2")).released


async def test_a_dead_replicas_slots_come_back_within_the_ttl(
        slots: SlotStore, clock: FakeClock) -> None:
    for i in range(3):
        await slots.acquire([("a", 3)], f"dead{i}", TTL, f"j{i}", None)
    assert (await slots.acquire([("a", 3)], "x", TTL, "jx", None)).index is None
    clock.advance(TTL)
    assert await slots.counts(["a"]) == ([0], 0)


async def test_one_leader_at_a_time_until_its_lease_lapses(
        slots: SlotStore, clock: FakeClock) -> None:
    assert await slots.lead("r1", 3000) == (True, "r1")
    assert await slots.lead("r2", 3000) == (False, "r1")
    clock.advance(2000)
    assert await slots.lead("r1", 3000) == (True, "r1")      # kept by calling again
    clock.advance(2500)
    assert await slots.lead("r2", 3000) == (False, "r1")
    assert not await slots.resign("r2")
    assert await slots.resign("r1")
    assert await slots.lead("r2", 3000) == (True, "r2")


async def test_charges_made_without_the_leader_are_taken_in_once(slots: SlotStore) -> None:
    await slots.acquire([("a", 2)], "l1", TTL, "j1", None, client="alice", charge=30.0)
    await slots.acquire([("a", 2)], "l2", TTL, "j2", None, client="bob", charge=5.0)
    queued = await slots.acquire([("a", 2)], "l3", TTL, "j3", b"{}", client="bob",
                                 charge=7.0)
    assert queued.index is None                 # queued: the leader charges it, not this
    await slots.release("a", "l1", "j1", client="alice", correction=-12.5)
    assert await slots.charges() == {"alice": 17.5, "bob": 5.0}
    assert await slots.charges() == {}


async def test_a_load_granted_is_announced_to_every_replica(slots: SlotStore) -> None:
    fleet = await listen(slots, FLEET)
    await slots.acquire([], "l1", TTL, "j1", b'{"m": 1}')
    assert await slots.job("j1") == b'{"m": 1}'
    assert await slots.grant("j1", "a", 2, "l1", TTL, "r1", "load", "m:latest", 8192) == (1, 1)
    assert await slots.job("j1") is None
    assert await fleet.wait_for(1) == ["load a m:latest 8192"]
    await fleet.stop()


async def test_replicas_are_known_while_their_heartbeat_lasts(
        slots: SlotStore, clock: FakeClock) -> None:
    await slots.heartbeat("r1", b'{"address": "a"}', 60_000)
    await slots.heartbeat("r2", b'{"address": "b"}', 150)
    assert await slots.replicas() == {"r1": b'{"address": "a"}', "r2": b'{"address": "b"}'}
    # r2 stops: gone once its heartbeat lapses (Redis expires keys on its own clock).
    clock.advance(200)
    alive = {"r1": b'{"address": "a"}'}

    async def lapsed() -> bool:
        return await slots.replicas() == alive

    await eventually(lapsed, "r2 to drop out once its heartbeat lapsed")


async def test_adopted_leases_count_whatever_the_cap(slots: SlotStore) -> None:
    await slots.acquire([("a", 1)], "l1", TTL, "j1", None)
    await slots.adopt([("a", "ran-alone-1"), ("a", "ran-alone-2")], TTL)
    assert await slots.counts(["a"]) == ([3], 0)
    assert (await slots.acquire([("a", 1)], "l2", TTL, "j2", None)).index is None
    assert (await slots.release("a", "ran-alone-1", "x")).released


async def test_releases_of_one_moment_go_back_together(slots: SlotStore) -> None:
    from corral.scheduler.shared.store import Release

    for i in range(3):
        await slots.acquire([("a", 3)], f"l{i}", TTL, f"j{i}", None)
    out = await slots.release_many([Release("a", "l0", "j0"), Release("a", "nope", "jx"),
                                    Release("a", "l2", "j2", "alice", 4.0)])
    assert [(r.released, r.used) for r in out] == [(True, 2), (False, 2), (True, 1)]
    assert await slots.charges() == {"alice": 4.0}


async def test_acquisitions_and_releases_of_one_moment_run_in_order(slots: SlotStore) -> None:
    from corral.scheduler.shared.store import Acquisition, Release, Released

    await slots.acquire([("a", 1)], "l1", TTL, "j1", None)
    out = await slots.run([
        Acquisition([("a", 1)], "l2", TTL, "j2", None),           # full: not taken
        Release("a", "l1", "j1"),                                 # frees it ...
        Acquisition([("a", 1)], "l3", TTL, "j3", None, "bob", 2.0),  # ... for this one
    ])
    assert out == [Taken(None, 0), Released(True, 0, 0), Taken(0, 1)]
    assert await slots.charges() == {"bob": 2.0}


async def test_the_grants_of_one_pass_go_together(slots: SlotStore) -> None:
    from corral.scheduler.shared.store import GrantCall

    await slots.acquire([("a", 1)], "busy", TTL, "j0", None)
    for i in (1, 2, 3):
        await slots.acquire([("a", 1)], f"w{i}", TTL, f"j{i}", b"{}")
    await slots.release("a", "busy", "j0")
    out = await slots.grant_many([GrantCall("j1", "a", 1, "g1", TTL, "r1"),
                                  GrantCall("j2", "a", 1, "g2", TTL, "r1"),
                                  GrantCall("jx", "a", 1, "gx", TTL, "r1")])
    assert out == [(1, 1), (-1, 1), (0, -1)]
    assert sorted(await slots.waiting()) == ["j2", "j3"]


async def test_preemptible_requests_are_known_while_they_run(slots: SlotStore) -> None:
    from corral.scheduler.shared.store import GrantCall

    replica = await listen(slots, replica_channel("r2"))
    await slots.acquire([("a", 1)], "low1", TTL, "j1", None, stoppable="r1|2|...")
    await slots.acquire([("a", 1)], "w", TTL, "j2", b"{}")
    await slots.acquire([("b", 1)], "p", TTL, "j3", None)          # queued: not registered
    await slots.release("a", "low1", "j1")
    assert await slots.stoppable() == {}
    await slots.grant_many([GrantCall("j2", "a", 1, "low2", TTL, "r2",
                                      stoppable="r2|2|...")])
    assert await slots.stoppable() == {"low2": ("a", "r2|2|...")}
    await slots.tell("r2", "preempt low2")
    assert await replica.wait_for(2) == ["grant j2 a low2 resident", "preempt low2"]
    await replica.stop()


async def lose_data(store: SlotStore) -> None:
    """The store restarts without its data (Redis killed and started again at once)."""
    if isinstance(store, MemorySlotStore):
        fresh = SlotState()
        for name in vars(fresh):
            setattr(store.state, name, getattr(fresh, name))
        return
    assert isinstance(store, RedisSlotStore)
    keys = [k async for k in store.client.scan_iter(match=store.channel("*"))]
    if keys:
        await store.client.delete(*keys)


async def test_a_store_that_lost_its_data_is_noticed_and_told_again_what_runs(
        slots: SlotStore, clock: FakeClock) -> None:
    """No slot is given twice after a restart: the replica that knew the old epoch is
    refused, records its running leases again, and nobody gets a slot until the grace
    period is over (every replica has had the time to do the same)."""
    other = slots.share() if isinstance(slots, MemorySlotStore) else RedisSlotStore(
        slots.client, prefix=slots.channel(""), clock=clock)
    await join(other)
    await slots.acquire([("a", 1)], "running", TTL, "j1", None)
    await lose_data(slots)
    with pytest.raises(EpochChanged) as changed:
        await slots.acquire([("a", 1)], "next", TTL, "j2", None)
    # The other replica's next word tells it too, and the grace period has begun.
    beat = await other.heartbeat("r2", b"{}", TTL)
    assert beat.name == changed.value.epoch != ""
    assert beat.grace_until > clock()
    await slots.adopt([("a", "running")], TTL, epoch=changed.value.epoch)
    await other.adopt([], TTL, epoch=beat.name)
    # In the grace period no slot is given, even where one is free.
    assert (await other.acquire([("b", 1)], "x", TTL, "jx", None)).index is None
    clock.advance(beat.grace_until - clock())
    assert (await other.acquire([("a", 1)], "y", TTL, "jy", None)).index is None  # held
    assert await slots.counts(["a", "b"]) == ([1, 0], 0)
    assert (await slots.release("a", "running", "j1")).released
    assert (await other.acquire([("a", 1)], "z", TTL, "jz", None)).index == 0


async def test_whoever_reaches_an_empty_store_first_waits_out_the_grace_period(
        slots: SlotStore, clock: FakeClock) -> None:
    """A replica starting right after a data loss cannot tell it from a first use:
    the slot a request of another replica still uses is not given before that
    replica has had the time to record it again."""
    await slots.acquire([("a", 1)], "old", TTL, "j1", None)
    await lose_data(slots)
    newcomer = slots.share() if isinstance(slots, MemorySlotStore) else RedisSlotStore(
        slots.client, prefix=slots.channel(""), clock=clock)
    epoch = await newcomer.heartbeat("r9", b"{}", TTL)
    assert epoch.grace_until > clock()
    await newcomer.adopt([], TTL, epoch=epoch.name)
    assert (await newcomer.acquire([("a", 1)], "l1", TTL, "j2", None)).index is None
    # The old replica's next word: refused, it records its lease again.
    with pytest.raises(EpochChanged) as changed:
        await slots.renew([("a", "old")], TTL)
    await slots.adopt([("a", "old")], TTL, epoch=changed.value.epoch)
    clock.advance(epoch.grace_until - clock())
    assert (await newcomer.acquire([("a", 1)], "l2", TTL, "j3", None)).index is None
    assert await slots.counts(["a"]) == ([1], 0)


async def test_epochs_never_share_a_name(slots: SlotStore) -> None:
    """Data lost twice within one millisecond is seen twice."""
    first = slots.epoch
    await lose_data(slots)
    second = (await slots.heartbeat("r1", b"{}", TTL)).name
    await lose_data(slots)
    third = (await slots.heartbeat("r1", b"{}", TTL)).name
    assert len({first, second, third}) == 3


async def test_an_operation_delivered_twice_has_no_second_effect(
        slots: SlotStore) -> None:
    """What a client library's retry after a lost answer does: the same call again."""
    first = await slots.acquire([("a", 2)], "l1", TTL, "j1", None, client="bob", charge=3.0)
    again = await slots.acquire([("a", 2)], "l1", TTL, "j1", None, client="bob", charge=3.0)
    assert first == again == Taken(0, 1)
    assert await slots.counts(["a"]) == ([1], 0)
    assert await slots.charges() == {"bob": 3.0}
    # A release is remembered by its lease: sent again (after an outage), it frees
    # nothing more and corrects the charge once.
    await slots.acquire([("a", 2)], "l2", TTL, "j2", None)
    once = await slots.release("a", "l1", "j1", "bob", -1.0)
    assert await slots.release("a", "l1", "j1", "bob", -1.0) == once
    assert once.released and await slots.counts(["a"]) == ([1], 0)
    assert await slots.charges() == {"bob": -1.0}
