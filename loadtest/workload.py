"""The pure parts of the load generator (``python -m loadtest.load``), testable without a pod.

- who is asked: :class:`ZipfPopularity`, model popularity by rank with a seeded permutation from
  rank to model, so the hot models are not simply the first ids;
- when: :func:`poisson_arrivals`, the send times of an open-loop run;
- what the pods say: :func:`parse_metric_totals` and :class:`MeshCounters`, read from the pods'
  Prometheus text before and after the measured window;
- how it adds up: :class:`WorkerResult` (one client process) and :func:`merge_results`,
  :func:`percentile`, :class:`LatencySummary`, :func:`summarize`;
- how it reads: :func:`format_report`, the table printed at the end of a run.

Nothing here touches the network, the clock or a global random state; every function takes what it
needs, so the same inputs give the same outputs.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "LOADS_METRIC",
    "EVICTIONS_METRIC",
    "CACHE_MISSES_METRIC",
    "FirstRequest",
    "LatencySummary",
    "MeshCounters",
    "RunSummary",
    "WorkerResult",
    "ZipfPopularity",
    "format_report",
    "format_rows",
    "merge_results",
    "parse_metric_totals",
    "percentile",
    "poisson_arrivals",
    "split_evenly",
    "summarize",
    "zipf_probabilities",
]

# Metric names as ModelMesh exports them (docs/metrics.md): counts of timed events are histogram
# _count samples, so a load is one modelmesh_loadmodel_milliseconds observation.
LOADS_METRIC = "modelmesh_loadmodel_milliseconds_count"
EVICTIONS_METRIC = "modelmesh_model_evicted_total"
CACHE_MISSES_METRIC = "modelmesh_cache_miss_milliseconds_count"

# A client process above this share of one core is probably the bottleneck, not the target.
CLIENT_BOUND_CPU_SHARE = 0.9


# ---------------------------------------------------------------------------------------------
# Popularity


def zipf_probabilities(n: int, s: float) -> list[float]:
    """P(rank k) for ranks 1..n under Zipf's law with exponent ``s``: proportional to 1 / k**s.

    ``s == 0`` is the uniform distribution; larger ``s`` concentrates requests on fewer models
    (s = 1.1 sends about a fifth of the requests to the top 1% of 2,000 models).
    """
    if n < 1:
        raise ValueError(f"need at least one model, got {n}")
    if s < 0:
        raise ValueError(f"zipf exponent must be >= 0, got {s}")
    weights = [1.0 / (k**s) for k in range(1, n + 1)]
    total = math.fsum(weights)
    return [w / total for w in weights]


class ZipfPopularity:
    """Draw model indexes 0..n-1 with Zipf-distributed popularity.

    Popularity is by rank; a permutation seeded by ``seed`` maps rank to model index, so with
    demo models the hot set is spread over the ids rather than being demo-0000, demo-0001, ...
    Every client process builds the same instance from the same seed (the same hot set) and draws
    from its own ``random.Random``, so processes do not repeat each other's sequence.
    """

    def __init__(self, n: int, s: float, seed: int) -> None:
        probabilities = zipf_probabilities(n, s)
        self._cumulative = list(itertools.accumulate(probabilities))
        # Float rounding can leave the last sum a hair below 1.0; a draw above it must still land.
        self._cumulative[-1] = 1.0
        self.model_of_rank: list[int] = list(range(n))
        random.Random(seed).shuffle(self.model_of_rank)
        self.s = s

    def __len__(self) -> int:
        return len(self.model_of_rank)

    def draw(self, rng: random.Random) -> int:
        """One model index, drawn by inverting the cumulative distribution (O(log n))."""
        return self.model_of_rank[bisect.bisect_right(self._cumulative, rng.random())]

    def probability_of_model(self, index: int) -> float:
        """The chance that one draw returns model ``index``."""
        rank = self.model_of_rank.index(index)
        return self._cumulative[rank] - (self._cumulative[rank - 1] if rank else 0.0)


# ---------------------------------------------------------------------------------------------
# Arrivals


def poisson_arrivals(rate: float, duration: float, rng: random.Random) -> Iterator[float]:
    """Send times (seconds from the start, increasing) of a Poisson process of ``rate`` per second.

    Gaps are exponential with mean 1 / rate. The generator is lazy, so a long run at a high rate
    holds no schedule in memory. Several processes at rate / P each add up to one Poisson process
    at rate, which is how an open-loop run is split over client processes.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    t = rng.expovariate(rate)
    while t < duration:
        yield t
        t += rng.expovariate(rate)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that differ by at most one, larger ones first."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending ``sorted_values``, linearly interpolated.

    Same definition as numpy's default (``method="linear"``): the value at position
    q/100 * (n - 1), interpolating between its two neighbours. NaN when there are no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    position = q / 100 * (n - 1)
    low = math.floor(position)
    high = min(low + 1, n - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


@dataclass(frozen=True)
class LatencySummary:
    """Count and percentiles of a set of latencies, in milliseconds."""

    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of_seconds(cls, values: Iterable[float]) -> LatencySummary:
        ms = sorted(v * 1000 for v in values)
        if not ms:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            count=len(ms),
            p50_ms=percentile(ms, 50),
            p95_ms=percentile(ms, 95),
            p99_ms=percentile(ms, 99),
            max_ms=ms[-1],
            mean_ms=math.fsum(ms) / len(ms),
        )


