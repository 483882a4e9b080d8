"""vModels on a real pod (in-process ONNX runtime, single-node store), managed over the wire and
served to tritonclient by the vmodel's name, as KServe's modelmesh-serving drives them; and the
pod's per-model gauges (MM_PER_MODEL_METRICS=2), which follow the models the requests reach."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from modelmesh.demo import demo_model_id, demo_weights, write_demo_models
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc
from tests.procs import PodProcess, start_pod

pytestmark = pytest.mark.slow

FEATURES = 16
VM = mpb.VModelStatusInfo


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    write_demo_models(d, 4, FEATURES)
    return d


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    pod = start_pod(tmp_path_factory.mktemp("pod"), "--capacity", str(1 << 28), "--runtime", "inprocess",
                    env={"MM_PER_MODEL_METRICS": "2"})
    yield pod
    assert pod.stop() == 0, pod.log()
    assert "Traceback" not in pod.log(), pod.log()


@pytest.fixture
def stub(pod: PodProcess):
    with grpc.insecure_channel(pod.address) as ch:
        yield mgrpc.ModelMeshStub(ch)


def model_info(models_dir, index: int) -> mpb.ModelInfo:
    return mpb.ModelInfo(type="onnx", path=str(models_dir / f"{demo_model_id(index)}.onnx"))


def served_index(pod: PodProcess, name: str, *, header: bool = False) -> int:
    """Which demo model answered a request for ``name`` (by model_name, or in mm-vmodel-id)."""
    x = np.random.default_rng(7).standard_normal((2, FEATURES)).astype(np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with tc.InferenceServerClient(pod.address) as client:
        headers = {"mm-vmodel-id": name} if header else None
        y = client.infer(name, [inp], headers=headers).as_numpy("y")
    for i in range(4):
        w, b = demo_weights(i, FEATURES)
        if np.allclose(y, x @ w + b, rtol=1e-4, atol=1e-4):
            return i
    raise AssertionError("no demo model gives this answer")


def test_a_vmodel_is_served_by_name_and_moves_to_a_new_model(pod, stub, models_dir):
    first, second = demo_model_id(0), demo_model_id(1)
    status = stub.setVModel(mpb.SetVModelRequest(
        vModelId="isvc", targetModelId=first, modelInfo=model_info(models_dir, 0), autoDeleteTargetModel=True,
        owner="ksvc", loadNow=True, sync=True))
    assert (status.status, status.activeModelId, status.targetModelId, status.owner) == (
        VM.DEFINED, first, first, "ksvc")
    assert status.activeModelStatus.status == mpb.ModelStatusInfo.LOADED
    assert served_index(pod, "isvc") == 0
    assert served_index(pod, "isvc", header=True) == 0

    status = stub.setVModel(mpb.SetVModelRequest(
        vModelId="isvc", targetModelId=second, modelInfo=model_info(models_dir, 1), autoDeleteTargetModel=True,
        owner="ksvc", expectedTargetModelId=first, sync=True))
    assert (status.status, status.activeModelId, status.targetModelId) == (VM.DEFINED, second, second)
    assert served_index(pod, "isvc") == 1
    # the first model was registered for the vmodel with auto-delete: it serves for a short grace
    # (requests resolved before the switch), then goes
    deadline = time.monotonic() + 15
    while stub.getModelStatus(mpb.GetStatusRequest(modelId=first)).status != mpb.ModelStatusInfo.NOT_FOUND:
        assert time.monotonic() < deadline, "the first model was not collected"
        time.sleep(0.2)

    status = stub.getVModelStatus(mpb.GetVModelStatusRequest(vModelId="isvc", owner="ksvc"))
    assert (status.status, status.activeModelId) == (VM.DEFINED, second)
    stub.deleteVModel(mpb.DeleteVModelRequest(vModelId="isvc", owner="ksvc"))
    status = stub.getVModelStatus(mpb.GetVModelStatusRequest(vModelId="isvc"))
    assert (status.status, status.activeModelId, status.activeModelStatus.status) == (
        VM.NOT_FOUND, "", mpb.ModelStatusInfo.NOT_FOUND)
    assert stub.getModelStatus(mpb.GetStatusRequest(modelId=second)).status == mpb.ModelStatusInfo.NOT_FOUND


@pytest.mark.parametrize("request_, code, message", [
    (mpb.SetVModelRequest(targetModelId="m"), grpc.StatusCode.INVALID_ARGUMENT, "give a vModelId"),
    (mpb.SetVModelRequest(vModelId="v"), grpc.StatusCode.INVALID_ARGUMENT, "give a targetModelId"),
    (mpb.SetVModelRequest(vModelId="v", targetModelId="unregistered"), grpc.StatusCode.NOT_FOUND,
     "target model 'unregistered' of vmodel 'v' is not registered"),
    (mpb.SetVModelRequest(vModelId="nope", targetModelId=demo_model_id(2), updateOnly=True),
     grpc.StatusCode.NOT_FOUND, "vmodel 'nope' not found"),
    (mpb.SetVModelRequest(vModelId="owned", targetModelId=demo_model_id(2), owner="b"),
     grpc.StatusCode.ALREADY_EXISTS, "another owner"),
    (mpb.SetVModelRequest(vModelId="owned", targetModelId=demo_model_id(3), expectedTargetModelId="x"),
     grpc.StatusCode.FAILED_PRECONDITION, "not the expected 'x'"),
])
def test_bad_vmodel_requests_get_clear_codes(pod, stub, models_dir, request_, code, message):
    stub.registerModel(mpb.RegisterModelRequest(modelId=demo_model_id(2), modelInfo=model_info(models_dir, 2)))
    stub.setVModel(mpb.SetVModelRequest(vModelId="owned", targetModelId=demo_model_id(2), owner="a"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.setVModel(request_)
    assert caught.value.code() == code
    assert message in caught.value.details()


def test_an_unknown_vmodel_header_is_not_found(pod):
    with tc.InferenceServerClient(pod.address) as client, pytest.raises(tc.InferenceServerException) as caught:
        client.infer("whatever", [tc.InferInput("x", [1, FEATURES], "FP32")],
                     headers={"mm-vmodel-id": "no-such-vmodel"})
    assert "vmodel 'no-such-vmodel' not found" in str(caught.value)


def test_per_model_gauges_name_the_busiest_models(pod, stub, models_dir):
    for name, index, requests in (("busy", 2, 3), ("quiet", 3, 1)):
        stub.registerModel(mpb.RegisterModelRequest(modelId=name, modelInfo=model_info(models_dir, index)))
        for _ in range(requests):
            assert served_index(pod, name) == index
    metrics = pod.metrics()
    rates = {k: v for k, v in metrics.items() if k.startswith("modelmesh_model_requests_per_minute{")}
    assert rates == {'modelmesh_model_requests_per_minute{modelId="busy"}': 3.0,
                     'modelmesh_model_requests_per_minute{modelId="quiet"}': 1.0}
    assert metrics['modelmesh_model_size_bytes{modelId="busy"}'] > 0
    assert metrics['modelmesh_model_copies{modelId="busy"}'] == 1
