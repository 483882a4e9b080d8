"""B2, the remote hop: a request enters pod A while the model is loaded only on pod B.

    python -m loadtest.bench_remote [--duration 5] [--concurrency 1 16] [--rounds 2] [--no-b1] [--json out.json]
                                    [--pod-loop auto asyncio uvloop]

It starts one etcd (tests/etcd_server.py: free loopback ports, data dir on tmpfs), two pods in
cluster mode (`modelmesh serve --etcd ... --instance-id pod-a` / `pod-b`, default in-process
runtime) and, for B1's figure in the same run, a bare `modelmesh runtime`. One demo model is
registered and loaded on pod B only: the first request goes to pod B with header `mm-forwarded`
(a forwarded request is served where it lands, so it loads there), and getModelStatus must then
show exactly one copy, on pod-b. Rounds then alternate, per concurrency:

- `runtime`: the bare runtime process with the same model loaded (B1's baseline),
- `pod-b`:   pod B directly, a local hit (B1 = pod-b - runtime; B2's baseline),
- `pod-a`:   pod A, which forwards to pod B (B2 = pod-a - pod-b).

With several ``--pod-loop`` values there is a pair of pods per event loop (pod-a-uvloop, ...), each
pair its own cluster (service name) on the one etcd, all in the same alternating rounds.

The model is pinned to pod B (pod B carries label `holder`, the registration asks for it), so the
copy keeper cannot add a copy of the (hot) model on pod A, which would remove the hop being
measured: raising MM_SCALEUP_RPM_THRESHOLD is not enough, a copy also comes for regular use and to
relieve a pod busier than the mean (`--allow-copies` registers it unpinned and shows that happen).

The client sends one pre-serialized ModelInferRequest with raw gRPC aio (as bench_hop does), so
the figures show the servers. Afterwards the pods' metrics must show one load in all (on pod B)
and the status still one copy, else the run is reported as invalid. Every process started here is
stopped on exit, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from loadtest.bench_hop import infer_request, loadavg
from loadtest.workload import parse_metric_totals
from modelmesh.demo import demo_model_id, write_demo_models
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc
from modelmesh.proto import model_runtime_pb2 as rpb
from modelmesh.proto import model_runtime_pb2_grpc as rgrpc

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # tests/ holds the etcd and process helpers
    sys.path.insert(0, str(REPO_ROOT))
from tests.procs import stop_process  # noqa: E402
INFER = "/inference.GRPCInferenceService/ModelInfer"
LOADS = "modelmesh_loadmodel_milliseconds_count"
START_TIMEOUT_S = 60.0
# issue 4's B1 target for the added p50 at concurrency 1 (B2's target is twice B1's added latency)
B1_TARGET_P50_MS = 0.2
HOLDER_LABEL = "holder"


# ---------------------------------------------------------------------------------------------
# processes (shared with bench_cold)


class Processes:
    """Every process a benchmark starts, stopped in reverse order by ``close()`` (SIGTERM, then
    SIGKILL), and etcd last. Use as a context manager; SIGTERM to the benchmark becomes
    KeyboardInterrupt so the ``finally`` runs."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self._procs: list[tuple[str, subprocess.Popen[str]]] = []
        self.etcd: Any = None

    def __enter__(self) -> Processes:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_etcd(self) -> str:
        from tests.etcd_server import EtcdServer

        self.etcd = EtcdServer()
        self.etcd.start()
        return str(self.etcd.endpoint)

    def start(self, name: str, args: Sequence[str], pattern: str, env: dict[str, str] | None = None,
              python: Sequence[str] = ("-m", "modelmesh.cli")) -> re.Match[str]:
        """Start ``python -m modelmesh.cli ARGS``; return the match of ``pattern`` on its stdout.
        stderr (the logs) goes to ``<tmp>/<name>.log``."""
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, *python, *args], stdout=subprocess.PIPE, stderr=log,
                                text=True, env={**os.environ, **(env or {})})
        log.close()
        self._procs.append((name, proc))
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()

        def drain(stream: Any = proc.stdout) -> None:  # keeps the pipe from filling, too
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True, name=f"{name}-stdout").start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if m := re.search(pattern, line):
                return m
        raise RuntimeError(f"{name} did not start (exit {proc.poll()}); log:\n{self.log(name)[-3000:]}")

    def start_pod(self, name: str, *flags: str, env: dict[str, str] | None = None,
                  python: Sequence[str] = ("-m", "modelmesh.cli")) -> tuple[str, str]:
        """A mesh pod on free loopback ports: (grpc address, metrics address)."""
        m = self.start(name, ["serve", "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
                              *flags], r"serving on \S+:(\d+) \(metrics on :(\d+)\)", env, python)
        return f"127.0.0.1:{m.group(1)}", f"127.0.0.1:{m.group(2)}"

    def start_runtime(self, name: str, capacity: int) -> str:
        m = self.start(name, ["runtime", "--grpc-port", "0", "--capacity", str(capacity)], r"listening on (\S+)")
        return m.group(1)

    def pid(self, name: str) -> int:
        return next(proc.pid for n, proc in self._procs if n == name)

    def log(self, name: str) -> str:
        try:
            return (self.tmp / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, name: str) -> None:
        for entry in [e for e in self._procs if e[0] == name]:
            self._procs.remove(entry)
            stop_process(entry[1])

    def close(self) -> None:
        while self._procs:
            stop_process(self._procs.pop()[1])
        if self.etcd is not None:
            self.etcd.close()
            self.etcd = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def machine() -> str:
    import grpc as _grpc
    import onnxruntime

    return (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, grpcio {_grpc.__version__}, onnxruntime {onnxruntime.__version__}; "
            f"modelmesh at {revision()}")


