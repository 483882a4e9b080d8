"""The simulator's pure pieces (loadtest.sim): traces, next uses, the hit ratios of LRU and Belady on
traces small enough to check by hand, the mesh policy's bookkeeping, and the CLI on a tiny run."""

import numpy as np
import pytest

from loadtest.sim.__main__ import main
from loadtest.sim.baselines import run_belady, run_random, run_ray
from loadtest.sim.config import EPOCH_MS, SimConfig
from loadtest.sim.mesh import MeshSim, run_mesh
from loadtest.sim.run import copies_target, run_policy
from loadtest.sim.tally import Tally
from loadtest.sim.trace import Trace, make_trace, next_uses

A, B, C, D = 0, 1, 2, 3
SIZE = 1000


def trace_of(requests, watched=A, watched_from_ms=EPOCH_MS):
    """``requests``: (seconds, model) pairs in time order."""
    times = np.array([EPOCH_MS + int(s * 1000) for s, _ in requests], dtype=np.int64)
    models = np.array([m for _, m in requests], dtype=np.int64)
    return Trace(times, models, watched, watched_from_ms, 0.0)


def one_pod(trace, policy, **kw):
    """Hit ratio of ``policy`` with one pod holding two models of four (all the same size)."""
    cfg = SimConfig(pods=1, models=4, warmup_s=0, service_ms=1, **kw)
    tally = Tally(1, EPOCH_MS, int(trace.times_ms[-1]), trace.watched_from_ms, 1)
    result = policy(cfg, trace, [SIZE] * 4, 2 * SIZE, tally)
    return result.hit_ratio


# A B C A B D A B, two models fit: LRU always evicts the one needed next
CYCLE = trace_of([(i * 0.1, m) for i, m in enumerate([A, B, C, A, B, D, A, B])])


def test_next_uses():
    assert next_uses(np.array([1, 2, 1, 3, 2, 1])).tolist() == [2, 4, 5, 6, 6, 6]
    assert next_uses(np.array([], dtype=np.int64)).tolist() == []


def test_belady_on_a_hand_checked_trace():
    # C and D are never used again: MIN serves them and drops them; A and B hit from then on
    assert one_pod(CYCLE, run_belady) == 4 / 8


def test_lru_on_a_hand_checked_trace():
    # random placement over one pod is plain LRU: every request misses
    assert one_pod(CYCLE, run_random) == 0.0
    assert one_pod(CYCLE, run_ray) == 0.0


def test_mesh_without_rates_is_lru():
    # no rate period completes in 0.8 s, so no copy has a rate: weighted eviction on a copy's own
    # count is plain LRU
    assert one_pod(CYCLE, lambda *a: run_mesh(*a, eviction="copy")) == 0.0


def test_the_record_carries_an_evicted_models_use():
    # A B C A B D A B: C evicts A, whose record keeps its one request. A and B come back carrying
    # their use, so the copies without any (B's first copy, then C, then D) go first, D evicts
    # the older carrier A, and B hits at last: 1 hit of 8 (plain LRU: none)
    assert one_pod(CYCLE, run_mesh) == 1 / 8


# A five times, B once, a period closes (A: 5 requests, B: 1), then two one-offs and A again
STEADY = trace_of([(1, A), (2, A), (3, A), (4, A), (5, A), (9, B), (11, C), (12, D), (13, A)])


def test_weighted_eviction_keeps_the_model_in_use():
    # LRU evicts A for C (A was used before B), then B for D: A misses at 13 s -> 4 hits of 9
    assert one_pod(STEADY, lambda *a: run_mesh(*a, eviction="lru")) == 4 / 9
    # weighted: C evicts B (1 request against A's 5), D evicts C (none yet): A hits -> 5 of 9
    assert one_pod(STEADY, run_mesh) == 5 / 9


def test_tally_figures():
    tally = Tally(2, EPOCH_MS + 1000, EPOCH_MS + 61_000, EPOCH_MS, 2)
    tally.request(EPOCH_MS, 0, False)  # warm-up: not counted
    tally.load(EPOCH_MS)
    for i in range(3):
        tally.request(EPOCH_MS + 2000 + i, 0, i > 0)
    tally.request(EPOCH_MS + 3000, 1, True)
    tally.load(EPOCH_MS + 2000)
    tally.copies(EPOCH_MS + 2500, 2)
    tally.refuse(EPOCH_MS + 4000)
    r = tally.result("x", 0.0)
    assert (r.requests, r.hit_ratio, r.loads_per_min, r.refused) == (5, 3 / 5, 1.0, 1)
    assert r.imbalance == 3 / 2 and r.copies_s == 2.5


