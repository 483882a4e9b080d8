"""Membership (``cluster.py``): the republish thresholds, and ``Cluster`` on a real MemoryStore.

Two clocks are at work: the FakeClock decides record times, the republish interval and lease
expiry (a test moves it, then calls ``store.expire_leases()``), while the publish and keepalive
loops sleep in real time. So tests that want a loop to run give it a short real interval
(``check_interval_s``, ``lease_ttl_s / 3``), and tests that want it quiet give it a long one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from modelmesh.clock import FakeClock
from modelmesh.cluster import REPUBLISH_MAX_INTERVAL_MS, Cluster, moved_enough
from modelmesh.kv.base import KeyValue
from modelmesh.kv.memory import MemoryStore
from modelmesh.types import InstanceRecord

pytestmark = pytest.mark.filterwarnings("error")

KEY_ROOT = "mm/svc"
QUIET_TTL_S = 600.0  # the keepalive loop sleeps ttl/3 = 200 real seconds: it never runs in a test
QUIET_CHECK_S = 60.0  # likewise for the publish loop
FAST_CHECK_S = 0.01
WAIT_S = 2.0  # bound on any wait for a loop or a watch, so a broken one fails fast


def instance_key(instance_id: str) -> str:
    return f"{KEY_ROOT}/instances/{instance_id}"


BASE = InstanceRecord(
    endpoint="10.0.0.1:8033",
    capacity_bytes=1_000_000,
    used_bytes=500_000,
    model_count=100,
    loading_in_flight=0,
    request_rate_rpm=2_000,
    labels=("gpu",),
    zone="z1",
    version="v1",
)


# ---- moved_enough -----------------------------------------------------------------------------

# (changes to BASE giving old, further changes giving new, republish?); each threshold from both sides
MOVES: dict[str, tuple[dict[str, object], dict[str, object], bool]] = {
    "nothing moved": ({}, {}, False),
    "capacity +2% exactly": ({}, {"capacity_bytes": 1_020_000}, False),
    "capacity just over +2%": ({}, {"capacity_bytes": 1_020_001}, True),
    "capacity just over -2%": ({}, {"capacity_bytes": 979_999}, True),
    "model count +9 of 100": ({}, {"model_count": 109}, False),
    "model count +10 of 100": ({}, {"model_count": 110}, True),
    "model count -10 of 100": ({}, {"model_count": 90}, True),
    "model count +15% exactly of 20": ({"model_count": 20}, {"model_count": 23}, False),
    "model count over +15% of 20": ({"model_count": 20}, {"model_count": 24}, True),
    "first model on an empty pod": ({"model_count": 0}, {"model_count": 1}, True),
    "used +20% exactly": ({}, {"used_bytes": 600_000}, False),
    "used just over +20%": ({}, {"used_bytes": 600_001}, True),
    "used just over -20%": ({}, {"used_bytes": 399_999}, True),
    "rate +99 of 2000": ({}, {"request_rate_rpm": 2_099}, False),
    "rate +100 of 2000": ({}, {"request_rate_rpm": 2_100}, True),
    "rate -100 of 2000": ({}, {"request_rate_rpm": 1_900}, True),
    "rate +10% exactly of 500": ({"request_rate_rpm": 500}, {"request_rate_rpm": 550}, False),
    "rate over +10% of 500": ({"request_rate_rpm": 500}, {"request_rate_rpm": 551}, True),
    "rate 0 -> 5 (a trickle)": ({"request_rate_rpm": 0}, {"request_rate_rpm": 5}, False),
    "shutting down": ({}, {"shutting_down": True}, True),
    "back from shutting down": ({"shutting_down": True}, {"shutting_down": False}, True),
    "endpoint": ({}, {"endpoint": "10.0.0.2:8033"}, True),
    "labels": ({}, {"labels": ("gpu", "fast")}, True),
    "zone": ({}, {"zone": "z2"}, True),
    "version": ({}, {"version": "v2"}, True),
    "loading starts": ({}, {"loading_in_flight": 1}, True),
    "loading ends": ({"loading_in_flight": 1}, {"loading_in_flight": 0}, True),
    "more loads in flight": ({"loading_in_flight": 1}, {"loading_in_flight": 3}, False),
    "fewer loads in flight": ({"loading_in_flight": 3}, {"loading_in_flight": 1}, False),
    "lru time only": ({}, {"lru_time_ms": 123_456}, False),
    "every figure nudged just under its threshold": (
        {"loading_in_flight": 2},
        {
            "capacity_bytes": 1_019_000, "used_bytes": 590_000, "model_count": 105,
            "request_rate_rpm": 2_090, "loading_in_flight": 1, "lru_time_ms": 99,
        },
        False,
    ),
}


@pytest.mark.parametrize(("old_changes", "new_changes", "expected"), MOVES.values(), ids=MOVES.keys())
def test_moved_enough(old_changes: dict[str, object], new_changes: dict[str, object], expected: bool) -> None:
    old = replace(BASE, **old_changes)  # type: ignore[arg-type]
    new = replace(old, **new_changes)  # type: ignore[arg-type]
    assert moved_enough(old, new) is expected


# ---- fixtures and helpers ---------------------------------------------------------------------


class Figures:
    """The ``figures`` callback: returns ``record`` and counts calls (the publish loop makes one
    per check, so a test can wait for the loop to have had its chances to publish)."""

    def __init__(self, record: InstanceRecord) -> None:
        self.record = record
        self.calls = 0

    def __call__(self) -> InstanceRecord:
        self.calls += 1
        return self.record

    async def checked(self, times: int) -> None:
        """Wait until the figures have been read ``times`` more times."""
        target = self.calls + times
        await eventually(lambda: self.calls >= target)


async def eventually(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.002)


async def eventually_async(condition: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():
            await asyncio.sleep(0.002)


def assert_no_tasks_left() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert others == []


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[MemoryStore]:
    store = MemoryStore(clock)
    yield store
    await store.close()
    assert_no_tasks_left()


MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(store: MemoryStore, clock: FakeClock) -> AsyncIterator[MakeCluster]:
    """Builds and starts a Cluster on the shared store; every one is closed at teardown."""
    made: list[Cluster] = []

    async def make(
        instance_id: str,
        *,
        figures: Figures | None = None,
        lease_ttl_s: float = QUIET_TTL_S,
        check_interval_s: float = QUIET_CHECK_S,
    ) -> Cluster:
        cluster = Cluster(
            store, KEY_ROOT, instance_id, clock=clock, lease_ttl_s=lease_ttl_s,
            figures=figures or Figures(replace(BASE, endpoint=f"{instance_id}:8033")),
            check_interval_s=check_interval_s, campaign_interval_s=check_interval_s,
        )
        made.append(cluster)
        await cluster.start()
        return cluster

    yield make
    for cluster in made:
        await cluster.close()


async def published(store: MemoryStore, instance_id: str) -> KeyValue:
    kv = await store.get(instance_key(instance_id))
    assert kv is not None, f"{instance_id} has no record in the store"
    return kv


def record_of(kv: KeyValue) -> InstanceRecord:
    return InstanceRecord.from_json(kv.value)


# ---- publishing and the lease -----------------------------------------------------------------


async def test_start_publishes_the_record_under_a_lease(
    store: MemoryStore, clock: FakeClock, make_cluster: MakeCluster
) -> None:
    figures = Figures(BASE)
    await make_cluster("pod-a", figures=figures)

    kv = await published(store, "pod-a")
    assert record_of(kv) == BASE
    assert kv.lease != 0

    # nobody keeps the lease alive (the keepalive loop sleeps for 200 s): the record expires with it
    clock.advance(QUIET_TTL_S + 1)
    assert store.expire_leases() == [kv.lease]
    assert await store.get(instance_key("pod-a")) is None


async def test_close_revokes_the_lease_so_peers_drop_the_pod_at_once(
    store: MemoryStore, make_cluster: MakeCluster
) -> None:
    a = await make_cluster("pod-a")
    b = await make_cluster("pod-b")
    await eventually(lambda: a.is_live("pod-b"))
    removed: list[str] = []
    a.view.on_removed.append(removed.append)

    await b.close()  # the FakeClock does not move: only the revoke can remove the record

    assert await store.get(instance_key("pod-b")) is None
    await eventually(lambda: removed == ["pod-b"])
    assert not a.is_live("pod-b")
    assert a.endpoint("pod-b") is None


async def test_pods_on_one_store_see_each_other(make_cluster: MakeCluster) -> None:
    a = await make_cluster("pod-a")
    b = await make_cluster("pod-b")

    assert b.is_live("pod-a")  # listed at start
    await eventually(lambda: a.is_live("pod-b"))  # learnt from the watch
    for cluster in (a, b):
        assert cluster.is_live(cluster.instance_id)
        assert cluster.endpoint("pod-a") == "pod-a:8033"
        assert cluster.endpoint("pod-b") == "pod-b:8033"
        assert not cluster.is_live("pod-z")
        assert cluster.endpoint("pod-z") is None
        assert set(cluster.instances()) == {"pod-a", "pod-b"}


async def test_instances_shows_this_pod_with_live_figures_and_peers_as_published(
    store: MemoryStore, make_cluster: MakeCluster
) -> None:
    figures_a = Figures(replace(BASE, endpoint="pod-a:8033"))
    a = await make_cluster("pod-a", figures=figures_a)
    b = await make_cluster("pod-b")
    await eventually(lambda: a.is_live("pod-b"))
    published_a = figures_a.record

    # below every threshold, so not republished (the publish loop is quiet anyway)
    figures_a.record = replace(published_a, used_bytes=510_000, request_rate_rpm=2_010)

    assert a.instances()["pod-a"] == figures_a.record
    assert a.instances()["pod-b"] == record_of(await published(store, "pod-b"))
    assert b.instances()["pod-a"] == published_a
    assert record_of(await published(store, "pod-a")) == published_a


async def test_mark_shutting_down_publishes_at_once(
    store: MemoryStore, make_cluster: MakeCluster
) -> None:
    a = await make_cluster("pod-a")
    b = await make_cluster("pod-b")

    await a.mark_shutting_down()

    assert record_of(await published(store, "pod-a")).shutting_down  # publish loop is quiet
    assert a.instances()["pod-a"].shutting_down
    await eventually(lambda: (r := b.view.get("pod-a")) is not None and r.shutting_down)
    assert b.is_live("pod-a")  # still live: it drains, it is not gone


# ---- leader ----------------------------------------------------------------------------------


async def test_a_lone_pod_leads(make_cluster: MakeCluster) -> None:
    a = await make_cluster("pod-a")
    assert a.is_leader()


async def test_one_pod_is_elected_and_another_takes_over(make_cluster: MakeCluster) -> None:
    b = await make_cluster("pod-b", check_interval_s=0.01)
    a = await make_cluster("pod-a", check_interval_s=0.01)
    c = await make_cluster("pod-c", check_interval_s=0.01)
    await eventually(lambda: all(x.leader == "pod-b" for x in (a, b, c)))
    assert [x.is_leader() for x in (a, b, c)] == [False, True, False]  # the first to campaign

    await b.mark_shutting_down()  # a draining pod resigns
    await eventually(lambda: sum(x.is_leader() for x in (a, c)) == 1)
    assert not b.is_leader()
    successor, other = (a, c) if a.is_leader() else (c, a)

    await successor.close()  # its lease goes, and the leader key with it
    await eventually(lambda: other.is_leader())


async def test_a_shutting_down_pod_does_not_lead_while_a_live_peer_exists(
    make_cluster: MakeCluster,
) -> None:
    a = await make_cluster("pod-a", check_interval_s=0.01)
    b = await make_cluster("pod-b", check_interval_s=0.01)
    await eventually(lambda: a.is_live("pod-b"))
    assert a.is_leader() and not b.is_leader()

    await a.mark_shutting_down()
    await eventually(lambda: b.is_leader())
    assert not a.is_leader()


# ---- the publish loop ------------------------------------------------------------------------


async def test_a_figure_beyond_its_threshold_is_republished(
    store: MemoryStore, make_cluster: MakeCluster
) -> None:
    figures = Figures(BASE)
    await make_cluster("pod-a", figures=figures, check_interval_s=FAST_CHECK_S)

    figures.record = replace(BASE, model_count=BASE.model_count + 10)

    async def republished() -> bool:
        return record_of(await published(store, "pod-a")) == figures.record

    await eventually_async(republished)


async def test_a_small_move_waits_for_the_max_interval(
    store: MemoryStore, clock: FakeClock, make_cluster: MakeCluster
) -> None:
    figures = Figures(BASE)
    await make_cluster("pod-a", figures=figures, check_interval_s=FAST_CHECK_S)
    first = await published(store, "pod-a")

    figures.record = replace(BASE, used_bytes=BASE.used_bytes + 1)
    await figures.checked(5)
    assert await published(store, "pod-a") == first

    clock.advance(REPUBLISH_MAX_INTERVAL_MS / 1000 - 1)
    await figures.checked(5)
    assert await published(store, "pod-a") == first

    clock.advance(1)

    async def republished() -> bool:
        return record_of(await published(store, "pod-a")) == figures.record

    await eventually_async(republished)


async def test_a_republish_that_finds_its_lease_gone_takes_a_new_one(
    store: MemoryStore, clock: FakeClock, make_cluster: MakeCluster
) -> None:
    figures = Figures(BASE)
    await make_cluster("pod-a", figures=figures, check_interval_s=FAST_CHECK_S)
    old_lease = (await published(store, "pod-a")).lease

    clock.advance(QUIET_TTL_S + 1)  # keepalive loop asleep: only the publish loop can notice
    assert store.expire_leases() == [old_lease]
    figures.record = replace(BASE, model_count=0)

    async def back_under_a_new_lease() -> bool:
        kv = await store.get(instance_key("pod-a"))
        return kv is not None and kv.lease != old_lease and record_of(kv) == figures.record

    await eventually_async(back_under_a_new_lease)


# ---- lease loss ------------------------------------------------------------------------------


async def test_a_lost_lease_is_noticed_by_keepalive_and_the_record_published_again(
    store: MemoryStore, clock: FakeClock, make_cluster: MakeCluster
) -> None:
    ttl_s = 0.06  # keepalive every 20 real ms; expiry itself happens only when the FakeClock moves
    a = await make_cluster("pod-a", lease_ttl_s=ttl_s)
    b = await make_cluster("pod-b")  # QUIET_TTL_S: survives the clock moves below
    await eventually(lambda: b.is_live("pod-a"))
    removed: list[str] = []
    b.view.on_removed.append(removed.append)
    old_lease = (await published(store, "pod-a")).lease

    # the store expired the lease behind the pod's back (say it was unreachable for a while)
    clock.advance(ttl_s * 2)
    assert store.expire_leases() == [old_lease]
    assert await store.get(instance_key("pod-a")) is None

    async def back_under_a_new_lease() -> bool:
        kv = await store.get(instance_key("pod-a"))
        return kv is not None and kv.lease != old_lease

    await eventually_async(back_under_a_new_lease)
    await eventually(lambda: removed == ["pod-a"] and b.is_live("pod-a"))
    assert a.is_live("pod-a")


async def test_keepalive_holds_the_lease_while_the_clock_runs(
    store: MemoryStore, clock: FakeClock, make_cluster: MakeCluster
) -> None:
    ttl_s = 0.06
    await make_cluster("pod-a", lease_ttl_s=ttl_s)
    lease = (await published(store, "pod-a")).lease

    # each step moves the clock by half the TTL, then lets several keepalives (every 20 ms) run;
    # after three steps the clock is past the first deadline, so only keepalives can have saved it
    for _ in range(3):
        clock.advance(ttl_s / 2)
        await asyncio.sleep(0.1)
        assert store.expire_leases() == []
    assert (await published(store, "pod-a")).lease == lease
