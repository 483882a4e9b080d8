"""Copies that follow traffic, on real processes: three pods and one etcd.

    python -m loadtest.bench_copies [--features 1024] [--batch 8] [--concurrency 6] [--window 20]

Part 1, a hot model gets a second copy and the cluster's throughput for it rises. The pods start
with MM_SCALEUP_RPM_THRESHOLD out of reach; one compute-heavy demo model (x @ W with W FP32
[F, F], one onnxruntime thread per pod) is loaded on one pod. Closed-loop clients send it
ModelInfer through all three pods for a window: the throughput with one copy. Then, as an operator
would, ``modelmesh config set scaleup_rpm_threshold`` lowers the threshold below the model's rate
while the traffic goes on; the copy keeper adds a copy within a rate period or two (the time is
reported), and a second window measures the throughput with the copies. The ratio is the gain.

Part 2, a cooled model loses its extra copy when space is needed. The traffic stops; each pod is
filled with small demo models (loaded where they land, through ``mm-forwarded``) until the cluster
is over 95% full. The copies of the hot model are polled until one is left (the rules: traffic
below 2/3 of the threshold per remaining copy, no copy change for 3 minutes, cluster at least 95%
full), and the fillers are checked to be still loaded (nothing else was evicted for it).

Everything started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.bench_hop import infer_request  # noqa: E402
from loadtest.bench_remote import scrape  # noqa: E402
from modelmesh.demo import write_demo_models  # noqa: E402
from modelmesh.proto import model_mesh_pb2 as mpb  # noqa: E402
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc  # noqa: E402
from modelmesh.routing import encode_string_field  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402
from tests.procs import stop_process  # noqa: E402

SERVING = re.compile(r"serving on \S+:(\d+) \(metrics on :(\d+)\)")
INFER = "/inference.GRPCInferenceService/ModelInfer"
METADATA = "/inference.GRPCInferenceService/ModelMetadata"
HOT = "hot"


class Pod:
    def __init__(self, etcd: str, index: int, capacity: int, log: Path, env: dict[str, str]) -> None:
        self.name = f"pod-{index}"
        self.log_path = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelmesh.cli", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
             "--metrics-port", "0", "--etcd", etcd, "--capacity", str(capacity), "--instance-id", self.name],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env={**os.environ, **env})
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = SERVING.search(line)
            if m:
                self.address, self.metrics = f"127.0.0.1:{m.group(1)}", f"127.0.0.1:{m.group(2)}"
                return
        raise RuntimeError(f"{self.name} exited: {log.read_text()[-2000:]}")

    def scrape(self) -> dict[str, float]:
        return scrape(self.metrics)

    def stop(self) -> None:
        stop_process(self.proc)


def copies(address: str, model_id: str) -> list[str]:
    with grpc.insecure_channel(address) as ch:
        info = mgrpc.ModelMeshStub(ch).getModelStatus(mpb.GetStatusRequest(modelId=model_id), timeout=10)
    return sorted(c.location for c in info.modelCopyInfos if c.copyStatus == mpb.ModelStatusInfo.LOADED)


def register(address: str, model_id: str, path: Path, *, load: bool) -> None:
    with grpc.insecure_channel(address) as ch:
        mgrpc.ModelMeshStub(ch).registerModel(mpb.RegisterModelRequest(
            modelId=model_id, loadNow=load, sync=load, modelInfo=mpb.ModelInfo(type="onnx", path=str(path))),
            timeout=60)


async def closed_loop(addresses: list[str], body: bytes, concurrency: int, stop: asyncio.Event,
                      counts: list[int], errors: list[str]) -> None:
    """``concurrency`` workers, spread over the pods, each sending the next request when the last
    returns, until ``stop``; ``counts[0]`` counts the answers."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    calls = [ch.unary_unary(INFER) for ch in channels]
    md = (("mm-model-id", HOT),)

    async def worker(i: int) -> None:
        call = calls[i % len(calls)]
        while not stop.is_set():
            try:
                await call(body, metadata=md, timeout=30)
                counts[0] += 1
            except grpc.aio.AioRpcError as err:
                errors.append(f"{err.code().name}: {err.details()}")
                await asyncio.sleep(0.05)

    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        for ch in channels:
            await ch.close()


