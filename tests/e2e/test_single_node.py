"""A real pod (its built-in runtime as a child process) driven by tritonclient, as users drive it."""

from __future__ import annotations

import random
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from modelmesh.demo import demo_model_id, demo_weights, write_demo_models
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc
from tests.procs import PodProcess, start_pod

pytestmark = pytest.mark.slow

FEATURES = 64
N_MODELS = 120
FITS = 20


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    write_demo_models(d, N_MODELS, FEATURES)
    return d


@pytest.fixture(scope="module", params=["inprocess", "process"])
def runtime_mode(request) -> str:
    """Every test here runs against a pod hosting its runtime in-process and one with a child."""
    return request.param


@pytest.fixture(scope="module")
def model_size(models_dir, runtime_mode, tmp_path_factory) -> int:
    """A demo model's measured size, from a pod with room for all of them."""
    pod = start_pod(tmp_path_factory.mktemp("sizing"), "--capacity", str(1 << 30), "--runtime", runtime_mode)
    try:
        with grpc.insecure_channel(pod.address) as ch:
            stub = mgrpc.ModelMeshStub(ch)
            for i in range(3):
                stub.registerModel(mpb.RegisterModelRequest(
                    modelId=demo_model_id(i), loadNow=True, sync=True,
                    modelInfo=mpb.ModelInfo(type="onnx", path=str(models_dir / f"{demo_model_id(i)}.onnx"))))
        metrics = pod.metrics()
        return int(metrics["modelmesh_instance_used_bytes"] / 3)
    finally:
        pod.stop()


@pytest.fixture(scope="module")
def pod(models_dir, model_size, runtime_mode, tmp_path_factory):
    capacity = int(model_size * (FITS + 0.5))
    pod = start_pod(tmp_path_factory.mktemp("pod"), "--capacity", str(capacity), "--runtime", runtime_mode)
    with grpc.insecure_channel(pod.address) as ch:
        stub = mgrpc.ModelMeshStub(ch)
        for i in range(N_MODELS):
            status = stub.registerModel(mpb.RegisterModelRequest(
                modelId=demo_model_id(i),
                modelInfo=mpb.ModelInfo(type="onnx", path=str(models_dir / f"{demo_model_id(i)}.onnx"))))
            assert status.status == mpb.ModelStatusInfo.NOT_LOADED
    yield pod
    assert pod.stop() == 0, pod.log()
    assert "Traceback" not in pod.log(), pod.log()


def infer(client: tc.InferenceServerClient, index: int, rows: int = 2) -> None:
    x = np.random.default_rng(index).standard_normal((rows, FEATURES)).astype(np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(demo_model_id(index), [inp])
    w, b = demo_weights(index, FEATURES)
    np.testing.assert_allclose(result.as_numpy("y"), x @ w + b, rtol=1e-4, atol=1e-4)


def test_every_model_served_by_name_with_evictions(pod: PodProcess):
    before = pod.metrics()
    order = list(range(N_MODELS)) * 2
    random.Random(7).shuffle(order)
    client = tc.InferenceServerClient(pod.address)
    try:
        for index in order:
            infer(client, index)
    finally:
        client.close()
    after = pod.metrics()
    loads = after["modelmesh_loadmodel_milliseconds_count"] - before.get("modelmesh_loadmodel_milliseconds_count", 0)
    evicted = after["modelmesh_model_evicted_total"] - before.get("modelmesh_model_evicted_total", 0)
    assert loads >= N_MODELS
    assert evicted >= N_MODELS - FITS - 1
    assert after["modelmesh_instance_used_bytes"] <= after["modelmesh_instance_capacity_bytes"]
    assert after["modelmesh_models_loaded_total"] <= FITS + 1
    assert after["modelmesh_models_managed_total"] == N_MODELS
    assert after.get("modelmesh_loadmodel_failure_total", 0) == 0
    # no request failed: every invoke the pod made answered OK
    failed = [k for k in after if k.startswith("modelmesh_api_request_milliseconds_count") and 'code="OK"' not in k]
    assert failed == []


def test_unknown_model_is_not_found(pod: PodProcess):
    client = tc.InferenceServerClient(pod.address)
    try:
        inp = tc.InferInput("x", [1, FEATURES], "FP32")
        inp.set_data_from_numpy(np.zeros((1, FEATURES), np.float32))
        with pytest.raises(InferenceServerException) as err:
            client.infer("no-such-model", [inp])
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert "no-such-model" in err.value.message()
    finally:
        client.close()


@pytest.mark.parametrize("name,shape,dtype,expected", [
    ("wrong", [1, FEATURES], "FP32", "x"),
    ("x", [1, FEATURES + 1], "FP32", str(FEATURES)),
    ("x", [1, FEATURES], "INT32", "FP32"),
])
def test_malformed_input_is_invalid_argument(pod: PodProcess, name, shape, dtype, expected):
    client = tc.InferenceServerClient(pod.address)
    try:
        inp = tc.InferInput(name, shape, dtype)
        inp.set_data_from_numpy(np.zeros(shape, np.float32 if dtype == "FP32" else np.int32))
        with pytest.raises(InferenceServerException) as err:
            client.infer(demo_model_id(0), [inp])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert expected in err.value.message()
    finally:
        client.close()


def test_garbage_body_is_invalid_argument(pod: PodProcess):
    with grpc.insecure_channel(pod.address) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\xff\xff\xff\x0f", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_twenty_concurrent_first_requests_share_one_load(pod: PodProcess, models_dir):
    model_id = "concurrent-first"
    with grpc.insecure_channel(pod.address) as ch:
        mgrpc.ModelMeshStub(ch).registerModel(mpb.RegisterModelRequest(
            modelId=model_id, modelInfo=mpb.ModelInfo(type="onnx", path=str(models_dir / f"{demo_model_id(5)}.onnx"))))
    before = pod.metrics()["modelmesh_loadmodel_milliseconds_count"]
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)
    x = np.ones((1, FEATURES), np.float32)
    w, b = demo_weights(5, FEATURES)

    def one() -> None:
        client = tc.InferenceServerClient(pod.address)
        try:
            inp = tc.InferInput("x", [1, FEATURES], "FP32")
            inp.set_data_from_numpy(x)
            barrier.wait()
            out = client.infer(model_id, [inp]).as_numpy("y")
            np.testing.assert_allclose(out, x @ w + b, rtol=1e-4, atol=1e-4)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert pod.metrics()["modelmesh_loadmodel_milliseconds_count"] - before == 1


