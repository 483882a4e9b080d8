"""Three pods (separate processes, each with its built-in runtime) sharing one real etcd."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from modelmesh.demo import demo_model_id, demo_weights, write_demo_models
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc
from tests.etcd_server import EtcdServer
from tests.procs import PodProcess, start_pod

pytestmark = pytest.mark.slow
F = 16
LEASE_TTL_S = 3


def x_for(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((1, F)).astype(np.float32)


def check_infer(client: tc.InferenceServerClient, index: int, model_id: str | None = None) -> None:
    inp = tc.InferInput("x", [1, F], "FP32")
    inp.set_data_from_numpy(x_for(index))
    out = client.infer(model_id or demo_model_id(index), [inp], client_timeout=30).as_numpy("y")
    w, b = demo_weights(index, F)
    np.testing.assert_allclose(out, x_for(index) @ w + b, rtol=1e-4, atol=1e-4)


def register(address: str, model_id: str, path: str) -> mpb.ModelStatusInfo:
    with grpc.insecure_channel(address) as ch:
        return mgrpc.ModelMeshStub(ch).registerModel(mpb.RegisterModelRequest(
            modelId=model_id, modelInfo=mpb.ModelInfo(type="onnx", path=path)), timeout=20)


def start_cluster(tmp_path, etcd: EtcdServer, n: int = 3) -> list[PodProcess]:
    return [
        start_pod(tmp_path, "--etcd", etcd.endpoint, "--capacity", str(200_000_000), "--instance-id", f"pod-{i}",
                  env={"MM_INSTANCE_LEASE_TTL_S": str(LEASE_TTL_S)})
        for i in range(n)
    ]


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def copies_of(address: str, model_id: str) -> set[str]:
    with grpc.insecure_channel(address) as ch:
        status = mgrpc.ModelMeshStub(ch).getModelStatus(mpb.GetStatusRequest(modelId=model_id), timeout=10)
    return {c.location for c in status.modelCopyInfos}


def check_large_request_through_a_hop(pods: list[PodProcess]) -> None:
    """A request and an answer of 6 MiB each (over gRPC's 4 MiB default; under the mesh's 16 MiB
    MM_SVC_GRPC_MAX_MSG_SIZE) entering at a pod without the model: the one limit holds on the pod's
    server, the pod-to-pod channel and the holder, both ways (ModelMesh needed it raised in three
    places). ``pods[i]`` is instance ``pod-i``."""
    holders = copies_of(pods[0].address, demo_model_id(0))
    assert len(holders) == 1, holders
    entry = next(p for i, p in enumerate(pods) if f"pod-{i}" not in holders)
    loads_before = entry.metrics()["modelmesh_loadmodel_milliseconds_count"]
    rows = (6 << 20) // (F * 4)
    x = np.random.default_rng(7).standard_normal((rows, F)).astype(np.float32)
    client = tc.InferenceServerClient(entry.address)
    try:
        inp = tc.InferInput("x", [rows, F], "FP32")
        inp.set_data_from_numpy(x)
        out = client.infer(demo_model_id(0), [inp], client_timeout=60).as_numpy("y")
    finally:
        client.close()
    w, b = demo_weights(0, F)
    np.testing.assert_allclose(out, x @ w + b, rtol=1e-4, atol=1e-4)
    # served by the holder through the hop, not by a load where it entered
    assert entry.metrics()["modelmesh_loadmodel_milliseconds_count"] == loads_before
    assert copies_of(pods[0].address, demo_model_id(0)) == holders


@pytest.fixture
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.mark.timeout(300)
def test_three_pods_serve_300_models_from_any_pod_and_spread_loads(tmp_path, etcd):
    models = tmp_path / "models"
    paths = write_demo_models(models, 300, F)
    pods = start_cluster(tmp_path, etcd)
    try:
        for path in paths:
            register(pods[0].address, path.stem, str(path))
        clients = [tc.InferenceServerClient(p.address) for p in pods]
        rng = random.Random(3)
        try:
            # first requests in a burst of 24 at a time, entering through all three pods at once:
            # many simultaneous misses, the case where stale records made ModelMesh pile loads up
            with ThreadPoolExecutor(24) as pool:
                list(pool.map(lambda i: check_infer(clients[i % 3], i), range(300)))
            # every model once more, through another random pod: served from its copy, no reloads
            before = sum(p.metrics()["modelmesh_loadmodel_milliseconds_count"] for p in pods)
            for i in range(300):
                check_infer(rng.choice(clients), i)
            after = sum(p.metrics()["modelmesh_loadmodel_milliseconds_count"] for p in pods)
        finally:
            for c in clients:
                c.close()
        assert after == before == 300
        counts = [p.metrics()["modelmesh_instance_models_total"] for p in pods]
        assert sum(counts) == 300
        assert max(counts) <= 1.2 * (sum(counts) / 3), counts
        check_large_request_through_a_hop(pods)
    finally:
        for p in pods:
            assert p.stop() == 0, p.log()


@pytest.mark.timeout(300)
def test_a_killed_pod_is_routed_around_and_leaves_the_registry(tmp_path, etcd):
    models = tmp_path / "models"
    paths = write_demo_models(models, 30, F)
    pods = start_cluster(tmp_path, etcd)
    for path in paths:
        register(pods[0].address, path.stem, str(path))
    survivors = pods[1:]
    victim = pods[0]
    # load everything, a third of it on the victim
    client = tc.InferenceServerClient(victim.address)
    for i in range(30):
        check_infer(client, i)
    client.close()
    on_victim = [i for i in range(30) if "pod-0" in copies_of(pods[1].address, demo_model_id(i))]
    assert on_victim, "placement put nothing on pod-0"

    failures: Counter[str] = Counter()
    done = threading.Event()
    served = Counter()

    def traffic(pod: PodProcess, seed: int) -> None:
        c = tc.InferenceServerClient(pod.address)
        rng = random.Random(seed)
        try:
            while not done.is_set():
                i = rng.randrange(30)
                try:
                    check_infer(c, i)
                    served[pod.address] += 1
                except Exception as exc:  # counted and asserted on below
                    failures[type(exc).__name__ + ": " + str(exc)[:120]] += 1
        finally:
            c.close()

    threads = [threading.Thread(target=traffic, args=(p, k)) for k, p in enumerate(survivors)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        victim.kill()
        time.sleep(LEASE_TTL_S + 3)
    finally:
        done.set()
        for t in threads:
            t.join(30)
    # requests to the survivors never went to a dead pod's runtime mid-flight, so none may fail
    assert sum(failures.values()) == 0, failures
    assert sum(served.values()) > 100
    # the models that lived on the dead pod loaded elsewhere on demand
    for i in on_victim:
        copies = copies_of(survivors[0].address, demo_model_id(i))
        assert copies and "pod-0" not in copies, (i, copies)
    # its lease expired: no record lists it any more
    wait_for(lambda: all("pod-0" not in copies_of(survivors[1].address, demo_model_id(i)) for i in range(30)),
             15, "the dead pod's copies to leave every record")
    for p in survivors:
        assert p.stop() == 0, p.log()


@pytest.mark.timeout(300)
def test_etcd_outage_keeps_inference_going_and_views_converge_after(tmp_path, etcd):
    models = tmp_path / "models"
    paths = write_demo_models(models, 12, F)
    pods = start_cluster(tmp_path, etcd)
    try:
        for path in paths[:10]:
            register(pods[0].address, path.stem, str(path))
        clients = [tc.InferenceServerClient(p.address) for p in pods]
        try:
            for i in range(10):
                for c in clients:
                    check_infer(c, i)
            etcd.stop()
            outage_ends = time.monotonic() + 10
            ok = 0
            while time.monotonic() < outage_ends:
                for k, c in enumerate(clients):
                    check_infer(c, (ok + k) % 10)
                    ok += 1
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                register(pods[1].address, paths[10].stem, str(paths[10]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "etcd" in err.value.details()
            assert time.monotonic() - started < 15
            etcd.start()
            # every pod sees a model registered after the outage, without restarts
            wait_for(lambda: _registered_ok(pods[2].address, paths[11]), 20, "registration to work again")
            wait_for(lambda: all(demo_model_id(11) in _listed(c) for c in clients), 10,
                     "every pod's view to show the new model")
            for c in clients:
                check_infer(c, 11, demo_model_id(11))
            for c in clients:
                check_infer(c, 3)
        finally:
            for c in clients:
                c.close()
        assert ok > 30
    finally:
        for p in pods:
            assert p.stop() == 0, p.log()


def _listed(client: tc.InferenceServerClient) -> set[str]:
    """The models in a pod's view (RepositoryIndex answers from the view, not the store)."""
    return {m["name"] for m in client.get_model_repository_index(as_json=True).get("models", [])}


