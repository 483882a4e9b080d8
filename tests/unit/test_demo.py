"""Demo models: reproducible, distinct, and computing what demo_weights says they compute."""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import pytest

from modelmesh.demo import add_demo_parser, demo_model_id, demo_weights, write_demo_models


def test_weights_are_reproducible_and_distinct() -> None:
    w1, b1 = demo_weights(1, 16)
    w1_again, b1_again = demo_weights(1, 16)
    np.testing.assert_array_equal(w1, w1_again)
    np.testing.assert_array_equal(b1, b1_again)
    assert w1.shape == (16, 16) and b1.shape == (16,)
    assert w1.dtype == b1.dtype == np.float32
    assert not np.allclose(w1, demo_weights(2, 16)[0])
    assert not np.allclose(w1, demo_weights(1, 16, seed=1)[0])


def test_model_ids_are_file_stems() -> None:
    assert demo_model_id(7) == "demo-0007"
    assert demo_model_id(12345) == "demo-12345"
    with pytest.raises(ValueError):
        demo_model_id(-1)


def test_written_models_compute_x_at_w_plus_b(tmp_path) -> None:
    paths = write_demo_models(tmp_path / "models", 3, 8)
    assert [p.name for p in paths] == ["demo-0000.onnx", "demo-0001.onnx", "demo-0002.onnx"]
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    outputs = []
    for index, path in enumerate(paths):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (spec,) = session.get_inputs()
        assert (spec.name, spec.type, spec.shape[1]) == ("x", "tensor(float)", 8)
        (y,) = session.run(["y"], {"x": x})
        w, b = demo_weights(index, 8)
        np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
        outputs.append(y)
    assert not np.allclose(outputs[0], outputs[1])


def test_cli_subcommand_writes_models_and_a_summary(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo-models", "--count", "2", "--features", "4", "--seed", "3", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"wrote 2 demo models to {tmp_path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-0000.onnx", "demo-0001.onnx"]
    with pytest.raises(SystemExit):
        parser.parse_args(["demo-models", "--count", "0", str(tmp_path)])
