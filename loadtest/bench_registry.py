"""B4, registry scale: registrations per second into etcd, a new pod's start with N records
present, and the pod's resident memory per registered model, in one run on one real etcd.

    python -m loadtest.bench_registry [--models 10000] [--concurrency 32 8 128] [--path stream unary]
                                      [--starts 3] [--etcd-dir DIR] [--tracemalloc] [--json out.json]

It starts one etcd (tests/etcd_server.py: free loopback ports, data on /dev/shm unless
``--etcd-dir``) and real pods (``modelmesh serve --etcd ... --grpc-port 0 --metrics-port 0``, run
through a thin wrapper that answers SIGUSR1 with ``gc.collect()`` and its VmRSS), then:

1. registration: for each ``--concurrency`` and ``--path`` (``stream``: the ModelMeshBulk stream,
   the CLI's default; ``unary``: ``--unary``, one registerModel call per model, the baseline),
   alternating, a pod under its own service name (so each run starts from an empty registry) and
   ``modelmesh models register-bulk models.jsonl --concurrency C [--unary]``,
   timed from the command's start to its exit (its own Python start-up included), with the CPU
   time per registration of the pod, etcd and the client: on a machine shared with other work
   the rate moves with the load, the CPU per registration much less (2 cores / total CPU ms is
   the rate the machine would reach with nothing else running);
2. start: ``--starts`` times each, alternating, a NEW pod on the registry of the first run
   (N records) and one on an empty registry: process start to the "serving" line, and to a
   RepositoryIndex answer listing all N;
3. memory: the same two kinds of pod, after start and a gc: (RSS with N - RSS with 0) / N; plus
   the size of one record's JSON, of its decoded objects (deep sys.getsizeof), and of the whole
   view built in this process (tracemalloc) with its build time.

Everything it starts is stopped in ``finally``; the etcd data dir is deleted. To compare code
versions side by side, point PYTHONPATH at another ``src`` tree: the pods and the client inherit it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SERVING = re.compile(r"serving on \S+:(\d+)")


# ---- the pod wrapper (runs in the pod's process) ------------------------------------------------


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pod_main(argv: list[str]) -> int:
    """``modelmesh serve ARGV`` as is, plus: on SIGUSR1, gc then print ``rss <kB>`` on stdout
    (and with BENCH_TRACEMALLOC=1 the top allocation sites on stderr)."""
    trace = os.environ.get("BENCH_TRACEMALLOC") == "1"
    if trace:
        import tracemalloc

        tracemalloc.start(1)

    def report(_sig: int, _frame: object) -> None:
        gc.collect()
        print(f"rss {_rss_kb()}", flush=True)
        if trace:
            snapshot = tracemalloc.take_snapshot()
            stats = snapshot.statistics("lineno")
            total = sum(s.size for s in stats)
            lines = [f"tracemalloc {total / 1e6:.1f} MB traced; top sites:"]
            lines += [f"  {s.size / 1e6:7.2f} MB {s.count:8d} blocks  {s.traceback}" for s in stats[:12]]
            print("\n".join(lines), file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, report)
    from modelmesh.cli import main

    return main(["serve", *argv])


# ---- the benchmark ---------------------------------------------------------------------------


@dataclass
class RegistrationRun:
    concurrency: int
    models: int
    registered: int
    seconds: float
    per_second: float
    # CPU time per registration (ms) of each process: the figure that does not depend on what
    # else the machine is doing
    pod_cpu_ms: float = 0.0
    etcd_cpu_ms: float = 0.0
    client_cpu_ms: float = 0.0
    load_average: float = 0.0  # 1-minute load average before the run
    pod_loop: str = "auto"
    path: str = "stream"  # register-bulk over the ModelMeshBulk stream, or "unary" (--unary)


@dataclass
class StartRun:
    records: int
    to_serving_s: float
    to_index_s: float  # 0 when the index was not asked for
    index_models: int


@dataclass
class MemoryRun:
    records: int
    rss_kb: int


@dataclass
class Results:
    machine: str
    models: int
    registration: list[RegistrationRun] = field(default_factory=list)
    starts: list[StartRun] = field(default_factory=list)
    memory: list[MemoryRun] = field(default_factory=list)
    record_json_bytes: int = 0
    record_objects_bytes: int = 0
    view_traced_bytes_per_model: float = 0.0
    view_build_s: float = 0.0
    view_list_s: float = 0.0


class Pod:
    """One pod process (the wrapper above around ``modelmesh serve``)."""

    def __init__(self, etcd: str, service: str, log_dir: Path, *, tracemalloc: bool = False,
                 loop: str = "auto") -> None:
        env = dict(os.environ, MM_SERVICE_NAME=service, MM_LOG_LEVEL="WARNING", MM_EVENT_LOOP=loop)
        self.loop = loop
        if tracemalloc:
            env["BENCH_TRACEMALLOC"] = "1"
        self.log_path = log_dir / f"pod-{service}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.bench_registry", "pod", "--etcd", etcd, "--host", "127.0.0.1",
             "--grpc-port", "0", "--metrics-port", "0"],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )
        assert self.proc.stdout is not None
        self.address = ""
        for line in self.proc.stdout:
            m = SERVING.search(line)
            if m:
                self.serving_s = time.perf_counter() - self.started
                self.address = f"127.0.0.1:{m.group(1)}"
                return
        code = self.proc.wait()
        raise RuntimeError(f"pod exited with {code}:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def rss_kb(self) -> int:
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        for line in self.proc.stdout:
            if line.startswith("rss "):
                return int(line.split()[1])
        raise RuntimeError("pod ended before reporting its RSS")

    def index(self) -> int:
        import grpc

        from modelmesh.proto import grpc_predict_v2_pb2 as pb
        from modelmesh.proto import grpc_predict_v2_pb2_grpc as pbg

        options = [("grpc.max_receive_message_length", 1 << 30)]
        with grpc.insecure_channel(self.address, options=options) as channel:
            reply = pbg.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=60)
        return len(reply.models)

    def stop(self) -> None:
        from tests.procs import stop_process

        stop_process(self.proc)
        self._log.close()


def write_source(path: Path, models: int) -> None:
    with open(path, "w") as out:
        for i in range(models):
            # Registration never reads the files; these paths look like a real deployment's.
            out.write(json.dumps({"id": f"model-{i:06d}", "path": f"/srv/models/model-{i:06d}/model.onnx"}) + "\n")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def register_bulk(pod: Pod, etcd_pid: int, source: Path, concurrency: int, models: int,
                  path: str = "stream") -> RegistrationRun:
    cmd = [sys.executable, "-m", "modelmesh.cli", "models", "register-bulk", str(source), "--endpoint", pod.address,
           "--concurrency", str(concurrency), "--no-progress", *(["--unary"] if path == "unary" else [])]
    load = os.getloadavg()[0]
    pod0, etcd0, client0 = cpu_s(pod.proc.pid), cpu_s(etcd_pid), children_cpu_s()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    pod1, etcd1, client1 = cpu_s(pod.proc.pid), cpu_s(etcd_pid), children_cpu_s()
    m = re.search(r"(\d+) registered", done.stdout)
    registered = int(m.group(1)) if m else 0
    if done.returncode != 0 or registered != models:
        print(f"  register-bulk exited {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}", flush=True)
    per = 1000 / max(registered, 1)
    return RegistrationRun(concurrency, models, registered, seconds, registered / seconds,
                           (pod1 - pod0) * per, (etcd1 - etcd0) * per, (client1 - client0) * per, load, pod.loop,
                           path)


def deep_size(obj: object, seen: set[int] | None = None) -> int:
    """sys.getsizeof of ``obj`` and everything it holds (slots, dicts, sequences), each object once;
    None, bools and small ints (shared singletons) count nothing."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, bool) or (isinstance(obj, int) and -5 <= obj <= 256) or id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(deep_size(v, seen) for v in obj)
    elif not isinstance(obj, (str, bytes, int, float)):
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(obj, name):
                    size += deep_size(getattr(obj, name), seen)
        if hasattr(obj, "__dict__"):
            size += deep_size(obj.__dict__, seen)
    return size


