"""B1, the local hop: the same request to the same model, sent to the runtime directly and through a
mesh pod in front of that runtime, in one run, at several concurrencies.

    python -m loadtest.bench_hop [--duration 10] [--concurrency 1 16] [--rounds 2] [--json out.json]
                                 [--pod-runtime endpoint|inprocess] [--pod-loop auto asyncio uvloop]

It starts `modelmesh runtime` and `modelmesh serve --runtime-endpoint` on free loopback ports,
registers one demo model through the pod and loads it, then alternates direct and mesh rounds so
drift on the machine hits both alike. The client sends a pre-serialized ModelInferRequest with raw
gRPC (no tritonclient conversion work in the loop), so the figures show the servers, not the client.
Prints throughput ratio (mesh / direct), the p50 / p99 latency the hop adds, and each server's CPU
time per request. With several ``--pod-loop`` values, one pod per event loop joins the same
alternating rounds (``serve --event-loop``; "auto", the pod's default, is uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from modelmesh.demo import demo_model_id, write_demo_models
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc
from modelmesh.proto import model_runtime_pb2 as rpb
from modelmesh.proto import model_runtime_pb2_grpc as rgrpc

INFER = "/inference.GRPCInferenceService/ModelInfer"
# the pod's event loops a benchmark can put side by side (--pod-loop; `serve --event-loop`);
# "auto", the pod's default, is uvloop when it is installed
POD_LOOPS = ("auto", "asyncio", "uvloop")


def mesh_target(loop: str) -> str:
    """Round label of a pod on ``loop``: "mesh" for the pod's default, so earlier outputs still read."""
    return "mesh" if loop == "auto" else f"mesh-{loop}"


@dataclass
class RoundResult:
    target: str
    concurrency: int
    requests: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float
    errors: int
    # CPU time of the serving process(es) per request (warm-up calls included): steadier than the
    # throughput on a machine shared with other work; 0 when not measured
    server_cpu_ms: float = 0.0


def start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen[str], re.Match[str]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(pattern, line)
        if m:
            return proc, m
    raise RuntimeError(f"{cmd[3]} exited with {proc.wait()}")