def revision() -> str:
    """The commit the pods ran, and whether src/ had uncommitted changes (the venv imports src/)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO_ROOT), *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted src changes" if git("status", "--porcelain", "src") else "")


def scrape(metrics_addr: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as response:
        return parse_metric_totals(response.read().decode())


def copies(address: str, model_id: str) -> list[tuple[str, int]]:
    """(pod, copy status) of every copy getModelStatus reports through ``address``."""
    with grpc.insecure_channel(address) as ch:
        info = mgrpc.ModelMeshStub(ch).getModelStatus(mpb.GetStatusRequest(modelId=model_id), timeout=10)
    return [(c.location, c.copyStatus) for c in info.modelCopyInfos]


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of ``values`` (bench_cold's summaries)."""
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 \
        else values[0]


# ---------------------------------------------------------------------------------------------
# B2


# the same closed-loop round as B1, so the two benchmarks measure alike
from loadtest.bench_hop import POD_LOOPS, RoundResult, run_round  # noqa: E402


def pod_names(loop: str) -> tuple[str, str]:
    """Names of the (entering, holding) pods on ``loop``; the pod's default keeps the plain names."""
    suffix = "" if loop == "auto" else f"-{loop}"
    return f"pod-a{suffix}", f"pod-b{suffix}"


def setup(procs: Processes, args: argparse.Namespace) -> dict[str, str]:
    etcd = procs.start_etcd()
    cap = str(1 << 30)
    addrs = {}
    for loop in args.pod_loop:
        # one pair of pods per event loop, each pair its own cluster (service name) on the one etcd;
        # the holding pod carries the label the model is pinned to
        pod_a, pod_b = pod_names(loop)
        for name in (pod_a, pod_b):
            env = {"MM_SERVICE_NAME": f"bench-{loop}", **({"MM_LABELS": HOLDER_LABEL} if name == pod_b else {})}
            addrs[name], addrs[f"metrics-{name}"] = procs.start_pod(
                name, "--capacity", cap, "--etcd", etcd, "--instance-id", name, "--event-loop", loop, env=env)
    if args.b1:
        addrs["runtime"] = procs.start_runtime("runtime", 1 << 30)
    return addrs


