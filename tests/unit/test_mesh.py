"""The mesh core on a fake runtime, the real in-memory store and a fake clock."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from modelmesh.clock import FakeClock
from modelmesh.errors import CapacityExhausted, InvalidRequest, ModelExists, ModelLoadFailed, ModelNotFound
from modelmesh.kv.memory import MemoryStore
from modelmesh.mesh import Mesh
from modelmesh.metrics import MeshMetrics
from modelmesh.registry import Registry
from modelmesh.routing import RouteTarget
from modelmesh.localcopy import CopyState
from modelmesh.types import ModelInfo, ModelState
from tests.fakes import FakeRuntime

INFER = "/inference.GRPCInferenceService/ModelInfer"
EXPIRY_MS = 60_000


@pytest.fixture
async def parts():
    clock = FakeClock()
    store = MemoryStore(clock)
    registry = Registry(store, "mm/test")
    await registry.start()
    runtime = FakeRuntime(capacity=1000)
    metrics = MeshMetrics(CollectorRegistry())
    mesh = Mesh(instance_id="pod-a", registry=registry, runtime=runtime, metrics=metrics, clock=clock,
                load_failure_expiry_ms=EXPIRY_MS)
    mesh.start(await runtime.status())
    yield mesh, runtime, clock, metrics
    await mesh.close()
    await registry.close()
    await store.close()


async def register(mesh, model_id, path=None, **kw):
    return await mesh.register(model_id, ModelInfo("onnx", path or f"/m/{model_id}"), load_now=False, sync=False, **kw)


async def infer(mesh, model_id, body=b"req"):
    resolved = mesh.resolve(RouteTarget(model_id, "any"))
    return await mesh.invoke(resolved, INFER, body, [("mm-model-id", resolved)], None)


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels or None) or 0


async def test_first_request_loads_then_hits(parts):
    mesh, runtime, clock, metrics = parts
    await register(mesh, "m1")
    assert (await mesh.status("m1")).state is ModelState.NOT_LOADED
    assert await infer(mesh, "m1") == b"req|m1"
    assert await infer(mesh, "m1") == b"req|m1"
    assert runtime.load_calls == ["m1"]
    assert (await mesh.status("m1")).state is ModelState.LOADED
    assert sample(metrics, "modelmesh_loadmodel_milliseconds_count") == 1
    assert sample(metrics, "modelmesh_cache_miss_milliseconds_count") == 1
    assert sample(metrics, "modelmesh_invoke_model_milliseconds_count", method="ModelInfer", code="OK") == 2


async def test_concurrent_first_requests_share_one_load(parts):
    mesh, runtime, clock, metrics = parts
    await register(mesh, "hot")
    runtime.gate = asyncio.Event()
    tasks = [asyncio.create_task(infer(mesh, "hot", str(i).encode())) for i in range(20)]
    await asyncio.sleep(0.01)
    assert (await mesh.status("hot")).state is ModelState.LOADING
    runtime.gate.set()
    results = await asyncio.gather(*tasks)
    assert results == [f"{i}|hot".encode() for i in range(20)]
    assert runtime.load_calls == ["hot"]


async def test_a_caller_giving_up_does_not_cancel_the_shared_load(parts):
    mesh, runtime, clock, metrics = parts
    await register(mesh, "m")
    runtime.gate = asyncio.Event()
    impatient = asyncio.create_task(infer(mesh, "m"))
    patient = asyncio.create_task(infer(mesh, "m"))
    await asyncio.sleep(0.01)
    impatient.cancel()
    runtime.gate.set()
    assert await patient == b"req|m"
    assert runtime.load_calls == ["m"]


async def test_eviction_follows_recency_and_size(parts):
    mesh, runtime, clock, metrics = parts
    sizes = {"a": 300, "b": 300, "c": 300, "big": 600}
    for mid, size in sizes.items():
        runtime.sizes[f"/m/{mid}"] = size
        runtime.predicted[f"/m/{mid}"] = size
        await register(mesh, mid)
    for mid in ("a", "b", "c"):
        await infer(mesh, mid)
        clock.advance(1)
    await infer(mesh, "a")  # a is now the most recent; b is the least recent
    clock.advance(1)
    assert set(runtime.loaded) == {"a", "b", "c"}
    await infer(mesh, "big")  # needs 600 of 1000: b then c go, a stays
    assert runtime.unload_calls == ["b", "c"]
    assert set(runtime.loaded) == {"a", "big"}
    assert mesh.used_bytes() <= mesh.capacity_bytes
    assert sample(metrics, "modelmesh_model_evicted_total") == 2
    assert (await mesh.status("b")).state is ModelState.NOT_LOADED
    assert runtime.max_loaded_bytes <= 1000


async def test_model_larger_than_capacity_is_refused(parts):
    mesh, runtime, clock, metrics = parts
    runtime.predicted["/m/huge"] = 5000
    await register(mesh, "huge")
    with pytest.raises(CapacityExhausted, match="whole capacity"):
        await infer(mesh, "huge")
    assert runtime.load_calls == []


async def test_prediction_too_low_is_corrected_after_load(parts):
    mesh, runtime, clock, metrics = parts
    for mid in ("a", "b"):
        runtime.sizes[f"/m/{mid}"] = 450
        await register(mesh, mid)
        await infer(mesh, mid)
        clock.advance(1)
    runtime.sizes["/m/c"] = 450  # predicted at the default 100, really 450
    await register(mesh, "c")
    await infer(mesh, "c")
    assert set(runtime.loaded) == {"b", "c"}
    assert mesh.used_bytes() == 900


async def test_failed_load_is_reported_and_not_retried_until_it_expires(parts):
    mesh, runtime, clock, metrics = parts
    runtime.failing["/m/bad"] = "model file is corrupt: protobuf parsing failed"
    await register(mesh, "bad")
    with pytest.raises(ModelLoadFailed, match="corrupt"):
        await infer(mesh, "bad")
    for _ in range(5):
        with pytest.raises(ModelLoadFailed, match="corrupt"):
            await infer(mesh, "bad")
    assert runtime.load_calls == ["bad"]
    status = await mesh.status("bad")
    assert status.state is ModelState.LOADING_FAILED
    assert any("corrupt" in e for e in status.errors)
    assert sample(metrics, "modelmesh_loadmodel_failure_total") == 1
    # fixed on disk; tried again once the failure expires
    del runtime.failing["/m/bad"]
    clock.advance(EXPIRY_MS / 1000 + 1)
    assert await infer(mesh, "bad") == b"req|bad"
    assert runtime.load_calls == ["bad", "bad"]
    assert (await mesh.status("bad")).state is ModelState.LOADED


async def test_unknown_model_is_not_found(parts):
    mesh, *_ = parts
    with pytest.raises(ModelNotFound, match="'nope'"):
        await infer(mesh, "nope")
    with pytest.raises(ModelNotFound):
        mesh.resolve(RouteTarget("alias", "vmodel"))
    assert (await mesh.status("nope")).state is ModelState.NOT_FOUND


async def test_register_is_idempotent_but_refuses_different_info(parts):
    mesh, *_ = parts
    await register(mesh, "m", "/a")
    await register(mesh, "m", "/a")
    with pytest.raises(ModelExists, match="different info"):
        await register(mesh, "m", "/b")
    with pytest.raises(InvalidRequest):
        await register(mesh, "")
    with pytest.raises(InvalidRequest, match="type"):
        await mesh.register("t", ModelInfo(""), load_now=False, sync=False)


async def test_register_load_now_sync(parts):
    mesh, runtime, *_ = parts
    status = await mesh.register("m", ModelInfo("onnx", "/m/m"), load_now=True, sync=True)
    assert status.state is ModelState.LOADED
    assert status.copies[0].instance_id == "pod-a"


async def test_ensure_loaded_async_then_loaded(parts):
    mesh, runtime, *_ = parts
    await register(mesh, "m")
    runtime.gate = asyncio.Event()
    assert (await mesh.ensure_loaded("m", sync=False)).state is ModelState.LOADING
    runtime.gate.set()
    for _ in range(100):
        if (await mesh.status("m")).state is ModelState.LOADED:
            break
        await asyncio.sleep(0.001)
    assert (await mesh.status("m")).state is ModelState.LOADED
    with pytest.raises(ModelNotFound):
        await mesh.ensure_loaded("ghost", sync=True)


async def test_unregister_unloads_and_forgets(parts):
    mesh, runtime, *_ = parts
    await register(mesh, "m")
    await infer(mesh, "m")
    await mesh.unregister("m")
    assert "m" not in runtime.loaded
    assert (await mesh.status("m")).state is ModelState.NOT_FOUND
    with pytest.raises(ModelNotFound):
        await infer(mesh, "m")
    await mesh.unregister("m")  # no-op


async def test_unregister_during_load_leaves_nothing_loaded(parts):
    mesh, runtime, *_ = parts
    await register(mesh, "m")
    runtime.gate = asyncio.Event()
    waiting = asyncio.create_task(infer(mesh, "m"))
    await asyncio.sleep(0.01)
    await mesh.unregister("m")
    runtime.gate.set()
    with pytest.raises(ModelNotFound):
        await waiting
    await asyncio.sleep(0.01)
    assert runtime.loaded == {}


async def test_runtime_that_lost_a_model_gets_it_loaded_again(parts):
    mesh, runtime, *_ = parts
    await register(mesh, "m")
    await infer(mesh, "m")
    runtime.loaded.clear()  # the runtime restarted
    assert await infer(mesh, "m") == b"req|m"
    assert runtime.load_calls == ["m", "m"]


async def test_gauges_follow_the_cache(parts):
    mesh, runtime, clock, metrics = parts
    await register(mesh, "m")
    await infer(mesh, "m")
    assert sample(metrics, "modelmesh_instance_capacity_bytes") == 1000
    assert sample(metrics, "modelmesh_instance_used_bytes") == 100
    assert sample(metrics, "modelmesh_models_loaded_total") == 1
    assert sample(metrics, "modelmesh_models_managed_total") == 1


async def test_model_record_lists_the_copy(parts):
    mesh, runtime, *_ = parts
    await register(mesh, "m")
    await infer(mesh, "m")
    record = mesh._registry.cached("m")
    assert list(record.copies) == ["pod-a"]


async def test_room_is_kept_for_the_next_load_in_the_background(parts):
    mesh, runtime, clock, metrics = parts
    for i in range(12):
        runtime.sizes[f"/m/h{i}"] = runtime.predicted[f"/m/h{i}"] = 90
        await register(mesh, f"h{i}")
    for i in range(11):
        await infer(mesh, f"h{i}")
        clock.advance(1)
    await asyncio.sleep(0.01)  # the headroom eviction runs after the load, off the request path
    assert "h0" not in runtime.loaded and len(runtime.loaded) == 10
    assert mesh.capacity_bytes - mesh.used_bytes() >= 90
    before = len(runtime.events)
    await infer(mesh, "h11")
    # its room was free: the runtime loaded it first thing, no unload in front of it
    assert runtime.events[before] == "load:h11"
    assert runtime.max_loaded_bytes <= 1000


async def test_a_store_outage_does_not_stop_a_load_from_serving():
    from tests.fakes import FlakyStore

    clock = FakeClock()
    store = FlakyStore(MemoryStore(clock))
    registry = Registry(store, "mm/test")
    await registry.start()
    runtime = FakeRuntime(capacity=1000)
    mesh = Mesh(instance_id="pod-a", registry=registry, runtime=runtime,
                metrics=MeshMetrics(CollectorRegistry()), clock=clock, load_failure_expiry_ms=EXPIRY_MS)
    mesh.start(await runtime.status())
    try:
        await register(mesh, "m")
        store.down = True
        assert await infer(mesh, "m") == b"req|m"
        assert runtime.loaded == {"m": 100}
    finally:
        await mesh.close()
        await registry.close()
        await store.close()


async def test_churn_guard_refuses_to_evict_a_model_in_recent_use():
    clock = FakeClock()
    store = MemoryStore(clock)
    registry = Registry(store, "mm/test")
    await registry.start()
    runtime = FakeRuntime(capacity=300)
    mesh = Mesh(instance_id="pod-a", registry=registry, runtime=runtime,
                metrics=MeshMetrics(CollectorRegistry()), clock=clock, load_failure_expiry_ms=EXPIRY_MS,
                churn_guard_ms=30_000)
    mesh.start(await runtime.status())
    try:
        for mid in ("a", "b", "c", "d"):
            await register(mesh, mid)
        for mid in ("a", "b", "c"):
            await infer(mesh, mid)
        clock.advance(5)
        with pytest.raises(CapacityExhausted, match="churn"):
            await infer(mesh, "d")  # would evict "a", used 5 s ago
        assert set(runtime.loaded) == {"a", "b", "c"}
        clock.advance(30)
        assert await infer(mesh, "d") == b"req|d"  # "a" has been idle long enough
        assert "a" not in runtime.loaded
    finally:
        await mesh.close()
        await registry.close()
        await store.close()


async def test_a_fresh_copy_is_not_evicted_before_its_waiting_requests_run(parts):
    """Regression: the background headroom eviction ran between the end of a load and the wake-up
    of the requests waiting for it, chose the new (unused, so lowest-scored) copy, and every waiter
    loaded it again: a load/evict loop."""
    from modelmesh.scaling import CopyKeeper

    mesh, runtime, clock, metrics = parts
    for i in range(9):
        runtime.predicted[f"/m/w{i}"] = 100
        await register(mesh, f"w{i}")
        for _ in range(5):
            await infer(mesh, f"w{i}")
    clock.advance(10)
    CopyKeeper(mesh, clock, threshold_rpm=lambda: 1e9).fold(clock.now_ms())  # they now have rates
    runtime.predicted["/m/new"] = 100
    await register(mesh, "new")
    runtime.gate = asyncio.Event()
    waiters = [asyncio.create_task(infer(mesh, "new")) for _ in range(5)]
    await asyncio.sleep(0.01)
    runtime.gate.set()
    assert await asyncio.gather(*waiters) == [b"req|new"] * 5
    await asyncio.sleep(0.01)
    assert runtime.load_calls.count("new") == 1
    assert "new" in runtime.loaded


async def test_a_pod_whose_counts_hold_steady_ranks_its_copies_by_long_term_use(parts):
    """The copy keeper's fold feeds each copy's count into its long-term use and the pod's
    popularity fit; once the counts fit their long-term rates, eviction sees each copy's long-term
    rate (with the linear credit), except a copy whose last minute says its traffic moved."""
    from modelmesh.placement.eviction import long_use_rpm
    from modelmesh.scaling import CopyKeeper

    mesh, runtime, clock, metrics = parts
    keeper = CopyKeeper(mesh, clock, threshold_rpm=lambda: 1e9)
    per_period = {f"m{i}": 2 + i % 4 for i in range(8)}  # 12 to 30 requests a minute each
    for mid in per_period:
        await register(mesh, mid)
    assert sample(metrics, "modelmesh_popularity_steady") == 0  # a pod starts unsteady
    assert sample(metrics, "modelmesh_popularity_fit") == 10
    for _ in range(40):
        for mid, n in per_period.items():
            for _ in range(n):
                await infer(mesh, mid)
        clock.advance(10)
        keeper.fold(clock.now_ms())
        if mesh.popularity.chi2 < 0.5:
            break
    assert mesh.popularity.steady
    assert sample(metrics, "modelmesh_popularity_steady") == 1
    assert sample(metrics, "modelmesh_popularity_fit") == pytest.approx(mesh.popularity.chi2)
    assert mesh.popularity.chi2 < 0.5
    now = clock.now_ms()
    copy = mesh._copies["m3"]  # 5 a period: 30 a minute
    long_rpm = long_use_rpm(copy.long_use, copy.long_use_ms, now, mesh.record("m3").registered_ms)
    assert long_rpm == pytest.approx(30, rel=0.15)
    cached = mesh._cached(copy)
    assert cached.steady and cached.request_rate_rpm == pytest.approx(long_rpm)

    for _ in range(100):  # a burst: the minute's count is far from the long-term rate
        await infer(mesh, "m3")
    for mid, n in per_period.items():
        for _ in range(n if mid != "m3" else 0):
            await infer(mesh, mid)
    clock.advance(10)
    keeper.fold(clock.now_ms())
    assert mesh.popularity.steady  # one model's burst does not decide for the pod
    cached = mesh._cached(copy)
    assert cached.steady and cached.request_rate_rpm == copy.rate.minute_rpm(clock.now_ms()) > 100


async def test_a_pod_whose_counts_move_keeps_the_minute_rule(parts):
    from modelmesh.scaling import CopyKeeper

    mesh, runtime, clock, metrics = parts
    keeper = CopyKeeper(mesh, clock, threshold_rpm=lambda: 1e9)
    for i in range(4):
        await register(mesh, f"m{i}")
    for period in range(40):  # 30 a minute on average, but 0 and 10 in turn: not Poisson noise
        for i in range(4):
            for _ in range(10 if (period + i) % 2 else 0):
                await infer(mesh, f"m{i}")
        clock.advance(10)
        keeper.fold(clock.now_ms())
        assert not mesh.popularity.steady, period
    assert sample(metrics, "modelmesh_popularity_steady") == 0
    assert sample(metrics, "modelmesh_popularity_fit") == pytest.approx(mesh.popularity.chi2)
    assert mesh.popularity.chi2 > 1.5
    copy = mesh._copies["m0"]
    cached = mesh._cached(copy)
    assert not cached.steady and cached.request_rate_rpm == copy.rate.minute_rpm(clock.now_ms())


async def test_requests_not_yet_folded_count_for_eviction(parts):
    """A copy's requests since the copy keeper last folded them (up to a rate period) are use
    too: a model just served 20 times must outrank one used 3 times a few seconds before, or the
    headroom kept after a load evicts the model that was just loaded (seen in CI: 20 concurrent
    first requests caused two loads)."""
    from modelmesh.placement.eviction import choose_evictions
    from modelmesh.scaling import CopyKeeper

    mesh, runtime, clock, _ = parts
    keeper = CopyKeeper(mesh, clock, threshold_rpm=lambda: 1e9)
    await register(mesh, "old")
    await register(mesh, "new")
    for _ in range(3):
        await infer(mesh, "old")
    keeper.fold(clock.now_ms())  # old's 3 requests are in its rate window now
    clock.advance(5)
    for _ in range(20):
        await infer(mesh, "new")  # not folded yet
    clock.advance(6)  # past the fresh-copy grace: new is judged on its use
    cache = [mesh._cached(c) for c in mesh.loaded_copies()]
    assert {c.model_id: c.request_rate_rpm for c in cache} == {"old": 3, "new": 20}
    assert choose_evictions(cache, mesh.capacity_bytes, mesh.capacity_bytes - 100).victims == ("old",)


async def test_requests_waiting_for_a_load_keep_the_new_copy_from_headroom_eviction(parts):
    """Seen in CI (twice): 20 concurrent first requests caused two loads. The model turned out
    larger than predicted, so the load made more room (an unload: an await); a request arriving
    meanwhile found the copy loaded and was served, so the copy no longer counted as fresh; then
    the headroom eviction after the load ranked it, 1 use for 300 bytes, below models used 3 times,
    and evicted it before the other 19 requests, still waiting on the load, woke. Requests waiting
    for a copy's load now make it busy."""
    mesh, runtime, clock, _ = parts
    for i in range(9):  # 900 of 1000 bytes, each model used 3 times
        await register(mesh, f"m{i}")
        for _ in range(3):
            await infer(mesh, f"m{i}")
    await register(mesh, "new")
    runtime.sizes["/m/new"] = 300  # predicted: the default 100
    unloading = asyncio.Event()
    unload = runtime.unload_model

    async def slow_unload(model_id):
        await unloading.wait()
        await unload(model_id)

    runtime.unload_model = slow_unload
    runtime.gate = asyncio.Event()
    waiters = [asyncio.create_task(infer(mesh, "new", str(i).encode())) for i in range(19)]
    await asyncio.sleep(0.01)
    runtime.gate.set()  # the load ends; making the extra 200 bytes waits for the unloads
    while mesh._copies["new"].state is not CopyState.LOADED:
        await asyncio.sleep(0.001)
    assert await infer(mesh, "new", b"late") == b"late|new"  # served at once, while the others wait
    unloading.set()
    results = await asyncio.gather(*waiters)
    assert results == [f"{i}|new".encode() for i in range(19)]
    assert runtime.load_calls.count("new") == 1


