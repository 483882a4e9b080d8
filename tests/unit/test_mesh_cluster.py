"""Three meshes on one in-memory store, wired to each other in-process: cluster routing without gRPC."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from prometheus_client import CollectorRegistry

from modelmesh.api.status import status_for
from modelmesh.clock import FakeClock
from modelmesh.cluster import Cluster
from modelmesh.errors import MeshError, ModelLoadFailed, RequestTooLarge, RuntimeUnavailable, UpstreamError
from modelmesh.kv.memory import MemoryStore
from modelmesh.mesh import REHOME_PARALLEL, REHOME_RECENT_MS, Mesh
from modelmesh.placement.eviction import LONG_USE_TAU_MS
from modelmesh.metrics import MeshMetrics
from modelmesh.registry import Registry
from modelmesh.routing import RouteTarget, resolve_target
from modelmesh.types import ModelInfo
from tests.fakes import FakeRuntime

INFER = "/inference.GRPCInferenceService/ModelInfer"
IDS = ("pod-a", "pod-b", "pod-c")


class InProcessPeer:
    """A ``Forwarder`` to another Mesh in this process, failing as gRPC would."""

    def __init__(self, pods: dict[str, Pod], instance_id: str) -> None:
        self._pods = pods
        self._id = instance_id

    async def invoke(self, method, body, metadata, timeout_s):
        pod = self._pods[self._id]
        if pod.down:
            raise RuntimeUnavailable(f"pod at {self._id} is unavailable: connection refused")
        if pod.too_large is not None:  # as runtime.grpc_client says of a hop over the size limit
            raise RequestTooLarge(pod.too_large)
        try:
            return await pod.mesh.route(resolve_target(metadata, body), method, body, metadata, timeout_s,
                                        forwarded=True)
        except MeshError as err:
            code, message = status_for(err)
            raise UpstreamError(code.name, message) from err

    async def close(self, grace_s=None):
        pass


class Pod:
    def __init__(self, instance_id, store, clock, pods, *, lease_ttl_s=30.0):
        self.id = instance_id
        self.store, self.clock = store, clock
        self.down = False
        # set: requests forwarded here fail as a message over gRPC's size limit would
        self.too_large: str | None = None
        self.runtime = FakeRuntime(capacity=10_000)
        self.registry = Registry(store, "mm/t")
        self.mesh = Mesh(instance_id=instance_id, registry=self.registry, runtime=self.runtime,
                         metrics=MeshMetrics(CollectorRegistry()), clock=clock, load_failure_expiry_ms=60_000,
                         peer_factory=lambda endpoint: InProcessPeer(pods, endpoint),
                         rng=random.Random(instance_id))
        # The keepalive loop sleeps a third of the TTL in real time, so on the FakeClock a test that
        # moves time past the TTL in one step expires every pod's lease (tests of minutes of
        # traffic history pass a longer TTL).
        self.cluster = Cluster(store, "mm/t", instance_id, clock=clock, lease_ttl_s=lease_ttl_s,
                               figures=lambda: self.mesh.instance_figures(instance_id, (), "", 0),
                               check_interval_s=0.01, campaign_interval_s=0.01)

    async def start(self):
        self.mesh.start(await self.runtime.status())
        await self.registry.start()
        await self.cluster.start()
        self.mesh.attach(self.cluster)

    async def stop(self):
        await self.mesh.close()
        await self.cluster.close()
        await self.registry.close()


async def until(predicate, what, timeout_s=2.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def start_pods(lease_ttl_s: float = 30.0) -> dict[str, Pod]:
    clock = FakeClock()
    store = MemoryStore(clock)
    pods: dict[str, Pod] = {}
    for i in IDS:
        pods[i] = Pod(i, store, clock, pods, lease_ttl_s=lease_ttl_s)
    for p in pods.values():
        await p.start()
    await until(lambda: all(len(p.cluster.view) == 3 for p in pods.values()), "every pod to see the others")
    return pods


async def stop_pods(pods: dict[str, Pod]) -> None:
    for p in pods.values():
        await p.stop()
    await next(iter(pods.values())).store.close()


@pytest.fixture
async def pods():
    started = await start_pods()
    yield started
    await stop_pods(started)


@pytest.fixture
async def long_lived_pods():
    started = await start_pods(lease_ttl_s=24 * 3600)
    yield started
    await stop_pods(started)


async def register(pod: Pod, model_id: str, path: str | None = None):
    await pod.mesh.register(model_id, ModelInfo("onnx", path or f"/m/{model_id}"), load_now=False, sync=False)


async def infer(pod: Pod, model_id: str, *, forwarded=False):
    md = [("mm-model-id", model_id)]
    return await pod.mesh.route(RouteTarget(model_id, "model"), INFER, b"x", md, None, forwarded=forwarded)


async def test_request_goes_to_the_pod_holding_the_copy(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    await register(a, "m")
    await infer(b, "m", forwarded=True)  # a forwarded request is served where it lands: loads on b
    assert b.runtime.loaded == {"m": 100}
    assert await infer(a, "m") == b"x|m"
    assert a.runtime.load_calls == [] and b.runtime.invocations[-1] == (INFER, "m")
    assert {c.instance_id for c in (await a.mesh.status("m")).copies} == {"pod-b"}


async def test_loads_spread_over_the_pods(pods):
    a = pods["pod-a"]
    for i in range(30):
        await register(a, f"m{i}")
    await asyncio.gather(*(infer(a, f"m{i}") for i in range(30)))
    counts = {p.id: len(p.runtime.loaded) for p in pods.values()}
    assert sum(counts.values()) == 30
    assert max(counts.values()) <= 12 and min(counts.values()) >= 8, counts


@pytest.mark.parametrize("used", [False, True], ids=["never-used", "used-a-second-ago"])
async def test_busier_pods_load_models_nobody_has_used_but_not_models_in_use(pods, used):
    """Among near-equal pods, the load filter keeps a model in use off pods busier than 1.1x the
    quietest (its traffic comes along); a model nobody has used brings no known traffic, so its
    loads may go to pods up to 4x as busy (a record's registration time is not a use)."""
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    for i, pod in enumerate((a, b, c) * 8):  # eight models on each pod: every pod near-best
        await register(a, f"pre{i}")
        await infer(pod, f"pre{i}", forwarded=True)
    for busy in (b, c):
        busy.mesh.requests.hit(50)  # +300 rpm: about 3.5x the quietest (counted as 100 rpm)
    await until(lambda: all(a.cluster.view.get(p.id).request_rate_rpm >= 300 for p in (b, c))
                and all(a.cluster.view.get(p.id).model_count >= 7 for p in (a, b, c)),  # moved enough
                "the pods' records: their models, pod-b's and pod-c's rates")
    now = a.clock.now_ms()
    for i in range(3):
        await a.mesh.register(f"m{i}", ModelInfo("onnx", f"/m/m{i}"), load_now=False, sync=False,
                              last_used_ms=now - 1000 if used else 0)
    await asyncio.gather(*(infer(a, f"m{i}") for i in range(3)))
    holders = {p.id: sorted(m for m in p.runtime.loaded if m.startswith("m")) for p in (a, b, c)}
    if used:
        assert holders == {"pod-a": ["m0", "m1", "m2"], "pod-b": [], "pod-c": []}
    else:  # the pods' own pending loads rotate the three over the three pods
        assert sorted(len(h) for h in holders.values()) == [1, 1, 1], holders


async def test_a_failed_load_moves_on_to_another_pod(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    for p in (a, b):
        p.runtime.failing["/m/picky"] = "needs an instruction set this machine lacks"
    await register(a, "picky")
    assert await infer(a, "picky") == b"x|picky"
    assert set(c.runtime.loaded) == {"picky"}
    assert len(a.runtime.load_calls) + len(b.runtime.load_calls) <= 2


async def test_a_model_failing_everywhere_reports_the_reason(pods):
    a = pods["pod-a"]
    for p in pods.values():
        p.runtime.failing["/m/bad"] = "corrupt file"
    await register(a, "bad")
    with pytest.raises((ModelLoadFailed, UpstreamError), match="corrupt file"):
        await infer(a, "bad")
    loads = sum(len(p.runtime.load_calls) for p in pods.values())
    assert 1 <= loads <= 3
    with pytest.raises((ModelLoadFailed, UpstreamError), match="corrupt file"):
        await infer(a, "bad")
    assert sum(len(p.runtime.load_calls) for p in pods.values()) == loads  # not retried until expiry


async def test_an_unreachable_pod_is_skipped(pods):
    a, c = pods["pod-a"], pods["pod-c"]
    await register(a, "m")
    await infer(c, "m", forwarded=True)
    c.down = True
    assert await infer(a, "m") == b"x|m"
    assert "m" in a.runtime.loaded or "m" in pods["pod-b"].runtime.loaded


async def test_a_message_over_the_size_limit_is_not_sent_to_other_pods(pods):
    """Every pod has the same MM_SVC_GRPC_MAX_MSG_SIZE: a hop whose request or answer is over it
    fails on any pod, so the caller hears RESOURCE_EXHAUSTED at once and no other pod loads the model
    (a RESOURCE_EXHAUSTED that means "no room there" does move on)."""
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await register(a, "m")
    await infer(c, "m", forwarded=True)
    c.too_large = "Received message larger than max (6291489 vs. 4194304)"
    with pytest.raises(RequestTooLarge, match="larger than max") as err:
        await infer(a, "m")
    assert status_for(err.value)[0].name == "RESOURCE_EXHAUSTED"
    assert a.runtime.load_calls == [] and b.runtime.load_calls == []
    c.too_large = None
    assert await infer(a, "m") == b"x|m"


async def test_forwarded_requests_are_never_forwarded_again(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await register(a, "m")
    await infer(c, "m", forwarded=True)
    await infer(b, "m", forwarded=True)  # b has no copy but must serve it itself
    assert "m" in b.runtime.loaded and c.runtime.invocations == [(INFER, "m")]


async def test_unregister_through_one_pod_unloads_everywhere(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await register(a, "m")
    await infer(b, "m", forwarded=True)
    await infer(c, "m", forwarded=True)
    await a.mesh.unregister("m")
    await until(lambda: "m" not in b.runtime.loaded and "m" not in c.runtime.loaded, "the copies to unload")


async def test_registration_through_one_pod_routes_at_once_on_the_others(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    await register(a, "fresh")
    assert await infer(b, "fresh") == b"x|fresh"


async def test_the_leader_sweeps_copies_of_a_departed_pod(pods):
    a, c = pods["pod-a"], pods["pod-c"]
    await register(a, "m")
    await infer(c, "m", forwarded=True)
    await until(lambda: "pod-c" in a.registry.cached("m").copies, "a to see the copy")  # by watch
    c.down = True
    await c.cluster.close()  # its lease goes, as when a pod dies and its TTL passes
    await until(lambda: "pod-c" not in (a.registry.cached("m").copies), "the sweep")
    assert await infer(a, "m") == b"x|m"


async def test_a_restarted_pod_forgets_copies_recorded_by_its_earlier_life(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    await register(a, "m")
    await infer(b, "m", forwarded=True)
    await until(lambda: "pod-b" in a.registry.cached("m").copies, "a to see the copy")  # by watch
    # pod-b restarts under the same id with an empty runtime
    restarted = Pod("pod-b", b.store, b.clock, pods)
    await restarted.registry.start()
    restarted.mesh.start(await restarted.runtime.status())
    assert await restarted.mesh.forget_own_copies() == 1
    assert "pod-b" not in (await restarted.registry.get("m")).record.copies
    await restarted.registry.close()
    await restarted.mesh.close()


async def test_ensure_loaded_places_like_a_request(pods):
    a = pods["pod-a"]
    for i in range(9):
        await register(a, f"e{i}")
    for i in range(9):
        status = await a.mesh.ensure_loaded(f"e{i}", sync=True)
        assert status.state.name == "LOADED"
    counts = {p.id: len(p.runtime.loaded) for p in pods.values()}
    assert sum(counts.values()) == 9 and max(counts.values()) <= 5, counts


# ---- copies that follow traffic (scaling.CopyKeeper) on the same harness

from modelmesh.scaling import CopyKeeper  # noqa: E402
from modelmesh.types import PlacementPolicy  # noqa: E402


def keeper(pod: Pod, threshold: float = 60.0) -> CopyKeeper:
    return CopyKeeper(pod.mesh, pod.clock, threshold_rpm=lambda: threshold)


async def next_period(pods, clock) -> None:
    clock.advance(10 - (clock.now_ms() % 10_000) / 1000 + 0.001)


async def test_a_hot_model_gets_more_copies_and_requests_spread(pods):
    a = pods["pod-a"]
    await register(a, "hot")
    await infer(a, "hot", forwarded=True)  # its one copy is on pod-a
    await next_period(pods, a.clock)
    for _ in range(30):  # 30 in a period = 180 rpm, three times a threshold of 60
        await infer(a, "hot")
    await next_period(pods, a.clock)
    k = keeper(a)
    await k.tick()
    await until(lambda: sum("hot" in p.runtime.loaded for p in pods.values()) == 2, "a second copy")
    # requests entering at a third pod now reach both copies
    c = next(p for p in pods.values() if "hot" not in p.runtime.loaded)
    holders = [p for p in pods.values() if "hot" in p.runtime.loaded]
    await asyncio.gather(*(infer(c, "hot") for _ in range(20)))
    assert all(any(m == "hot" for _, m in p.runtime.invocations) for p in holders)


async def test_a_cool_model_keeps_one_copy_when_space_is_not_needed(pods):
    a = pods["pod-a"]
    await register(a, "warm")
    await infer(a, "warm", forwarded=True)
    await next_period(pods, a.clock)
    await infer(a, "warm")
    await next_period(pods, a.clock)
    await keeper(a).tick()
    await asyncio.sleep(0.01)
    assert sum("warm" in p.runtime.loaded for p in pods.values()) == 1


async def test_minimum_copies_asked_at_registration_are_kept(pods):
    a = pods["pod-a"]
    await a.mesh.register("twice", ModelInfo("onnx", "/m/twice"), load_now=False, sync=False,
                          policy=PlacementPolicy(min_copies=2))
    await until(lambda: sum("twice" in p.runtime.loaded for p in pods.values()) == 2, "two copies")
    assert a.registry.cached("twice").min_copies == 2


async def test_all_pods_loads_everywhere(pods):
    a = pods["pod-a"]
    await a.mesh.register("everywhere", ModelInfo("onnx", "/m/everywhere"), load_now=False, sync=False,
                          policy=PlacementPolicy(all_pods=True))
    await until(lambda: all("everywhere" in p.runtime.loaded for p in pods.values()), "a copy on every pod")


async def test_a_pinned_model_loads_only_on_pods_with_its_labels():
    clock = FakeClock()
    store = MemoryStore(clock)
    pods: dict[str, Pod] = {}
    for i in IDS:
        pods[i] = Pod(i, store, clock, pods)
        labels = ("gpu",) if i == "pod-c" else ()
        pods[i].cluster = Cluster(store, "mm/t", i, clock=clock, lease_ttl_s=30,
                                  figures=lambda i=i, labels=labels: pods[i].mesh.instance_figures(i, labels, "", 0),
                                  check_interval_s=0.01, campaign_interval_s=0.01)
    for p in pods.values():
        await p.start()
    try:
        await until(lambda: all(len(p.cluster.view) == 3 for p in pods.values()), "the views")
        a = pods["pod-a"]
        await a.mesh.register("pinned", ModelInfo("onnx", "/m/pinned"), load_now=False, sync=False,
                              policy=PlacementPolicy(pin_labels=("gpu",)))
        for _ in range(3):
            assert await infer(a, "pinned") == b"x|pinned"
        assert [p.id for p in pods.values() if "pinned" in p.runtime.loaded] == ["pod-c"]
    finally:
        for p in pods.values():
            await p.stop()
        await store.close()


async def test_the_leader_expires_old_failures_and_each_pod_reconciles_its_copies(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    for p in pods.values():
        p.runtime.failing["/m/bad"] = "corrupt"
    await register(a, "bad")
    with pytest.raises((ModelLoadFailed, UpstreamError)):
        await infer(a, "bad")
    assert a.registry.cached("bad").failures
    a.clock.advance(61)  # past the 60 s expiry
    leader = next(p for p in pods.values() if p.cluster.is_leader())
    await keeper(leader).tick()
    await until(lambda: not a.registry.cached("bad").failures, "the failures to expire")

    await register(a, "m")
    await infer(b, "m", forwarded=True)
    await until(lambda: "pod-b" in a.registry.cached("m").copies, "a to see b's copy")  # a's view follows by watch
    b.runtime.loaded.clear()
    b.mesh._copies.clear()  # the runtime lost it and the pod noticed, but the record still says b
    await keeper(b).tick()
    await until(lambda: "pod-b" not in a.registry.cached("m").copies, "pod-b to correct the record")


async def test_a_cooled_model_loses_its_extra_copy_when_space_is_needed(long_lived_pods):
    pods = long_lived_pods
    a = pods["pod-a"]
    await register(a, "cool")
    await infer(a, "cool", forwarded=True)
    await next_period(pods, a.clock)
    for _ in range(30):  # 180 rpm, three times the threshold
        await infer(a, "cool")
    await next_period(pods, a.clock)
    keepers = {p.id: keeper(p) for p in pods.values()}
    await keepers["pod-a"].tick()
    await until(lambda: sum("cool" in p.runtime.loaded for p in pods.values()) == 2, "a second copy")
    await until(lambda: len(a.registry.cached("cool").copies) == 2, "the second copy in the record")

    # fill every pod to 97% (100-byte models, 10,000 bytes each)
    for p in pods.values():
        for i in range(97 - len(p.runtime.loaded)):
            await register(a, f"{p.id}-f{i}")
            await infer(p, f"{p.id}-f{i}", forwarded=True)

    # the traffic stops; after the cool-down (pods republish their figures by then too) every
    # pod's keeper runs
    a.clock.advance(4 * 60)
    await until(lambda: a.mesh.pods.cluster_fullness() >= 0.95, "the cluster to publish it is full")
    # ... and that the filling traffic is over (a holder busier than the mean keeps its copies)
    await until(lambda: all(p.cluster.view.get(q).request_rate_rpm == 0 for p in pods.values() for q in IDS),
                "every pod to publish its rate has dropped")
    for k in keepers.values():
        await k.tick()
    await until(lambda: sum("cool" in p.runtime.loaded for p in pods.values()) == 1, "one copy left")
    holder = next(p for p in pods.values() if "cool" in p.runtime.loaded)
    await until(lambda: set(a.registry.cached("cool").copies) == {holder.id}, "the record to follow")
    assert sum(p.runtime.unload_calls.count("cool") for p in pods.values()) == 1
    assert await infer(pods["pod-c"], "cool") == b"x|cool"
    # no other model was unloaded or lost from its record to make that happen
    assert all(u == ["cool"] or u == [] for u in (p.runtime.unload_calls for p in pods.values()))


async def test_copies_swept_while_a_lease_lapsed_come_back_to_the_records(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    await register(a, "kept")
    await infer(b, "kept", forwarded=True)
    await until(lambda: "pod-b" in a.registry.cached("kept").copies, "a to see the copy")  # by watch

    # The store lost pod-b's lease (out of its reach past the TTL) and the leader swept its copies
    # from the records, as it does for a departed pod; pod-b published again under a new lease,
    # and its runtime still holds and serves the model.
    def swept(record):
        del record.copies["pod-b"]
        return record

    await a.registry.update("kept", swept)
    await until(lambda: "pod-b" not in b.registry.cached("kept").copies, "pod-b to see the sweep")
    assert "kept" in b.runtime.loaded
    await keeper(b).tick()  # its reconcile restores the entry
    await until(lambda: "pod-b" in a.registry.cached("kept").copies, "the copy back in the record")
    assert await infer(a, "kept") == b"x|kept" and b.runtime.invocations[-1] == (INFER, "kept")
    assert b.runtime.load_calls == ["kept"] and a.runtime.load_calls == []  # never loaded again


async def test_the_leader_loads_models_held_nowhere_into_free_space_most_recent_first(long_lived_pods):
    pods = long_lived_pods
    a = pods["pod-a"]
    for p in pods.values():
        p.runtime.capacity = 1000  # room for 10 models of 100 bytes each
        p.mesh.capacity_bytes = 1000
    # pod-b is nearly full already: 9 models there
    for i in range(9):
        await register(a, f"busy{i}")
        await infer(pods["pod-b"], f"busy{i}", forwarded=True)
    now = a.clock.now_ms()
    for i in range(20):  # m0 used most recently, m19 longest ago
        await a.mesh.register(f"m{i}", ModelInfo("onnx", f"/m/m{i}"), load_now=False, sync=False,
                              last_used_ms=now - 1000 * (i + 1))
    a.clock.advance(61)  # every pod republishes within a minute, moved or not
    await until(lambda: all(p.cluster.view.get("pod-b").model_count == 9 for p in pods.values()), "pod-b's record")
    leader = next(p for p in pods.values() if p.cluster.is_leader())
    started = leader.mesh.load_into_free_space()
    # two loading slots on each pod; pod-b has no room to spare (9 of 10: one model's room is kept)
    assert sorted(started) == sorted(f"m{i}" for i in range(len(started)))  # the most recent ones
    await until(lambda: sum(len(p.runtime.loaded) for p in pods.values()) == 9 + len(started), "the loads")
    assert len(started) == 4 and all(not any(f"m{i}" == x for x in pods["pod-b"].runtime.loaded) for i in range(20))
    assert all(p.runtime.unload_calls == [] for p in pods.values())  # nothing evicted for them
    # the copies carry the models' last use, so they go first when room is needed
    for p in pods.values():
        for copy in p.mesh.loaded_copies():
            if copy.model_id in started:
                assert copy.last_used_ms == now - 1000 * (int(copy.model_id[1:]) + 1)
    # a second run loads the next ones
    a.clock.advance(61)
    await until(lambda: all(leader.cluster.view.get(p.id).model_count == len(p.runtime.loaded)
                            for p in pods.values()), "the pods to publish their loads")
    more = leader.mesh.load_into_free_space()
    assert more and set(more).isdisjoint(started)


async def test_an_unloaded_copy_leaves_its_last_use_in_the_record(pods):
    a = pods["pod-a"]
    await register(a, "m")
    registered = a.registry.cached("m").last_used_ms
    await infer(a, "m", forwarded=True)
    a.clock.advance(5)
    await infer(a, "m", forwarded=True)
    used = a.mesh._copies["m"].last_used_ms
    assert used > registered
    await a.mesh.drop_copy("m")
    await until(lambda: "pod-a" not in a.registry.cached("m").copies, "the copy to leave the record")
    assert a.registry.cached("m").last_used_ms == used


async def test_the_leaders_keeper_loads_ahead_every_seven_minutes_not_at_once(long_lived_pods):
    pods = long_lived_pods
    a = pods["pod-a"]
    for i in range(3):
        await register(a, f"r{i}")
    leader = next(p for p in pods.values() if p.cluster.is_leader())
    k = keeper(leader)
    await k.tick()
    await asyncio.sleep(0.05)
    assert all(p.runtime.load_calls == [] for p in pods.values())  # a starting cluster waits
    a.clock.advance(7 * 60)
    await k.tick()
    await until(lambda: sum(len(p.runtime.loaded) for p in pods.values()) == 3, "the three loaded ahead")
    assert all(len(a.registry.cached(f"r{i}").copies) == 1 for i in range(3))


async def test_requests_for_a_model_held_elsewhere_go_to_the_copy_on_the_quieter_pod(long_lived_pods):
    pods = long_lived_pods
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await register(a, "two")
    await infer(b, "two", forwarded=True)
    await infer(c, "two", forwarded=True)
    for _ in range(3000):  # pod-b is busy with other work: its published rate says so
        b.mesh.requests.hit()
    await until(lambda: a.cluster.view.get("pod-b").request_rate_rpm >= 3000, "pod-b's busy record")
    a.clock.advance(6)  # past the fresh-copy grace, so both copies count as settled
    before = len(b.runtime.invocations)
    for _ in range(20):
        await infer(a, "two")
    assert len(b.runtime.invocations) == before
    assert sum(1 for _, m in c.runtime.invocations if m == "two") == 21


async def test_an_evicted_copy_leaves_its_use_in_the_record_and_the_next_copy_starts_with_it(pods):
    a = pods["pod-a"]
    await register(a, "m")
    for _ in range(12):
        await infer(a, "m", forwarded=True)
    a.clock.advance(1)
    await a.mesh.drop_copy("m")
    await until(lambda: "pod-a" not in a.registry.cached("m").copies, "the copy to leave the record")
    record = a.registry.cached("m")
    assert record.use_count == 12 and record.use_count_ms == a.clock.now_ms()
    assert record.long_use == 12 and record.long_use_ms == a.clock.now_ms()
    # loaded again 15 s later: three quarters of the minute's use is still carried (plus the one
    # request that loaded it, not yet folded into the new copy's window), and the long-term use
    # goes on from the record's, decayed over the 15 s
    a.clock.advance(15)
    await infer(a, "m", forwarded=True)
    copy = a.mesh._copies["m"]
    assert a.mesh._cached(copy).request_rate_rpm == pytest.approx(12 * 0.75 + 1)
    assert copy.long_use == pytest.approx(12 * math.exp(-15_000 / LONG_USE_TAU_MS))


async def test_a_malformed_load_ahead_header_is_invalid_argument_not_a_crash(pods):
    from modelmesh.errors import InvalidRequest
    from modelmesh.routing import LOAD_AHEAD_HEADER, MODEL_METADATA_METHOD, encode_string_field

    a = pods["pod-a"]
    await register(a, "m")
    md = [("mm-model-id", "m"), (LOAD_AHEAD_HEADER, "yesterday")]
    with pytest.raises(InvalidRequest, match="mm-load-ahead must be a time in ms"):
        await a.mesh.route(RouteTarget("m", "model"), MODEL_METADATA_METHOD, encode_string_field(1, "m"), md, None,
                           forwarded=True)
    assert a.runtime.load_calls == []


async def test_a_load_ahead_of_need_never_evicts(pods):
    from modelmesh.errors import CapacityExhausted
    from modelmesh.routing import LOAD_AHEAD_HEADER, MODEL_METADATA_METHOD, encode_string_field

    a, b = pods["pod-a"], pods["pod-b"]
    b.runtime.capacity = b.mesh.capacity_bytes = 500  # room for 5 models of 100 bytes
    for i in range(4):
        await register(a, f"f{i}")
        await infer(b, f"f{i}", forwarded=True)
    await register(a, "ahead")
    md = [("mm-model-id", "ahead"), (LOAD_AHEAD_HEADER, "1")]
    # 100 bytes free, a model and a spare model's room wanted: refused, nothing evicted
    with pytest.raises(CapacityExhausted, match="ahead of need"):
        await b.mesh.route(RouteTarget("ahead", "model"), MODEL_METADATA_METHOD, encode_string_field(1, "ahead"),
                           md, None, forwarded=True)
    assert b.runtime.unload_calls == [] and "ahead" not in b.runtime.loaded
    # with room to spare it loads, back-dated to the model's last use
    b.runtime.capacity = b.mesh.capacity_bytes = 1000
    await b.mesh.route(RouteTarget("ahead", "model"), MODEL_METADATA_METHOD, encode_string_field(1, "ahead"),
                       md, None, forwarded=True)
    assert "ahead" in b.runtime.loaded and b.mesh._copies["ahead"].last_used_ms == 1


async def test_a_pod_shutting_down_loads_its_recently_used_models_elsewhere_first(long_lived_pods):
    pods = long_lived_pods
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    for m in ("hot", "old", "shared"):
        await register(a, m)
    await infer(a, "old", forwarded=True)  # loaded here, then not used for more than an hour
    a.clock.advance(REHOME_RECENT_MS / 1000 + 1)
    await infer(a, "hot", forwarded=True)
    await infer(a, "shared", forwarded=True)
    await infer(b, "shared", forwarded=True)
    await until(lambda: set(a.mesh.record("shared").copies) == {"pod-a", "pod-b"}, "b's copy of 'shared'")

    await a.cluster.mark_shutting_down()
    await until(lambda: b.cluster.view.get("pod-a").shutting_down and c.cluster.view.get("pod-a").shutting_down,
                "the others to see a shutting down")
    assert await a.mesh.rehome(timeout_s=5) == (1, 1)  # only 'hot': used lately and held only here
    assert ("hot" in b.runtime.loaded) != ("hot" in c.runtime.loaded)
    assert "old" not in b.runtime.loaded and "old" not in c.runtime.loaded
    assert "shared" not in c.runtime.loaded
    assert {"pod-b", "pod-c"} & set(a.mesh.record("hot").copies)
    # the new copy serves: a request entering at the third pod loads nothing more
    loads = len(b.runtime.load_calls) + len(c.runtime.load_calls)
    assert await infer(c if "hot" in b.runtime.loaded else b, "hot") == b"x|hot"
    assert len(b.runtime.load_calls) + len(c.runtime.load_calls) == loads
    assert await a.mesh.rehome(timeout_s=5) == (0, 0)  # nothing left that only a holds


async def test_rehoming_runs_a_bounded_number_of_loads_at_once(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    models = [f"m{i}" for i in range(3 * REHOME_PARALLEL)]
    for m in models:
        await register(a, m)
        await infer(a, m, forwarded=True)
    b.runtime.gate, c.runtime.gate = asyncio.Event(), asyncio.Event()
    await a.cluster.mark_shutting_down()
    await until(lambda: b.cluster.view.get("pod-a").shutting_down and c.cluster.view.get("pod-a").shutting_down,
                "the others to see a shutting down")
    rehoming = asyncio.create_task(a.mesh.rehome(timeout_s=30))

    def arrived() -> int:  # copies the forwarded loads made on b and c, loading or waiting to
        return len(b.mesh._copies) + len(c.mesh._copies)

    await until(lambda: arrived() == REHOME_PARALLEL, "the first loads to reach b and c")
    await asyncio.sleep(0.1)
    assert arrived() == REHOME_PARALLEL  # the rest wait for one of these to finish
    b.runtime.gate.set()
    c.runtime.gate.set()
    assert await asyncio.wait_for(rehoming, timeout=5) == (len(models), len(models))
    assert arrived() == len(models)


async def test_rehoming_is_off_at_zero_and_without_other_pods(pods):
    a = pods["pod-a"]
    await register(a, "m")
    await infer(a, "m", forwarded=True)
    await a.cluster.mark_shutting_down()
    assert await a.mesh.rehome(timeout_s=0) == (0, 0)
    for other in ("pod-b", "pod-c"):
        pods[other].down = True
        await pods[other].cluster.mark_shutting_down()
    await until(lambda: all(a.cluster.view.get(i).shutting_down for i in ("pod-b", "pod-c")), "b and c shutting down")
    assert await a.mesh.rehome(timeout_s=0.3) == (0, 1)  # every other pod is going too: nowhere to go


async def test_pods_stopping_together_do_not_wait_for_each_other(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await register(a, "m")
    await infer(a, "m", forwarded=True)
    await c.cluster.mark_shutting_down()
    await until(lambda: a.cluster.view.get("pod-c").shutting_down, "a to see c shutting down")
    b.runtime.gate = asyncio.Event()  # b is still loading 'm' when it starts shutting down too
    await a.cluster.mark_shutting_down()
    rehoming = asyncio.create_task(a.mesh.rehome(timeout_s=30))
    await until(lambda: b.runtime.load_calls == ["m"], "b to start loading 'm'")
    await b.cluster.mark_shutting_down()
    assert await asyncio.wait_for(rehoming, timeout=5) == (0, 1)  # not the 30 s budget
    b.runtime.gate.set()


async def test_requests_go_to_copies_on_pods_that_are_not_stopping(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await register(a, "m")
    await infer(a, "m", forwarded=True)
    await infer(b, "m", forwarded=True)
    await until(lambda: set(c.mesh.record("m").copies) == {"pod-a", "pod-b"}, "c to see both copies")
    await a.cluster.mark_shutting_down()
    await until(lambda: c.cluster.view.get("pod-a").shutting_down, "c to see a shutting down")
    served_by_a = len(a.runtime.invocations)
    for _ in range(20):
        assert await infer(c, "m") == b"x|m"
    assert len(a.runtime.invocations) == served_by_a  # all 20 went to b
    b.down = True  # the only other copy is unreachable: the stopping pod still serves
    assert await infer(c, "m") == b"x|m"
    assert len(a.runtime.invocations) == served_by_a + 1