def measure_view(etcd: str, service: str, models: int, results: Results) -> None:
    """Build the registry view in this process, as a pod does at start: time and traced memory."""
    import asyncio
    import tracemalloc

    from modelmesh.kv.etcd import EtcdStore
    from modelmesh.registry import Registry

    async def build() -> None:
        store = EtcdStore(etcd)
        try:
            t0 = time.perf_counter()
            await store.list_prefix(f"mm/{service}/registry/")
            results.view_list_s = time.perf_counter() - t0
            registry = Registry(store, f"mm/{service}")
            t0 = time.perf_counter()
            await registry.start()
            results.view_build_s = time.perf_counter() - t0
            await registry.close()
            del registry
            registry = Registry(store, f"mm/{service}")
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            await registry.start()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            assert len(registry) == models, len(registry)
            results.view_traced_bytes_per_model = (after - before) / models
            model_id, record = next(iter(registry.items()))
            results.record_json_bytes = len(record.to_json())
            entry = registry.view.versioned(model_id)
            results.record_objects_bytes = deep_size(model_id) + deep_size(entry)
            await registry.close()
        finally:
            await store.close()

    asyncio.run(build())


def etcd_pid(etcd: object) -> int:
    proc = getattr(etcd, "_proc", None)
    assert proc is not None, "etcd is not running"
    return int(proc.pid)