# ---------------------------------------------------------------------------------------------
# Pod metrics


def parse_metric_totals(text: str) -> dict[str, float]:
    """Prometheus text exposition -> sample name -> value summed over its label sets.

    Labels are dropped because the figures the load tool wants are pod-wide totals (a histogram
    labelled by method and code still has one total count). Comment lines are skipped; label
    values may hold spaces, braces and escaped quotes; a trailing timestamp is ignored.
    """
    totals: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, rest = _split_sample_name(line)
        fields = rest.split()
        if not name or not fields:
            raise ValueError(f"not a Prometheus sample line: {raw!r}")
        totals[name] = totals.get(name, 0.0) + float(fields[0])
    return totals


def _split_sample_name(line: str) -> tuple[str, str]:
    """``name{labels} value ts`` -> (name, " value ts"), skipping a label block that may hold
    quoted ``}`` or spaces."""
    brace = line.find("{")
    space = line.find(" ")
    if space == -1:
        space = len(line)
    if brace == -1 or space < brace:
        return line[:space], line[space:]
    in_quotes = False
    i = brace + 1
    while i < len(line):
        ch = line[i]
        if in_quotes and ch == "\\":
            i += 2
            continue
        if ch == '"':
            in_quotes = not in_quotes
        elif ch == "}" and not in_quotes:
            return line[:brace], line[i + 1 :]
        i += 1
    raise ValueError(f"unterminated label set: {line!r}")


@dataclass(frozen=True)
class MeshCounters:
    """The pod counters a load run compares before and after; a difference of two is a delta."""

    loads: float = 0.0
    evictions: float = 0.0
    cache_misses: float = 0.0

    @classmethod
    def from_totals(cls, totals: Mapping[str, float]) -> MeshCounters:
        return cls(
            loads=totals.get(LOADS_METRIC, 0.0),
            evictions=totals.get(EVICTIONS_METRIC, 0.0),
            cache_misses=totals.get(CACHE_MISSES_METRIC, 0.0),
        )

    def __sub__(self, earlier: MeshCounters) -> MeshCounters:
        return MeshCounters(
            self.loads - earlier.loads, self.evictions - earlier.evictions, self.cache_misses - earlier.cache_misses
        )

    def __add__(self, other: MeshCounters) -> MeshCounters:
        return MeshCounters(
            self.loads + other.loads, self.evictions + other.evictions, self.cache_misses + other.cache_misses
        )


# ---------------------------------------------------------------------------------------------
# Results of client processes


