"""Load placement and copy choice: the ModelMesh candidate order, shortlist, load filter, type
constraints, pending loads (no hot spots), and their invariants as properties."""

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelmesh.placement.load import (
    CandidateOrder,
    allowed_rate_ratio,
    choose_copy,
    choose_load_target,
    filter_by_load,
    parse_type_constraints,
    project_pending,
    shortlist,
)
from modelmesh.placement.view import (
    MIB,
    ClusterView,
    CopyView,
    InstanceView,
    LabelConstraint,
    ModelView,
    PendingLoad,
    TypeConstraints,
)

NOW = 1_700_000_000_000
MIN = 60_000
CONSTRAINTS = parse_type_constraints('{"onnx": {"required": ["gpu"], "preferred": ["fast"]}}')


def pod(iid, *, cap=100, used=0, models=0, lru=0, slots=2, loading=0, rpm=0, labels=(), version="1",
        down=False):
    """An instance with sizes in MiB."""
    return InstanceView(
        iid, int(cap * MIB), int(used * MIB), models, lru, loading_in_flight=loading, loading_slots=slots,
        request_rate_rpm=rpm, labels=frozenset(labels), version=version, shutting_down=down,
    )


def model(mid="m", *, mtype="any", size=1, last_used=0, holders=(), failed=()):
    return ModelView(mid, mtype, int(size * MIB), last_used, frozenset(holders), frozenset(failed))


def cluster(*pods, constraints=CONSTRAINTS):
    return ClusterView(tuple(pods), MIB, constraints)


def choose(view, m=None, seed=0, **kw):
    return choose_load_target(view, m or model(), now_ms=NOW, rng=random.Random(seed), **kw)


def ranked(*pods, size=1, preferred=()):
    order = CandidateOrder.for_load(pods, needed_bytes=size * MIB, default_model_size_bytes=MIB,
                                    preferred=frozenset(preferred))
    return [p.instance_id for p in sorted(pods, key=order.key)]


# --- the order, one criterion at a time ---------------------------------------------------------

def test_not_shutting_down_first():
    assert ranked(pod("a", down=True), pod("b", used=99, models=50)) == ["b", "a"]


def test_preferred_labels_before_everything_else():
    assert ranked(pod("plain"), pod("fast", used=97, models=9, version="0", labels={"fast"}),
                  preferred={"fast"}) == ["fast", "plain"]


def test_newer_version_first_unless_full():
    assert ranked(pod("old"), pod("new", used=50, models=9, version="2")) == ["new", "old"]
    assert ranked(pod("old", version="1.9"), pod("new", version="1.10", models=3)) == ["new", "old"]
    # full, the newer pod loses its precedence to any pod with room
    assert ranked(pod("old"), pod("new", used=99, models=1, version="2")) == ["old", "new"]


def test_not_full_before_full_and_the_full_rule():
    # full: free below max(2 default sizes, the model's size)
    assert ranked(pod("tight", used=99), pod("roomy", used=90, models=40)) == ["roomy", "tight"]
    assert ranked(pod("a", used=95, models=1), pod("b", used=80, models=5), size=10) == ["b", "a"]


def test_among_full_oldest_lru_first():
    assert ranked(pod("recent", used=99, models=1, lru=NOW - MIN),
                  pod("stale", used=99, models=9, lru=NOW - 60 * MIN)) == ["stale", "recent"]


def test_then_fewest_models_most_free_oldest_lru_most_slots():
    assert ranked(pod("more", models=5), pod("fewer", models=4, used=50)) == ["fewer", "more"]
    assert ranked(pod("less", models=4, used=50), pod("more", models=4, used=10)) == ["more", "less"]
    assert ranked(pod("new", models=4, lru=NOW), pod("old", models=4, lru=NOW - MIN)) == ["old", "new"]
    assert ranked(pod("busy", loading=2), pod("idle", loading=0)) == ["idle", "busy"]


# --- shortlist and load filter ------------------------------------------------------------------