def test_status_list_and_unregister(pod: PodProcess):
    client = tc.InferenceServerClient(pod.address)
    try:
        infer(client, 3)
        index = client.get_model_repository_index(as_json=True)["models"]
        states = {m["name"]: m.get("state") for m in index}
        assert states[demo_model_id(3)] == "LOADED"
        assert len(states) >= N_MODELS
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(demo_model_id(3))
    finally:
        client.close()
    with grpc.insecure_channel(pod.address) as ch:
        stub = mgrpc.ModelMeshStub(ch)
        assert stub.getModelStatus(mpb.GetStatusRequest(modelId=demo_model_id(3))).status == mpb.ModelStatusInfo.LOADED
        stub.unregisterModel(mpb.UnregisterModelRequest(modelId=demo_model_id(3)))
        assert stub.getModelStatus(mpb.GetStatusRequest(modelId=demo_model_id(3))).status == mpb.ModelStatusInfo.NOT_FOUND


def test_bad_model_file_shows_loading_failed(pod: PodProcess, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an onnx model")
    with grpc.insecure_channel(pod.address) as ch:
        stub = mgrpc.ModelMeshStub(ch)
        status = stub.registerModel(mpb.RegisterModelRequest(
            modelId="bad-file", loadNow=True, sync=True, modelInfo=mpb.ModelInfo(type="onnx", path=str(bad))))
        assert status.status == mpb.ModelStatusInfo.LOADING_FAILED
        assert status.errors and "bad.onnx" in status.errors[0] or "onnx" in status.errors[0].lower()
    client = tc.InferenceServerClient(pod.address)
    try:
        inp = tc.InferInput("x", [1, FEATURES], "FP32")
        inp.set_data_from_numpy(np.zeros((1, FEATURES), np.float32))
        with pytest.raises(InferenceServerException) as err:
            client.infer("bad-file", [inp])
        assert err.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "failed to load" in err.value.message()
    finally:
        client.close()


def test_health_and_reflection(pod: PodProcess):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(pod.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"mmesh.ModelMesh", "mmesh.ModelMeshBulk", "inference.GRPCInferenceService",
                "grpc.health.v1.Health"} <= names
        bulk = health_pb2.HealthCheckRequest(service="mmesh.ModelMeshBulk")
        assert health.Check(bulk).status == health_pb2.HealthCheckResponse.SERVING
        responses = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService")])))
        assert responses[0].file_descriptor_response.file_descriptor_proto
