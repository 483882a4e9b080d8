"""Inference on the event loop vs in the runtime's thread pool, for a tiny model.

    python loadtest/runtime_inference.py --seconds 5 --concurrency 1 8

First the cost of one call in-process: ``session.run`` alone, and the runtime's ``infer`` with every
run sent to the thread pool. Then, for each mode, a runtime is started as a child process (this file
with ``--serve MODE``) and a gRPC client sends ModelInfer for one demo model (x: FP32 [1, 64]) from N
concurrent callers, printing requests/s and latency percentiles. Modes: ``pool`` sends every run to the
thread pool; ``adaptive`` is the runtime as shipped (runs predicted under INLINE_BUDGET_S stay on the
event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from modelmesh.demo import write_demo_models
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.proto import grpc_predict_v2_pb2_grpc as igrpc
from modelmesh.proto import model_runtime_pb2 as rpb
from modelmesh.proto import model_runtime_pb2_grpc as rgrpc
from modelmesh.runtime.onnx import models
from modelmesh.runtime.onnx.server import start_runtime
from modelmesh.settings import RuntimeSettings

LISTENING_PREFIX = "modelmesh runtime listening on "
FEATURES = 64


async def _serve(mode: str) -> None:
    server = await start_runtime(RuntimeSettings(grpc_port=0, capacity_bytes=1 << 30, log_level="WARNING"))
    if mode == "pool":
        # benchmark only: the shipped runtime has no switch for this
        models.INLINE_BUDGET_S = 0.0
    print(f"{LISTENING_PREFIX}{server.address}", flush=True)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop()


async def _per_call(model_path: Path, calls: int = 5000) -> None:
    table = models.ModelTable(RuntimeSettings(capacity_bytes=1 << 30))
    try:
        await table.load("m", "onnx", str(model_path))
        model = table.get("m")
        feed = {"x": np.ones((1, FEATURES), np.float32)}
        started = time.perf_counter()
        for _ in range(calls):
            model.session.run(["y"], feed)
        alone = (time.perf_counter() - started) / calls
        models.INLINE_BUDGET_S = 0.0
        started = time.perf_counter()
        for _ in range(calls):
            await table.infer(model, feed, [])
        pooled = (time.perf_counter() - started) / calls
    finally:
        await table.close()
    print(f"per call, in-process: session.run {alone * 1e6:.1f} us; infer via the thread pool {pooled * 1e6:.1f} us")


async def _drive(address: str, model_path: Path, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        await rgrpc.ModelRuntimeStub(channel).loadModel(
            rpb.LoadModelRequest(modelId="m", modelType="onnx", modelPath=str(model_path)))
        infer = igrpc.GRPCInferenceServiceStub(channel)
        x = np.ones((1, FEATURES), np.float32).tobytes()
        request = pb.ModelInferRequest(
            model_name="m", inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32",
                                                                          shape=[1, FEATURES])],
            raw_input_contents=[x])
        for _ in range(200):  # warm up the channel and the session
            await infer.ModelInfer(request)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await infer.ModelInfer(request)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return len(latencies) / (time.perf_counter() - started), latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", choices=("pool", "adaptive"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        (model_path,) = write_demo_models(Path(tmp), 1, FEATURES)
        asyncio.run(_per_call(model_path))
        for mode in ("pool", "adaptive"):
            proc = subprocess.Popen([sys.executable, __file__, "--serve", mode], stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                address = line[len(LISTENING_PREFIX):].strip()
                for concurrency in args.concurrency:
                    rate, lat = asyncio.run(_drive(address, model_path, args.seconds, concurrency))
                    q = statistics.quantiles(lat, n=100)
                    print(f"{mode:8s} concurrency {concurrency:3d}: {rate:7.0f} req/s, "
                          f"p50 {q[49] * 1e6:5.0f} us, p99 {q[98] * 1e6:5.0f} us")
            finally:
                proc.terminate()
                proc.wait(timeout=15)
                if proc.stdout is not None:
                    proc.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