def test_zipf_trace_popularity_and_watched_model():
    cfg = SimConfig(models=1000, rate=2000, duration_s=10, zipf_s=1.0)
    t = make_trace(cfg)
    assert abs(len(t) - 20_000) < 600 and np.all(np.diff(t.times_ms) >= 0)
    counts = np.bincount(t.models, minlength=1000)
    assert counts.argmax() == t.watched_model
    # rank 1 of 1000 under s=1 takes 1/H(1000) = 13.4% of the requests
    assert abs(counts.max() / len(t) - 0.134) < 0.01
    assert t.watched_rpm == pytest.approx(0.134 * 2000 * 60, rel=0.01)


def test_shift_trace_rotates_the_hot_set():
    cfg = SimConfig(models=1000, rate=2000, duration_s=20, trace="shift", shift_every_s=10, shift_models=100)
    t = make_trace(cfg)
    after = t.times_ms >= t.watched_from_ms
    assert t.watched_from_ms == EPOCH_MS + 10_000
    assert np.bincount(t.models[after]).argmax() == t.watched_model
    assert np.bincount(t.models[~after]).argmax() != t.watched_model


def test_burst_trace_adds_a_cold_model():
    cfg = SimConfig(models=1000, rate=500, duration_s=30, trace="burst", burst_at_s=20, burst_x=4,
                    threshold_rpm=600)
    t = make_trace(cfg)
    burst = t.models == t.watched_model
    assert t.watched_rpm == 2400
    assert (t.times_ms[burst] < t.watched_from_ms).sum() < 10
    # 2400 rpm for 10 s: about 400 requests, plus its own trickle
    assert 330 < burst.sum() < 480


SMALL = SimConfig(pods=12, models=300, rate=200, duration_s=45, warmup_s=10, trace="burst", burst_at_s=15,
                  burst_x=4, threshold_rpm=600, size_sigma=0.3)


def test_mesh_bookkeeping_and_eviction_shortcut():
    trace = make_trace(SMALL)
    sizes = SMALL.model_sizes()
    capacity = SMALL.pod_capacity(sizes)
    tally = Tally(SMALL.pods, SMALL.measure_from_ms, int(trace.times_ms[-1]), trace.watched_from_ms, 4)
    # check_evictions: every decision made on the heap's head equals the one on the whole cache
    sim = MeshSim(SMALL, sizes.tolist(), capacity, check_evictions=True)
    sim.run(trace, tally)
    assert sim.evictions > 100
    for p, resident in enumerate(sim.resident):
        assert sim.used[p] == sum(sizes[m] for m in resident) <= capacity
        assert all(p in sim.holders[m] for m in resident)
    assert sum(len(h) for h in sim.holders.values()) == sum(len(r) for r in sim.resident)


def test_a_burst_gets_its_copies_within_two_rate_periods():
    trace = make_trace(SMALL)
    # 2400 rpm at 600 per copy: 4 copies, a third of 12 pods
    assert copies_target(SMALL, trace.watched_rpm) == 4
    result = run_policy(SMALL, "mesh")
    assert result.copies_s is not None and result.copies_s <= 20


def test_cli_prints_the_table(capsys):
    assert main(["--pods", "4", "--models", "200", "--rate", "100", "--duration-s", "12", "--warmup-s", "2",
                 "--jobs", "1", "--policies", "mesh,ray,random,belady"]) == 0
    out = capsys.readouterr().out
    for row in ("| mesh |", "| ray-style |", "| random |", "| belady (bound) |", "imbalance <= 1.2"):
        assert row in out
    assert main(["--policies", "nope", "--jobs", "1", "--pods", "2", "--models", "10", "--duration-s", "2",
                 "--warmup-s", "1"]) == 2


def _steady_run(trace, eviction):
    cfg = SimConfig(pods=4, models=2000, rate=200, duration_s=240, warmup_s=120, trace=trace, shift_models=200)
    t = make_trace(cfg)
    sizes = cfg.model_sizes()
    tally = Tally(cfg.pods, cfg.measure_from_ms, int(t.times_ms[-1]), t.watched_from_ms, 2)
    sim = MeshSim(cfg, sizes.tolist(), cfg.pod_capacity(sizes), eviction=eviction)
    sim.run(t, tally)
    return sim, tally.result(eviction, 0.0)


def test_pods_trust_long_term_counts_when_popularity_holds_still_and_only_then():
    # Zipf: the counts fit their long-term rates within a couple of minutes, the pods turn steady
    # and hit more than with the minute's counts alone
    sim, steady = _steady_run("zipf", "record")
    assert sim.steady_pod_periods > 0.2 * sim.periods * 4
    _, minute = _steady_run("zipf", "minute")
    assert steady.hit_ratio > minute.hit_ratio
    # a hot set that moves every 30 s: never steady, so the rule is the minute's
    sim, shifting = _steady_run("shift", "record")
    assert sim.steady_pod_periods == 0
    _, minute = _steady_run("shift", "minute")
    assert shifting.hit_ratio == minute.hit_ratio
