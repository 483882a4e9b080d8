"""The load tool's pure parts (loadtest/workload.py): popularity, arrivals, percentiles, metrics
text, merging client processes' results, and the report table."""

from __future__ import annotations

import math
import random
import statistics
from array import array
from collections import Counter

import numpy as np
import pytest

from loadtest.workload import (
    CACHE_MISSES_METRIC,
    EVICTIONS_METRIC,
    LOADS_METRIC,
    FirstRequest,
    LatencySummary,
    MeshCounters,
    WorkerResult,
    ZipfPopularity,
    format_report,
    format_rows,
    merge_results,
    parse_metric_totals,
    percentile,
    poisson_arrivals,
    split_evenly,
    summarize,
    zipf_probabilities,
)

# --- popularity ---------------------------------------------------------------------------------


def test_zipf_probabilities_follow_the_power_law() -> None:
    p = zipf_probabilities(100, 1.1)
    assert math.isclose(sum(p), 1.0)
    assert math.isclose(p[0] / p[9], 10**1.1)
    assert p == sorted(p, reverse=True)
    assert zipf_probabilities(4, 0) == [0.25] * 4
    with pytest.raises(ValueError):
        zipf_probabilities(0, 1.0)
    with pytest.raises(ValueError):
        zipf_probabilities(10, -0.5)


def test_draws_match_the_expected_frequencies() -> None:
    n, s, draws = 50, 1.1, 200_000
    popularity = ZipfPopularity(n, s, seed=7)
    rng = random.Random(1)
    counts = Counter(popularity.draw(rng) for _ in range(draws))
    expected = [popularity.probability_of_model(i) * draws for i in range(n)]
    # Pearson's chi-square with 49 degrees of freedom: mean 49, sd ~10; 100 is far in the tail,
    # loose enough never to flake with this fixed seed yet far below a wrong distribution's value.
    chi2 = sum((counts[i] - expected[i]) ** 2 / expected[i] for i in range(n))
    assert chi2 < 100
    # and the head in plain terms: the most popular model gets about P(rank 1) of the requests
    top = popularity.model_of_rank[0]
    assert counts[top] / draws == pytest.approx(zipf_probabilities(n, s)[0], rel=0.02)


def test_uniform_when_s_is_zero() -> None:
    rng = random.Random(3)
    popularity = ZipfPopularity(10, 0, seed=0)
    counts = Counter(popularity.draw(rng) for _ in range(50_000))
    assert set(counts) == set(range(10))
    assert all(abs(c - 5_000) < 400 for c in counts.values())


def test_hot_set_is_a_seeded_permutation_not_the_first_ids() -> None:
    a, b = ZipfPopularity(1000, 1.1, seed=0), ZipfPopularity(1000, 1.1, seed=0)
    assert a.model_of_rank == b.model_of_rank  # every client process agrees on the hot set
    assert sorted(a.model_of_rank) == list(range(1000))
    assert a.model_of_rank[:10] != list(range(10))
    assert ZipfPopularity(1000, 1.1, seed=1).model_of_rank != a.model_of_rank
    assert a.probability_of_model(a.model_of_rank[0]) == pytest.approx(zipf_probabilities(1000, 1.1)[0])


def test_a_single_model_is_always_drawn() -> None:
    rng = random.Random(0)
    assert {ZipfPopularity(1, 2.0, seed=5).draw(rng) for _ in range(100)} == {0}


# --- arrivals -----------------------------------------------------------------------------------


def test_poisson_arrivals_have_the_rate_and_exponential_gaps() -> None:
    rate, duration = 500.0, 200.0
    times = list(poisson_arrivals(rate, duration, random.Random(11)))
    assert times == sorted(times) and 0 < times[0] and times[-1] < duration
    # count ~ Poisson(100,000): sd ~316
    assert abs(len(times) - rate * duration) < 1_500
    gaps = np.diff(times)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.02)
    # exponential gaps: sd equals the mean, and P(gap > mean) = 1/e
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert float(np.mean(gaps > 1 / rate)) == pytest.approx(math.exp(-1), abs=0.01)


