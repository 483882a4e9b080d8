"""The built-in runtime as a real process, driven through the ModelRuntime SPI and the v2 data plane."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto, helper

from modelmesh.demo import demo_model_id, demo_weights
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.proto import grpc_predict_v2_pb2_grpc, model_runtime_pb2, model_runtime_pb2_grpc
from modelmesh.runtime.onnx.server import start_runtime
from modelmesh.settings import RuntimeSettings
from tests.integration.conftest import DEMO_FEATURES, RuntimeProcess

F = DEMO_FEATURES
Input = pb.ModelInferRequest.InferInputTensor


class Runtime:
    """Stubs for both services over one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.spi = model_runtime_pb2_grpc.ModelRuntimeStub(channel)
        self.infer = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def load(self, model_id: str, path: Path | str, model_type: str = "onnx") -> int:
        response = await self.spi.loadModel(
            model_runtime_pb2.LoadModelRequest(modelId=model_id, modelType=model_type, modelPath=str(path))
        )
        return response.sizeInBytes

    async def unload(self, model_id: str) -> None:
        await self.spi.unloadModel(model_runtime_pb2.UnloadModelRequest(modelId=model_id))

    async def size(self, model_id: str) -> int:
        return (await self.spi.modelSize(model_runtime_pb2.ModelSizeRequest(modelId=model_id))).sizeInBytes


@pytest.fixture
async def rt(runtime_process: RuntimeProcess) -> AsyncIterator[Runtime]:
    async with grpc.aio.insecure_channel(runtime_process.address) as channel:
        yield Runtime(channel)


def _demo(demo_dir: Path, index: int) -> tuple[str, Path]:
    model_id = demo_model_id(index)
    return model_id, demo_dir / f"{model_id}.onnx"


def _expected(index: int, x: np.ndarray) -> np.ndarray:
    w, b = demo_weights(index, F)
    return x @ w + b


async def _error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_status_is_ready_with_the_given_capacity(rt: Runtime) -> None:
    status = await rt.spi.runtimeStatus(model_runtime_pb2.RuntimeStatusRequest())
    assert status.status == model_runtime_pb2.RuntimeStatusResponse.READY
    assert status.capacityInBytes == 1 << 30
    assert status.maxLoadingConcurrency == 2
    assert status.modelLoadingTimeoutMs > 0 and status.defaultModelSizeInBytes > 0
    assert status.runtimeVersion and status.allowAnyMethod and not status.methodInfos
    assert (await rt.infer.ServerReady(pb.ServerReadyRequest())).ready
    assert (await rt.infer.ServerLive(pb.ServerLiveRequest())).live


async def test_load_infer_unload(rt: Runtime, demo_dir: Path) -> None:
    model_id, path = _demo(demo_dir, 1)
    predicted = (await rt.spi.predictModelSize(model_runtime_pb2.PredictModelSizeRequest(
        modelId=model_id, modelType="ONNX", modelPath=str(path)))).sizeInBytes
    size = await rt.load(model_id, path, "ONNX")
    weights = (F * F + F) * 4
    assert weights <= size <= predicted
    assert await rt.size(model_id) == size
    assert await rt.load(model_id, path) == size  # idempotent
    assert (await rt.infer.ModelReady(pb.ModelReadyRequest(name=model_id))).ready

    x = np.random.default_rng(1).standard_normal((3, F)).astype(np.float32)
    raw = await rt.infer.ModelInfer(pb.ModelInferRequest(
        model_name=model_id, id="req-1", inputs=[Input(name="x", datatype="FP32", shape=[3, F])],
        raw_input_contents=[x.tobytes()]))
    assert (raw.model_name, raw.id, raw.outputs[0].name, raw.outputs[0].datatype) == (model_id, "req-1", "y", "FP32")
    assert list(raw.outputs[0].shape) == [3, F]
    y = np.frombuffer(raw.raw_output_contents[0], "<f4").reshape(3, F)
    np.testing.assert_allclose(y, _expected(1, x), rtol=1e-5, atol=1e-5)

    contents = await rt.infer.ModelInfer(pb.ModelInferRequest(
        model_name=model_id, outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="y")],
        inputs=[Input(name="x", datatype="FP32", shape=[3, F],
                      contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()))]))
    assert not contents.raw_output_contents
    y = np.array(contents.outputs[0].contents.fp32_contents, np.float32).reshape(3, F)
    np.testing.assert_allclose(y, _expected(1, x), rtol=1e-5, atol=1e-5)

    await rt.unload(model_id)
    await rt.unload(model_id)  # idempotent
    err = await _error(rt.size(model_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND and model_id in err.details()
    assert not (await rt.infer.ModelReady(pb.ModelReadyRequest(name=model_id))).ready
    err = await _error(rt.infer.ModelInfer(pb.ModelInferRequest(model_name=model_id)))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, f"model '{model_id}' is not loaded")


async def test_header_names_the_model(rt: Runtime, demo_dir: Path) -> None:
    model_id, path = _demo(demo_dir, 2)
    await rt.load(model_id, path)
    x = np.ones((1, F), np.float32)
    response = await rt.infer.ModelInfer(
        pb.ModelInferRequest(model_name="my-vmodel", inputs=[Input(name="x", datatype="FP32", shape=[1, F])],
                             raw_input_contents=[x.tobytes()]),
        metadata=[("mm-model-id", model_id)],
    )
    assert response.model_name == "my-vmodel"
    np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], "<f4"), _expected(2, x)[0], rtol=1e-5, atol=1e-5)
    metadata = await rt.infer.ModelMetadata(pb.ModelMetadataRequest(), metadata=[("mm-model-id", model_id)])
    assert metadata.name == model_id
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, F])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("y", "FP32", [-1, F])]