def _registered_ok(address: str, path) -> bool:
    try:
        register(address, path.stem, str(path))
        return True
    except grpc.RpcError:
        return False


@pytest.mark.timeout(120)
def test_a_pod_stopping_moves_its_models_in_use_to_another_pod_first(tmp_path, etcd):
    paths = write_demo_models(tmp_path / "models", 3, F)
    pods = start_cluster(tmp_path, etcd, n=2)
    try:
        for path in paths:
            register(pods[0].address, path.stem, str(path))
        clients = [tc.InferenceServerClient(p.address) for p in pods]
        try:
            for i in range(3):
                check_infer(clients[0], i)
        finally:
            for c in clients:
                c.close()
        holders = [copies_of(pods[0].address, demo_model_id(i)) for i in range(3)]
        assert all(len(h) == 1 for h in holders), holders
        # stop the pod holding the most models: its models must be loaded on the other first
        going = max((0, 1), key=lambda k: sum(f"pod-{k}" in h for h in holders))
        staying = pods[1 - going]
        moving = [i for i in range(3) if f"pod-{going}" in holders[i]]
        loads_before = staying.metrics()["modelmesh_loadmodel_milliseconds_count"]
        assert pods[going].stop() == 0, pods[going].log()
        assert f"{len(moving)} of {len(moving)} models re-homed" in pods[going].log()
        # by the time the pod has exited, the survivor holds them all (loaded while the pod went)
        assert staying.metrics()["modelmesh_loadmodel_milliseconds_count"] == loads_before + len(moving)
        client = tc.InferenceServerClient(staying.address)
        try:
            for i in range(3):
                check_infer(client, i)  # served by the copies already there: no cold start
        finally:
            client.close()
        assert staying.metrics()["modelmesh_loadmodel_milliseconds_count"] == loads_before + len(moving)
    finally:
        for p in pods:
            p.stop()