def test_poisson_arrivals_are_reproducible_and_reject_a_bad_rate() -> None:
    assert list(poisson_arrivals(10, 5, random.Random(2))) == list(poisson_arrivals(10, 5, random.Random(2)))
    with pytest.raises(ValueError):
        next(poisson_arrivals(0, 1, random.Random(0)))


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(2, 4) == [1, 1, 0, 0]
    assert sum(split_evenly(1001, 7)) == 1001
    with pytest.raises(ValueError):
        split_evenly(3, 0)


# --- percentiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_agrees_with_numpy_linear(q: float) -> None:
    values = sorted(np.random.default_rng(4).lognormal(0, 1, 1_001).tolist())
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_is_in_milliseconds() -> None:
    s = LatencySummary.of_seconds([0.001 * i for i in range(1, 101)])
    assert s.count == 100 and s.max_ms == pytest.approx(100)
    assert s.p50_ms == pytest.approx(50.5) and s.p99_ms == pytest.approx(99.01)
    assert math.isnan(LatencySummary.of_seconds([]).p50_ms)


# --- metrics text -------------------------------------------------------------------------------

METRICS = """\
# HELP modelmesh_loadmodel_milliseconds Time taken to load model
# TYPE modelmesh_loadmodel_milliseconds histogram
modelmesh_loadmodel_milliseconds_bucket{le="+Inf"} 12.0
modelmesh_loadmodel_milliseconds_count 12.0
modelmesh_loadmodel_milliseconds_sum 340.5
modelmesh_model_evicted_total 3.0
modelmesh_cache_miss_milliseconds_count 14.0 1700000000000
modelmesh_api_request_milliseconds_count{code="OK",method="ModelInfer"} 100.0
modelmesh_api_request_milliseconds_count{code="NOT_FOUND",method="ModelInfer"} 2.0
odd_label{path="a } b",quote="say \\"hi\\" {x}"} 1e3

modelmesh_instance_capacity_bytes 2e+07
"""


def test_metric_totals_sum_label_sets_and_skip_comments() -> None:
    totals = parse_metric_totals(METRICS)
    assert totals[LOADS_METRIC] == 12.0
    assert totals[EVICTIONS_METRIC] == 3.0
    assert totals[CACHE_MISSES_METRIC] == 14.0  # the timestamp is not the value
    assert totals["modelmesh_api_request_milliseconds_count"] == 102.0
    assert totals["modelmesh_loadmodel_milliseconds_bucket"] == 12.0
    assert totals["odd_label"] == 1000.0
    assert totals["modelmesh_instance_capacity_bytes"] == 2e7


def test_metric_text_errors_are_reported() -> None:
    with pytest.raises(ValueError):
        parse_metric_totals('broken{le="1" 3\n')
    with pytest.raises(ValueError):
        parse_metric_totals("no_value\n")


def test_mesh_counters_from_totals_and_deltas() -> None:
    before = MeshCounters.from_totals(parse_metric_totals(METRICS))
    assert before == MeshCounters(loads=12, evictions=3, cache_misses=14)
    after = MeshCounters(loads=20, evictions=9, cache_misses=25)
    assert after - before == MeshCounters(8, 6, 11)
    assert (after - before) + MeshCounters(1, 1, 1) == MeshCounters(9, 7, 12)
    assert MeshCounters.from_totals({}) == MeshCounters()


# --- merging and summary ------------------------------------------------------------------------


def _result(latencies: list[float], errors: dict[str, int], firsts: list[FirstRequest], cpu: float) -> WorkerResult:
    return WorkerResult(latencies=array("d", latencies), errors=Counter(errors),
                        first_requests={f.model_id: f for f in firsts}, cpu_seconds=[cpu])


