"""Load a mesh (or a runtime) with KServe v2 ModelInfer over gRPC, as users will.

    python -m loadtest.load --target 127.0.0.1:8033 --metrics 127.0.0.1:2112 \\
        --models 200 --register /tmp/models --zipf 1.1 --concurrency 8 --duration 30

Models are demo models (``modelmesh.demo``: input ``x`` FP32 [1, F]). Either ``--register DIR``
writes N of them into DIR (only the missing files) and registers them through the first target,
or ``--model-ids FILE`` / ``--use-registered`` names models that exist already. Each request asks
for one model drawn with Zipf popularity (``--zipf S``; 0 is uniform) from a seeded permutation,
so the hot set is not simply the first ids.

Load is closed loop (``--concurrency C`` workers, each sending its next request when the last one
answers) or open loop (``--rate R``: Poisson arrivals at R req/s whatever the answers, at most
``--max-outstanding`` in flight; an arrival over the cap is dropped and counted, and open-loop
latency counts from the scheduled send time, so a client that falls behind shows it rather than
hiding it). Requests are serialized once per model before the run and sent as bytes on reused
channels, so the client spends its time on gRPC, not on protobuf.

The report (stdout, and everything with ``--json FILE``): throughput; latency p50/p95/p99/max of
the successful requests sent after ``--warmup``; errors by gRPC status; the latency of the first
request each model got (its cold start, if it was not loaded before the run); and, from each
``--metrics`` endpoint scraped when the warmup ends and after the run, model loads, evictions and
cache misses with the hit ratio 1 - cache misses / requests.

One Python client process tops out at a few thousand requests per second. The report gives each
client process's CPU use over the window; near one core, the client is the limit, so add
``--processes P`` (results are merged) and check the client's ceiling by pointing it at a trivial
target, such as a bare runtime with one loaded model (see loadtest/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np

from loadtest.workload import (
    FirstRequest,
    MeshCounters,
    WorkerResult,
    ZipfPopularity,
    format_report,
    merge_results,
    parse_metric_totals,
    poisson_arrivals,
    split_evenly,
    summarize,
)
from modelmesh.admin import ModelEntry, format_bulk_summary, register_many
from modelmesh.demo import DEFAULT_FEATURES, demo_model_bytes, demo_model_id
from modelmesh.proto import grpc_predict_v2_pb2 as v2
from modelmesh.proto import grpc_predict_v2_pb2_grpc as v2_grpc
from modelmesh.proto import model_runtime_pb2 as rpb
from modelmesh.proto import model_runtime_pb2_grpc as rgrpc

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODEL_ID_HEADER = "mm-model-id"
# An open-loop arrival sent later than this behind its schedule counts as late: above the
# event loop's usual timer slack, well below any latency worth measuring.
LATE_AFTER_S = 0.002
CONNECT_TIMEOUT_S = 10.0
# Spawned client processes import grpc, numpy and the protos before they are ready.
START_TIMEOUT_S = 120.0
SCRAPE_TIMEOUT_S = 5.0
REGISTER_CONCURRENCY = 32
RUNTIME_LOAD_TIMEOUT_S = 120.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class StartBarrier(Protocol):
    """``threading.Barrier`` or ``multiprocessing.Barrier``: the client processes and the
    coordinator start the clock together."""

    def wait(self, timeout: float | None = None) -> int: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class LoadPlan:
    """What one client process sends; picklable, so it can travel to a spawned process."""

    targets: tuple[str, ...]
    model_ids: tuple[str, ...]
    features: int
    zipf_s: float
    seed: int
    process_index: int
    concurrency: int  # closed loop workers; 0 in open loop
    rate: float  # open loop arrivals per second for this process; 0 in closed loop
    max_outstanding: int
    warmup_s: float
    duration_s: float
    timeout_s: float
    header_routing: bool
    spread: str  # "round-robin" or "random" over targets


def infer_request_bytes(model_id: str, features: int) -> bytes:
    """A serialized ModelInferRequest for a demo model: x FP32 [1, features], raw contents."""
    x = np.random.default_rng(0).standard_normal((1, features)).astype(np.float32)
    request = v2.ModelInferRequest(model_name=model_id)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    body: bytes = request.SerializeToString()
    return body


# ---------------------------------------------------------------------------------------------
# One client process


async def drive(plan: LoadPlan, barrier: StartBarrier) -> WorkerResult:
    """Connect, wait at ``barrier`` for the other client processes, send the plan's load.

    If connecting fails the barrier is aborted, so the coordinator and the other processes stop
    waiting and the error surfaces at once.
    """
    popularity = ZipfPopularity(len(plan.model_ids), plan.zipf_s, plan.seed)
    # random.Random hashes a str seed deterministically; each process gets its own stream.
    rng = random.Random(f"{plan.seed}/{plan.process_index}")
    bodies = [infer_request_bytes(model_id, plan.features) for model_id in plan.model_ids]
    metadata = [((MODEL_ID_HEADER, m),) if plan.header_routing else None for m in plan.model_ids]
    channels = [grpc.aio.insecure_channel(target) for target in plan.targets]
    try:
        try:
            for target, channel in zip(plan.targets, channels, strict=True):
                try:
                    await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
                except TimeoutError:
                    raise ConnectionError(f"could not connect to {target} in {CONNECT_TIMEOUT_S:g} s") from None
        except BaseException:
            barrier.abort()
            raise
        # No serializers: the request is bytes already, and the response is not looked at.
        calls = [channel.unary_unary(INFER_METHOD) for channel in channels]
        await asyncio.to_thread(barrier.wait, START_TIMEOUT_S)
        return await _send_load(plan, popularity, rng, bodies, metadata, calls)
    finally:
        for channel in channels:
            await channel.close()


async def _send_load(
    plan: LoadPlan,
    popularity: ZipfPopularity,
    rng: random.Random,
    bodies: Sequence[bytes],
    metadata: Sequence[tuple[tuple[str, str], ...] | None],
    calls: Sequence[grpc.aio.UnaryUnaryMultiCallable],
) -> WorkerResult:
    result = WorkerResult()
    wall_start, start = time.time(), time.perf_counter()
    window_start = start + plan.warmup_s
    end = window_start + plan.duration_s
    sent_models: set[int] = set()
    targets = itertools.cycle(range(len(calls)))

    def choose_target() -> int:
        return next(targets) if plan.spread == "round-robin" else rng.randrange(len(calls))

    async def send(index: int, counted_from: float) -> None:
        # counted_from: the send time in closed loop, the scheduled time in open loop
        first = index not in sent_models
        sent_models.add(index)
        try:
            await calls[choose_target()](bodies[index], timeout=plan.timeout_s, metadata=metadata[index])
            code = "OK"
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        latency = time.perf_counter() - counted_from
        if first:
            model_id = plan.model_ids[index]
            sent_at = wall_start + (counted_from - start)
            result.first_requests[model_id] = FirstRequest(model_id, sent_at, latency, code)
        if counted_from >= window_start:
            if code == "OK":
                result.latencies.append(latency)
            else:
                result.errors[code] += 1

    async def closed_loop_worker() -> None:
        while (now := time.perf_counter()) < end:
            await send(popularity.draw(rng), now)

    async def open_loop() -> None:
        in_flight: set[asyncio.Task[None]] = set()
        for offset in poisson_arrivals(plan.rate, plan.warmup_s + plan.duration_s, rng):
            scheduled = start + offset
            # Sleep even when behind schedule (sleep(0)): the answers must get a turn, or a client
            # that has fallen behind would only ever drop arrivals at the cap.
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            counted = scheduled >= window_start
            if len(in_flight) >= plan.max_outstanding:
                result.dropped += counted
                continue
            if counted:
                lag = time.perf_counter() - scheduled
                result.send_lags.append(lag)
                result.late += lag > LATE_AFTER_S
            task = asyncio.create_task(send(popularity.draw(rng), scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)

    async def measure_cpu() -> None:
        # process_time covers every thread, gRPC's core threads included: the client's whole cost
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        cpu_at_window_start = time.process_time()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        result.cpu_seconds.append(time.process_time() - cpu_at_window_start)

    async with asyncio.TaskGroup() as group:
        group.create_task(measure_cpu())
        if plan.rate > 0:
            group.create_task(open_loop())
        else:
            for _ in range(plan.concurrency):
                group.create_task(closed_loop_worker())
    return result


def _client_process(plan: LoadPlan, barrier: StartBarrier, results: multiprocessing.Queue[Any]) -> None:
    """Entry point of a spawned client process: its result or its traceback goes on ``results``."""
    try:
        outcome = asyncio.run(drive(plan, barrier))
    except (OSError, threading.BrokenBarrierError) as err:
        # expected failures (no connection, another process gave up) need no traceback
        results.put(("error", plan.process_index, f"{type(err).__name__}: {err}"))
    except BaseException:
        results.put(("error", plan.process_index, traceback.format_exc()))
    else:
        results.put(("ok", plan.process_index, outcome))


async def _in_this_process(plan: LoadPlan, barrier: StartBarrier) -> list[WorkerResult]:
    return [await drive(plan, barrier)]


def _collect(
    processes: Sequence[multiprocessing.process.BaseProcess], results: multiprocessing.Queue[Any]
) -> list[WorkerResult]:
    """Every client process's result; raises when one failed or died without answering."""
    collected: list[WorkerResult] = []
    while len(collected) < len(processes):
        try:
            status, index, payload = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"client process {dead[0].name} died with exit code {dead[0].exitcode}") from None
            continue
        if status == "error":
            raise RuntimeError(f"client process {index} failed: {payload}")
        collected.append(payload)
    for process in processes:
        process.join()
    return collected