def _shortlist(*pods, now=NOW):
    order = CandidateOrder.for_load(pods, needed_bytes=MIB, default_model_size_bytes=MIB)
    return sorted(p.instance_id for p in shortlist(sorted(pods, key=order.key), order, now_ms=now))


def test_shortlist_with_room_keeps_a_quarter_of_the_space_and_125pct_of_the_models():
    best = pod("best", models=8, used=20)  # 80 free
    assert _shortlist(best, pod("ok", models=10, used=70), pod("many", models=11),
                      pod("cramped", models=9, used=80)) == ["best", "ok"]


def test_shortlist_when_full_keeps_lru_within_45s_or_10pct_of_its_age():
    def full(iid, lru):
        return pod(iid, used=99.5, models=3, lru=lru)
    best = NOW - 10 * MIN  # 10% of the age is 60 s
    assert _shortlist(full("a", best), full("b", best + 59_000), full("c", best + 61_000)) == ["a", "b"]
    best = NOW - MIN  # the 45 s floor applies
    assert _shortlist(full("a", best), full("b", best + 45_000), full("c", best + 46_000)) == ["a", "b"]


def test_shortlist_never_mixes_tiers():
    # "fast" is preferred: a plain pod never joins the shortlist however close it is
    pods = (pod("fast", models=4, labels={"fast"}), pod("plain", models=4))
    order = CandidateOrder.for_load(pods, needed_bytes=MIB, default_model_size_bytes=MIB,
                                    preferred=frozenset({"fast"}))
    assert [p.instance_id for p in shortlist(sorted(pods, key=order.key), order, now_ms=NOW)] == ["fast"]


def test_allowed_rate_ratio_grows_with_idle_time():
    assert allowed_rate_ratio(0) == pytest.approx(1.1)
    assert allowed_rate_ratio(5 * MIN) == pytest.approx(2.55)
    assert allowed_rate_ratio(10 * MIN) == allowed_rate_ratio(None) == pytest.approx(4.0)
    assert allowed_rate_ratio(-5) == pytest.approx(1.1)


def test_load_filter_drops_busy_pods_for_a_hot_model_only():
    pods = (pod("quiet", rpm=1000), pod("busy", rpm=3000))
    hot = {choose(cluster(*pods), model(last_used=NOW - 1000), seed=s).instance_id for s in range(20)}
    cold = {choose(cluster(*pods), model(last_used=0), seed=s).instance_id for s in range(20)}
    assert hot == {"quiet"} and cold == {"quiet", "busy"}
    # trickles below 100 rpm are noise
    assert len(filter_by_load([pod("a", rpm=0), pod("b", rpm=105)], 1.1)) == 2


# --- exclusions and reasons ---------------------------------------------------------------------

def test_nothing_fits_names_why():
    view = cluster(pod("a"), pod("b"), pod("c", labels={"cpu"}), pod("d", down=True), pod("e", cap=1))
    d = choose(view, model(mtype="onnx", size=2, holders={"a", "b"}))
    assert d.instance_id is None and d.candidates_considered == 0
    assert d.reason == "5 pods: 2 hold the model, 2 lack required label 'gpu', 1 is shutting down"
    assert choose(cluster(pod("e", cap=1, labels={"gpu"})), model(mtype="onnx", size=2)).reason == (
        "1 pod: 1 is too small for 2.0 MiB")
    assert choose(cluster()).reason == "no pods in the cluster"


def test_failed_and_excluded_pods_are_skipped_and_reported():
    view = cluster(pod("a"), pod("b"), pod("c"))
    d = choose(view, model(failed={"a"}), exclude=["b"])
    assert d.instance_id == "c" and d.candidates_considered == 1
    assert "1 failed to load it" in d.reason and "1 is excluded by the caller" in d.reason


def test_success_reason_describes_the_pick():
    d = choose(cluster(pod("a", models=3, used=10, rpm=40)))
    assert d.instance_id == "a"
    assert d.reason == "random pick among 1 of 1 near-best of 1 eligible (3 models, 90.0 MiB free, 40 rpm)"


