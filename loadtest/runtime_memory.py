"""Does the built-in runtime's measured model size track its real memory growth?

    python loadtest/runtime_memory.py --count 50 --features 64
    python loadtest/runtime_memory.py --count 50 --features 512

Starts ``modelmesh runtime`` as a child, loads N demo models through the SPI (two loads at a time, as
the mesh does), and compares the sum of the sizes it reports with the growth of its RSS; then unloads
them all and reports how much RSS stays. Prints one line per phase; figures go into docs/runtime.md.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil

from modelmesh.demo import demo_model_id, write_demo_models
from modelmesh.proto import model_runtime_pb2 as rpb
from modelmesh.proto import model_runtime_pb2_grpc as rgrpc

LISTENING_PREFIX = "modelmesh runtime listening on "
MIB = 1024 * 1024


def _rss(proc: psutil.Process) -> int:
    return int(proc.memory_info().rss)


async def _measure(address: str, pid: int, models: list[Path], parallel: int) -> None:
    proc = psutil.Process(pid)
    async with grpc.aio.insecure_channel(address) as channel:
        spi = rgrpc.ModelRuntimeStub(channel)
        await spi.runtimeStatus(rpb.RuntimeStatusRequest())
        await asyncio.sleep(0.5)
        rss_before = _rss(proc)
        slots = asyncio.Semaphore(parallel)

        async def load(index: int, path: Path) -> int:
            async with slots:
                response = await spi.loadModel(rpb.LoadModelRequest(
                    modelId=demo_model_id(index), modelType="onnx", modelPath=str(path)))
                return int(response.sizeInBytes)

        started = time.perf_counter()
        sizes = await asyncio.gather(*(load(i, p) for i, p in enumerate(models)))
        elapsed = time.perf_counter() - started
        predicted = [
            (await spi.predictModelSize(rpb.PredictModelSizeRequest(
                modelId=demo_model_id(i), modelType="onnx", modelPath=str(p)))).sizeInBytes
            for i, p in enumerate(models)
        ]
        await asyncio.sleep(0.5)
        grown = _rss(proc) - rss_before
        total = sum(sizes)
        print(f"loaded {len(models)} models in {elapsed:.2f} s: file {models[0].stat().st_size} B, "
              f"measured per model min {min(sizes)} / median {sorted(sizes)[len(sizes) // 2]} / max {max(sizes)} B, "
              f"predicted {predicted[0]} B")
        print(f"sum of measured sizes {total / MIB:.2f} MiB, RSS growth {grown / MIB:.2f} MiB "
              f"(ratio {grown / total:.3f})")
        for i in range(len(models)):
            await spi.unloadModel(rpb.UnloadModelRequest(modelId=demo_model_id(i)))
        await asyncio.sleep(0.5)
        kept = _rss(proc) - rss_before
        print(f"after unloading all: RSS {kept / MIB:+.2f} MiB vs before loading "
              f"({100 * kept / max(grown, 1):.1f}% of the growth stays)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=2, help="loads in flight at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = write_demo_models(Path(tmp), args.count, args.features)
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelmesh.cli", "runtime", "--grpc-port", "0", "--host", "127.0.0.1",
             "--capacity", str(1 << 34), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith(LISTENING_PREFIX):
                raise SystemExit(f"runtime did not start: {line!r}")
            asyncio.run(_measure(line[len(LISTENING_PREFIX):].strip(), proc.pid, models, args.parallel))
        finally:
            proc.terminate()
            proc.wait(timeout=15)
            if proc.stdout is not None:
                proc.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