# ---------------------------------------------------------------------------------------------
# Coordinator: models, metrics, client processes


def scrape_counters(endpoint: str) -> MeshCounters:
    """The load, eviction and cache-miss counters of one pod's Prometheus endpoint (HOST:PORT)."""
    url = endpoint if endpoint.startswith("http") else f"http://{endpoint}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return MeshCounters.from_totals(parse_metric_totals(response.read().decode()))


async def scrape_all(endpoints: Sequence[str]) -> dict[str, MeshCounters | None]:
    """Every endpoint's counters at about the same moment; None (with a warning) where unreadable."""

    async def one(endpoint: str) -> MeshCounters | None:
        try:
            return await asyncio.to_thread(scrape_counters, endpoint)
        except (OSError, ValueError) as err:
            print(f"warning: could not read metrics from {endpoint}: {err}", file=sys.stderr)
            return None

    values = await asyncio.gather(*(one(e) for e in endpoints))
    return dict(zip(endpoints, values, strict=True))


def window_deltas(
    before: Mapping[str, MeshCounters | None], after: Mapping[str, MeshCounters | None]
) -> dict[str, MeshCounters] | None:
    """Per-endpoint counter deltas, or None unless every endpoint was read both times (a hit
    ratio from some of the pods would mislead)."""
    deltas = {}
    for endpoint, earlier in before.items():
        later = after.get(endpoint)
        if earlier is None or later is None:
            return None
        deltas[endpoint] = later - earlier
    return deltas