@dataclass(frozen=True)
class FirstRequest:
    """The first request a model got during the run (warmup included): its cold latency when the
    model was not loaded before the run."""

    model_id: str
    sent_at: float  # wall-clock epoch seconds, comparable across client processes
    latency_s: float
    code: str  # gRPC status name, "OK" on success


@dataclass
class WorkerResult:
    """What one client process measured; :func:`merge_results` adds several up.

    ``latencies`` holds the latency of every successful request sent within the measured window
    (after warmup), in seconds; ``array('d')`` keeps a long run's samples at 8 bytes each and
    pickles compactly between processes.
    """

    latencies: array[float] = field(default_factory=lambda: array("d"))
    errors: Counter[str] = field(default_factory=Counter)
    first_requests: dict[str, FirstRequest] = field(default_factory=dict)
    # open loop only: arrivals not sent because the outstanding cap was reached, arrivals sent
    # later than the lateness threshold, and each sent arrival's lag behind its schedule
    dropped: int = 0
    late: int = 0
    send_lags: array[float] = field(default_factory=lambda: array("d"))
    # CPU seconds each client process used during the measured window (all its threads)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def requests(self) -> int:
        """Requests sent in the window that got an answer (OK or an error status)."""
        return self.ok + sum(self.errors.values())


def merge_results(results: Iterable[WorkerResult]) -> WorkerResult:
    """One result from several processes' results: samples and counts add up; a model's first
    request is the earliest sent by any process."""
    merged = WorkerResult()
    for result in results:
        merged.latencies.extend(result.latencies)
        merged.errors.update(result.errors)
        merged.dropped += result.dropped
        merged.late += result.late
        merged.send_lags.extend(result.send_lags)
        merged.cpu_seconds.extend(result.cpu_seconds)
        for model_id, first in result.first_requests.items():
            known = merged.first_requests.get(model_id)
            if known is None or first.sent_at < known.sent_at:
                merged.first_requests[model_id] = first
    return merged


# ---------------------------------------------------------------------------------------------
# Summary and table


@dataclass(frozen=True)
class RunSummary:
    """The figures of one run, ready to print or dump as JSON."""

    description: str
    duration_s: float
    requests: int
    ok: int
    throughput_rps: float
    latency: LatencySummary
    errors: dict[str, int]
    first_request: LatencySummary
    first_request_models: int
    first_request_failed: int
    dropped: int
    late: int
    send_lag: LatencySummary | None  # open loop only
    client_cpu_share: list[float]  # per process, share of one core during the window
    metrics: dict[str, MeshCounters] | None  # per metrics endpoint, deltas over the window
    metrics_with_warmup: MeshCounters | None  # all endpoints, from before the first request
    hit_ratio: float | None


def summarize(
    result: WorkerResult,
    *,
    description: str,
    duration_s: float,
    open_loop: bool,
    metrics: Mapping[str, MeshCounters] | None,
    metrics_with_warmup: Mapping[str, MeshCounters] | None = None,
) -> RunSummary:
    """Figures of a merged result over a measured window of ``duration_s`` seconds.

    ``metrics`` are the per-endpoint counter deltas over the same window (None when no metrics
    endpoint was given, or any of them could not be read); ``metrics_with_warmup`` the same from
    before the first request, where a run's first loads show. The hit ratio is 1 - cache misses /
    requests answered (OK or not), where a cache miss is a request that found its model not
    loaded; it is left out when no request succeeded.
    """
    firsts = list(result.first_requests.values())
    hit_ratio = None
    # with nothing answered OK the misses say nothing about the cache (a wrong model id is no hit)
    if metrics is not None and result.ok:
        misses = sum(c.cache_misses for c in metrics.values())
        hit_ratio = 1.0 - misses / result.requests
    return RunSummary(
        description=description,
        duration_s=duration_s,
        requests=result.requests,
        ok=result.ok,
        throughput_rps=result.ok / duration_s if duration_s > 0 else math.nan,
        latency=LatencySummary.of_seconds(result.latencies),
        errors=dict(result.errors.most_common()),
        first_request=LatencySummary.of_seconds(f.latency_s for f in firsts if f.code == "OK"),
        first_request_models=len(firsts),
        first_request_failed=sum(1 for f in firsts if f.code != "OK"),
        dropped=result.dropped,
        late=result.late,
        send_lag=LatencySummary.of_seconds(result.send_lags) if open_loop else None,
        client_cpu_share=[c / duration_s for c in result.cpu_seconds] if duration_s > 0 else [],
        metrics=dict(metrics) if metrics is not None else None,
        metrics_with_warmup=sum(metrics_with_warmup.values(), MeshCounters()) if metrics_with_warmup else None,
        hit_ratio=hit_ratio,
    )


