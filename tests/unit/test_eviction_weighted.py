"""Eviction weighted by use, pinned minimum copies, and the churn guard."""

import math
import random
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from modelmesh.placement.eviction import (
    FIT_CLAMP,
    FIT_FLOOR_RPM,
    FIT_MAX_RPM,
    LONG_USE_TAU_MS,
    STEADY_CREDIT_MS_PER_USE,
    USE_CREDIT_MS,
    CachedModel,
    PopularityFit,
    choose_evictions,
    churn_guard,
    churn_threshold_ms,
    decayed_count,
    eviction_key,
    eviction_score,
    fit_term,
    fits_the_test,
    long_use_rpm,
    steady_use,
    use_credit_ms,
)

NOW = 1_700_000_000_000
S = 1000


def m(mid, size=10, used_ago_s=0.0, rpm=0.0, busy=False, pinned=False):
    return CachedModel(mid, size, NOW - int(used_ago_s * S), busy, rpm, pinned)


def test_a_model_used_every_few_seconds_outlives_a_once_used_more_recent_one():
    every_5s = m("steady", used_ago_s=4, rpm=12)
    once = m("once", used_ago_s=1, rpm=1)
    d = choose_evictions([every_5s, once], 20, 10)
    assert d.victims == ("once",) and "weighted by use" in d.reason


def test_each_doubling_of_the_rate_is_worth_the_same_credit():
    assert eviction_score(m("a", rpm=1)) - eviction_score(m("b")) == USE_CREDIT_MS
    assert math.isclose(eviction_score(m("a", rpm=3)) - eviction_score(m("b", rpm=1)), USE_CREDIT_MS)


def test_a_hot_model_gone_quiet_falls_back_to_lru():
    # the credit comes from the last minute's rate: once that is 0, recency alone decides
    was_hot, recent = m("was-hot", used_ago_s=120, rpm=0), m("recent", used_ago_s=60)
    assert choose_evictions([was_hot, recent], 20, 10).victims == ("was-hot",)


def test_a_very_hot_model_is_worth_minutes_not_hours():
    hot = m("hot", used_ago_s=5 * 60, rpm=2000)
    idle = m("idle", used_ago_s=60)
    assert choose_evictions([hot, idle], 20, 10).victims == ("hot",)


def test_pinned_models_are_never_evicted():
    cache = [m("pinned-old", used_ago_s=999, pinned=True), m("idle", used_ago_s=1)]
    assert choose_evictions(cache, 20, 10).victims == ("idle",)
    d = choose_evictions([m("pinned", size=15, pinned=True), m("idle", size=5)], 20, 10)
    assert not d.fits and d.victims == () and "minimum copies" in d.reason


def test_churn_guard_refuses_a_full_pod_with_a_young_oldest_entry():
    # 10 x max(3 s, 240 s / 3) = 800 s
    assert churn_threshold_ms(240_000) == 800_000
    assert churn_threshold_ms(1_000) == 30_000
    reason = churn_guard(NOW - 100 * S, NOW, 240_000, full=True)
    assert reason is not None and reason.startswith("cache churn threshold exceeded")
    assert churn_guard(NOW - 800 * S, NOW, 240_000, full=True) is None
    assert churn_guard(NOW - 100 * S, NOW, 240_000, full=False) is None
    assert churn_guard(0, NOW, 240_000, full=True) is None


entries = st.lists(
    st.builds(
        CachedModel, st.text(min_size=1, max_size=4), st.integers(1, 50), st.integers(0, 10**6),
        st.booleans(), st.sampled_from([0.0, 0.5, 1.0, 12.0, 2000.0]), st.booleans(),
    ),
    max_size=12, unique_by=lambda e: e.model_id,
)


@given(entries, st.integers(1, 400))
def test_weighted_invariants(cache, needed):
    capacity = 300
    used = sum(e.size_bytes for e in cache)
    d = choose_evictions(cache, capacity, needed)
    by_id = {e.model_id: e for e in cache}
    assert all(not by_id[v].busy and not by_id[v].min_copies_pinned for v in d.victims)
    freed = sum(by_id[v].size_bytes for v in d.victims)
    if d.fits:
        assert capacity - used + freed >= needed
        idle = sorted((e for e in cache if not e.busy and not e.min_copies_pinned), key=eviction_key)
        assert list(d.victims) == [e.model_id for e in idle[: len(d.victims)]]
    else:
        assert d.victims == ()
    assert choose_evictions(cache, capacity, needed) == d


@given(st.lists(st.tuples(st.text(min_size=1, max_size=4), st.integers(1, 50), st.integers(0, 10**6)),
                max_size=12, unique_by=lambda t: t[0]), st.integers(1, 400))
def test_default_fields_give_pure_lru(raw, needed):
    cache = [CachedModel(mid, size, used) for mid, size, used in raw]
    d = choose_evictions(cache, 300, needed)
    lru = sorted(cache, key=lambda e: (e.last_used_ms, e.model_id))
    assert list(d.victims) == [e.model_id for e in lru[: len(d.victims)]]


