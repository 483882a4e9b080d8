"""B5, mixed load: many models with Zipf popularity on three pods and one etcd, memory for about
10% of the models. Reports hit ratio, throughput, p99 and loads per minute through loadtest.load.

    python -m loadtest.bench_mixed [--models 2000] [--zipf 1.1] [--share 0.10] [--duration 60]

The pods' capacity is sized from a measured demo-model size so that `share` of the models fit in
the cluster at once. Everything started here is stopped on exit. After the run it reads the
store's history of the run and reports its writes per second: the pods' instance records (each pod
republishes when its figures move, checked every 200 ms) and the model records (copies added and
removed, besides the registrations).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelmesh.kv.etcd import EtcdStore  # noqa: E402
from modelmesh.settings import MeshSettings  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402

SERVING = re.compile(r"serving on \S+:(\d+) \(metrics on :(\d+)\)")
# the built-in runtime's measured size of a 64-wide demo model (docs/runtime.md)
DEMO_MODEL_BYTES = 91_000


def start_pod(etcd: str, index: int, capacity: int, log: Path) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelmesh.cli", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
         "--metrics-port", "0", "--etcd", etcd, "--capacity", str(capacity), "--instance-id", f"pod-{index}"],
        stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = SERVING.search(line)
        if m:
            return proc, int(m.group(1)), int(m.group(2))
    raise RuntimeError(f"pod {index} exited: {log.read_text()[-2000:]}")


async def store_revision(endpoint: str) -> int:
    store = EtcdStore(endpoint, timeout_s=5)
    try:
        return (await store.list_prefix("bench-mixed-none/")).revision
    finally:
        await store.close()


async def writes_since(endpoint: str, prefix: str, start: int, end: int) -> Counter[str]:
    """Writes (puts and deletes) under ``prefix`` in revisions start+1..end, by the key's table
    (``instances``, ``registry``, ...), replayed from etcd's history; ``<table> revisions`` counts
    the distinct revisions among them: what a watcher of the table receives as messages."""
    counts: Counter[str] = Counter()
    seen: set[tuple[str, int]] = set()
    if end <= start:
        return counts
    store = EtcdStore(endpoint, timeout_s=5)
    try:
        async def follow() -> None:
            async for batch in store.watch_prefix(prefix, start + 1):
                for event in batch:
                    if event.mod_revision > end:
                        return
                    table = event.key[len(prefix):].split("/", 1)[0]
                    counts[table] += 1
                    if (table, event.mod_revision) not in seen:
                        seen.add((table, event.mod_revision))
                        counts[f"{table} revisions"] += 1
                if batch and batch[-1].mod_revision >= end:
                    return

        try:
            await asyncio.wait_for(follow(), timeout=60)
        except TimeoutError:
            pass  # the last revisions were outside the prefix: everything in it has been read
    finally:
        await store.close()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--share", type=float, default=0.10, help="share of the models that fit at once")
    parser.add_argument("--pods", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    capacity = int(args.models * args.share * DEMO_MODEL_BYTES / args.pods)
    pods: list[subprocess.Popen[str]] = []
    with EtcdServer() as etcd:
        try:
            addresses, metrics = [], []
            for i in range(args.pods):
                proc, port, mport = start_pod(etcd.endpoint, i, capacity, tmp / f"pod-{i}.log")
                pods.append(proc)
                addresses.append(f"127.0.0.1:{port}")
                metrics.append(f"127.0.0.1:{mport}")
            print(f"{args.pods} pods x {capacity} bytes (about {int(args.models * args.share)} of "
                  f"{args.models} models in the cluster)", flush=True)
            cmd = [sys.executable, "-m", "loadtest.load", "--register", str(tmp / "models"),
                   "--models", str(args.models), "--zipf", str(args.zipf),
                   "--concurrency", str(args.concurrency), "--duration", str(args.duration),
                   "--warmup", str(args.warmup), "--spread", "random"]
            for a in addresses:
                cmd += ["--target", a]
            for m in metrics:
                cmd += ["--metrics", m]
            if args.json:
                cmd += ["--json", str(args.json)]
            start = asyncio.run(store_revision(etcd.endpoint))
            began = time.monotonic()
            code = subprocess.run(cmd, cwd=ROOT).returncode
            elapsed = time.monotonic() - began
            end = asyncio.run(store_revision(etcd.endpoint))
            writes = asyncio.run(writes_since(etcd.endpoint, MeshSettings().key_root + "/", start, end))
            copies = writes["registry"] - args.models  # each registration is one write
            print(f"\nstore writes over the run ({elapsed:.0f} s, registration and warmup included): "
                  f"instance records {writes['instances'] / elapsed:.1f}/s "
                  f"({writes['instances'] / elapsed / args.pods:.1f}/s per pod), "
                  f"model records {copies / elapsed:.1f}/s besides {args.models} registrations, "
                  f"in {writes['registry revisions']} revisions (watch messages, registrations included)")
            return code
        finally:
            for proc in pods:
                proc.terminate()
            for proc in pods:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