def load_on_pod_b(addrs: dict[str, str], model_id: str, path: Path, body: bytes, loop: str = "auto",
                  pin: bool = True) -> None:
    pod_a, pod_b = pod_names(loop)
    # Under sustained load the copy keeper adds a copy of a hot model on the entering pod, which
    # removes the very hop measured here: the model is pinned to pod B unless --allow-copies.
    placement = mpb.PlacementPolicy(requiredLabels=[HOLDER_LABEL]) if pin else None
    with grpc.insecure_channel(addrs[pod_b]) as ch:
        mgrpc.ModelMeshStub(ch).registerModel(mpb.RegisterModelRequest(
            modelId=model_id, loadNow=False, modelInfo=mpb.ModelInfo(type="onnx", path=str(path)),
            placement=placement), timeout=30)
        ch.unary_unary(INFER)(body, metadata=[("mm-forwarded", "bench")], timeout=60)
    # pod A's view must know the copy (status reads the store; the routing view follows by watch)
    deadline = time.monotonic() + 10
    while True:
        seen = {pod: copies(addrs[pod], model_id) for pod in (pod_a, pod_b)}
        if all([loc for loc, _ in c] == [pod_b] for c in seen.values()):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"model copies are not [{pod_b}] only: {seen}")
        time.sleep(0.1)
    time.sleep(0.5)  # and let pod A's watch deliver the record the status just read from etcd
    if "runtime" in addrs and loop == "auto":
        with grpc.insecure_channel(addrs["runtime"]) as ch:
            rgrpc.ModelRuntimeStub(ch).loadModel(rpb.LoadModelRequest(
                modelId=model_id, modelType="onnx", modelPath=str(path)), timeout=60)


def summarize(results: list[RoundResult], base: str, other: str, c: int) -> dict[str, float]:
    d = [r for r in results if r.concurrency == c and r.target == base]
    h = [r for r in results if r.concurrency == c and r.target == other]
    dt, ht = statistics.mean(r.throughput for r in d), statistics.mean(r.throughput for r in h)
    d50, h50 = statistics.median(r.p50_ms for r in d), statistics.median(r.p50_ms for r in h)
    d99, h99 = statistics.median(r.p99_ms for r in d), statistics.median(r.p99_ms for r in h)
    return {"concurrency": c, "base": base, "other": other, "base_rps": dt, "other_rps": ht, "ratio": ht / dt,
            "base_p50_ms": d50, "added_p50_ms": h50 - d50, "base_p99_ms": d99, "added_p99_ms": h99 - d99,
            "rounds": len(d)}