def config_set(etcd: str, name: str, value: str) -> None:
    done = subprocess.run([sys.executable, "-m", "modelmesh.cli", "config", "set", name, value, "--etcd", etcd],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    print(f"  {done.stdout.strip()}", flush=True)


async def part1(args: argparse.Namespace, etcd: str, pods: list[Pod], body: bytes) -> dict[str, float]:
    stop = asyncio.Event()
    counts, errors = [0], []
    load = asyncio.create_task(closed_loop([p.address for p in pods], body, args.concurrency, stop, counts, errors))
    try:
        await asyncio.sleep(3)  # warm-up
        start_n, t0 = counts[0], time.monotonic()
        await asyncio.sleep(args.window)
        one = (counts[0] - start_n) / (time.monotonic() - t0)
        holders = copies(pods[0].address, HOT)
        print(f"  one copy ({holders}): {one:.0f} req/s = {one * 60:.0f} rpm", flush=True)
        threshold = max(1, int(one * 60 / 4))
        changed = time.monotonic()
        await asyncio.to_thread(config_set, etcd, "scaleup_rpm_threshold", str(threshold))
        while len(holders := copies(pods[0].address, HOT)) < 2:
            if time.monotonic() - changed > 60:
                raise RuntimeError("no second copy within 60 s of lowering the threshold")
            await asyncio.sleep(0.5)
        took = time.monotonic() - changed
        print(f"  second copy after {took:.1f} s: {holders}", flush=True)
        await asyncio.sleep(3)
        start_n, t0 = counts[0], time.monotonic()
        await asyncio.sleep(args.window)
        two = (counts[0] - start_n) / (time.monotonic() - t0)
        holders = copies(pods[0].address, HOT)
        print(f"  {len(holders)} copies ({holders}): {two:.0f} req/s, {two / one:.2f}x", flush=True)
    finally:
        stop.set()
        await load
    if errors:
        print(f"  {len(errors)} errors, first: {errors[0]}", flush=True)
    return {"one_copy_rps": one, "copies_rps": two, "ratio": two / one, "second_copy_s": took,
            "copies": len(holders), "threshold_rpm": threshold, "errors": len(errors)}


async def fill(pods: list[Pod], paths: list[Path], target: float) -> int:
    """Load filler models on each pod (``mm-forwarded``: served, so loaded, where it lands) until
    every pod is at least ``target`` full; returns how many were loaded."""
    loaded = 0
    it = iter(paths)
    for pod in pods:
        async with grpc.aio.insecure_channel(pod.address) as ch:
            call = ch.unary_unary(METADATA)
            while True:
                m = pod.scrape()
                if m["modelmesh_instance_used_bytes"] >= target * m["modelmesh_instance_capacity_bytes"]:
                    break
                path = next(it)
                await call(encode_string_field(1, path.stem), metadata=(("mm-model-id", path.stem),
                                                                        ("mm-forwarded", "bench")), timeout=60)
                loaded += 1
    return loaded


async def part2(args: argparse.Namespace, pods: list[Pod], fillers: list[Path]) -> dict[str, float]:
    stopped = time.monotonic()
    n = await fill(pods, fillers, args.fill)
    full = [p.scrape() for p in pods]
    fullness = sum(m["modelmesh_instance_used_bytes"] for m in full) / sum(
        m["modelmesh_instance_capacity_bytes"] for m in full)
    evicted_before = sum(m.get("modelmesh_model_evicted_total", 0) for m in full)
    print(f"  {n} fillers loaded; cluster {fullness:.1%} full; waiting for the hot model to cool", flush=True)
    while len(holders := copies(pods[0].address, HOT)) > 1:
        if time.monotonic() - stopped > args.cool_timeout:
            raise RuntimeError(f"still {holders} after {args.cool_timeout} s")
        await asyncio.sleep(5)
    took = time.monotonic() - stopped
    after = [p.scrape() for p in pods]
    evicted = sum(m.get("modelmesh_model_evicted_total", 0) for m in after) - evicted_before
    fillers_loaded = sum(m["modelmesh_instance_models_total"] for m in after) - len(holders)
    print(f"  one copy left ({holders}) {took:.0f} s after the traffic stopped; "
          f"{evicted:.0f} evictions meanwhile; {fillers_loaded:.0f} of {n} fillers still loaded", flush=True)
    return {"fillers": n, "fullness": fullness, "cooled_after_s": took, "evictions": evicted,
            "fillers_left": fillers_loaded}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=1024, help="the hot model's width F")
    parser.add_argument("--batch", type=int, default=8, help="rows per request")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--window", type=float, default=20, help="seconds measured per phase")
    parser.add_argument("--capacity", type=int, default=24_000_000, help="bytes per pod")
    parser.add_argument("--fill", type=float, default=0.97, help="how full part 2 fills each pod")
    parser.add_argument("--cool-timeout", type=float, default=600)
    parser.add_argument("--skip-cooling", action="store_true", help="part 1 only")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-copies-"))
    hot_path = write_demo_models(tmp / "hot", 1, args.features)[0]
    fillers = write_demo_models(tmp / "fill", 1200, 64)
    env = {"MM_SCALEUP_RPM_THRESHOLD": "1000000000", "MM_LOG_LEVEL": "INFO"}
    pods: list[Pod] = []
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; F={args.features}, "
          f"batch {args.batch}, {args.concurrency} clients over 3 pods", flush=True)
    with EtcdServer() as etcd:
        try:
            for i in range(3):
                pods.append(Pod(etcd.endpoint, i, args.capacity, tmp / f"pod-{i}.log", env))
            register(pods[0].address, HOT, hot_path, load=True)
            for f in fillers:
                register(pods[0].address, f.stem, f, load=False)
            print("part 1: a hot model", flush=True)
            body = infer_request(HOT, args.features, args.batch)
            one = asyncio.run(part1(args, etcd.endpoint, pods, body))
            if not args.skip_cooling:
                print("part 2: the model cools while space is needed", flush=True)
                two = asyncio.run(part2(args, pods, fillers))
                print(f"summary: {one | two}", flush=True)
            print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            for p in pods:
                p.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