def test_preferred_labels_win_when_eligible():
    view = cluster(pod("gpu", labels={"gpu"}), pod("gpu-fast", used=90, models=30, labels={"gpu", "fast"}))
    assert {choose(view, model(mtype="onnx"), seed=s).instance_id for s in range(10)} == {"gpu-fast"}
    # an ineligible preferred pod does not count
    assert choose(view, model(mtype="onnx", holders={"gpu-fast"})).instance_id == "gpu"


# --- no hot spots: pending loads ----------------------------------------------------------------

def test_project_pending_counts_size_model_and_slot():
    view = cluster(pod("a", used=10, models=2, loading=0), pod("b"))
    out = project_pending(view, {"a": [PendingLoad("x", 3 * MIB, NOW), PendingLoad("y", 0, NOW)],
                                 "gone": [PendingLoad("z", MIB, NOW)]})
    a = out.instances[0]
    assert (a.used_bytes, a.model_count, a.loading_in_flight, a.pending_loads) == (14 * MIB, 4, 2, 2)
    assert out.instances[1] == view.instances[1]
    assert project_pending(view, {}) is view


def _burst(view, *, routers, loads=50, track_pending=True, seed=7):
    """``loads`` concurrent misses spread over ``routers`` pods, all deciding from the same stale
    ``view``; each router learns only of its own choices, through its own pending map."""
    rng = random.Random(seed)
    pending: list[dict[str, list[PendingLoad]]] = [{} for _ in range(routers)]
    placed: Counter[str] = Counter()
    for i in range(loads):
        mine = pending[i % routers]
        seen = project_pending(view, mine) if track_pending else view
        d = choose_load_target(seen, model(f"m{i}"), now_ms=NOW, rng=rng)
        assert d.instance_id is not None
        mine.setdefault(d.instance_id, []).append(PendingLoad(f"m{i}", MIB, NOW))
        placed[d.instance_id] += 1
    return placed


EQUAL = cluster(*(pod(f"p{i}", models=10, used=40, lru=NOW - 30 * MIN) for i in range(3)))
# what records look like in practice: one pod a little ahead (fewer models) in a stale snapshot
ONE_AHEAD = cluster(pod("p0", models=2, used=40), pod("p1", models=3, used=40), pod("p2", models=3, used=40))


@pytest.mark.parametrize("view", [EQUAL, ONE_AHEAD], ids=["equal", "one-ahead"])
@pytest.mark.parametrize("routers", [1, 3])
def test_a_burst_spreads_within_20pct_of_even(view, routers):
    placed = _burst(view, routers=routers)
    assert sum(placed.values()) == 50
    assert all(abs(placed[p.instance_id] - 50 / 3) <= 0.2 * 50 / 3 for p in view.instances), placed


def test_without_pending_a_stale_view_piles_a_burst_onto_one_pod():
    # the ModelMesh hot spot: every decision sees p0 as best and nothing tells it otherwise
    assert _burst(ONE_AHEAD, routers=3, track_pending=False) == {"p0": 50}


def _uneven(placed):
    return any(abs(placed[f"p{i}"] - 50 / 3) > 0.2 * 50 / 3 for i in range(3))


def test_pending_beats_a_dice_roll_on_equal_pods():
    # on equal pods a random pick alone does not pile up, but strays past 20% in about half the bursts
    seeds = range(40)
    assert sum(_uneven(_burst(EQUAL, routers=3, track_pending=False, seed=s)) for s in seeds) >= 10
    assert sum(_uneven(_burst(EQUAL, routers=3, seed=s)) for s in seeds) == 0


def test_fewest_pending_loads_among_the_near_best_goes_first():
    # a stays first in the order with its pending load (9 models against 10), yet b is chosen
    view = project_pending(cluster(pod("a", models=8, slots=3), pod("b", models=10)),
                           {"a": [PendingLoad("x", MIB, NOW)]})
    assert [p.instance_id for p in sorted(view.instances, key=_order(view).key)] == ["a", "b"]
    assert {choose(view, seed=s).instance_id for s in range(10)} == {"b"}