def ensure_demo_models(directory: Path, count: int, features: int) -> list[Path]:
    """Paths of demo models 0..count-1 in ``directory``, writing only those that are missing.

    Files already there are reused as they are; a width other than ``features`` would make every
    request fail with INVALID_ARGUMENT, so it is checked on the first one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = [(directory / f"{demo_model_id(i)}.onnx").absolute() for i in range(count)]
    if paths and paths[0].exists():
        found = _demo_model_width(paths[0])
        if found != features:
            raise ValueError(f"{paths[0]} has width {found}, not --features {features}; use another directory")
    for index, path in enumerate(paths):
        if not path.exists():
            path.write_bytes(demo_model_bytes(index, features))
    return paths


def _demo_model_width(path: Path) -> int:
    import onnx  # only --register needs it, and it is slow to import

    (x,) = onnx.load(str(path), load_external_data=False).graph.input
    return int(x.type.tensor_type.shape.dim[1].dim_value)


async def register_in_mesh(target: str, paths: Sequence[Path]) -> None:
    """Register the models through one pod (idempotent for the same path), bounded in parallel."""
    entries = [ModelEntry(path.stem, "onnx", str(path)) for path in paths]
    async with grpc.aio.insecure_channel(target) as channel:
        outcome = await register_many(channel, entries, endpoint=target, concurrency=REGISTER_CONCURRENCY)
    if outcome.failures:
        raise RuntimeError(format_bulk_summary(outcome))


async def load_into_runtimes(targets: Sequence[str], paths: Sequence[Path]) -> None:
    """With runtime targets there is no mesh: load every model into every runtime (loadModel)."""
    for target in targets:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                await _load_into_runtime(rgrpc.ModelRuntimeStub(channel), paths)
            except* grpc.aio.AioRpcError as errors:
                first = errors.exceptions[0]
                assert isinstance(first, grpc.aio.AioRpcError)
                raise RuntimeError(
                    f"loading into runtime {target} failed: {first.code().name} {first.details()}") from None


async def _load_into_runtime(stub: rgrpc.ModelRuntimeStub, paths: Sequence[Path]) -> None:
    limit = asyncio.Semaphore(REGISTER_CONCURRENCY)

    async def load(path: Path) -> None:
        async with limit:
            request = rpb.LoadModelRequest(modelId=path.stem, modelType="onnx", modelPath=str(path))
            await stub.loadModel(request, timeout=RUNTIME_LOAD_TIMEOUT_S)

    async with asyncio.TaskGroup() as group:
        for path in paths:
            group.create_task(load(path))


async def registered_model_ids(target: str) -> list[str]:
    """Every model the pod knows (RepositoryIndex), sorted so a seed picks the same hot set."""
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await v2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            v2.RepositoryIndexRequest(), timeout=30)
    return sorted(m.name for m in reply.models)


def read_model_ids(path: Path) -> list[str]:
    """One model id a line; blank lines and ``#`` comments skipped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


