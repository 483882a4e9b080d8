"""vModels on three in-process pods sharing the in-memory store (fake runtimes, fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from modelmesh.errors import InvalidRequest, ModelExists, ModelNotFound, PreconditionFailed
from modelmesh.routing import RouteTarget
from modelmesh.types import ModelInfo, ModelState
from modelmesh.vmodels import VModels, VModelState
from tests.unit.test_mesh_cluster import INFER, register, start_pods, stop_pods, until

GRACE_S = 0.3  # how long a model a vmodel stopped serving stays registered (retire_grace_s)


@pytest.fixture
async def pods():
    # leases longer than any clock jump here (a jump past the TTL would expire every pod)
    started = await start_pods(lease_ttl_s=24 * 3600)
    for pod in started.values():
        pod.vmodels = VModels(pod.store, "mm/t", pod.mesh, pod.clock, retire_grace_s=GRACE_S)
        await pod.vmodels.start()
        pod.mesh.aliases = pod.vmodels
    yield started
    for pod in started.values():
        await pod.vmodels.close()
    await stop_pods(started)


def info(model_id: str) -> ModelInfo:
    return ModelInfo("onnx", f"/m/{model_id}")


async def infer_vmodel(pod, vmodel_id: str, *, by_header: bool = True) -> bytes:
    """A request naming the vmodel in ``mm-vmodel-id``, or only by model_name (kind "any")."""
    if by_header:
        return await pod.mesh.route(RouteTarget(vmodel_id, "vmodel"), INFER, b"x", [("mm-vmodel-id", vmodel_id)], None)
    return await pod.mesh.route(RouteTarget(vmodel_id, "any"), INFER, b"x", [], None)


async def test_a_vmodel_serves_its_model_by_header_and_by_name_on_every_pod(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    status = await a.vmodels.set("v", "m1", info=info("m1"), owner="ksvc")
    assert (status.state, status.active, status.target, status.owner) == (VModelState.DEFINED, "m1", "m1", "ksvc")
    assert status.active_status is not None and status.active_status.state is ModelState.NOT_LOADED
    # b asks at once: its views may not have the records yet, and read them from the store
    assert await infer_vmodel(b, "v") == b"x|m1"
    assert await infer_vmodel(c, "v", by_header=False) == b"x|m1"
    assert (await a.vmodels.status("v")).active_status.state is ModelState.LOADED
    with pytest.raises(ModelNotFound, match="vmodel 'nope' not found"):
        await infer_vmodel(a, "nope")
    # a model id is still served by its own name
    assert await a.mesh.route(RouteTarget("m1", "any"), INFER, b"y", [], None) == b"y|m1"


async def test_a_new_target_loads_first_and_then_takes_over(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    await a.vmodels.set("v", "m1", info=info("m1"), auto_delete=True)
    assert await infer_vmodel(a, "v") == b"x|m1"  # m1 is loaded: a move must keep it serving
    for pod in pods.values():
        pod.runtime.gate = asyncio.Event()
    status = await a.vmodels.set("v", "m2", info=info("m2"), auto_delete=True)
    assert (status.state, status.active, status.target) == (VModelState.TRANSITIONING, "m1", "m2")
    await until(lambda: any("m2" in p.runtime.load_calls for p in pods.values()), "m2 to start loading")
    assert await infer_vmodel(b, "v") == b"x|m1"  # still the old model while the new one loads
    for pod in pods.values():
        pod.runtime.gate.set()
    await until(lambda: b.vmodels.active("v") == "m2", "the move to m2")
    assert await infer_vmodel(b, "v") == b"x|m2"
    # m1 was registered for the vmodel with auto-delete, and nothing refers to it now
    await until(lambda: a.mesh.record("m1") is None, "m1 to be unregistered")
    status = await b.vmodels.status("v")
    assert (status.state, status.active, status.target, status.target_status) == (
        VModelState.DEFINED, "m2", "m2", None)


async def test_a_sync_set_returns_once_the_move_is_done(pods):
    a = pods["pod-a"]
    await register(a, "m1")
    await register(a, "m2")
    await a.vmodels.set("v", "m1")
    await infer_vmodel(a, "v")
    status = await a.vmodels.set("v", "m2", sync=True)
    assert (status.state, status.active) == (VModelState.DEFINED, "m2")
    assert status.active_status.state is ModelState.LOADED
    assert a.mesh.record("m1") is not None  # not registered with auto-delete: stays


async def test_a_new_target_takes_over_at_once_when_nothing_is_loaded_or_when_forced(pods):
    a = pods["pod-a"]
    for m in ("m1", "m2", "m3"):
        await register(a, m)
    await a.vmodels.set("v", "m1")
    status = await a.vmodels.set("v", "m2")  # m1 is loaded nowhere: nothing warm to keep
    assert (status.state, status.active) == (VModelState.DEFINED, "m2")
    await infer_vmodel(a, "v")
    a.runtime.gate = asyncio.Event()  # so m3 cannot finish loading before force is checked
    status = await a.vmodels.set("v", "m3", force=True)
    assert (status.state, status.active, status.target) == (VModelState.DEFINED, "m3", "m3")
    a.runtime.gate.set()
    assert all("m3" not in p.runtime.load_calls for p in pods.values())  # forced: not loaded first


async def test_owners_and_expected_targets_are_checked(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    for m in ("m1", "m2"):
        await register(a, m)
    await a.vmodels.set("v", "m1", owner="team-a")
    with pytest.raises(ModelExists, match="another owner"):
        await b.vmodels.set("v", "m2", owner="team-b")
    assert (await b.vmodels.status("v", owner="team-b")).state is VModelState.NOT_FOUND
    await b.vmodels.delete("v", owner="team-b")  # not its vmodel: nothing happens
    assert (await b.vmodels.status("v")).state is VModelState.DEFINED
    with pytest.raises(PreconditionFailed, match="targets 'm1', not the expected 'm0'"):
        await b.vmodels.set("v", "m2", expected_target="m0")
    with pytest.raises(ModelNotFound, match="vmodel 'w' not found"):
        await b.vmodels.set("w", "m2", update_only=True)
    with pytest.raises(PreconditionFailed, match="vmodel 'w' not found"):
        await b.vmodels.set("w", "m2", expected_target="m1")
    # expected == target: the vmodel may be absent ...
    assert (await b.vmodels.set("w", "m2", expected_target="m2")).active == "m2"
    # ... or target it already
    assert (await b.vmodels.set("w", "m2", expected_target="m2")).active == "m2"
    status = await b.vmodels.set("v", "m2", expected_target="m1", owner="team-a")
    assert (status.active, status.owner) == ("m2", "team-a")


async def test_bad_requests_are_invalid_or_not_found_and_leave_nothing_behind(pods):
    a = pods["pod-a"]
    with pytest.raises(InvalidRequest, match="give a vModelId"):
        await a.vmodels.set("", "m1")
    with pytest.raises(InvalidRequest, match="give a targetModelId"):
        await a.vmodels.set("v", "")
    with pytest.raises(ModelNotFound, match="target model 'm1' of vmodel 'v' is not registered"):
        await a.vmodels.set("v", "m1")
    await register(a, "m1", path="/elsewhere")
    with pytest.raises(ModelExists, match="different info"):
        await a.vmodels.set("v", "m1", info=info("m1"))
    # a set that fails after registering its target model takes the model back out
    await a.vmodels.set("v", "m1", owner="team-a")
    with pytest.raises(ModelExists, match="another owner"):
        await a.vmodels.set("v", "m9", info=info("m9"), owner="team-b")
    assert a.mesh.record("m9") is None
    assert (await a.vmodels.status("")).state is VModelState.NOT_FOUND
    with pytest.raises(InvalidRequest):
        await a.vmodels.delete("")


async def test_a_vmodel_whose_model_was_unregistered_answers_not_found(pods):
    a = pods["pod-a"]
    await a.vmodels.set("v", "m1", info=info("m1"))
    await a.mesh.unregister("m1")
    with pytest.raises(ModelNotFound, match="vmodel 'v' serves model 'm1', which is not registered"):
        await infer_vmodel(a, "v")
    status = await a.vmodels.status("v")
    assert (status.state, status.active_status.state) == (VModelState.DEFINED, ModelState.NOT_FOUND)


async def test_a_target_that_fails_to_load_blocks_the_move_until_the_elected_pod_retries_it(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await a.vmodels.set("v", "m1", info=info("m1"))
    await infer_vmodel(a, "v")
    for pod in pods.values():
        pod.runtime.failing["/m/m2"] = "bad weights"
    status = await a.vmodels.set("v", "m2", info=info("m2"))
    assert status.state is VModelState.TRANSITIONING
    await until(lambda: a.vmodels._moves == {}, "the move to end")
    status = await a.vmodels.status("v")
    assert (status.state, status.active) == (VModelState.TRANSITION_FAILED, "m1")
    assert "bad weights" in "; ".join(status.target_status.errors)
    assert await infer_vmodel(b, "v") == b"x|m1"
    # the elected pod's round tries again, but while the failures are recent nothing loads
    leader = next(p for p in pods.values() if p.cluster.is_leader())
    attempts = sum(p.runtime.load_calls.count("m2") for p in pods.values())
    await leader.vmodels.advance_all()
    await until(lambda: leader.vmodels._moves == {}, "the retry to end")
    assert sum(p.runtime.load_calls.count("m2") for p in pods.values()) == attempts
    assert (await a.vmodels.status("v")).state is VModelState.TRANSITION_FAILED
    # fixed, and the failures expired: the elected pod moves the vmodel on its next round
    for pod in pods.values():
        pod.runtime.failing.clear()
    a.clock.advance(61)
    await leader.mesh.expire_failures()
    await leader.vmodels.advance_all()
    await until(lambda: c.vmodels.active("v") == "m2", "the retried move")
    assert await infer_vmodel(c, "v") == b"x|m2"


async def test_deleting_vmodels_unregisters_their_auto_delete_models_once_none_refers_to_them(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    await a.vmodels.set("v1", "m", info=info("m"), auto_delete=True)
    await b.vmodels.set("v2", "m", info=info("m"), auto_delete=True)
    await a.vmodels.set("keep", "k", info=info("k"))  # not auto-delete
    await a.vmodels.delete("v1")
    assert (await a.vmodels.status("v1")).state is VModelState.NOT_FOUND
    assert a.mesh.record("m") is not None  # v2 still serves it
    await b.vmodels.delete("v2")
    assert await a.mesh.fetch_record("m") is None
    await a.vmodels.delete("keep")
    assert await a.mesh.fetch_record("k") is not None
    await a.vmodels.delete("never-was")  # absent: nothing to do, no error


async def test_a_target_replaced_before_it_took_over_is_collected(pods):
    a = pods["pod-a"]
    await a.vmodels.set("v", "m1", info=info("m1"))
    await infer_vmodel(a, "v")
    for pod in pods.values():
        pod.runtime.gate = asyncio.Event()
    await a.vmodels.set("v", "m2", info=info("m2"), auto_delete=True)
    status = await a.vmodels.set("v", "m3", info=info("m3"), auto_delete=True)
    assert (status.active, status.target) == ("m1", "m3")
    assert await a.mesh.fetch_record("m2") is None  # replaced while m1 still served: unregistered
    for pod in pods.values():
        pod.runtime.gate.set()
    await until(lambda: a.vmodels.active("v") == "m3", "the move to m3")
    assert a.mesh.record("m1") is not None  # registered without auto-delete


async def test_a_move_whose_pod_went_away_is_finished_by_the_elected_pod(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await a.vmodels.set("v", "m1", info=info("m1"))
    await infer_vmodel(a, "v")
    for pod in pods.values():
        pod.runtime.gate = asyncio.Event()
    await a.vmodels.set("v", "m2", info=info("m2"))
    await a.vmodels.close()  # a stops before the move is done: its task goes with it
    for pod in pods.values():
        pod.runtime.gate.set()
    await until(lambda: all(p.mesh.cached_status("m2").state is not ModelState.LOADING for p in (b, c)),
                "the load a started to end")
    assert (await b.vmodels.status("v")).active == "m1"  # nobody promoted it
    await b.vmodels.advance_all()  # the elected pod's round (any pod may run it)
    await until(lambda: c.vmodels.active("v") == "m2", "the elected pod to finish the move")
    assert await infer_vmodel(c, "v") == b"x|m2"


async def test_a_move_loads_the_target_to_as_many_copies_as_the_active_model_has(pods):
    a, b, c = pods["pod-a"], pods["pod-b"], pods["pod-c"]
    await a.vmodels.set("v", "m1", info=info("m1"))
    await register(a, "m2")
    for pod in (a, b, c):  # a busy model: a copy on every pod
        await pod.mesh.route(RouteTarget("m1", "model"), INFER, b"x", [("mm-model-id", "m1")], None, forwarded=True)
    await until(lambda: len(a.mesh.record("m1").copies) == 3, "three copies of m1")
    status = await a.vmodels.set("v", "m2", sync=True)
    assert (status.state, status.active) == (VModelState.DEFINED, "m2")
    # all three loaded before the move (each pod wrote its copy before answering the load)
    assert {p.id for p in pods.values() if "m2" in p.runtime.loaded} == {"pod-a", "pod-b", "pod-c"}


async def test_the_model_a_vmodel_stopped_serving_stays_registered_for_a_grace(pods):
    a, b = pods["pod-a"], pods["pod-b"]
    await a.vmodels.set("v", "m1", info=info("m1"), auto_delete=True)
    await infer_vmodel(a, "v")
    await a.vmodels.set("v", "m2", info=info("m2"), auto_delete=True, sync=True)
    # requests that resolved "v" to m1 just before the switch (or on a pod whose view is behind)
    # still find m1 for a moment
    assert await b.mesh.route(RouteTarget("m1", "model"), INFER, b"x", [("mm-model-id", "m1")], None) == b"x|m1"
    assert await a.mesh.fetch_record("m1") is not None
    await asyncio.sleep(GRACE_S + 0.1)
    await until(lambda: a.mesh.record("m1") is None, "m1 to be collected after the grace")


async def test_a_pod_stopping_during_the_grace_collects_at_once(pods):
    a = pods["pod-a"]
    await a.vmodels.set("v", "m1", info=info("m1"), auto_delete=True)
    await infer_vmodel(a, "v")
    await a.vmodels.set("v", "m2", info=info("m2"), auto_delete=True, sync=True)
    assert await a.mesh.fetch_record("m1") is not None
    await a.vmodels.close()
    assert await a.mesh.fetch_record("m1") is None
