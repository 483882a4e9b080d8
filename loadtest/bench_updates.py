"""What a model-record update costs: ``Registry.update`` (compare-and-set from the pod's view,
reading the store only when the view is behind) against reading the record first and then
compare-and-setting it (how ``update`` worked before), in the same run on one etcd.

    python -m loadtest.bench_updates [--models 200] [--rounds 10]

Each round toggles one copy in every model's record, as a load or an eviction does: once one
update at a time, once all models' updates at once (group commit batches them). Each variant runs
twice, in the order A B B A. Reported per variant: updates per second, and the store calls
counted (reads, compare-and-set writes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelmesh.kv.base import CasFailed  # noqa: E402
from modelmesh.kv.etcd import EtcdStore  # noqa: E402
from modelmesh.registry import Registry  # noqa: E402
from modelmesh.types import ModelInfo, ModelRecord  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402

Change = Callable[[ModelRecord], "ModelRecord | None"]


def toggle(pod: str, add: bool) -> Change:
    def change(record: ModelRecord) -> ModelRecord | None:
        if (pod in record.copies) == add:
            return None
        if add:
            record.copies[pod] = 1
        else:
            del record.copies[pod]
        return record
    return change


async def read_first(registry: Registry, store: EtcdStore, model_id: str, change: Change) -> None:
    """The baseline: a store read, then a compare-and-set on its revision, retried on conflicts."""
    while True:
        current = await registry.get(model_id)
        assert current is not None
        updated = change(ModelRecord.from_json(current.record.to_json()))
        if updated is None:
            return
        try:
            revision = await store.put(registry._key(model_id), updated.to_json(), expected_revision=current.revision)
        except CasFailed:
            continue
        registry.view.remember(model_id, updated, revision)
        return


async def run(endpoint: str, models: int, rounds: int) -> dict[str, dict[str, float]]:
    store = EtcdStore(endpoint, timeout_s=30)
    calls = {"get": 0, "put": 0}
    for name in ("get", "put"):
        original = getattr(store, name)

        async def counted(*args: object, _original: Callable[..., Awaitable[object]] = original, _name: str = name,
                          **kwargs: object) -> object:
            calls[_name] += 1
            return await _original(*args, **kwargs)

        setattr(store, name, counted)
    registry = Registry(store, "mm/bench")
    await registry.start()
    ids = [f"m{i:05d}" for i in range(models)]
    for model_id in ids:
        await registry.create(model_id, ModelRecord(info=ModelInfo("onnx", f"/m/{model_id}"), registered_ms=1))

    async def view_first(model_id: str, change: Change) -> None:
        await registry.update(model_id, change)

    async def baseline(model_id: str, change: Change) -> None:
        await read_first(registry, store, model_id, change)

    results: dict[str, dict[str, float]] = {}
    variants = [("read-then-CAS (before)", baseline), ("view-first (now)", view_first)]
    # each variant twice, in both orders (A B B A), so neither gains from running second
    for pod_index, (name, update) in enumerate(variants + variants[::-1]):
        pod = f"pod-{pod_index}"
        for mode in ("one at a time", "all at once"):
            calls.update(get=0, put=0)
            started = time.perf_counter()
            for r in range(rounds):
                change = toggle(pod, add=r % 2 == 0)
                if mode == "one at a time":
                    for model_id in ids:
                        await update(model_id, change)
                else:
                    await asyncio.gather(*(update(model_id, change) for model_id in ids))
            seconds = time.perf_counter() - started
            n = models * rounds
            row = results.setdefault(f"{name}, {mode}", {"updates": 0, "seconds": 0.0, "reads": 0, "writes": 0})
            row["updates"] += n
            row["seconds"] += seconds
            row["reads"] += calls["get"]
            row["writes"] += calls["put"]
            row["per_s"] = row["updates"] / row["seconds"]
    await registry.close()
    await store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    with EtcdServer() as etcd:
        results = asyncio.run(run(etcd.endpoint, args.models, args.rounds))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'variant':<40} {'updates':>8} {'updates/s':>10} {'reads':>7} {'writes':>7}")
    for name, row in results.items():
        print(f"{name:<40} {row['updates']:>8} {row['per_s']:>10.0f} {row['reads']:>7} {row['writes']:>7}")
    for mode in ("one at a time", "all at once"):
        ratio = results[f"view-first (now), {mode}"]["per_s"] / results[f"read-then-CAS (before), {mode}"]["per_s"]
        print(f"{mode}: view-first / read-then-CAS = {ratio:.2f}x")


if __name__ == "__main__":
    main()