def test_a_vmodel_set_through_one_pod_is_served_and_moved_through_the_other(tmp_path, etcd):
    paths = write_demo_models(tmp_path / "models", 2, F)
    pods = start_cluster(tmp_path, etcd, n=2)
    try:
        stubs = [mgrpc.ModelMeshStub(grpc.insecure_channel(p.address)) for p in pods]
        info = [mpb.ModelInfo(type="onnx", path=str(p)) for p in paths]
        status = stubs[0].setVModel(mpb.SetVModelRequest(
            vModelId="isvc", targetModelId=demo_model_id(0), modelInfo=info[0], autoDeleteTargetModel=True,
            loadNow=True, sync=True), timeout=30)
        assert status.activeModelStatus.status == mpb.ModelStatusInfo.LOADED
        clients = [tc.InferenceServerClient(p.address) for p in pods]
        try:
            # at once through the other pod, by the vmodel's name: its view may be a moment behind
            check_infer(clients[1], 0, model_id="isvc")
            # moved through the other pod, without waiting: the pod that set it drives the move
            status = stubs[1].setVModel(mpb.SetVModelRequest(
                vModelId="isvc", targetModelId=demo_model_id(1), modelInfo=info[1], autoDeleteTargetModel=True),
                timeout=30)
            assert status.status in (mpb.VModelStatusInfo.TRANSITIONING, mpb.VModelStatusInfo.DEFINED)

            def moved() -> bool:
                got = stubs[0].getVModelStatus(mpb.GetVModelStatusRequest(vModelId="isvc"), timeout=10)
                return got.status == mpb.VModelStatusInfo.DEFINED and got.activeModelId == demo_model_id(1)

            wait_for(moved, 30, "the vmodel to move to the second model")
            check_infer(clients[0], 1, model_id="isvc")
            check_infer(clients[1], 1, model_id="isvc")
            wait_for(lambda: stubs[0].getModelStatus(mpb.GetStatusRequest(modelId=demo_model_id(0)), timeout=10)
                     .status == mpb.ModelStatusInfo.NOT_FOUND, 10, "the first model's auto-deletion")
        finally:
            for c in clients:
                c.close()
    finally:
        for p in pods:
            assert p.stop() == 0, p.log()
            assert "Traceback" not in p.log(), p.log()


def test_a_new_pod_is_not_ready_while_another_pod_shuts_down(tmp_path, etcd):
    """ModelMesh's rolling-update rule: a pod that starts while another is shutting down (and
    re-homing its models) turns ready only once that pod is gone, so a rolling update stops one old
    pod at a time; it serves requests meanwhile."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from modelmesh.kv.etcd import EtcdStore
    from modelmesh.proto import grpc_predict_v2_pb2 as pb
    from modelmesh.proto import grpc_predict_v2_pb2_grpc as pbgrpc
    from modelmesh.types import InstanceRecord

    async def stopping_pod(action: str, lease: int = 0) -> int:
        store = EtcdStore(etcd.endpoint)
        try:
            if action == "publish":  # as a stopping pod publishes itself, under its lease
                lease = await store.grant_lease(30)
                record = InstanceRecord(endpoint="127.0.0.1:1", capacity_bytes=1, shutting_down=True)
                await store.put("mm/modelmesh/instances/old-pod", record.to_json(), lease=lease)
            else:  # it exits: its lease goes
                await store.revoke_lease(lease)
            return lease
        finally:
            await store.close()

    lease = asyncio.run(stopping_pod("publish"))
    path = write_demo_models(tmp_path / "models", 1, F)[0]
    pod = start_cluster(tmp_path, etcd, n=1)[0]
    try:
        with grpc.insecure_channel(pod.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            ready = pbgrpc.GRPCInferenceServiceStub(ch)

            def is_ready() -> bool:
                serving = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                return serving == health_pb2.HealthCheckResponse.SERVING and \
                    ready.ServerReady(pb.ServerReadyRequest(), timeout=5).ready

            assert not is_ready()
            register(pod.address, path.stem, str(path))
            client = tc.InferenceServerClient(pod.address)
            try:
                check_infer(client, 0)  # served while not ready
            finally:
                client.close()
            time.sleep(1)
            assert not is_ready()
            asyncio.run(stopping_pod("exit", lease))
            wait_for(is_ready, 10, "the pod to turn ready once the other pod is gone")
        assert "not ready while old-pod is shutting down" in pod.log()
    finally:
        assert pod.stop() == 0, pod.log()
