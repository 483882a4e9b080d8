"""Loading models held nowhere into free space (``placement/proactive.py``): the rules and invariants."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from modelmesh.placement.proactive import plan_proactive_loads
from modelmesh.placement.view import ClusterView, InstanceView, ModelView

NOW = 1_700_000_000_000
SIZE = 100  # the default model size


def pod(iid, used=0, capacity=1000, slots=2, loading=0, **kw):
    return InstanceView(iid, capacity, used, used // SIZE, NOW - 60_000, loading_in_flight=loading,
                        loading_slots=slots, **kw)


def cluster(*pods):
    return ClusterView(tuple(pods), default_model_size_bytes=SIZE)


def model(mid, last_used, **kw):
    return ModelView(mid, "onnx", last_used_ms=last_used, **kw)


def plan(view, models, **kw):
    return plan_proactive_loads(view, models, now_ms=NOW, rng=random.Random(1), **kw)


def test_the_most_recently_used_come_first_and_only_as_many_as_fit_with_room_to_spare():
    # 1,000 bytes, 600 used: room for 3 more models of 100 and a spare one's room
    view = cluster(pod("a", used=600, slots=10))
    models = [model(f"m{i}", NOW - i * 1000) for i in range(6)]
    chosen = plan(view, reversed(models))
    assert [x.model_id for x in chosen.loads] == ["m0", "m1", "m2"]
    assert chosen.view.instances[0].used_bytes == 900  # projected: the spare room stays free


def test_no_pod_takes_more_than_its_free_loading_slots():
    view = cluster(pod("a", slots=2), pod("b", slots=3, loading=1))
    chosen = plan(view, [model(f"m{i}", NOW - i) for i in range(10)])
    by_pod = {}
    for load in chosen.loads:
        by_pod[load.instance_id] = by_pod.get(load.instance_id, 0) + 1
    assert by_pod == {"a": 2, "b": 2}


def test_a_full_cluster_loads_nothing_and_says_why():
    view = cluster(pod("a", used=950), pod("b", used=1000))
    chosen = plan(view, [model("m", NOW)])
    assert chosen.loads == () and "no pod has room to spare" in chosen.reason


def test_a_model_is_not_loaded_where_it_failed_or_that_is_too_large_for_the_room():
    view = cluster(pod("a"), pod("b", used=700))
    failed = model("bad", NOW, failed=frozenset({"a"}))
    big = model("big", NOW - 1, predicted_size_bytes=600)
    chosen = plan(view, [failed, big, model("ok", NOW - 2)])
    where = {x.model_id: x.instance_id for x in chosen.loads}
    assert where["bad"] == "b" and where["big"] == "a" and "ok" in where


def test_max_loads_bounds_a_run_and_shutting_down_pods_take_none():
    view = cluster(pod("a", slots=50, capacity=100_000), pod("b", slots=50, shutting_down=True))
    chosen = plan(view, [model(f"m{i}", NOW - i) for i in range(30)], max_loads=7)
    assert len(chosen.loads) == 7 and {x.instance_id for x in chosen.loads} == {"a"}


def test_loads_spread_over_pods_with_room():
    view = cluster(*(pod(i, slots=4, capacity=100_000) for i in "abcd"))
    chosen = plan(view, [model(f"m{i}", NOW - i) for i in range(8)])
    counts = [sum(1 for x in chosen.loads if x.instance_id == i) for i in "abcd"]
    assert counts == [2, 2, 2, 2]


pods_st = st.lists(
    st.tuples(st.integers(0, 2000), st.integers(1000, 3000), st.integers(1, 4), st.integers(0, 2)),
    min_size=1, max_size=6,
)
models_st = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 400)), min_size=0, max_size=25)


@settings(max_examples=200, deadline=None)
@given(pods_st, models_st)
def test_invariants(raw_pods, raw_models):
    pods = [pod(f"p{i}", used=min(u, c), capacity=c, slots=s, loading=min(l, s))
            for i, (u, c, s, l) in enumerate(raw_pods)]
    view = cluster(*pods)
    models = [model(f"m{i}", NOW - age, predicted_size_bytes=size) for i, (age, size) in enumerate(raw_models)]
    chosen = plan(view, models)
    sizes = {m.model_id: (m.predicted_size_bytes or SIZE) for m in models}
    ids = [x.model_id for x in chosen.loads]
    assert len(ids) == len(set(ids))
    by_id = {p.instance_id: p for p in pods}
    for iid, p in by_id.items():
        placed = [x.model_id for x in chosen.loads if x.instance_id == iid]
        # nothing evicted: everything placed fits with a default model's room to spare
        if placed:
            assert p.used_bytes + sum(sizes[m] for m in placed) + SIZE <= p.capacity_bytes
        assert len(placed) <= p.loading_slots - p.loading_in_flight
    # planned loads go in the order of last use
    last = {m.model_id: m.last_used_ms for m in models}
    assert [last[m] for m in ids] == sorted((last[m] for m in ids), reverse=True)