def _order(view):
    return CandidateOrder.for_load(view.instances, needed_bytes=MIB, default_model_size_bytes=MIB)


# --- properties ---------------------------------------------------------------------------------

IDS = [f"p{i}" for i in range(6)]
LABELS = ["gpu", "fast", "arm"]


@st.composite
def instances(draw, iid):
    cap = draw(st.sampled_from([1, 4, 8, 16, 32]))
    return pod(
        iid, cap=cap, used=draw(st.integers(0, cap)), models=draw(st.integers(0, 20)),
        lru=draw(st.integers(NOW - 120 * MIN, NOW)), slots=draw(st.integers(1, 3)),
        loading=draw(st.integers(0, 3)), rpm=draw(st.sampled_from([0, 50, 500, 1000, 3000])),
        # each label on two pods in three, so required and preferred labels split the pods often
        labels={label for label in LABELS if draw(st.sampled_from([True, True, False]))},
        version=draw(st.sampled_from(["1", "2"])), down=draw(st.sampled_from([False, False, False, True])),
    )


views = st.lists(st.sampled_from(IDS), min_size=0, max_size=len(IDS), unique=True).flatmap(
    lambda ids: st.tuples(*(instances(i) for i in ids))
).map(lambda pods: cluster(*pods))
models = st.builds(
    model,
    mtype=st.sampled_from(["onnx", "any"]),
    size=st.sampled_from([0.5, 1, 4, 16]),
    last_used=st.sampled_from([0, NOW - 1000, NOW - 5 * MIN, NOW - 60 * MIN]),
    holders=st.frozensets(st.sampled_from(IDS), max_size=2),
    failed=st.frozensets(st.sampled_from(IDS), max_size=1),
)
excludes = st.frozensets(st.sampled_from(IDS), max_size=1)


def _eligible(view, m, exclude):
    required = view.constraints.for_type(m.model_type).required
    return [p for p in view.instances
            if p.instance_id not in m.holders | m.failed | exclude and not p.shutting_down
            and required <= p.labels and p.capacity_bytes >= m.predicted_size_bytes]


def _is_full(p, m):
    return p.free_bytes < max(m.predicted_size_bytes, 2 * MIB)


@settings(max_examples=200, deadline=None)
@given(views, models, excludes, st.integers(0, 2**32))
def test_invariants(view, m, exclude, seed):
    d = choose(view, m, seed=seed, exclude=exclude)
    eligible = _eligible(view, m, exclude)
    assert d.candidates_considered == len(eligible)
    assert d.reason
    if not eligible:
        assert d.instance_id is None
        return
    by_id = {p.instance_id: p for p in eligible}
    # only ever an eligible pod: not holding, failed, excluded, shutting down, unlabelled or too small
    assert d.instance_id in by_id
    chosen = by_id[d.instance_id]
    preferred = view.constraints.for_type(m.model_type).preferred

    def n_preferred(p):
        return len(preferred & p.labels)
    # preferred labels win whenever a pod with them is eligible
    assert n_preferred(chosen) == max(n_preferred(p) for p in eligible)
    # never a full pod when one with room (and as many preferred labels) fits
    if _is_full(chosen, m):
        assert all(_is_full(p, m) for p in eligible if n_preferred(p) == n_preferred(chosen))
    # same view, same seed, same choice
    assert choose(view, m, seed=seed, exclude=exclude) == d


@settings(max_examples=200, deadline=None)
@given(views, models, st.integers(0, 2**32))
def test_never_full_when_one_with_room_fits_without_preferences(view, m, seed):
    view = replace(view, constraints=TypeConstraints())
    d = choose(view, m, seed=seed)
    eligible = _eligible(view, m, frozenset())
    if any(not _is_full(p, m) for p in eligible):
        assert not _is_full(next(p for p in eligible if p.instance_id == d.instance_id), m)