def cpu_s(*pids: int) -> float:
    """User + system CPU seconds of running processes (their threads included)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


WARMUP_CALLS = 50


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def infer_request(model_id: str, features: int, batch: int = 1) -> bytes:
    """A serialized ModelInferRequest for a demo model: ``batch`` rows of ``features`` FP32 inputs."""
    x = np.random.default_rng(0).standard_normal((batch, features)).astype(np.float32)
    req = pb.ModelInferRequest(model_name=model_id)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()


async def run_round(target: str, address: str, body: bytes, concurrency: int, duration: float,
                    channels: int = 1) -> RoundResult:
    """``concurrency`` closed-loop callers sending ``body`` for ``duration`` seconds, spread over
    ``channels`` connections (more than one: separate subchannel pools, so several connections
    reach a port that several processes share)."""
    latencies: list[float] = []
    errors = 0
    options = [("grpc.use_local_subchannel_pool", 1)] if channels > 1 else []
    chans = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    try:
        calls = [ch.unary_unary(INFER) for ch in chans]
        for call in calls:  # warm every connection and both servers (and load the model behind it)
            for _ in range(WARMUP_CALLS):
                await call(body, timeout=60)
        stop_at = time.perf_counter() + duration

        async def worker(call: grpc.aio.UnaryUnaryMultiCallable) -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await call(body, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker(calls[i % channels]) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        for ch in chans:
            await ch.close()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return RoundResult(target, concurrency, len(latencies), elapsed, len(latencies) / elapsed,
                       q[49] * 1000, q[98] * 1000, errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/mesh rounds per concurrency")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--pod-runtime", choices=("endpoint", "inprocess"), default="endpoint",
                        help="endpoint: the pod fronts the measured runtime process; inprocess: the pod "
                             "hosts its own runtime (the baseline is the runtime process, same model)")
    parser.add_argument("--pod-loop", nargs="+", choices=POD_LOOPS, default=["auto"],
                        help="event loop(s) of the pod; with several, one pod per loop, all measured in "
                             "the same alternating rounds")
    parser.add_argument("--uds", action="store_true",
                        help="the runtime listens on a Unix socket (the pod and the direct client use it)")
    args = parser.parse_args()

    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="bench-hop-"))
    path = write_demo_models(tmp, 1, args.features)[0]
    model_id = demo_model_id(0)
    runtime_cmd = [py, "-m", "modelmesh.cli", "runtime", "--grpc-port", "0", "--capacity", str(1 << 30)]
    if args.uds:
        runtime_cmd += ["--socket-path", str(tmp / "runtime.sock")]
    runtime, m = start(runtime_cmd, r"listening on (\S+)")
    runtime_addr = m.group(1)
    pods: list[subprocess.Popen[str]] = []
    try:
        runtime_flags = ["--runtime", "inprocess"] if args.pod_runtime == "inprocess" \
            else ["--runtime-endpoint", runtime_addr]
        targets = [("direct", runtime_addr)]
        pids = {"direct": runtime.pid}
        for loop in args.pod_loop:
            pod, m = start([py, "-m", "modelmesh.cli", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
                            "--metrics-port", "0", "--capacity", str(1 << 30), "--event-loop", loop,
                            *runtime_flags],
                           r"serving on \S+:(\d+)")
            pods.append(pod)
            pod_addr = f"127.0.0.1:{m.group(1)}"
            label = mesh_target(loop)
            if any(t == label for t, _ in targets):  # the same loop twice: an A/A check of the set-up
                label += f"-{len(targets)}"
            targets.append((label, pod_addr))
            pids[label] = pod.pid
            with grpc.insecure_channel(pod_addr) as ch:
                mgrpc.ModelMeshStub(ch).registerModel(mpb.RegisterModelRequest(
                    modelId=model_id, loadNow=True, sync=True,
                    modelInfo=mpb.ModelInfo(type="onnx", path=str(path))))
        if args.pod_runtime == "inprocess":
            with grpc.insecure_channel(runtime_addr) as ch:
                rgrpc.ModelRuntimeStub(ch).loadModel(rpb.LoadModelRequest(
                    modelId=model_id, modelType="onnx", modelPath=str(path)))
        body = infer_request(model_id, args.features)
        print(f"loadavg {loadavg()} before the rounds", flush=True)
        results: list[RoundResult] = []
        for c in args.concurrency:
            for _ in range(args.rounds):
                for target, address in targets:
                    cpu0 = cpu_s(pids[target])
                    r = asyncio.run(run_round(target, address, body, c, args.duration))
                    r.server_cpu_ms = (cpu_s(pids[target]) - cpu0) * 1000 / (r.requests + r.errors + WARMUP_CALLS)
                    results.append(r)
                    print(f"  {target:11} c={c:<3} {r.throughput:8.0f} req/s  p50 {r.p50_ms:6.3f} ms  "
                          f"p99 {r.p99_ms:6.3f} ms  server CPU {r.server_cpu_ms:.3f} ms/req  errors {r.errors}  "
                          f"(loadavg {loadavg()})", flush=True)
    finally:
        for proc in (*pods, runtime):
            proc.terminate()
            proc.wait(timeout=20)

    print(f"\nB1 local hop (pod runtime: {args.pod_runtime}) — {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {args.duration:.0f} s x {args.rounds} rounds each; "
          f"loadavg {loadavg()} at the end")
    print(f"{'pod':>12} {'conc':>4} {'direct req/s':>13} {'mesh req/s':>11} {'ratio':>6} {'direct p50':>11} "
          f"{'added p50':>10} {'direct p99':>11} {'added p99':>10} {'CPU ms/req direct':>18} {'mesh':>6}")
    summary = []
    for c in args.concurrency:
        for mesh, _ in targets[1:]:
            d = [r for r in results if r.concurrency == c and r.target == "direct"]
            h = [r for r in results if r.concurrency == c and r.target == mesh]
            dt, ht = statistics.mean(r.throughput for r in d), statistics.mean(r.throughput for r in h)
            d50, h50 = statistics.median(r.p50_ms for r in d), statistics.median(r.p50_ms for r in h)
            d99, h99 = statistics.median(r.p99_ms for r in d), statistics.median(r.p99_ms for r in h)
            dcpu = statistics.median(r.server_cpu_ms for r in d)
            hcpu = statistics.median(r.server_cpu_ms for r in h)
            row = {"pod": mesh, "concurrency": c, "direct_rps": dt, "mesh_rps": ht, "ratio": ht / dt,
                   "direct_p50_ms": d50, "added_p50_ms": h50 - d50, "direct_p99_ms": d99,
                   "added_p99_ms": h99 - d99, "direct_cpu_ms_per_req": dcpu, "mesh_cpu_ms_per_req": hcpu}
            summary.append(row)
            print(f"{mesh:>12} {c:>4} {dt:>13.0f} {ht:>11.0f} {ht / dt:>6.2f} {d50:>9.3f}ms {h50 - d50:>8.3f}ms "
                  f"{d99:>9.3f}ms {h99 - d99:>8.3f}ms {dcpu:>18.3f} {hcpu:>6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": [asdict(r) for r in results], "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