async def prepare_models(args: argparse.Namespace) -> list[str]:
    if args.register is not None:
        paths = ensure_demo_models(args.register, args.models, args.features)
        started = time.perf_counter()
        if args.runtime_targets:
            await load_into_runtimes(args.target, paths)
        else:
            await register_in_mesh(args.target[0], paths)
        verb = "loaded into" if args.runtime_targets else "registered through"
        print(f"{verb} {', '.join(args.target) if args.runtime_targets else args.target[0]}: "
              f"{len(paths)} models in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return [path.stem for path in paths]
    ids = read_model_ids(args.model_ids) if args.model_ids else await registered_model_ids(args.target[0])
    if args.models:
        ids = ids[: args.models]
    if not ids:
        raise ValueError("no models to send requests to")
    return ids


def build_plans(args: argparse.Namespace, model_ids: Sequence[str]) -> list[LoadPlan]:
    """One plan per client process: concurrency split evenly, rate and outstanding cap shared."""
    processes = args.processes
    concurrency = split_evenly(args.concurrency or 0, processes)
    outstanding = split_evenly(args.max_outstanding, processes)
    return [
        LoadPlan(
            targets=tuple(args.target),
            model_ids=tuple(model_ids),
            features=args.features,
            zipf_s=args.zipf,
            seed=args.seed,
            process_index=i,
            concurrency=concurrency[i],
            rate=(args.rate or 0.0) / processes,
            max_outstanding=outstanding[i],
            warmup_s=args.warmup,
            duration_s=args.duration,
            timeout_s=args.timeout,
            header_routing=args.header_routing,
            spread=args.spread,
        )
        for i in range(processes)
    ]


@dataclass
class Measurement:
    results: list[WorkerResult]
    # metrics endpoint -> counters, at: "start" (before any request), "window_start", "end"
    snapshots: dict[str, dict[str, MeshCounters | None]]


async def measure(plans: Sequence[LoadPlan], metrics: Sequence[str]) -> Measurement:
    """Run the client processes (in this one when there is one plan) and scrape the pods' metrics
    before the first request, when the warmup ends, and after the last answer."""
    snapshots = {"start": await scrape_all(metrics)}
    processes: list[multiprocessing.process.BaseProcess] = []
    barrier: StartBarrier
    if len(plans) == 1:
        barrier = threading.Barrier(2)
        clients = asyncio.ensure_future(_in_this_process(plans[0], barrier))
    else:
        # spawn, not fork: this process already runs gRPC, whose threads do not survive a fork.
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(len(plans) + 1)
        results: multiprocessing.Queue[Any] = context.Queue()
        processes = [context.Process(target=_client_process, args=(plan, barrier, results),
                                     name=f"load-client-{plan.process_index}") for plan in plans]
        for process in processes:
            process.start()
        clients = asyncio.ensure_future(asyncio.to_thread(_collect, processes, results))
    try:
        try:
            await asyncio.to_thread(barrier.wait, START_TIMEOUT_S)
        except threading.BrokenBarrierError:
            await clients  # a client's own error says more than the broken barrier
            raise
        started = time.perf_counter()
        print(f"running: {plans[0].warmup_s:g} s warmup + {plans[0].duration_s:g} s measured", file=sys.stderr)
        if plans[0].warmup_s > 0:
            await asyncio.sleep(plans[0].warmup_s - (time.perf_counter() - started))
            snapshots["window_start"] = await scrape_all(metrics)
        else:
            snapshots["window_start"] = snapshots["start"]
        worker_results = await clients
        snapshots["end"] = await scrape_all(metrics)
        return Measurement(worker_results, snapshots)
    finally:
        clients.cancel()
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


def describe(args: argparse.Namespace, model_count: int) -> str:
    shape = (f"open loop {args.rate:g} req/s (at most {args.max_outstanding} outstanding)" if args.rate
             else f"closed loop, concurrency {args.concurrency}")
    routing = ", mm-model-id header" if args.header_routing else ""
    return (f"{model_count} models, zipf s={args.zipf:g}, {shape}, {args.duration:g} s after {args.warmup:g} s warmup, "
            f"{args.processes} client process{'es' if args.processes > 1 else ''}, "
            f"{len(args.target)} target{'s' if len(args.target) > 1 else ''}{routing}")


def _json_safe(value: Any) -> Any:
    """NaN (an empty percentile) becomes null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def run(args: argparse.Namespace) -> int:
    model_ids = await prepare_models(args)
    plans = build_plans(args, model_ids)
    measurement = await measure(plans, args.metrics)
    merged = merge_results(measurement.results)
    snapshots = measurement.snapshots
    deltas = window_deltas(snapshots["window_start"], snapshots["end"]) if args.metrics else None
    with_warmup = window_deltas(snapshots["start"], snapshots["end"]) if args.metrics and args.warmup else None
    summary = summarize(merged, description=describe(args, len(model_ids)), duration_s=args.duration,
                        open_loop=bool(args.rate), metrics=deltas, metrics_with_warmup=with_warmup)
    print(format_report(summary))
    if args.json:
        document = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "grpcio": grpc.__version__},
            "summary": asdict(summary),
            "metrics_snapshots": {
                when: {e: (asdict(c) if c else None) for e, c in counters.items()}
                for when, counters in measurement.snapshots.items()
            },
            "first_requests": [asdict(f) for f in sorted(merged.first_requests.values(), key=lambda f: f.sent_at)],
        }
        args.json.write_text(json.dumps(_json_safe(document), indent=2) + "\n")
    return EXIT_OK if summary.ok else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Command line


def _positive(kind: Callable[[str], float | int]) -> Callable[[str], Any]:
    def parse(raw: str) -> float | int:
        value = kind(raw)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
        return value

    return parse


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {raw}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, metavar="HOST:PORT",
                        help="gRPC endpoint to load; repeat to spread requests over several pods")
    parser.add_argument("--spread", choices=("round-robin", "random"), default="round-robin",
                        help="how requests are spread over several targets (default round-robin)")
    parser.add_argument("--runtime-targets", action="store_true",
                        help="the targets are runtimes, not pods: --register loads each model into every "
                             "target with mmesh.ModelRuntime/loadModel")
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--register", type=Path, metavar="DIR",
                        help="write --models demo models into DIR (if missing) and register them")
    models.add_argument("--model-ids", type=Path, metavar="FILE", help="model ids to use, one a line")
    models.add_argument("--use-registered", action="store_true",
                        help="use the models the first target lists (RepositoryIndex)")
    parser.add_argument("--models", type=_positive(int), metavar="N",
                        help="number of models (required with --register; otherwise the first N)")
    parser.add_argument("--features", type=_positive(int), default=DEFAULT_FEATURES, metavar="F",
                        help=f"demo model width: requests send x FP32 [1, F] (default {DEFAULT_FEATURES})")
    parser.add_argument("--zipf", type=_non_negative_float, default=1.1, metavar="S",
                        help="Zipf exponent of model popularity; 0 is uniform (default 1.1)")
    parser.add_argument("--seed", type=int, default=0, help="seeds popularity order and draws (default 0)")
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--concurrency", type=_positive(int), metavar="C", help="closed loop with C workers")
    shape.add_argument("--rate", type=_positive(float), metavar="R", help="open loop, Poisson arrivals at R req/s")
    parser.add_argument("--max-outstanding", type=_positive(int), default=1000, metavar="N",
                        help="open loop: most requests in flight; arrivals over it are dropped (default 1000)")
    parser.add_argument("--duration", type=_positive(float), default=30.0, metavar="SECONDS",
                        help="measured seconds (default 30)")
    parser.add_argument("--warmup", type=_non_negative_float, default=5.0, metavar="SECONDS",
                        help="seconds of load before measuring, excluded from the figures (default 5)")
    parser.add_argument("--timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                        help="deadline of each request (default 30)")
    parser.add_argument("--header-routing", action="store_true",
                        help=f"also name the model in the {MODEL_ID_HEADER} header")
    parser.add_argument("--processes", type=_positive(int), default=1, metavar="P",
                        help="client processes whose results are merged (default 1)")
    parser.add_argument("--metrics", action="append", default=[], metavar="HOST:PORT",
                        help="a pod's Prometheus endpoint; repeat for every pod (loads, evictions, hit ratio)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write config and results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.register is not None and args.models is None:
        parser.error("--register needs --models N")
    if args.use_registered and args.runtime_targets:
        parser.error("--use-registered lists a pod's models; a runtime does not serve RepositoryIndex")
    if args.concurrency is not None and args.concurrency < args.processes:
        parser.error(f"--concurrency {args.concurrency} is fewer workers than --processes {args.processes}")
    try:
        return asyncio.run(run(args))
    except grpc.aio.AioRpcError as err:
        # a setup call (register, RepositoryIndex) failed; the run's own errors are counted instead
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return EXIT_FAILED
    except (RuntimeError, ValueError, OSError, threading.BrokenBarrierError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
