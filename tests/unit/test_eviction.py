from hypothesis import given
from hypothesis import strategies as st

from modelmesh.placement.eviction import CachedModel, choose_evictions


def m(mid, size, used, busy=False):
    return CachedModel(mid, size, used, busy)


def test_nothing_evicted_when_it_fits():
    d = choose_evictions([m("a", 40, 1)], 100, 60)
    assert d.fits and d.victims == ()


def test_least_recently_used_go_first_until_it_fits():
    cache = [m("new", 30, 30), m("old", 30, 10), m("mid", 30, 20)]
    d = choose_evictions(cache, 100, 40)
    assert d.fits and d.victims == ("old",)
    d = choose_evictions(cache, 100, 60)
    assert d.victims == ("old", "mid")


def test_size_decides_how_many_go():
    # one large old model frees enough; two small ones are kept
    cache = [m("big-old", 80, 1), m("small-a", 10, 5), m("small-b", 10, 6)]
    assert choose_evictions(cache, 100, 50).victims == ("big-old",)
    cache = [m("small-old", 10, 1), m("big-newer", 80, 5), m("small-b", 10, 6)]
    assert choose_evictions(cache, 100, 50).victims == ("small-old", "big-newer")


def test_busy_models_are_never_evicted():
    cache = [m("busy-old", 50, 1, busy=True), m("idle", 50, 9)]
    d = choose_evictions(cache, 100, 50)
    assert d.victims == ("idle",)


def test_nothing_evicted_when_it_cannot_fit_anyway():
    cache = [m("busy", 60, 1, busy=True), m("idle", 30, 2)]
    d = choose_evictions(cache, 100, 80)
    assert not d.fits and d.victims == () and "loading or serving" in d.reason


def test_larger_than_capacity():
    d = choose_evictions([], 100, 101)
    assert not d.fits and "whole capacity" in d.reason


entries = st.lists(
    st.builds(CachedModel, st.text(min_size=1, max_size=4), st.integers(1, 50), st.integers(0, 100), st.booleans()),
    max_size=12, unique_by=lambda e: e.model_id,
)


@given(entries, st.integers(1, 400))
def test_invariants(cache, needed):
    capacity = 300
    used = sum(e.size_bytes for e in cache)
    d = choose_evictions(cache, capacity, needed)
    by_id = {e.model_id: e for e in cache}
    assert all(not by_id[v].busy for v in d.victims)
    freed = sum(by_id[v].size_bytes for v in d.victims)
    if d.fits:
        assert capacity - used + freed >= needed
        # minimal: without the last victim it would not have fitted
        if d.victims:
            assert capacity - used + freed - by_id[d.victims[-1]].size_bytes < needed
        # the victims are the oldest idle ones
        idle = sorted((e for e in cache if not e.busy), key=lambda e: (e.last_used_ms, e.model_id))
        assert list(d.victims) == [e.model_id for e in idle[: len(d.victims)]]
    else:
        assert d.victims == ()
        idle_bytes = sum(e.size_bytes for e in cache if not e.busy)
        assert capacity - used + idle_bytes < needed or needed > capacity
    assert choose_evictions(cache, capacity, needed) == d