async def test_per_model_gauges_show_the_busiest_models_only(parts):
    from prometheus_client import CollectorRegistry

    from modelmesh.metrics import TopModels

    mesh, runtime, clock, metrics = parts
    runtime.sizes = {"/m/m1": 300, "/m/m2": 100, "/m/m3": 200}
    for model_id, requests in (("m1", 3), ("m2", 1), ("m3", 2)):
        await register(mesh, model_id)
        for _ in range(requests):
            await infer(mesh, model_id)
    scrape = CollectorRegistry()
    scrape.register(TopModels(mesh.model_figures, 2))

    def gauge(name, model_id):
        return scrape.get_sample_value(name, {"modelId": model_id})

    assert gauge("modelmesh_model_requests_per_minute", "m1") == 3
    assert gauge("modelmesh_model_requests_per_minute", "m3") == 2
    assert gauge("modelmesh_model_requests_per_minute", "m2") is None  # not among the 2 busiest
    assert (gauge("modelmesh_model_size_bytes", "m1"), gauge("modelmesh_model_size_bytes", "m3")) == (300, 200)
    assert gauge("modelmesh_model_copies", "m1") == 1
    wider = CollectorRegistry()
    wider.register(TopModels(mesh.model_figures, 10))
    assert wider.get_sample_value("modelmesh_model_requests_per_minute", {"modelId": "m2"}) == 1
