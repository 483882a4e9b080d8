"""Copy rules: rate tracking, how many copies, which to remove, where to add; and their invariants."""

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from modelmesh.placement.copies import (
    COOL_DOWN_MS,
    RATE_PERIOD_MS,
    CopyModelView,
    HeldCopy,
    RateWindow,
    UseHistory,
    choose_copies_to_remove,
    choose_new_copy_pods,
    copy_targets,
    project_traffic,
)
from modelmesh.placement.view import MIB, ClusterView, InstanceView, ModelView

NOW = 1_700_000_000_000
MIN = 60_000
T = 2000.0


def view(mid="m", copies=1, rpm=0.0, **kw):
    return CopyModelView(mid, copies, rpm, **kw)


def target(m, *, now=NOW, fullness=0.5, size=30, threshold=T):
    return copy_targets(m, now_ms=now, threshold_rpm=threshold, cluster_fullness=fullness, cluster_size=size)


# --- rate tracking ------------------------------------------------------------------------------

def test_rate_window_counts_complete_periods_only():
    w = RateWindow().add(NOW, 10)
    assert w.rpm(NOW) == 0.0
    # the period closes: 10 requests in 10 s is 60 rpm
    assert w.rpm(NOW + RATE_PERIOD_MS) == 60.0


def test_rate_window_rises_fast_and_falls_slowly():
    w = RateWindow()
    t = NOW - NOW % RATE_PERIOD_MS
    for i in range(6):
        w = w.add(t + i * RATE_PERIOD_MS, 100 if i < 5 else 0)
    # last period quiet: the minute's mean still counts
    assert w.rpm(t + 6 * RATE_PERIOD_MS) == 500 / 6 * 6
    burst = RateWindow(done=(0, 0, 0, 0, 0), period=t // RATE_PERIOD_MS).add(t, 600)
    # a burst shows at full strength at the end of its first complete period
    assert burst.rpm(t + RATE_PERIOD_MS) == 3600.0


def test_rate_window_forgets_after_a_minute():
    w = RateWindow().add(NOW, 50)
    assert w.idle(NOW + 7 * RATE_PERIOD_MS) and w.rpm(NOW + 7 * RATE_PERIOD_MS) == 0.0


def test_use_history_regular_use():
    h = UseHistory().record(NOW - 20 * MIN).record(NOW)
    assert h.regular(NOW) and h.regular(NOW + MIN)
    assert not UseHistory().record(NOW - 3 * MIN).record(NOW).regular(NOW)
    assert not UseHistory().record(NOW - 50 * MIN).record(NOW).regular(NOW)
    assert not h.regular(NOW + 5 * MIN)  # not used recently


# --- how many copies ----------------------------------------------------------------------------

def test_regular_use_gets_a_second_copy_unless_nearly_full():
    regular = UseHistory().record(NOW - 10 * MIN).record(NOW)
    d = target(view(history=regular))
    assert d.target_copies == 2 and "regularly" in d.reason
    assert target(view(history=regular), fullness=0.91).target_copies == 1
    # a model that is not loaded anywhere gets no copy from this rule
    assert target(view(copies=0, history=regular)).target_copies == 0


def test_scale_up_to_rpm_over_threshold_capped_at_a_third_of_the_cluster():
    assert target(view(rpm=T)).target_copies == 1
    assert target(view(rpm=T + 1)).target_copies == 2
    assert target(view(rpm=4 * T)).target_copies == 4
    # two copies carrying 1.5x each: 3 copies; exactly at the threshold each: no change
    assert target(view(copies=2, rpm=3 * T)).target_copies == 3
    assert target(view(copies=2, rpm=2 * T)).target_copies == 2
    assert target(view(copies=2, rpm=3 * T + 1)).target_copies == 4
    d = target(view(rpm=100 * T), size=30)
    assert d.target_copies == 10 and "third" in d.reason
    # a hot model may always have a second copy, however small the cluster
    assert target(view(rpm=100 * T), size=2).target_copies == 2
    assert target(view(rpm=100 * T), size=3).target_copies == 2
    assert target(view(rpm=100 * T), size=1).target_copies == 1


def test_min_copies_and_all_pods_override_upward():
    assert target(view(copies=0, min_copies=3)).target_copies == 3
    assert target(view(copies=1, min_copies=50), size=30).target_copies == 30
    d = target(view(copies=2, all_pods=True), size=7)
    assert d.target_copies == 7 and "every pod" in d.reason


def _cool(copies, rpm, **kw):
    return view(copies=copies, rpm=rpm, copies_changed_ms=NOW - COOL_DOWN_MS, **kw)


def test_scale_down_needs_space_cool_traffic_and_a_cool_down():
    # 3 copies, 2000 rpm: 2 copies would carry 1000 each, under 2/3 of 2000
    assert target(_cool(3, T), fullness=0.95).target_copies == 2
    assert target(_cool(3, T), fullness=0.94).target_copies == 3  # space is not needed
    assert target(_cool(3, 2.7 * T), fullness=0.99).target_copies == 3  # 1.35x threshold each
    recent = view(copies=3, rpm=T, copies_changed_ms=NOW - COOL_DOWN_MS + 1)
    assert target(recent, fullness=0.99).target_copies == 3
    # one step at a time, never the last copy, never below the minimum
    assert target(_cool(10, 0.0), fullness=1.0).target_copies == 9
    assert target(_cool(1, 0.0), fullness=1.0).target_copies == 1
    assert target(_cool(3, 0.0, min_copies=3), fullness=1.0).target_copies == 3


def test_a_model_at_4x_the_threshold_reaches_its_copies_within_two_periods():
    reached = _periods_to_reach(rpm=4 * T, start_offset_ms=3_700, cluster=30)
    assert reached is not None and reached <= 2


def _periods_to_reach(*, rpm, start_offset_ms, cluster, periods=3):
    """Traffic at ``rpm`` from ``start_offset_ms`` into a period, spread evenly over the model's
    copies (each with its own RateWindow); the copy rules run at the end of every period and the
    copies they ask for are added at once. Returns the number of periods from the burst's start
    to the tick at which the model has its target copies (the target for ``rpm``, less 1%: a
    period counts whole requests, so a rate a hair above a multiple of the threshold may count
    a hair below it)."""
    wanted = min(math.ceil(0.99 * rpm / T), max(1, cluster // 3))
    t0 = (NOW - NOW % RATE_PERIOD_MS) + start_offset_ms
    gap_ms = 60_000 / rpm
    windows = [RateWindow()]
    k, t = 0, float(t0)
    for p in range(1, periods + 1):
        tick = (t0 - t0 % RATE_PERIOD_MS) + p * RATE_PERIOD_MS
        while t < tick:
            i = k % len(windows)
            windows[i] = windows[i].add(int(t))
            k, t = k + 1, t + gap_ms
        total = sum(w.rpm(tick) for w in windows)
        d = copy_targets(view(copies=len(windows), rpm=total), now_ms=tick, threshold_rpm=T,
                         cluster_fullness=0.99, cluster_size=cluster)
        windows += [RateWindow()] * max(0, d.target_copies - len(windows))
        if len(windows) >= wanted:
            return math.ceil((tick - t0) / RATE_PERIOD_MS)
    return None


@settings(max_examples=60, deadline=None)
@given(st.floats(1.01, 8.0), st.integers(0, RATE_PERIOD_MS - 1), st.integers(3, 100))
def test_above_the_threshold_the_target_is_reached_within_two_periods(x, offset, cluster):
    reached = _periods_to_reach(rpm=x * T, start_offset_ms=offset, cluster=cluster)
    assert reached is not None and reached <= 2


models = st.builds(
    CopyModelView,
    st.just("m"),
    st.integers(0, 40),
    st.floats(0, 200_000, allow_nan=False),
    st.builds(UseHistory, st.just(NOW // MIN), st.integers(0, 2**64 - 1)),
    st.integers(0, 50),
    st.booleans(),
    st.integers(0, NOW),
)
knobs = st.fixed_dictionaries({
    "fullness": st.floats(0, 1.2, allow_nan=False),
    "size": st.integers(0, 120),
    "threshold": st.sampled_from([1.0, 100.0, 2000.0]),
})


@settings(max_examples=300, deadline=None)
@given(models, knobs)
def test_copy_target_invariants(m, k):
    d = target(m, **k)
    if k["size"] == 0:
        assert d.target_copies == m.copies
        return
    assert d.target_copies <= max(k["size"], 0)
    assert d.target_copies >= min(m.min_copies, k["size"])
    if m.all_pods:
        assert d.target_copies == k["size"]
    if m.copies >= 1:
        assert d.target_copies >= 1
        # one step down at a time (unless the cluster shrank below the copies)
        assert d.target_copies >= min(m.copies - 1, k["size"])
    assert target(m, **k) == d


@settings(max_examples=300, deadline=None)
@given(models, knobs, st.floats(0, 200_000, allow_nan=False))
def test_more_traffic_never_means_fewer_copies(m, k, more):
    from dataclasses import replace
    low = target(m, **k).target_copies
    high = target(replace(m, total_rpm=m.total_rpm + more), **k).target_copies
    assert high >= low


# --- which copies go ----------------------------------------------------------------------------

def held(iid, rpm=0.0, labels=()):
    return HeldCopy(iid, rpm, 0, frozenset(labels))


def test_remove_least_busy_never_the_last():
    copies = [held("a", 500), held("b", 10), held("c", 300)]
    assert choose_copies_to_remove(copies, 1).instance_ids == ("b",)
    assert choose_copies_to_remove(copies, 5).instance_ids == ("b", "c")
    assert choose_copies_to_remove([held("a")], 1).instance_ids == ()
    assert choose_copies_to_remove(copies, 5, min_copies=2).instance_ids == ("b",)


def test_remove_respects_pin_labels():
    copies = [held("gpu-1", 5, {"gpu"}), held("cpu-1", 900), held("gpu-2", 1, {"gpu"})]
    # the unpinned copy goes first even though it is the busiest
    assert choose_copies_to_remove(copies, 1, pin_labels=frozenset({"gpu"})).instance_ids == ("cpu-1",)
    # the last copy on a pinned pod stays
    two = [held("gpu-1", 5, {"gpu"}), held("cpu-1", 900)]
    assert choose_copies_to_remove(two, 1, pin_labels=frozenset({"gpu"})).instance_ids == ("cpu-1",)
    assert choose_copies_to_remove(copies, 2, pin_labels=frozenset({"gpu"})).instance_ids == ("cpu-1", "gpu-2")


@given(st.lists(st.builds(held, st.text(min_size=1, max_size=3), st.floats(0, 1e4),
                          st.sets(st.sampled_from(["gpu", "x"]))), max_size=8, unique_by=lambda c: c.instance_id),
       st.integers(0, 10), st.integers(0, 5), st.sets(st.sampled_from(["gpu", "x"])))
def test_removal_invariants(copies, count, min_copies, pin):
    d = choose_copies_to_remove(copies, count, min_copies=min_copies, pin_labels=frozenset(pin))
    left = [c for c in copies if c.instance_id not in d.instance_ids]
    assert len(d.instance_ids) <= count and len(set(d.instance_ids)) == len(d.instance_ids)
    if copies:
        assert len(left) >= min(len(copies), max(1, min_copies))
    pinned = [c for c in copies if frozenset(pin) <= c.labels]
    if pin and pinned:
        assert any(frozenset(pin) <= c.labels for c in left)
    assert choose_copies_to_remove(copies, count, min_copies=min_copies, pin_labels=frozenset(pin)) == d


# --- where new copies go ------------------------------------------------------------------------

def pod(iid, rpm=0, labels=(), used=10):
    return InstanceView(iid, 100 * MIB, used * MIB, used, NOW - MIN, request_rate_rpm=rpm,
                        labels=frozenset(labels), loading_slots=2)


def test_new_copies_go_to_distinct_quiet_pods_not_the_holders():
    cluster = ClusterView(tuple(pod(f"p{i}", rpm=5000 if i < 3 else 200) for i in range(8)))
    hot = ModelView("hot", "any", MIB, NOW, holders=frozenset({"p3"}))
    placed = choose_new_copy_pods(cluster, hot, 3, now_ms=NOW, rng=random.Random(1))
    assert len(placed.instance_ids) == 3 and len(set(placed.instance_ids)) == 3
    assert not set(placed.instance_ids) & {"p0", "p1", "p2", "p3"}


def test_copies_placed_in_one_round_count_their_traffic():
    # two quiet pods among busy ones: each hot model's copy takes one, then both look busy
    cluster = ClusterView(tuple(pod(f"p{i}", rpm=3000 if i < 6 else 1000) for i in range(8)))
    view = cluster
    placed = []
    for mid in ("a", "b", "c"):
        m = ModelView(mid, "any", MIB, NOW, holders=frozenset({"p0"}))
        p = choose_new_copy_pods(view, m, 1, now_ms=NOW, rng=random.Random(3), copy_rpm=1500)
        placed += p.instance_ids
        view = p.view
    assert sorted(placed[:2]) == ["p6", "p7"]
    rates = {i.instance_id: i.request_rate_rpm for i in view.instances}
    assert rates["p6"] >= 2500 and rates["p7"] >= 2500


def test_project_traffic():
    cluster = ClusterView((pod("a", rpm=100), pod("b", rpm=100)))
    out = project_traffic(cluster, {"a": 250.4, "zz": 9})
    assert [i.request_rate_rpm for i in out.instances] == [350, 100]
    assert project_traffic(cluster, {}) is cluster


def test_new_copies_honour_pin_labels_and_stop_when_no_pod_is_left():
    cluster = ClusterView((pod("a", labels={"gpu"}), pod("b"), pod("c", labels={"gpu"})))
    m = ModelView("m", "any", MIB, NOW, holders=frozenset({"a"}))
    placed = choose_new_copy_pods(cluster, m, 3, now_ms=NOW, rng=random.Random(0),
                                  required_labels=frozenset({"gpu"}))
    assert placed.instance_ids == ("c",) and "no pod for copy 2" in placed.reason


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(0, 6), st.integers(0, 2**32))
def test_new_copy_placement_invariants(pods, count, seed):
    cluster = ClusterView(tuple(pod(f"p{i}", rpm=(i * 37) % 900, used=(i * 13) % 90) for i in range(pods)))
    holders = frozenset(f"p{i}" for i in range(0, pods, 3))
    m = ModelView("m", "any", MIB, NOW, holders=holders)
    a = choose_new_copy_pods(cluster, m, count, now_ms=NOW, rng=random.Random(seed))
    assert len(a.instance_ids) <= count and len(set(a.instance_ids)) == len(a.instance_ids)
    assert not set(a.instance_ids) & holders
    assert len(a.instance_ids) == min(count, pods - len(holders))
    assert choose_new_copy_pods(cluster, m, count, now_ms=NOW, rng=random.Random(seed)) == a
