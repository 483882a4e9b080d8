"""Several worker processes sharing one port (SO_REUSEPORT) against one pod process, in one run.

    python -m loadtest.bench_workers [--workers 1 2] [--duration 5] [--rounds 2] [--concurrency 16 32]
                                     [--channels 8] [--pod-loop auto] [--json out.json]

A "worker" here is a whole pod: its own process, memory store, cache and in-process runtime, all
bound to one gRPC port with ``grpc.so_reuseport`` on, so the kernel spreads incoming connections
over them. This is the best case of that design: every worker has the model loaded (each
registers the demo models at start, `--demo-models`, and loads on its first request), so no
request crosses between workers. In a real cluster each worker would be its own instance in the
store and a request arriving at a worker without the model would be forwarded (B2's cost), and a
peer could not pick a worker through the shared port.

For each entry of ``--workers`` a set of N such pods is started on a port of its own; rounds then
alternate between the sets (and a bare ``modelmesh runtime``, the B1 baseline). The client opens
``--channels`` channels, each its own TCP connection (``grpc.use_local_subchannel_pool``), and
spreads its concurrent callers over them, the same for every target, so the kernel has
connections to spread. The pods run ``modelmesh serve`` with ``grpc.so_reuseport`` forced to 1
(the pod sets it to 0 so a second pod on a taken port fails): a benchmark-only patch, see
``WORKER_MAIN``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import grpc

from loadtest.bench_hop import POD_LOOPS, WARMUP_CALLS, RoundResult, cpu_s, infer_request, loadavg, run_round
from loadtest.bench_remote import Processes, machine
from modelmesh.demo import demo_model_id

# `modelmesh serve` with the pod's server options patched to share its port
WORKER_MAIN = """
import sys, grpc, grpc.aio
_server = grpc.aio.server
def server(*args, options=(), **kwargs):
    options = [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in options]
    return _server(*args, options=options, **kwargs)
grpc.aio.server = server
from modelmesh.cli import main
sys.exit(main())
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pods sharing one port, per set")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per concurrency")
    parser.add_argument("--channels", type=int, default=8, help="client connections per target")
    parser.add_argument("--pod-loop", choices=POD_LOOPS, default="auto")
    parser.add_argument("--no-direct", dest="direct", action="store_false", help="skip the bare runtime rounds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    model_id = demo_model_id(0)
    body = infer_request(model_id, 64)
    results: list[RoundResult] = []
    client_cpu: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    load_before = loadavg()
    with Processes("bench-workers-") as procs:
        targets: list[tuple[str, str]] = []
        pids: dict[str, list[int]] = {}
        if args.direct:
            from modelmesh.demo import write_demo_models
            from modelmesh.proto import model_runtime_pb2 as rpb
            from modelmesh.proto import model_runtime_pb2_grpc as rgrpc

            path = write_demo_models(procs.tmp / "direct", 1)[0]
            address = procs.start_runtime("runtime", 1 << 30)
            with grpc.insecure_channel(address) as ch:
                rgrpc.ModelRuntimeStub(ch).loadModel(rpb.LoadModelRequest(
                    modelId=model_id, modelType="onnx", modelPath=str(path)), timeout=60)
            targets.append(("direct", address))
            pids["direct"] = [procs.pid("runtime")]
        python = ("-c", WORKER_MAIN)
        for n in args.workers:
            port = "0"
            for i in range(n):
                flags = ["--capacity", str(1 << 30), "--event-loop", args.pod_loop, "--demo-models", "1",
                         "--demo-dir", str(procs.tmp / f"w{n}-{i}"), "--instance-id", f"w{n}-{i}"]
                m = procs.start(f"w{n}-{i}", ["serve", "--host", "127.0.0.1", "--grpc-port", port,
                                              "--metrics-port", "0", *flags],
                                r"serving on \S+:(\d+) \(metrics", python=python)
                port = m.group(1)  # the next workers bind the same port
            targets.append((f"workers-{n}", f"127.0.0.1:{port}"))
            pids[f"workers-{n}"] = [procs.pid(f"w{n}-{i}") for i in range(n)]
        print(f"loadavg {loadavg()} before the rounds; targets {targets}", flush=True)
        for c in args.concurrency:
            for _ in range(args.rounds):
                for target, address in targets:
                    before = [cpu_s(pid) for pid in pids[target]]
                    client0 = time.process_time()
                    r = asyncio.run(run_round(target, address, body, c, args.duration, args.channels))
                    calls = r.requests + r.errors + WARMUP_CALLS * args.channels
                    client_ms = (time.process_time() - client0) * 1000 / calls
                    used = [cpu_s(pid) - b for pid, b in zip(pids[target], before, strict=True)]
                    r.server_cpu_ms = sum(used) * 1000 / calls
                    results.append(r)
                    client_cpu[(target, c)].append(client_ms)
                    shares = "/".join(f"{u / max(sum(used), 1e-9):.2f}" for u in used)
                    print(f"  {target:10} c={c:<3} {r.throughput:7.0f} req/s  p50 {r.p50_ms:7.3f} ms  "
                          f"p99 {r.p99_ms:7.3f} ms  CPU ms/req: servers {r.server_cpu_ms:.3f} (shares {shares}), "
                          f"client {client_ms:.3f}  errors {r.errors}  (loadavg {loadavg()})", flush=True)
    load_after = loadavg()

    base = f"workers-{args.workers[0]}"
    print(f"\n{machine()}; pod loop {args.pod_loop}; {args.channels} client connections; "
          f"{args.duration:.0f} s x {args.rounds} rounds; loadavg {load_before} before, {load_after} after")
    print(f"{'target':>12} {'conc':>4} {'req/s':>7} {'vs ' + base:>14} {'p50':>9} {'p99':>9} "
          f"{'server CPU ms/req':>18} {'client':>7}")
    summary = []
    for c in args.concurrency:
        rows = {t: [r for r in results if r.concurrency == c and r.target == t] for t, _ in targets}
        base_rps = statistics.mean(r.throughput for r in rows[base])
        for t, rs in rows.items():
            rps = statistics.mean(r.throughput for r in rs)
            p50 = statistics.median(r.p50_ms for r in rs)
            p99 = statistics.median(r.p99_ms for r in rs)
            cpu = statistics.median(r.server_cpu_ms for r in rs)
            client = statistics.median(client_cpu[(t, c)])
            summary.append({"target": t, "concurrency": c, "rps": rps, "vs_base": rps / base_rps,
                            "p50_ms": p50, "p99_ms": p99, "server_cpu_ms_per_req": cpu,
                            "client_cpu_ms_per_req": client})
            print(f"{t:>12} {c:>4} {rps:>7.0f} {rps / base_rps:>14.2f} {p50:>7.2f}ms {p99:>7.2f}ms "
                  f"{cpu:>18.3f} {client:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "loadavg_before": load_before,
                                         "loadavg_after": load_after, "rounds": [asdict(r) for r in results],
                                         "summary": summary}, indent=2))
    return 0 if not any(r.errors for r in results) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