def test_a_head_of_the_cache_gives_the_same_victims_as_the_whole():
    # what loadtest.sim relies on: the lowest-key entries plus the rest as one busy block decide alike
    cache = [m(f"m{i}", size=5 + i % 7, used_ago_s=i * 3 % 50, rpm=float(i % 4) * 3) for i in range(40)]
    full = choose_evictions(cache, 300, 30)
    head = sorted(cache, key=eviction_key)[:8]
    rest = CachedModel("rest", sum(e.size_bytes for e in cache) - sum(e.size_bytes for e in head), 0, busy=True)
    assert choose_evictions([*head, rest], 300, 30).victims == full.victims


# --- steady popularity: long-term use ------------------------------------------------------------

MIN = 60 * S


def test_the_long_term_count_decays_over_its_time_constant():
    assert decayed_count(0, NOW, NOW + MIN) == 0.0
    assert math.isclose(decayed_count(100, NOW, NOW + LONG_USE_TAU_MS), 100 / math.e)
    # a count is never made larger by a clock that went back
    assert decayed_count(100, NOW, NOW - MIN) == 100


def test_long_term_rate_in_steady_state_and_early():
    # 6 rpm for a long time: the decayed count is 6 x tau in minutes
    count = 6 * LONG_USE_TAU_MS / MIN
    assert math.isclose(long_use_rpm(count, NOW, NOW, NOW - 100 * LONG_USE_TAU_MS), 6.0)
    # 6 requests spread over the model's first minute: about 6 rpm, not 6 over ten minutes
    early = sum(math.exp(-(60 - t) * S / LONG_USE_TAU_MS) for t in range(5, 61, 10))
    assert 5.9 < long_use_rpm(early, NOW, NOW, NOW - MIN) < 6.1
    assert long_use_rpm(0, NOW, NOW, NOW - MIN) == 0.0


def test_steady_use_is_the_long_term_rate_unless_the_minute_disagrees():
    assert steady_use(3, 6.0) == 6.0  # within Poisson noise: the long-term rate knows better
    assert steady_use(9, 6.0) == 6.0
    assert steady_use(0, 6.0) == 6.0  # at 6 rpm a quiet minute happens
    assert steady_use(0, 100.0) == 0.0  # a hot model gone quiet is judged on its minute
    assert steady_use(400, 6.0) == 400  # a burst too


def test_fit_terms_and_a_pods_fit():
    assert fit_term(1, 6.0, 10_000) == 0.0  # 6 rpm expects 1 request in 10 s
    assert fit_term(3, 6.0, 10_000) == 4.0
    assert fit_term(50, 6.0, 10_000) == FIT_CLAMP  # one model cannot decide for the pod
    assert fit_term(1, 0.0, 10_000) == fit_term(1, FIT_FLOOR_RPM, 10_000)
    assert not PopularityFit().steady  # a pod starts unsteady
    assert PopularityFit().add(123.0, 0) == PopularityFit()
    assert fits_the_test(1, 6.0) and not fits_the_test(2, 6.0) and not fits_the_test(1, -1.0)
    assert not fits_the_test(1, FIT_MAX_RPM + 1)


def test_a_pod_turns_steady_when_counts_fit_their_rates_and_not_when_they_move():
    rng = random.Random(7)
    rates = [rng.choice([1.0, 3.0, 6.0, 12.0, 30.0]) for _ in range(100)]

    def period(fit, factor):
        # Poisson counts over 10 s at factor x the predicted rates (numpy-free: sum of exponentials)
        terms = 0.0
        for r in rates:
            lam, k, t = r * factor / 6, 0, rng.expovariate(1.0)
            while t < lam:
                k, t = k + 1, t + rng.expovariate(1.0)
            terms += fit_term(k, r, 10_000)
        return fit.add(terms, len(rates))

    steady = PopularityFit()
    for _ in range(18):  # three minutes of counts that fit
        steady = period(steady, 1.0)
    assert steady.steady and 0.7 < steady.chi2 < 1.5
    moved = PopularityFit()
    for _ in range(18):  # every rate doubled (or halved): the counts do not fit
        moved = period(moved, 2.0 if rng.random() < 0.5 else 0.5)
    assert not moved.steady


def test_a_steady_pod_keeps_the_model_with_more_uses_per_byte():
    # 6 rpm last used 40 s ago against 2 rpm used just now: recency wins with the minute's counts
    # (15 s per doubling), the known rate wins on a steady pod (100 s a use a minute)
    often, rare = m("often", used_ago_s=40, rpm=6), m("rare", used_ago_s=0, rpm=2)
    assert choose_evictions([often, rare], 20, 10).victims == ("often",)
    often, rare = replace(often, steady=True), replace(rare, steady=True)
    assert choose_evictions([often, rare], 20, 10).victims == ("rare",)
    assert use_credit_ms(6, steady=True) == 6 * STEADY_CREDIT_MS_PER_USE
    # per byte: twice the size needs twice the uses
    assert use_credit_ms(6, 20, 10, steady=True) == use_credit_ms(3, steady=True)