def machine() -> str:
    import grpc

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"grpcio {grpc.__version__}, etcd {etcd_version()}")


def etcd_version() -> str:
    from tests.etcd_server import etcd_binary

    out = subprocess.run([etcd_binary(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"etcd Version: (\S+)", out)
    return m.group(1) if m else "?"


def run(args: argparse.Namespace) -> Results:
    from tests.etcd_server import EtcdServer

    results = Results(machine(), args.models)
    tmp = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    source = tmp / "models.jsonl"
    write_source(source, args.models)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-registry-etcd-", dir=args.etcd_dir)) if args.etcd_dir else None
    etcd = EtcdServer(data_dir)
    pods: list[Pod] = []

    def pod(service: str, **kw: Any) -> Pod:
        p = Pod(etcd.endpoint, service, tmp, **kw)
        pods.append(p)
        return p

    def stop(p: Pod) -> None:
        p.stop()
        pods.remove(p)

    try:
        etcd.start()
        print(f"etcd at {etcd.endpoint} (data in {etcd.data_dir})", flush=True)
        full = f"reg-c{args.concurrency[0]}-{args.pod_loop[0]}-{args.path[0]}-0"
        for i, c in enumerate(args.concurrency):
            # alternating, so drift on the machine hits each loop and path alike
            for loop in args.pod_loop:
                for path in args.path:
                    p = pod(f"reg-c{c}-{loop}-{path}-{i}", loop=loop)
                    r = register_bulk(p, etcd_pid(etcd), source, c, args.models, path)
                    results.registration.append(r)
                    print(f"  register-bulk {path:<6} c={c:<4} {r.registered} in {r.seconds:6.2f} s  "
                          f"{r.per_second:7.0f}/s  CPU ms per registration: pod {r.pod_cpu_ms:.2f}, etcd "
                          f"{r.etcd_cpu_ms:.2f}, client {r.client_cpu_ms:.2f} (load average before: "
                          f"{r.load_average:.1f}; pod loop {loop})", flush=True)
                    stop(p)
        for i in range(0 if args.registrations_only else args.starts):
            for service, records in ((full, args.models), ("empty", 0)):
                p = pod(service)
                n = p.index()
                to_index = time.perf_counter() - p.started
                started = StartRun(records, p.serving_s, to_index, n)
                results.starts.append(started)
                stop(p)
                p = pod(service, tracemalloc=args.tracemalloc and i == 0)
                rss = p.rss_kb()
                results.memory.append(MemoryRun(records, rss))
                stop(p)
                if args.tracemalloc and i == 0:
                    print(p.log_path.read_text(errors="replace"), flush=True)
                print(f"  start with {records:>6} records: serving {started.to_serving_s:5.2f} s, index ({n}) "
                      f"{to_index:5.2f} s, RSS {rss / 1024:6.1f} MiB", flush=True)
        if not args.registrations_only:
            measure_view(etcd.endpoint, full, args.models, results)
    finally:
        for p in list(pods):
            p.stop()
        etcd.close()
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
        if args.keep_logs:
            print(f"pod logs kept in {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def report(results: Results) -> dict[str, object]:
    n = results.models
    print(f"\nB4 registry scale — {results.machine}; {n} models, one etcd, pods and client on the same machine")
    print(f"{'register-bulk path':>19} {'conc':>6} {'pod loop':>8} {'seconds':>8} {'models/s':>9}   CPU ms/model: "
          f"{'pod':>5} {'etcd':>5} {'client':>6} {'total':>5}  load avg")
    for r in results.registration:
        total = r.pod_cpu_ms + r.etcd_cpu_ms + r.client_cpu_ms
        print(f"{r.path:>19} {r.concurrency:>6} {r.pod_loop:>8} {r.seconds:>8.2f} {r.per_second:>9.0f}   {'':13} "
              f"{r.pod_cpu_ms:>5.2f} {r.etcd_cpu_ms:>5.2f} {r.client_cpu_ms:>6.2f} {total:>5.2f}  "
              f"{r.load_average:>8.1f}")

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    full_start = [s for s in results.starts if s.records == n]
    empty_start = [s for s in results.starts if s.records == 0]
    rss_full = med([m.rss_kb for m in results.memory if m.records == n])
    rss_empty = med([m.rss_kb for m in results.memory if m.records == 0])
    per_model = (rss_full - rss_empty) * 1024 / n
    summary = {
        "registrations_per_s": {f"{r.path}/{r.concurrency}/{r.pod_loop}": r.per_second for r in results.registration},
        "start_to_serving_s": med([s.to_serving_s for s in full_start]),
        "start_to_index_s": med([s.to_index_s for s in full_start]),
        "empty_start_to_serving_s": med([s.to_serving_s for s in empty_start]),
        "empty_start_to_index_s": med([s.to_index_s for s in empty_start]),
        "rss_full_kib": rss_full,
        "rss_empty_kib": rss_empty,
        "rss_bytes_per_model": per_model,
        "record_json_bytes": results.record_json_bytes,
        "record_objects_bytes": results.record_objects_bytes,
        "view_traced_bytes_per_model": results.view_traced_bytes_per_model,
        "view_list_s": results.view_list_s,
        "view_build_s": results.view_build_s,
    }
    print(f"\n{'new pod (median of ' + str(len(full_start)) + ')':>26} {'to serving':>11} {'to index':>9} {'RSS':>10}")
    print(f"{f'{n} records':>26} {summary['start_to_serving_s']:>9.2f} s {summary['start_to_index_s']:>7.2f} s "
          f"{rss_full / 1024:>6.1f} MiB")
    print(f"{'0 records':>26} {summary['empty_start_to_serving_s']:>9.2f} s {summary['empty_start_to_index_s']:>7.2f} s "
          f"{rss_empty / 1024:>6.1f} MiB")
    print(f"\nmemory per model: RSS {per_model:.0f} B; one record: JSON {results.record_json_bytes} B, "
          f"objects in the view {results.record_objects_bytes} B (deep getsizeof, id included); "
          f"whole view {results.view_traced_bytes_per_model:.0f} B/model (tracemalloc)")
    print(f"view of {n} in-process: etcd range read + conversion {results.view_list_s * 1000:.0f} ms, "
          f"Registry.start() {results.view_build_s * 1000:.0f} ms")
    return summary


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "pod":
        return pod_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 8, 128],
                        help="register-bulk --concurrency values; the first one's registry is the one started on")
    parser.add_argument("--path", nargs="+", choices=("stream", "unary"), default=["stream", "unary"],
                        help="how register-bulk registers: over the ModelMeshBulk stream (its default) or "
                             "--unary (one registerModel call per model, the baseline); each concurrency "
                             "runs once per path, alternating")
    parser.add_argument("--pod-loop", nargs="+", choices=("auto", "asyncio", "uvloop"), default=["auto"],
                        help="event loop(s) of the registering pod; with several, each concurrency runs once "
                             "per loop, alternating (starts and memory use the first)")
    parser.add_argument("--registrations-only", action="store_true", help="skip the start and memory parts")
    parser.add_argument("--starts", type=int, default=3, help="new-pod starts of each kind (median reported)")
    parser.add_argument("--etcd-dir", help="parent dir of etcd's data (default /dev/shm, as the tests)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace the first memory pods' allocations (slower); top sites go to their logs")
    parser.add_argument("--keep-logs", action="store_true", help="keep the pods' logs (printed path)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args)
    summary = report(results)
    if args.json:
        args.json.write_text(json.dumps({"results": asdict(results), "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