def print_table(title: str, rows: list[dict[str, float]], base: str, other: str) -> None:
    print(f"\n{title}")
    print(f"{'conc':>4} {base + ' req/s':>15} {other + ' req/s':>15} {'ratio':>6} {base + ' p50':>13} "
          f"{'added p50':>10} {base + ' p99':>13} {'added p99':>10}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['base_rps']:>15.0f} {r['other_rps']:>15.0f} {r['ratio']:>6.2f} "
              f"{r['base_p50_ms']:>11.3f}ms {r['added_p50_ms']:>8.3f}ms {r['base_p99_ms']:>11.3f}ms "
              f"{r['added_p99_ms']:>8.3f}ms")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round and target")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per concurrency")
    parser.add_argument("--features", type=int, default=64, help="demo model width (x: FP32 [1, F])")
    parser.add_argument("--no-b1", dest="b1", action="store_false",
                        help="skip the bare-runtime rounds (B1's figure for context)")
    parser.add_argument("--allow-copies", action="store_true",
                        help="register the model unpinned: the pods may then add a copy on pod A under "
                             "load, and the run is reported invalid")
    parser.add_argument("--pod-loop", nargs="+", choices=POD_LOOPS, default=["auto"],
                        help="event loop(s) of the pods; with several, one pair of pods per loop (each its "
                             "own service name), all measured in the same alternating rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    load_before = loadavg()
    model_id = demo_model_id(0)
    results: list[RoundResult] = []
    with Processes("bench-remote-") as procs:
        path = write_demo_models(procs.tmp / "models", 1, args.features)[0]
        addrs = setup(procs, args)
        body = infer_request(model_id, args.features)
        loops = list(dict.fromkeys(args.pod_loop))
        if "runtime" in addrs and "auto" not in loops:
            with grpc.insecure_channel(addrs["runtime"]) as ch:
                rgrpc.ModelRuntimeStub(ch).loadModel(rpb.LoadModelRequest(
                    modelId=model_id, modelType="onnx", modelPath=str(path)), timeout=60)
        for loop in loops:
            load_on_pod_b(addrs, model_id, path, body, loop, pin=not args.allow_copies)
        pods = [name for loop in loops for name in pod_names(loop)]
        before = {p: scrape(addrs[f"metrics-{p}"]).get(LOADS, 0.0) for p in pods}
        targets = (["runtime"] if args.b1 else []) + [name for loop in loops for name in reversed(pod_names(loop))]
        print(f"loadavg {loadavg()} before the rounds", flush=True)
        for c in args.concurrency:
            for _ in range(args.rounds):
                for target in targets:
                    r = asyncio.run(run_round(target, addrs[target], body, c, args.duration))
                    results.append(r)
                    print(f"  {target:13} c={c:<3} {r.throughput:7.0f} req/s  p50 {r.p50_ms:7.3f} ms  "
                          f"p99 {r.p99_ms:7.3f} ms  errors {r.errors}  (loadavg {loadavg()})", flush=True)
        after = {p: scrape(addrs[f"metrics-{p}"]).get(LOADS, 0.0) for p in pods}
        final_copies = {loop: copies(addrs[pod_names(loop)[0]], model_id) for loop in loops}
    load_after = loadavg()

    valid = all([loc for loc, _ in final_copies[loop]] == [pod_names(loop)[1]] for loop in loops) \
        and all(after[pod_names(loop)[0]] == 0 and after[pod_names(loop)[1]] == 1 for loop in loops) \
        and after == before and not any(r.errors for r in results)
    b2 = {loop: [summarize(results, pod_names(loop)[1], pod_names(loop)[0], c) for c in args.concurrency]
          for loop in loops}
    b1 = {loop: [summarize(results, "runtime", pod_names(loop)[1], c) for c in args.concurrency]
          for loop in loops} if args.b1 else {}
    print(f"\n{machine()}; {args.duration:.0f} s x {args.rounds} rounds per target; "
          f"{'' if args.allow_copies else f'model pinned to label {HOLDER_LABEL!r} on pod B (no copies); '}"
          f"loadavg {load_before} before, {load_after} after")
    during = {p: after[p] - before[p] for p in pods}
    print(f"check: loads {after} (during rounds: {during}); copies {final_copies}; "
          f"{'VALID' if valid else 'INVALID'}")
    for loop in loops:
        pod_a, pod_b = pod_names(loop)
        print_table(f"B2 remote hop ({loop}): {pod_b} = direct to the pod holding the model, {pod_a} = entering "
                    "at the other pod", b2[loop], pod_b, pod_a)
        if b1:
            print_table(f"B1 local hop (context, {loop}): runtime = bare `modelmesh runtime`, {pod_b} = in-process "
                        "pod, local hit", b1[loop], "runtime", pod_b)
            print(f"\nB2 vs B1 ({loop}; target: B2 added <= 2 x B1 added; B1's own target is "
                  f"+{B1_TARGET_P50_MS} ms p50, so B2's is +{2 * B1_TARGET_P50_MS} ms)")
            for r2, r1 in zip(b2[loop], b1[loop], strict=True):
                print(f"  c={r2['concurrency']:<3} p50: B2 +{r2['added_p50_ms']:.3f} ms vs 2 x B1 = "
                      f"{2 * r1['added_p50_ms']:+.3f} ms;  p99: B2 +{r2['added_p99_ms']:.3f} ms vs 2 x B1 = "
                      f"{2 * r1['added_p99_ms']:+.3f} ms")
    if args.json:
        args.json.write_text(json.dumps({
            "benchmark": "B2", "machine": machine(), "loadavg_before": load_before, "loadavg_after": load_after,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "valid": valid, "final_copies": final_copies, "loads": after,
            "rounds": [asdict(r) for r in results], "b2": b2, "b1": b1}, indent=2))
    return 0 if valid else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
