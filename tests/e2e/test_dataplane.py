"""Every data-plane method through a pod that fronts a separately started runtime."""

from __future__ import annotations

import queue
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from modelmesh.demo import demo_model_id, demo_weights, write_demo_models
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.proto import grpc_predict_v2_pb2_grpc as pbgrpc
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc
from tests.procs import start_pod

pytestmark = pytest.mark.slow
F = 8


@pytest.fixture(scope="module")
def runtime_address():
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelmesh.cli", "runtime", "--grpc-port", "0", "--capacity", str(1 << 28)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, line
    yield line.rsplit(" ", 1)[-1].strip()
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    proc.stdout.close()


@pytest.fixture(scope="module")
def pod(runtime_address, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    paths = write_demo_models(tmp, 4, F)
    pod = start_pod(tmp, "--runtime-endpoint", runtime_address)
    with grpc.insecure_channel(pod.address) as ch:
        stub = mgrpc.ModelMeshStub(ch)
        for p in paths:
            stub.registerModel(mpb.RegisterModelRequest(modelId=p.stem, modelInfo=mpb.ModelInfo(type="onnx", path=str(p))))
    yield pod
    assert pod.stop() == 0, pod.log()


def x_for(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((3, F)).astype(np.float32)


def expected(i: int) -> np.ndarray:
    w, b = demo_weights(i, F)
    return x_for(i) @ w + b


def test_contents_form_is_answered_in_contents(pod):
    with grpc.insecure_channel(pod.address) as ch:
        stub = pbgrpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name=demo_model_id(1), id="r-1")
        t = req.inputs.add(name="x", datatype="FP32", shape=[3, F])
        t.contents.fp32_contents.extend(x_for(1).ravel().tolist())
        resp = stub.ModelInfer(req, timeout=30)
    assert resp.id == "r-1" and not resp.raw_output_contents
    out = np.array(resp.outputs[0].contents.fp32_contents, np.float32).reshape(list(resp.outputs[0].shape))
    np.testing.assert_allclose(out, expected(1), rtol=1e-4, atol=1e-4)


def test_model_id_header_routes_whatever_the_body_says(pod):
    client = tc.InferenceServerClient(pod.address)
    try:
        inp = tc.InferInput("x", [3, F], "FP32")
        inp.set_data_from_numpy(x_for(2))
        result = client.infer("ignored-name", [inp], headers={"mm-model-id": demo_model_id(2)})
        np.testing.assert_allclose(result.as_numpy("y"), expected(2), rtol=1e-4, atol=1e-4)
        with pytest.raises(Exception) as err:
            client.infer(demo_model_id(2), [inp], headers={"mm-model-id": "a", "mm-vmodel-id": "b"})
        assert "StatusCode.INVALID_ARGUMENT" in str(err.value)
    finally:
        client.close()


def test_model_metadata_through_the_pod(pod):
    client = tc.InferenceServerClient(pod.address)
    try:
        meta = client.get_model_metadata(demo_model_id(3), as_json=True)
    finally:
        client.close()
    assert meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["datatype"] == "FP32"
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, F]
    assert meta["outputs"][0]["name"] == "y"


def test_stream_infer_answers_each_request_and_survives_errors(pod):
    client = tc.InferenceServerClient(pod.address)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in (0, 1):
            inp = tc.InferInput("x", [3, F], "FP32")
            inp.set_data_from_numpy(x_for(i))
            client.async_stream_infer(demo_model_id(i), [inp], request_id=f"s{i}")
        inp = tc.InferInput("x", [3, F], "FP32")
        inp.set_data_from_numpy(x_for(0))
        client.async_stream_infer("no-such-model", [inp], request_id="bad")
        inp = tc.InferInput("x", [3, F], "FP32")
        inp.set_data_from_numpy(x_for(3))
        client.async_stream_infer(demo_model_id(3), [inp], request_id="s3")
        got = [results.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    ok = [r for r, e in got if e is None]
    errors = [e for r, e in got if e is not None]
    assert len(ok) == 3 and len(errors) == 1
    assert "NOT_FOUND" in str(errors[0]) and "no-such-model" in str(errors[0])
    for r in ok:
        i = int(r.get_response().id[1:])
        np.testing.assert_allclose(r.as_numpy("y"), expected(i), rtol=1e-4, atol=1e-4)


def test_repository_load_and_unload(pod):
    client = tc.InferenceServerClient(pod.address)
    try:
        client.load_model(demo_model_id(0))
        states = {m["name"]: m["state"] for m in client.get_model_repository_index(as_json=True)["models"]}
        assert states[demo_model_id(0)] == "LOADED"
        client.unload_model(demo_model_id(0))
        states = {m["name"]: m["state"] for m in client.get_model_repository_index(as_json=True)["models"]}
        assert states[demo_model_id(0)] == "NOT_LOADED"
        with pytest.raises(Exception) as err:
            client.load_model("no-such-model")
        assert "NOT_FOUND" in str(err.value)
    finally:
        client.close()


def test_server_metadata_and_unknown_methods(pod):
    with grpc.insecure_channel(pod.address) as ch:
        stub = pbgrpc.GRPCInferenceServiceStub(ch)
        meta = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        assert meta.name == "modelmesh" and "model_repository" in meta.extensions
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary("/mmesh.ModelMesh/ensureVModelLoaded")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_oversized_request_is_resource_exhausted(pod):
    with grpc.insecure_channel(pod.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        req = pb.ModelInferRequest(model_name=demo_model_id(0))
        req.raw_input_contents.append(b"\0" * (17 << 20))
        with pytest.raises(grpc.RpcError) as err:
            call(req.SerializeToString(), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
