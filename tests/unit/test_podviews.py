"""``PodViews``: every pod as this pod's placement sees it, on a real MemoryStore and Cluster.

Pod "a" is this pod (a started ``Cluster`` whose loops stay quiet); the other pods' records are
written into the store as their own pods would, and the test waits for a's view to show them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from modelmesh.clock import FakeClock
from modelmesh.cluster import Cluster
from modelmesh.kv.memory import MemoryStore
from modelmesh.placement.view import LabelConstraint, TypeConstraints
from modelmesh.podviews import PENDING_TTL_MS, PodViews
from modelmesh.types import InstanceRecord, ModelInfo, ModelRecord

KEY_ROOT = "mm/svc"
MIB = 1024 * 1024
DEFAULT_SIZE = 2 * MIB
WAIT_S = 2.0

RECORD = InstanceRecord(endpoint="127.0.0.1:1", capacity_bytes=100 * MIB, used_bytes=10 * MIB, model_count=5,
                        request_rate_rpm=600)


class Own:
    """Pod a's live figures, as the mesh core would give them."""

    rate_rpm = 900
    used_bytes = 40 * MIB
    capacity_bytes = 100 * MIB


async def eventually(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def make_views(clock: FakeClock, constraints: TypeConstraints = TypeConstraints()) -> PodViews:
    return PodViews(
        instance_id="a", clock=clock, constraints=constraints,
        own_rate_rpm=lambda: Own.rate_rpm, own_used_bytes=lambda: Own.used_bytes,
        own_capacity_bytes=lambda: Own.capacity_bytes, default_size=lambda: DEFAULT_SIZE,
    )


class Pods:
    def __init__(self, store: MemoryStore, cluster: Cluster, views: PodViews, clock: FakeClock) -> None:
        self.store, self.cluster, self.views, self.clock = store, cluster, views, clock

    async def publish(self, instance_id: str, record: InstanceRecord) -> None:
        """Write another pod's record, as that pod would, and wait until a's view has it."""
        revision = await self.store.put(f"{KEY_ROOT}/instances/{instance_id}", record.to_json())

        def seen() -> bool:
            current = self.cluster.view.versioned(instance_id)
            return current is not None and current.revision == revision

        await eventually(seen, f"{instance_id}'s record in the view")

    async def leave(self, instance_id: str) -> None:
        await self.store.delete(f"{KEY_ROOT}/instances/{instance_id}")
        await eventually(lambda: not self.cluster.is_live(instance_id), f"{instance_id} to leave the view")


@pytest.fixture
async def pods() -> AsyncIterator[Pods]:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    views = make_views(clock)
    own = replace(RECORD, used_bytes=Own.used_bytes, request_rate_rpm=Own.rate_rpm)
    cluster = Cluster(store, KEY_ROOT, "a", clock=clock, lease_ttl_s=600.0, figures=lambda: own,
                      check_interval_s=60.0, campaign_interval_s=60.0)
    await cluster.start()
    views.cluster = cluster
    try:
        yield Pods(store, cluster, views, clock)
    finally:
        await cluster.close()


def model(*copies: str, pin: tuple[str, ...] = (), model_type: str = "onnx") -> ModelRecord:
    return ModelRecord(ModelInfo(model_type), registered_ms=0, copies={c: 0 for c in copies}, pin_labels=pin)


async def test_a_load_sent_to_a_pod_counts_against_it_until_the_pod_republishes(pods: Pods) -> None:
    await pods.publish("b", RECORD)
    pods.views.add_pending("b", "m1", pods.clock.now_ms())
    pods.views.add_pending("b", "m2", pods.clock.now_ms())
    assert {i: [p.model_id for p in loads] for i, loads in pods.views.pending_loads().items()} == {"b": ["m1", "m2"]}
    assert pods.views.pending_for("m1") == 1 and pods.views.pending_for("m3") == 0
    b = next(i for i in pods.views.placement_view().instances if i.instance_id == "b")
    assert (b.used_bytes, b.model_count, b.loading_in_flight) == (RECORD.used_bytes + 2 * DEFAULT_SIZE, 7, 2)
    # b's next record shows what it loaded: the pending loads no longer count on top of it
    await pods.publish("b", replace(RECORD, used_bytes=RECORD.used_bytes + 2 * DEFAULT_SIZE, model_count=7))
    assert pods.views.pending_loads() == {}
    b = next(i for i in pods.views.placement_view().instances if i.instance_id == "b")
    assert (b.used_bytes, b.model_count) == (RECORD.used_bytes + 2 * DEFAULT_SIZE, 7)


async def test_pending_loads_expire_and_leave_with_their_pod(pods: Pods) -> None:
    await pods.publish("b", RECORD)
    await pods.publish("c", RECORD)
    pods.views.add_pending("b", "m1", pods.clock.now_ms())
    pods.clock.advance(PENDING_TTL_MS / 1000 - 0.001)
    assert pods.views.pending_for("m1") == 1
    pods.clock.advance(0.001)  # a pod that never republishes does not carry the load for ever
    assert pods.views.pending_loads() == {}
    pods.views.add_pending("c", "m2", pods.clock.now_ms())
    pods.views.forget("c")
    assert pods.views.pending_loads() == {}


async def test_eligible_pods_need_the_types_labels_and_the_pin_labels_and_not_shutting_down() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    gpu = TypeConstraints(by_type=(("big", LabelConstraint(required=frozenset({"gpu"}))),))
    views = make_views(clock, gpu)
    cluster = Cluster(store, KEY_ROOT, "a", clock=clock, lease_ttl_s=600.0,
                      figures=lambda: replace(RECORD, labels=("gpu",)), check_interval_s=60.0,
                      campaign_interval_s=60.0)
    await cluster.start()
    views.cluster = cluster
    p = Pods(store, cluster, views, clock)
    try:
        await p.publish("b", replace(RECORD, labels=("gpu", "fast")))
        await p.publish("c", replace(RECORD, labels=("fast",)))
        await p.publish("d", replace(RECORD, labels=("gpu", "fast"), shutting_down=True))
        assert views.eligible_pods(model()) == ["a", "b", "c"]
        assert views.eligible_pods(model(model_type="big")) == ["a", "b"]
        assert views.eligible_pods(model(pin=("fast",))) == ["b", "c"]
        assert views.eligible_pods(model(model_type="big", pin=("fast",))) == ["b"]
        # a pinned model's placement view requires its pin labels on top of its type's
        pinned = views.placement_view(model(model_type="big", pin=("fast",))).constraints.for_type("big")
        assert pinned.required == {"gpu", "fast"}
        assert views.placement_view(model(model_type="big")).constraints.for_type("big").required == {"gpu"}
    finally:
        await cluster.close()


async def test_rates_fullness_and_holders_come_from_the_published_records(pods: Pods) -> None:
    await pods.publish("b", replace(RECORD, request_rate_rpm=300, used_bytes=60 * MIB))
    await pods.publish("c", replace(RECORD, request_rate_rpm=1200, used_bytes=80 * MIB))
    Own.rate_rpm, was = 1500, Own.rate_rpm  # this pod's own rate is read live, not as published
    try:
        assert [pods.views.pod_rate(i) for i in ("a", "b", "c", "gone")] == [1500, 300, 1200, 0]
        assert pods.views.mean_pod_rate() == pytest.approx((1500 + 300 + 1200) / 3)
    finally:
        Own.rate_rpm = was
    # fullness from the records: a's published 40 MiB, not anything live
    assert pods.views.cluster_fullness() == pytest.approx((40 + 60 + 80) / 300)
    assert pods.views.live_holders(model("c", "gone", "a", "b")) == ["a", "b", "c"]
    await pods.leave("c")
    assert pods.views.live_holders(model("c", "a", "b")) == ["a", "b"]
    assert not pods.views.is_live("c") and pods.views.is_live("a")


def test_without_a_cluster_the_pod_stands_for_the_cluster() -> None:
    views = make_views(FakeClock())
    assert views.live_holders(model("x", "a")) == ["a", "x"]  # no view to say a pod left
    assert views.cluster_fullness() == pytest.approx(Own.used_bytes / Own.capacity_bytes)
    assert views.mean_pod_rate() == Own.rate_rpm and views.pod_rate("a") == Own.rate_rpm
    assert views.eligible_pods(model()) == [] and views.pending_loads() == {}
