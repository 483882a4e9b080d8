"""A real pod on each event loop serves a request (grpc.aio on uvloop included)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from modelmesh.demo import demo_model_id, demo_weights
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from tests.procs import start_pod

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pod_serves_on_its_event_loop(tmp_path, loop):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    pod = start_pod(tmp_path, "--event-loop", loop, "--demo-models", "1", "--demo-dir", str(tmp_path / "models"),
                    "--capacity", str(1 << 28))
    try:
        x = np.ones((1, 64), np.float32)
        request = pb.ModelInferRequest(model_name=demo_model_id(0))
        request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(x.tobytes())
        with grpc.insecure_channel(pod.address) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=pb.ModelInferRequest.SerializeToString,
                                        response_deserializer=pb.ModelInferResponse.FromString)
            reply = infer(request, timeout=60)
        weights, bias = demo_weights(0, 64)
        got = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 64)
        np.testing.assert_allclose(got, x @ weights + bias, rtol=1e-4, atol=1e-4)
    finally:
        assert pod.stop() == 0
    assert f"event loop: {loop}" in pod.log()
