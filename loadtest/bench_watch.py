"""The cost of watching the registry: the CPU a pod spends applying model-record writes made by
other pods (each load and each eviction anywhere writes its model's record once), against decoding
the same records alone, measured in the same run.

    python -m loadtest.bench_watch [--models 2000] [--writes 20000]

One etcd; this process runs a pod's ``Registry`` (the watched view of ``<root>/registry/``) and
measures its own CPU time while a separate writer process rewrites records as fast as it can
(toggling a copy, as loads and evictions do). Reported: events applied per second of wall time,
CPU per event for the whole watch path (gRPC stream, decode, apply), CPU per event to decode
alone, and what a given cluster-wide write rate would cost every pod.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelmesh.kv.etcd import EtcdStore  # noqa: E402
from modelmesh.registry import Registry  # noqa: E402
from modelmesh.types import ModelInfo, ModelRecord  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402

KEY_ROOT = "mm/modelmesh"

WRITER = textwrap.dedent('''
    import asyncio, random, sys
    from modelmesh.kv.etcd import EtcdStore
    from modelmesh.types import ModelInfo, ModelRecord

    async def main(endpoint, prefix, models, writes, in_flight):
        store = EtcdStore(endpoint, timeout_s=30)
        revisions = {kv.key: kv.mod_revision for kv in (await store.list_prefix(prefix)).items}
        rng = random.Random(1)
        async def one(k, m):
            key = f"{prefix}demo-{m:05d}"
            copies = {"pod-1": 1_700_000_000_000} if k % 2 else {"pod-1": 1_700_000_000_000, "pod-2": 1_700_000_000_000 + k}
            record = ModelRecord(ModelInfo("onnx", f"/models/demo-{m:05d}.onnx"), registered_ms=1_700_000_000_000,
                                 last_used_ms=1_700_000_000_000 + k, copies=copies, use_count=3.0,
                                 use_count_ms=1_700_000_000_000 + k, long_use=12.5, long_use_ms=1_700_000_000_000 + k)
            # compare-and-set, as the pods update records (concurrent ones leave as one transaction)
            revisions[key] = await store.put(key, record.to_json(), expected_revision=revisions[key])
            return revisions[key]
        last = 0
        for start in range(0, writes, in_flight):
            keys = rng.sample(range(models), min(in_flight, writes - start))
            revs = await asyncio.gather(*(one(start + n, m) for n, m in enumerate(keys)))
            last = max(last, *revs)
        await store.close()
        print(last, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
''')


def sample_record(k: int) -> bytes:
    return ModelRecord(
        ModelInfo("onnx", f"/models/demo-{k:05d}.onnx"), registered_ms=1_700_000_000_000,
        last_used_ms=1_700_000_000_000 + k, copies={"pod-1": 1_700_000_000_000, "pod-2": 1_700_000_000_000 + k},
        use_count=3.0, use_count_ms=1_700_000_000_000 + k, long_use=12.5, long_use_ms=1_700_000_000_000 + k,
    ).to_json()


def decode_alone(writes: int) -> float:
    """CPU seconds to decode ``writes`` records like the writer's, nothing else."""
    bodies = [sample_record(k) for k in range(1000)]
    started = time.process_time()
    for k in range(writes):
        ModelRecord.from_json(bodies[k % 1000])
    return time.process_time() - started


async def measure(endpoint: str, models: int, writes: int, in_flight: int) -> tuple[float, float, int, int]:
    """(CPU seconds of this process while the view applied the writes, less what it burns when idle;
    wall seconds; events seen; watch batches seen: one per etcd revision that touched the registry)."""
    prefix = f"{KEY_ROOT}/registry/"
    seed = EtcdStore(endpoint, timeout_s=30)
    for start in range(0, models, 256):
        await asyncio.gather(*(seed.put(f"{prefix}demo-{m:05d}", sample_record(m))
                               for m in range(start, min(models, start + 256))))
    await seed.close()
    registry = Registry(EtcdStore(endpoint, timeout_s=30), KEY_ROOT)
    await registry.start()
    assert len(registry) == models, len(registry)
    seen = newest = 0
    revisions: set[int] = set()

    def count(key: str, _value: object) -> None:
        nonlocal seen, newest
        seen += 1
        current = registry.view.versioned(key)
        if current is not None:
            revisions.add(current.revision)
            newest = max(newest, current.revision)

    registry.view.on_changed.append(count)
    # what the process burns doing nothing (gRPC's poller, the event loop), to take out below
    idle0, idle_wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(2.0)
    idle_rate = (time.process_time() - idle0) / (time.monotonic() - idle_wall0)
    cpu0, wall0 = time.process_time(), time.monotonic()
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, endpoint, prefix, str(models), str(writes), str(in_flight),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    out, _ = await writer.communicate()
    last = int(out.decode().strip())

    while newest < last:
        await asyncio.sleep(0.05)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    await registry.close()
    return cpu - idle_rate * wall, wall, seen, len(revisions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--writes", type=int, default=20000)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 64],
                        help="the writer's compare-and-set updates in flight (one run each)")
    parser.add_argument("--cluster-rate", type=float, default=8000,
                        help="cluster-wide model-record writes per second to project the cost for")
    args = parser.parse_args()
    decode = decode_alone(args.writes) / args.writes
    print(f"decoding a record alone: {decode * 1e6:.1f} us of CPU")
    print("writes in flight | events applied/s | revisions (watch messages) | CPU per event | x decoding "
          f"| a pod's CPU at {args.cluster_rate:,.0f} writes/s")
    for in_flight in args.in_flight:
        with EtcdServer() as etcd:
            cpu, wall, seen, batches = asyncio.run(measure(etcd.endpoint, args.models, args.writes, in_flight))
        per_event = cpu / max(seen, 1)
        print(f"{in_flight:>16} | {seen / wall:>16,.0f} | {batches:>26,} | {per_event * 1e6:>10.1f} us "
              f"| {per_event / decode:>10.1f} | {args.cluster_rate * per_event:.2f} of a core", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
