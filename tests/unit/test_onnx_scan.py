"""The ONNX layout scan agrees with a full parse and refuses what is not ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelmesh.demo import write_demo_models
from modelmesh.runtime.onnx.models import PREDICT_FIXED_BYTES, predict_size
from modelmesh.runtime.onnx.scan import OnnxLayout, scan_onnx


def _model_with_all_initializer_kinds(path) -> None:
    strings = helper.make_tensor("s", TensorProto.STRING, [2], [b"abc", b"de"])
    typed = helper.make_tensor("i", TensorProto.INT64, [3, 2], list(range(6)))  # int64_data, not raw
    raw = numpy_helper.from_array(np.zeros((4, 5), np.float16), "h")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
        initializer=[strings, typed, raw],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def test_scan_counts_nodes_and_initializer_bytes(tmp_path) -> None:
    path = tmp_path / "m.onnx"
    _model_with_all_initializer_kinds(path)
    assert scan_onnx(path) == OnnxLayout(node_count=2, initializer_bytes=5 + 3 * 2 * 8 + 4 * 5 * 2)

    (demo,) = write_demo_models(tmp_path / "demo", 1, 32)
    assert scan_onnx(demo) == OnnxLayout(node_count=2, initializer_bytes=(32 * 32 + 32) * 4)


def test_scan_refuses_garbage_and_truncated_files(tmp_path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError):
        scan_onnx(garbage)
    (demo,) = write_demo_models(tmp_path, 1, 64)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(demo.read_bytes()[:5000])
    with pytest.raises(ValueError):
        scan_onnx(truncated)


def test_prediction_covers_weights_and_nodes(tmp_path) -> None:
    (demo,) = write_demo_models(tmp_path, 1, 64)
    predicted = predict_size("ONNX", str(demo))
    assert predicted >= 1.25 * demo.stat().st_size + PREDICT_FIXED_BYTES
    # a folder holding one model predicts the same plus its other files
    assert predict_size("onnx", str(tmp_path)) == predicted