def test_merge_adds_up_and_keeps_each_models_earliest_first_request() -> None:
    a = _result([0.001, 0.002], {"UNAVAILABLE": 1},
                [FirstRequest("m1", 10.0, 0.050, "OK"), FirstRequest("m2", 12.0, 0.001, "OK")], 1.0)
    b = _result([0.003], {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1},
                [FirstRequest("m1", 9.5, 0.040, "OK"), FirstRequest("m3", 11.0, 0.030, "NOT_FOUND")], 2.0)
    b.dropped, b.late, b.send_lags = 4, 2, array("d", [0.0001])
    merged = merge_results([a, b])
    assert sorted(merged.latencies) == [0.001, 0.002, 0.003]
    assert merged.errors == Counter({"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 1})
    assert (merged.ok, merged.requests) == (3, 7)
    assert merged.first_requests["m1"].sent_at == 9.5  # b sent m1 first
    assert set(merged.first_requests) == {"m1", "m2", "m3"}
    assert (merged.dropped, merged.late, list(merged.send_lags)) == (4, 2, [0.0001])
    assert merged.cpu_seconds == [1.0, 2.0]
    assert merge_results([]).requests == 0


def test_summary_figures_and_hit_ratio() -> None:
    result = _result([0.002] * 90, {"RESOURCE_EXHAUSTED": 10},
                     [FirstRequest("m1", 0.0, 0.030, "OK"), FirstRequest("m2", 0.0, 0.010, "INTERNAL")], 4.5)
    metrics = {"pod-a:2112": MeshCounters(5, 4, 6), "pod-b:2112": MeshCounters(3, 0, 4)}
    summary = summarize(result, description="d", duration_s=10.0, open_loop=False, metrics=metrics)
    assert summary.throughput_rps == 9.0  # successes per second
    assert summary.requests == 100 and summary.errors == {"RESOURCE_EXHAUSTED": 10}
    assert summary.hit_ratio == pytest.approx(1 - 10 / 100)  # misses from both pods
    assert (summary.first_request_models, summary.first_request_failed, summary.first_request.count) == (2, 1, 1)
    assert summary.client_cpu_share == [0.45]
    assert summary.send_lag is None
    no_metrics = summarize(result, description="d", duration_s=10.0, open_loop=True, metrics=None)
    assert no_metrics.hit_ratio is None and no_metrics.send_lag is not None
    all_failed = _result([], {"NOT_FOUND": 50}, [], 0.1)
    assert summarize(all_failed, description="d", duration_s=1.0, open_loop=False, metrics=metrics).hit_ratio is None


# --- table --------------------------------------------------------------------------------------


def test_rows_align_first_left_rest_right() -> None:
    assert format_rows([["a", "1", "22"], ["bbb", "333", "4"]]).splitlines() == ["a      1  22", "bbb  333   4"]
    assert format_rows([]) == ""


def test_report_shows_every_section() -> None:
    result = _result([0.001, 0.002, 0.004], {"UNAVAILABLE": 1}, [FirstRequest("m1", 0.0, 0.025, "OK")], 0.95)
    result.dropped, result.late, result.send_lags = 3, 1, array("d", [0.0001, 0.003])
    summary = summarize(result, description="3 models, open loop", duration_s=1.0, open_loop=True,
                        metrics={"p:1": MeshCounters(2, 1, 1), "p:2": MeshCounters(1, 0, 0)},
                        metrics_with_warmup={"p:1": MeshCounters(4, 1, 3), "p:2": MeshCounters(1, 0, 0)})
    text = format_report(summary)
    lines = text.splitlines()
    assert lines[0] == "3 models, open loop"
    assert "3.0 req/s" in text and "UNAVAILABLE 1" in text
    requests_row = next(line for line in lines if line.startswith("requests"))
    assert requests_row.split() == ["requests", "3", "2.00", "3.80", "3.96", "4.00"]
    assert next(line for line in lines if line.startswith("first per model")).split()[3:] == ["1"] + ["25.00"] * 4
    assert "3 arrivals dropped" in text and "1 sent late" in text
    total = next(line for line in lines if line.startswith("total")).split()
    assert total == ["total", "3", "1", "1", "180"]
    assert next(line for line in lines if line.startswith("run incl. warmup")).split()[-3:] == ["5", "1", "3"]
    assert "hit ratio    0.7500" in text
    assert "the client may be the limit" in text
