"""Small, distinct ONNX models to try the mesh with: ``modelmesh demo-models --count N DIR``.

Model ``demo-0007`` computes ``y = x @ W + b`` with ``x`` and ``y`` FP32 of shape ``[-1, F]``. ``W`` and
``b`` come from :func:`demo_weights`, seeded by ``(seed, index)``, so a test or a client can recompute
the exact expected output of any demo model without reading its file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEFAULT_FEATURES = 64
# Opset 17 / IR 8 is old enough for every onnxruntime we support (>= 1.17) and new enough for MatMul
# and Add with broadcasting, the only operators the demo graph uses.
DEMO_OPSET = 17
DEMO_IR_VERSION = 8


def demo_model_id(index: int) -> str:
    """The model id (and file stem) of demo model ``index``: ``demo_model_id(7) == "demo-0007"``."""
    if index < 0:
        raise ValueError(f"demo model index must be >= 0, got {index}")
    return f"demo-{index:04d}"


def demo_weights(index: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The weights ``(W, b)`` of demo model ``index``: W is FP32 ``[F, F]``, b is FP32 ``[F]``.

    W is scaled by 1/sqrt(F) so outputs stay near the inputs' magnitude whatever F is.
    """
    # numpy is imported here, not at module level: the CLI imports this module for every command,
    # and numpy was 130-220 ms of each command's start
    import numpy as np

    if features < 1:
        raise ValueError(f"features must be >= 1, got {features}")
    rng = np.random.default_rng([seed, index])
    weights = (rng.standard_normal((features, features)) / np.sqrt(features)).astype(np.float32)
    bias = rng.standard_normal(features).astype(np.float32)
    return weights, bias


def demo_model_bytes(index: int, features: int = DEFAULT_FEATURES, seed: int = 0) -> bytes:
    """The serialized ONNX model ``demo_model_id(index)``."""
    # onnx is imported here, not at module level: the CLI imports this module for every command.
    from onnx import TensorProto, checker, helper, numpy_helper

    weights, bias = demo_weights(index, features, seed)
    model_id = demo_model_id(index)
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["x", "W"], ["xW"]),
            helper.make_node("Add", ["xW", "b"], ["y"]),
        ],
        name=model_id,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", DEMO_OPSET)],
        ir_version=DEMO_IR_VERSION,
        producer_name="modelmesh-demo",
    )
    checker.check_model(model)
    return model.SerializeToString()


def write_demo_models(
    directory: str | Path, count: int, features: int = DEFAULT_FEATURES, seed: int = 0
) -> list[Path]:
    """Write ``count`` demo models as ``directory/demo-0000.onnx`` ...; return their paths.

    The directory is created if needed; existing files of the same names are overwritten.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = out / f"{demo_model_id(index)}.onnx"
        path.write_bytes(demo_model_bytes(index, features, seed))
        paths.append(path)
    return paths


def _demo_models(args: argparse.Namespace) -> int:
    paths = write_demo_models(args.directory, args.count, args.features, args.seed)
    total = sum(p.stat().st_size for p in paths)
    print(
        f"wrote {len(paths)} demo models to {args.directory} "
        f"(x: FP32 [-1, {args.features}] -> y: FP32 [-1, {args.features}], {total} bytes)",
        flush=True,
    )
    return 0


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``demo-models`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "demo-models",
        help="write small ONNX models (y = x @ W + b) to try the mesh with",
        description="Write N small, distinct ONNX models DIR/demo-0000.onnx ... whose model id is "
        "the file stem. Input x and output y are FP32 [-1, F].",
    )
    parser.add_argument("directory", metavar="DIR", help="where to write the models (created if needed)")
    parser.add_argument("--count", type=_positive_int, required=True, metavar="N", help="how many models")
    parser.add_argument("--features", type=_positive_int, default=DEFAULT_FEATURES, metavar="F",
                        help=f"width F of x and y (default {DEFAULT_FEATURES})")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="weights seed; W, b of model i come from (S, i) (default 0)")
    parser.set_defaults(func=_demo_models)