async def test_bad_model_files_fail_with_clear_messages(rt: Runtime, demo_dir: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    err = await _error(rt.load("garbage", garbage))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"onnxruntime cannot load '{garbage}'" in err.details() and "Protobuf parsing failed" in err.details()

    missing = tmp_path / "nowhere" / "model.onnx"
    err = await _error(rt.load("missing", missing))
    assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION, f"model path '{missing}' does not exist")

    err = await _error(rt.load("typed", demo_dir / "demo-0000.onnx", "tensorflow"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'onnx'" in err.details()

    err = await _error(rt.load("several", demo_dir))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected exactly one" in err.details()
    empty = tmp_path / "empty"
    empty.mkdir()
    err = await _error(rt.load("none", empty))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, f"model folder '{empty}' holds no .onnx file")

    one = tmp_path / "folder" / "1"
    one.mkdir(parents=True)
    (one / "model.onnx").write_bytes((demo_dir / "demo-0003.onnx").read_bytes())
    assert await rt.load("in-folder", tmp_path / "folder") > 0
    await rt.unload("in-folder")

    for model_id in ("garbage", "missing", "typed", "several"):
        assert (await _error(rt.size(model_id))).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "inputs,raw,outputs,message",
    [
        ([Input(name="z", datatype="FP32", shape=[1, F])], [bytes(4 * F)], [],
         "model 'demo-0004' has no input 'z'; its inputs are: 'x' FP32 with shape [-1, 64]"),
        ([Input(name="x", datatype="FP32", shape=[1, F + 1])], [bytes(4 * (F + 1))], [],
         "model 'demo-0004' input 'x': expected FP32 with shape [-1, 64], got FP32 [1, 65]"),
        ([Input(name="x", datatype="INT32", shape=[1, F])], [bytes(4 * F)], [],
         "model 'demo-0004' input 'x': expected FP32 with shape [-1, 64], got INT32 [1, 64]"),
        ([], [], [], "model 'demo-0004' input 'x' is missing: expected FP32 with shape [-1, 64]"),
        ([Input(name="x", datatype="FP32", shape=[1, F])], [bytes(4 * F - 1)], [],
         "model 'demo-0004' input 'x': FP32 [1, 64] needs 256 bytes of raw contents, got 255"),
        ([Input(name="x", datatype="FP32", shape=[1, F])], [bytes(4 * F)], ["y", "probabilities"],
         "model 'demo-0004' has no output 'probabilities'; its outputs are: 'y'"),
    ],
    ids=["name", "shape", "datatype", "missing", "raw-length", "output"],
)
async def test_wrong_requests_are_invalid_arguments(
    rt: Runtime, demo_dir: Path, inputs: list, raw: list, outputs: list, message: str
) -> None:
    model_id, path = _demo(demo_dir, 4)
    await rt.load(model_id, path)
    request = pb.ModelInferRequest(
        model_name=model_id, inputs=inputs, raw_input_contents=raw,
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
    )
    err = await _error(rt.infer.ModelInfer(request))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


async def test_concurrent_loads_of_one_id_share_one_load(
    rt: Runtime, demo_dir: Path, runtime_process: RuntimeProcess
) -> None:
    model_id, path = _demo(demo_dir, 5)
    sizes = await asyncio.gather(*(rt.load(model_id, path) for _ in range(10)))
    assert len(set(sizes)) == 1 and sizes[0] > 0
    assert len(re.findall(rf"loaded model {model_id} from", runtime_process.log())) == 1


async def test_cancelled_load_then_unload_leaves_the_model_unloaded(rt: Runtime, demo_dir: Path) -> None:
    # what the mesh does when it gives up on a load; other loads keep the target in the queue
    others = [asyncio.ensure_future(rt.load(*_demo(demo_dir, i))) for i in range(10, 16)]
    model_id, path = _demo(demo_dir, 16)
    target = rt.spi.loadModel(model_runtime_pb2.LoadModelRequest(modelId=model_id, modelType="onnx",
                                                                 modelPath=str(path)))
    await asyncio.sleep(0.05)
    target.cancel()
    await rt.unload(model_id)
    assert all(size > 0 for size in await asyncio.gather(*others))
    assert (await _error(rt.size(model_id))).code() == grpc.StatusCode.NOT_FOUND
    assert await rt.load(model_id, path) > 0