@settings(max_examples=100, deadline=None)
@given(views, st.integers(0, 2**32))
def test_project_pending_moves_only_the_chosen_pod(view, seed):
    d = choose(view, seed=seed)
    if d.instance_id is None:
        return
    after = project_pending(view, {d.instance_id: [PendingLoad("m", MIB, NOW)]})
    for before_p, after_p in zip(view.instances, after.instances, strict=True):
        if before_p.instance_id != d.instance_id:
            assert after_p == before_p
            continue
        assert after_p.model_count == before_p.model_count + 1
        assert after_p.free_bytes == before_p.free_bytes - MIB
        assert after_p.free_loading_slots == before_p.free_loading_slots - 1
        assert after_p.pending_loads == 1


# --- type constraints ---------------------------------------------------------------------------

def test_parse_type_constraints():
    tc = parse_type_constraints(
        '{"onnx": {"required": ["gpu"], "preferred": ["fast"]}, "_default": {"preferred": ["cpu"]}}')
    assert tc.for_type("onnx") == LabelConstraint(frozenset({"gpu"}), frozenset({"fast"}))
    assert tc.for_type("sklearn") == LabelConstraint(frozenset(), frozenset({"cpu"}))
    assert parse_type_constraints({}) == parse_type_constraints("") == TypeConstraints()
    assert parse_type_constraints({"x": {}}).for_type("x") == LabelConstraint()


@pytest.mark.parametrize("raw, message", [
    ("{", "MM_TYPE_CONSTRAINTS is not valid JSON"),
    ("[]", "must be a JSON object of model type"),
    ('{"": {}}', "empty or non-string model type"),
    ('{"onnx": ["gpu"]}', "MM_TYPE_CONSTRAINTS['onnx'] must be an object"),
    ('{"onnx": {"requird": ["gpu"]}}', "unknown key 'requird'"),
    ('{"onnx": {"required": "gpu"}}', "['onnx']['required'] must be a list of label strings, got 'gpu'"),
    ('{"onnx": {"preferred": [1]}}', "['preferred'] must be a list of label strings"),
    ('{"onnx": {"required": [" "]}}', "contains an empty label"),
])
def test_parse_type_constraints_rejects_with_a_clear_message(raw, message):
    with pytest.raises(ValueError) as err:
        parse_type_constraints(raw)
    assert message in str(err.value)


# --- choose_copy --------------------------------------------------------------------------------

def copy(iid, in_flight, age_ms=10_000):
    return CopyView(iid, in_flight, NOW - age_ms)


def pick(copies, local="here", prefer_local=False, seed=0):
    return choose_copy(copies, local_instance=local, prefer_local=prefer_local, now_ms=NOW,
                       rng=random.Random(seed))


def test_choose_copy_picks_the_least_loaded():
    assert pick([copy("a", 3), copy("b", 1), copy("here", 2)]) == "b"


def test_choose_copy_avoids_fresh_copies_unless_all_are():
    assert pick([copy("old", 5), copy("fresh", 0, age_ms=500)]) == "old"
    assert pick([copy("a", 5, age_ms=100), copy("b", 1, age_ms=-50)]) == "b"


def test_choose_copy_ties_go_local_then_random():
    assert pick([copy("a", 1), copy("here", 1)]) == "here"
    picks = {pick([copy("a", 1), copy("b", 1)], seed=s) for s in range(20)}
    assert picks == {"a", "b"}
    assert pick([copy("a", 1), copy("b", 1)], seed=3) == pick([copy("b", 1), copy("a", 1)], seed=3)


def test_choose_copy_prefer_local():
    assert pick([copy("a", 0), copy("here", 9)], prefer_local=True) == "here"
    assert pick([copy("a", 0), copy("b", 9)], prefer_local=True) == "a"


def test_choose_copy_needs_a_copy():
    with pytest.raises(ValueError, match="at least one copy"):
        pick([])