def format_rows(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns: the first left-aligned, the rest right-aligned (they are figures)."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(len(r) for r in rows))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _latency_cells(s: LatencySummary) -> list[str]:
    return [f"{s.count}", _ms(s.p50_ms), _ms(s.p95_ms), _ms(s.p99_ms), _ms(s.max_ms)]


def format_report(summary: RunSummary) -> str:
    """The readable table printed at the end of a run."""
    out = [summary.description, ""]
    out.append(
        f"throughput   {summary.throughput_rps:.1f} req/s  ({summary.ok} ok of {summary.requests} answered "
        f"in {summary.duration_s:g} s)"
    )
    if summary.errors:
        out.append("errors       " + ", ".join(f"{code} {n}" for code, n in summary.errors.items()))
    else:
        out.append("errors       none")
    out.append("")
    rows = [["latency (ms)", "count", "p50", "p95", "p99", "max"]]
    rows.append(["requests", *_latency_cells(summary.latency)])
    rows.append(["first per model", *_latency_cells(summary.first_request)])
    if summary.send_lag is not None:
        rows.append(["send lag", *_latency_cells(summary.send_lag)])
    out.append(format_rows(rows))
    notes = []
    if summary.first_request_failed:
        notes.append(f"{summary.first_request_failed} of {summary.first_request_models} first requests failed")
    if summary.send_lag is not None:
        notes.append(f"open loop: {summary.dropped} arrivals dropped at the outstanding cap, {summary.late} sent late")
    if notes:
        out.append("(" + "; ".join(notes) + ")")
    if summary.metrics is not None:
        out.append("")
        per_minute = 60 / summary.duration_s if summary.duration_s > 0 else math.nan
        mrows = [["pod metrics (window)", "loads", "evictions", "cache misses", "loads/min"]]
        total = MeshCounters()
        for endpoint, counters in summary.metrics.items():
            total = total + counters
            mrows.append([endpoint, f"{counters.loads:.0f}", f"{counters.evictions:.0f}",
                          f"{counters.cache_misses:.0f}", f"{counters.loads * per_minute:.0f}"])
        if len(summary.metrics) > 1:
            mrows.append(["total", f"{total.loads:.0f}", f"{total.evictions:.0f}",
                          f"{total.cache_misses:.0f}", f"{total.loads * per_minute:.0f}"])
        warm = summary.metrics_with_warmup
        if warm is not None:
            mrows.append(["run incl. warmup", f"{warm.loads:.0f}", f"{warm.evictions:.0f}",
                          f"{warm.cache_misses:.0f}", ""])
        out.append(format_rows(mrows))
        if summary.hit_ratio is not None:
            out.append(f"hit ratio    {summary.hit_ratio:.4f}  (1 - cache misses / requests)")
    cpu = summary.client_cpu_share
    if cpu:
        line = f"client cpu   {max(cpu):.2f} of a core (busiest of {len(cpu)} process{'es' if len(cpu) > 1 else ''})"
        if max(cpu) >= CLIENT_BOUND_CPU_SHARE:
            line += " -- the client may be the limit: add --processes or check against a trivial target"
        out.append(line)
    return "\n".join(out)