async def test_stream_infer_answers_each_request(rt: Runtime, demo_dir: Path) -> None:
    model_id, path = _demo(demo_dir, 6)
    await rt.load(model_id, path)
    x = np.zeros((1, F), np.float32)
    good = pb.ModelInferRequest(model_name=model_id, id="a", inputs=[Input(name="x", datatype="FP32", shape=[1, F])],
                                raw_input_contents=[x.tobytes()])
    unknown = pb.ModelInferRequest(model_name="nope", id="b")
    responses = [r async for r in rt.infer.ModelStreamInfer(iter([good, unknown]))]
    assert responses[0].infer_response.id == "a" and not responses[0].error_message
    assert responses[1].error_message == "model 'nope' is not loaded"


def _typed_model(path: Path) -> None:
    """s: BYTES [-1] -> s_out = s; f: FP32 [-1] -> h_out = FP16(2 f)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["s_out"]),
         helper.make_node("Add", ["f", "f"], ["f2"]),
         helper.make_node("Cast", ["f2"], ["h_out"], to=TensorProto.FLOAT16)],
        "typed",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["n"]),
         helper.make_tensor_value_info("f", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("s_out", TensorProto.STRING, ["n"]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT16, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())


async def test_bytes_and_fp16_tensors(rt: Runtime, tmp_path: Path) -> None:
    _typed_model(tmp_path / "typed.onnx")
    await rt.load("typed", tmp_path / "typed.onnx")
    words = ["héllo".encode(), b""]
    f = np.array([1.5, -2.0], np.float32)
    raw_words = b"".join(len(w).to_bytes(4, "little") + w for w in words)

    def request(raw: bool, outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
        inputs = [Input(name="s", datatype="BYTES", shape=[2]), Input(name="f", datatype="FP32", shape=[2])]
        if not raw:
            inputs[0].contents.bytes_contents.extend(words)
            inputs[1].contents.fp32_contents.extend(f.tolist())
        return pb.ModelInferRequest(
            model_name="typed", inputs=inputs, raw_input_contents=[raw_words, f.tobytes()] if raw else [],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs])

    response = await rt.infer.ModelInfer(request(raw=True))
    assert [(o.name, o.datatype) for o in response.outputs] == [("s_out", "BYTES"), ("h_out", "FP16")]
    assert response.raw_output_contents[0] == raw_words
    assert np.frombuffer(response.raw_output_contents[1], "<f2").tolist() == [3.0, -4.0]

    # contents in, contents out; but FP16 has no contents field, so with it every output goes raw
    only_s = await rt.infer.ModelInfer(request(raw=False, outputs=("s_out",)))
    assert list(only_s.outputs[0].contents.bytes_contents) == words and not only_s.raw_output_contents
    both = await rt.infer.ModelInfer(request(raw=False))
    assert len(both.raw_output_contents) == 2 and both.raw_output_contents[0] == raw_words
    await rt.unload("typed")


def test_tritonclient_calls_the_runtime_by_model_name(runtime_process: RuntimeProcess, demo_dir: Path) -> None:
    model_id, path = _demo(demo_dir, 7)
    client = tc.InferenceServerClient(url=runtime_process.address)
    try:
        with grpc.insecure_channel(runtime_process.address) as channel:
            model_runtime_pb2_grpc.ModelRuntimeStub(channel).loadModel(
                model_runtime_pb2.LoadModelRequest(modelId=model_id, modelType="onnx", modelPath=str(path)))
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(model_id)
        x = np.random.default_rng(7).standard_normal((2, F)).astype(np.float32)
        infer_input = tc.InferInput("x", [2, F], "FP32")
        infer_input.set_data_from_numpy(x)
        result = client.infer(model_id, [infer_input], outputs=[tc.InferRequestedOutput("y")], request_id="t-1")
        np.testing.assert_allclose(result.as_numpy("y"), _expected(7, x), rtol=1e-5, atol=1e-5)
        assert result.get_response().id == "t-1"
        metadata = client.get_model_metadata(model_id)
        assert metadata.platform == "onnxruntime_onnx" and metadata.inputs[0].name == "x"
    finally:
        client.close()


async def test_in_process_runtime_on_a_unix_socket(tmp_path: Path, demo_dir: Path) -> None:
    socket_path = tmp_path / "runtime.sock"
    server = await start_runtime(RuntimeSettings(socket_path=str(socket_path), capacity_bytes=1 << 28))
    try:
        assert server.address == f"unix:{socket_path}"
        async with grpc.aio.insecure_channel(server.address) as channel:
            rt = Runtime(channel)
            model_id, path = _demo(demo_dir, 8)
            assert await rt.load(model_id, path) > 0
            status = await rt.spi.runtimeStatus(model_runtime_pb2.RuntimeStatusRequest())
            assert status.capacityInBytes == 1 << 28
    finally:
        await server.stop()
