"""The rules that even out pods and keep what matters (issue 5's simulator gaps): the copy limit
relative to the mean pod, relief copies for busy pods, routing among copies by pod rate, eviction
weighed per byte with the use a model's record carries, and the rate meter's first minute."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from modelmesh.clock import FakeClock
from modelmesh.placement.copies import (
    COPY_POD_SHARE,
    RATE_PERIOD_MS,
    RELIEF_POD_RATIO,
    CopyModelView,
    RateWindow,
    copy_limit_rpm,
    copy_targets,
)
from modelmesh.placement.eviction import (
    USE_CREDIT_MS,
    USE_WINDOW_MS,
    CachedModel,
    carried_use,
    choose_evictions,
    eviction_score,
    use_credit_ms,
)
from modelmesh.placement.load import choose_copy
from modelmesh.placement.view import CopyView
from modelmesh.rates import RateMeter

NOW = 1_700_000_000_000
T = 2000.0
MEAN = 12_000.0  # a mean pod's published rate: its copy limit is 1,200 rpm


def targets(rpm, copies=1, **kw):
    kw.setdefault("cluster_fullness", 1.0)
    kw.setdefault("cluster_size", 100)
    return copy_targets(CopyModelView("m", copies, rpm), now_ms=NOW, threshold_rpm=T, **kw)


# --- the copy limit -----------------------------------------------------------------------------

def test_copy_limit_is_the_threshold_or_a_tenth_of_the_mean_pod_whichever_is_lower():
    assert copy_limit_rpm(T) == T
    assert copy_limit_rpm(T, 0.0) == T
    assert copy_limit_rpm(T, MEAN) == COPY_POD_SHARE * MEAN == 1200
    assert copy_limit_rpm(T, 100_000) == T


def test_a_model_that_is_a_large_part_of_a_pods_work_gets_copies():
    # 1,500 rpm: under the threshold, over a tenth of the mean pod
    assert targets(1500).target_copies == 1
    assert targets(1500, mean_pod_rpm=MEAN).target_copies == 2
    # 12,000 rpm: 10 copies of 1,200, where the threshold alone gives 6
    assert targets(12_000).target_copies == 6
    assert targets(12_000, mean_pod_rpm=MEAN).target_copies == 10


def test_scale_down_uses_the_same_limit():
    # 3 copies of 1,800 rpm: two would carry 900 each, under 2/3 of 2,000 but not of 1,200
    assert targets(1800, copies=3).target_copies == 2
    assert targets(1800, copies=3, mean_pod_rpm=MEAN).target_copies == 3


# --- relief copies ------------------------------------------------------------------------------

BUSY = RELIEF_POD_RATIO * MEAN * 1.01


def test_a_model_on_a_busy_pod_gets_one_more_copy():
    d = targets(600, mean_pod_rpm=MEAN, busiest_holder_rpm=BUSY)
    assert d.target_copies == 2 and "one more copy" in d.reason
    # a pod at the mean, or a model with too little traffic to matter: nothing
    assert targets(600, mean_pod_rpm=MEAN, busiest_holder_rpm=MEAN).target_copies == 1
    assert targets(100, mean_pod_rpm=MEAN, busiest_holder_rpm=BUSY).target_copies == 1
    # without the mean the rule is off
    assert targets(600, busiest_holder_rpm=BUSY).target_copies == 1


def test_relief_respects_the_scale_up_cap():
    # a third of 6 pods is 2 copies
    assert targets(900, copies=2, mean_pod_rpm=MEAN, busiest_holder_rpm=BUSY, cluster_size=6).target_copies == 2


def test_a_copy_on_a_busy_pod_is_not_scaled_down():
    assert targets(300, copies=2).target_copies == 1
    assert targets(300, copies=2, mean_pod_rpm=MEAN, busiest_holder_rpm=MEAN * 1.01).target_copies == 2


@settings(max_examples=200, deadline=None)
@given(rpm=st.floats(0, 200_000), copies=st.integers(1, 40), mean=st.floats(0, 50_000),
       busiest=st.floats(0, 100_000), size=st.integers(1, 120))
def test_targets_stay_within_the_eligible_pods_and_move_one_way(rpm, copies, mean, busiest, size):
    copies = min(copies, size)
    d = targets(rpm, copies=copies, mean_pod_rpm=mean, busiest_holder_rpm=busiest, cluster_size=size)
    assert 1 <= d.target_copies <= size
    # more copies only for traffic, fewer only by one
    assert d.target_copies >= copies - 1


# --- routing among copies by pod rate -----------------------------------------------------------

def copies_at(*rates, in_flight=0):
    return [CopyView(f"p{i}", in_flight, NOW - 10_000, int(r)) for i, r in enumerate(rates)]


def test_with_two_copies_the_quieter_pod_always_wins():
    rng = random.Random(1)
    picks = {choose_copy(copies_at(9000, 7000), local_instance="x", prefer_local=False, now_ms=NOW, rng=rng)
             for _ in range(50)}
    assert picks == {"p1"}


def test_the_busiest_pod_never_serves_and_the_rest_share():
    rng = random.Random(2)
    counts: dict[str, int] = {}
    for _ in range(3000):
        c = choose_copy(copies_at(8000, 9000, 10_000, 14_000), local_instance="x", prefer_local=False,
                        now_ms=NOW, rng=rng)
        counts[c] = counts.get(c, 0) + 1
    assert "p3" not in counts
    # power of two choices: the quietest wins every draw it is in (half of them), not all
    assert 1300 < counts["p0"] < 1700 and counts["p1"] > counts["p2"] > 0


def test_without_pod_rates_fewest_in_flight_wins_as_before():
    copies = [CopyView("a", 3, NOW - 10_000), CopyView("b", 1, NOW - 10_000)]
    assert choose_copy(copies, local_instance="x", prefer_local=False, now_ms=NOW, rng=random.Random(0)) == "b"


def test_prefer_local_and_warming_copies_still_come_first():
    copies = copies_at(20_000, 100)
    assert choose_copy(copies, local_instance="p0", prefer_local=True, now_ms=NOW, rng=random.Random(0)) == "p0"
    fresh = [CopyView("old", 0, NOW - 10_000, 20_000), CopyView("new", 0, NOW - 10, 100)]
    assert choose_copy(fresh, local_instance="x", prefer_local=False, now_ms=NOW, rng=random.Random(0)) == "old"


def test_same_inputs_same_copy():
    copies = copies_at(5000, 5100, 4900, 6000, 5050)
    a = [choose_copy(copies, local_instance="x", prefer_local=False, now_ms=NOW, rng=random.Random(7))
         for _ in range(3)]
    assert len(set(a)) == 1


# --- eviction per byte, and the use a record carries --------------------------------------------

def test_use_is_weighed_per_byte():
    typical = 1_000_000
    small = CachedModel("small", typical // 2, NOW, request_rate_rpm=3)
    big = CachedModel("big", typical * 2, NOW, request_rate_rpm=3)
    # without a typical size, equal use is equal credit
    assert eviction_score(small) == eviction_score(big) == NOW + 2 * USE_CREDIT_MS
    # per byte: the small model's 3 requests are worth 6 typical ones, the big one's 1.5
    assert use_credit_ms(3, typical // 2, typical) > use_credit_ms(3, typical, typical) > use_credit_ms(3, typical * 2, typical)
    d = choose_evictions([small, big], typical * 3, typical * 2, typical_size_bytes=typical)
    assert d.victims == ("big",)


def test_carried_use_fades_over_the_use_window():
    assert carried_use(10, NOW, NOW) == 10
    assert carried_use(10, NOW, NOW + USE_WINDOW_MS // 2) == 5
    assert carried_use(10, NOW, NOW + USE_WINDOW_MS) == 0
    assert carried_use(0, NOW, NOW) == 0
    # a record written "after" now (clocks of two pods) counts in full, never more
    assert carried_use(10, NOW + 500, NOW) == 10


def test_recent_uses_count_the_period_being_counted():
    w = RateWindow().add(NOW, 4).add(NOW + RATE_PERIOD_MS, 2)
    assert w.minute_rpm(NOW + RATE_PERIOD_MS) == 4
    assert w.recent_uses(NOW + RATE_PERIOD_MS) == 6


# --- the rate meter's first minute --------------------------------------------------------------

def test_a_new_meter_scales_its_first_minute_up_to_a_minute():
    clock = FakeClock()
    meter = RateMeter(clock)
    for _ in range(20):
        clock.advance(1)
        meter.hit(10)
    # 200 requests in 20 s: 600 a minute
    assert meter.rpm() == 600
    for _ in range(60):
        clock.advance(1)
        meter.hit(10)
    # after a minute, the plain count of the buckets kept
    assert 500 <= meter.rpm() <= 600


def test_relief_needs_a_pod_busier_by_a_hundred_rpm_too():
    # a mean pod at 1,000 rpm: the copy limit is 100, so 50 rpm is enough traffic for relief
    assert targets(50, mean_pod_rpm=1000.0, busiest_holder_rpm=1101.0).target_copies == 2
    # over 1.05x the mean but only 90 rpm above it: noise, not a hot spot
    assert targets(50, mean_pod_rpm=1000.0, busiest_holder_rpm=1090.0).target_copies == 1
    # 12 requests a minute on a pod beside a mean of 6 is no hot spot either
    assert targets(10, mean_pod_rpm=6.0, busiest_holder_rpm=12.0).target_copies == 1
