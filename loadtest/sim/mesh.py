"""The mesh policy: simulated pods that decide with the real ``modelmesh.placement`` functions.

What is real (imported and called as the mesh calls them):

- a cache miss: ``load.project_pending`` + ``load.choose_load_target`` over the pods' published
  records, the entry pod's own pending loads projected on top; then ``eviction.choose_evictions``
  (weighted by use) on the chosen pod, and ``eviction.churn_guard`` when turned on;
- a request for a model with copies: ``load.choose_copy`` (with one copy the answer is that copy),
  fed with the requests the entry pod has in flight to each pod, as ``mesh.py`` does, and each
  holder's published request rate (``CopyView.pod_rate_rpm``; the mesh does not pass it yet);
- each pod's published request rate: ``rates.RateMeter`` on the simulated clock, counting what
  ``mesh.py`` counts (requests entering the pod, and those forwarded to it); the pods start with
  the trace, so the meters scale their first minute up to a minute;
- every rate period (10 s): ``copies.RateWindow`` per copy and per model, ``copies.UseHistory``,
  ``copies.copy_targets`` (with the mean of the pods' published rates: ``mean_pod_rpm``, which
  the mesh does not pass yet), then ``copies.choose_new_copy_pods`` or
  ``copies.choose_copies_to_remove``.

What is simulated: requests enter at a random pod (a load balancer in front); every pod republishes
its record every ``publish_ms`` (the mesh checks every second and republishes when figures moved,
which a busy full pod's do), and an entry pod's pending loads count until then. A request occupies
its pod for ``service_ms``. Loads are instantaneous: the figures are about placement, not load
latency. Choices the mesh has not made yet, made here as stated:

- a copy's eviction credit counts, per byte (``typical_size_bytes``: the median model size):
  ``eviction="record"`` (the default, the rule the mesh is to follow) its own requests of the last
  minute, plus what the model's record carries (``eviction.carried_use``) from the copy evicted
  last: the pod that removes a copy writes the copy's recent uses (``RateWindow.recent_uses``)
  and the time into the record in the same write; and, on a pod whose counts fit their long-term
  rates (``eviction.PopularityFit``, updated every rate period from each copy's count against the
  long-term rate predicted at the period's start: ``eviction.fit_term``), the copy's long-term use
  (``eviction.long_use_rpm`` of a count decayed over 10 minutes, ``eviction.decayed_count``,
  counted at every request and carried by the record the same way) through ``eviction.steady_use``,
  with the steady (linear) credit; the models' counts start with the trace (their registration);
  ``"minute"``, the same without the long-term use (the rule before); ``"copy"``, its own requests only (what a pod
  counts alone, the rule before); ``"model"``, its share of its model's requests of the last minute
  anywhere, before its last eviction too (a continuously summed count per model: the bound of
  what a record could carry); ``"lru"``, nothing (plain least recently used, no size weighing);
- the LRU time a pod publishes is its first victim's eviction score, capped at now (see
  ``_publish``); a copy added for traffic starts with its share of that traffic as its use;
- the traffic of copies added in the last minute, which their pods' rates show only in part, is
  projected onto the view (``copies.project_traffic``).

A pod keeps its cache in eviction order (a heap of ``eviction.eviction_key``: score, then id) and
hands ``choose_evictions`` only the head of it plus the rest as one busy block, which gives the same
victims as the whole cache (``check_evictions=True`` verifies that on every eviction, for tests).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque

from loadtest.sim.config import SimConfig
from loadtest.sim.tally import PolicyResult, Tally
from loadtest.sim.trace import Trace
from modelmesh.placement.copies import (
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
from modelmesh.placement.eviction import (
    LONG_USE_TAU_MS,
    CachedModel,
    PopularityFit,
    carried_use,
    choose_evictions,
    churn_guard,
    decayed_count,
    eviction_score,
    fit_term,
    fits_the_test,
    long_use_rpm,
    steady_use,
)
from modelmesh.placement.load import choose_copy, choose_load_target, project_pending
from modelmesh.placement.view import ClusterView, CopyView, InstanceView, ModelView, PendingLoad
from modelmesh.rates import RateMeter

__all__ = ["EVICTION_INPUTS", "MeshSim", "run_mesh"]

# what a copy's eviction credit counts (see the module docstring): "record", its own requests of
# the last minute plus what the model's record carries from its last evicted copy, and its
# long-term use on a steady pod; "minute", the same without the long-term use; "copy", its own
# requests only; "model", its share of its model's requests of the last minute anywhere; "lru":
# nothing, plain least recently used
EVICTION_INPUTS = ("copy", "model", "record", "minute", "lru")

# a copy's state: [last used ms, eviction credit, loaded since ms, request rate rpm (the use its
# credit is for), long-term count, when it was counted, long-term rpm predicted at the last rate
# period (-1: none yet)]
_LAST, _CREDIT, _SINCE, _RPM, _LONG, _LONG_MS, _PREDICTED = 0, 1, 2, 3, 4, 5, 6
# a pod's published request rate counts the last minute
_RATE_SPAN_MS = 60_000
# pods tried for one request before it is refused (mesh.MAX_ROUTE_ATTEMPTS)
_ROUTE_ATTEMPTS = 3


class _SimClock:
    """The simulated time, for the mesh's RateMeter (a ``modelmesh.clock.Clock``)."""

    def __init__(self) -> None:
        self.ms = 0

    def now_ms(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.ms / 1000


class MeshSim:
    def __init__(self, cfg: SimConfig, sizes: list[int], capacity: int, *, eviction: str = "record",
                 check_evictions: bool = False) -> None:
        if eviction not in EVICTION_INPUTS:
            raise ValueError(f"eviction must be one of {EVICTION_INPUTS}, got {eviction!r}")
        self.cfg = cfg
        self.n_models = len(sizes)
        self.sizes = sizes
        self.capacity = capacity
        # "record" and "minute" both carry the minute's use in the record
        self.eviction = "record" if eviction == "minute" else eviction
        self.long_term = eviction == "record"
        self.weighted = eviction != "lru"
        self.check_evictions = check_evictions
        # eviction weighs use per byte against this size (the mesh: its typical predicted size)
        self.typical = cfg.size_median if self.weighted else 0
        pods = cfg.pods
        self.ids = [f"pod-{i:03d}" for i in range(pods)]
        self.index = {iid: i for i, iid in enumerate(self.ids)}
        self.mids = [f"m{m:06d}" for m in range(self.n_models)]
        self.rng = random.Random(cfg.seed)
        self.used = [0] * pods
        self.resident: list[dict[int, list[float]]] = [{} for _ in range(pods)]
        self.heaps: list[list[tuple[float, str, int]]] = [[] for _ in range(pods)]
        self.holders: dict[int, list[int]] = {}
        self.model_last_used = [0] * self.n_models
        # rate tracking, keyed pod * n_models + model
        self.period_hits: dict[int, int] = {}
        # a copy's own requests this period are its key's minus those of an earlier copy on the
        # same pod (evicted and loaded again within the period)
        self.hits_before_load: dict[int, int] = {}
        self.copy_windows: dict[int, RateWindow] = {}
        self.model_windows: dict[int, RateWindow] = {}
        # requests in the last minute (at the last rate period): per model, per copy
        self.model_used: dict[int, float] = {}
        self.copy_used: dict[int, float] = {}
        # each pod's published request rate, as mesh.py counts it: requests entering the pod,
        # plus those forwarded to it, over the last minute (the real RateMeter on the sim's clock)
        self.clock = _SimClock()
        self.meters = [RateMeter(self.clock) for _ in range(pods)]
        self.history: dict[int, UseHistory] = {}
        self.copies_changed: dict[int, int] = {}
        # copies whose rate (and so eviction credit) is not 0
        self.rated: set[int] = set()
        # requests in flight: (finish ms, entry pod, serving pod, copy key)
        self.in_flight: deque[tuple[int, int, int, int]] = deque()
        self.in_flight_copy: dict[int, int] = {}
        self.in_flight_pod = [0] * pods
        self.forwarded = [[0] * pods for _ in range(pods)]
        # each entry pod's view: the published records plus the loads it sent since
        self.entry_views: list[ClusterView] = []
        self.view = ClusterView(())
        self.pod_rpm = [0] * pods
        # the published view plus the copies placed since (pending loads and their traffic)
        self.copy_view = self.view
        # copies added for traffic: (when, pod, expected rpm), for a minute
        self.recent_copies: deque[tuple[int, str, float]] = deque()
        self.tally: Tally | None = None
        # eviction "record": each model's use as its record keeps it when a copy goes (count, ms),
        # and the copies still carrying some of it
        self.record_use: dict[int, tuple[float, int]] = {}
        self.carrying: set[int] = set()
        # long-term use: each model's record (count, when counted), each pod's fit and whether it
        # is steady, and when the models' counts started (their registration: the trace's start)
        self.record_long: dict[int, tuple[float, int]] = {}
        self.fits = [PopularityFit() for _ in range(pods)]
        self.steady = [False] * pods
        self.since_ms = 0
        # rate periods, and pods steady at each (for reports and tests)
        self.periods = 0
        self.steady_pod_periods = 0
        self.watched = -1
        self.evictions = 0

    # ------------------------------------------------------------------ the replay

    def run(self, trace: Trace, tally: Tally) -> None:
        self.tally = tally
        self.watched = trace.watched_model
        cfg = self.cfg
        times = trace.times_ms.tolist()
        models = trace.models.tolist()
        entries = random.Random(cfg.seed + 1)
        pods = cfg.pods
        next_tick = times[0] - times[0] % RATE_PERIOD_MS + RATE_PERIOD_MS if times else 0
        next_publish = times[0] if times else 0
        # the pods start with the trace: their rate meters count from its first request
        self.clock.ms = times[0] if times else 0
        self.meters = [RateMeter(self.clock) for _ in range(pods)]
        self.since_ms = times[0] if times else 0
        long_term = self.long_term
        exp = math.exp
        service = cfg.service_ms
        in_flight = self.in_flight
        resident = self.resident
        holders_of = self.holders
        for t, m in zip(times, models):
            while next_tick <= t:
                self._tick(next_tick)
                next_tick += RATE_PERIOD_MS
            if next_publish <= t:
                self._publish(t)
                next_publish = t + cfg.publish_ms
            while in_flight and in_flight[0][0] <= t:
                self._finish(in_flight.popleft())
            entry = entries.randrange(pods)
            self.clock.ms = t
            self.meters[entry].hit()
            holders = holders_of.get(m)
            if holders:
                hit = True
                if len(holders) == 1:
                    p = holders[0]
                else:
                    p = self._choose_copy(holders, m, entry, t)
            else:
                hit = False
                p = self._place(m, entry, t)
                if p < 0:
                    tally.refuse(t)
                    continue
            # serve on p
            st = resident[p][m]
            st[_LAST] = t
            if long_term:
                # eviction.decayed_count(count, counted_ms, t) + 1, inline (every request)
                st[_LONG] = st[_LONG] * exp((st[_LONG_MS] - t) / LONG_USE_TAU_MS) + 1.0
                st[_LONG_MS] = t
            heapq.heappush(self.heaps[p], (t + st[_CREDIT], self.mids[m], m))
            key = p * self.n_models + m
            self.period_hits[key] = self.period_hits.get(key, 0) + 1
            self.model_last_used[m] = t
            in_flight.append((t + service, entry, p, key))
            self.in_flight_copy[key] = self.in_flight_copy.get(key, 0) + 1
            self.in_flight_pod[p] += 1
            if entry != p:
                self.forwarded[entry][p] += 1
                self.meters[p].hit()
            tally.request(t, p, hit)

    def _finish(self, done: tuple[int, int, int, int]) -> None:
        _, entry, p, key = done
        left = self.in_flight_copy[key] - 1
        if left:
            self.in_flight_copy[key] = left
        else:
            del self.in_flight_copy[key]
        self.in_flight_pod[p] -= 1
        if entry != p:
            self.forwarded[entry][p] -= 1

    def _choose_copy(self, holders: list[int], m: int, entry: int, t: int) -> int:
        if self.cfg.copy_load == "global":
            known = self.in_flight_pod
        else:
            # as mesh.py: the requests this entry pod forwarded; its own copy counts as idle
            known = self.forwarded[entry]
        rates = self.pod_rpm
        copies = [CopyView(self.ids[h], known[h] if h != entry or self.cfg.copy_load == "global" else 0,
                           int(self.resident[h][m][_SINCE]), rates[h]) for h in holders]
        chosen = choose_copy(copies, local_instance=self.ids[entry], prefer_local=False, now_ms=t, rng=self.rng)
        return self.index[chosen]

    # ------------------------------------------------------------------ placement of a miss

    def _place(self, m: int, entry: int, t: int) -> int:
        view = self.entry_views[entry]
        model = ModelView(self.mids[m], "any", self.sizes[m], self.model_last_used[m])
        excluded: set[str] = set()
        for _ in range(_ROUTE_ATTEMPTS):
            decision = choose_load_target(view, model, now_ms=t, rng=self.rng, exclude=excluded)
            if decision.instance_id is None:
                return -1
            p = self.index[decision.instance_id]
            if self._refused_by_churn_guard(p, m, t) or not self._load(p, m, t):
                excluded.add(decision.instance_id)
                continue
            # projecting one load at a time adds up to projecting them all at once
            self.entry_views[entry] = project_pending(
                view, {decision.instance_id: [PendingLoad(self.mids[m], self.sizes[m], t)]})
            return p
        return -1

    def _refused_by_churn_guard(self, p: int, m: int, t: int) -> bool:
        timeout = self.cfg.churn_guard_timeout_ms
        if timeout <= 0:
            return False
        full = self.capacity - self.used[p] < self.sizes[m]
        victim = self._next_victim(p)
        oldest = int(self.resident[p][victim][_LAST]) if victim >= 0 else 0
        return churn_guard(oldest, t, timeout, full) is not None

    def _next_victim(self, p: int) -> int:
        """The model first in eviction order on ``p`` (stale heap entries dropped), or -1."""
        heap, res = self.heaps[p], self.resident[p]
        while heap:
            score, _, x = heap[0]
            st = res.get(x)
            if st is not None and st[_LAST] + st[_CREDIT] == score:
                return x
            heapq.heappop(heap)
        return -1

    def _load(self, p: int, m: int, t: int, rpm: float = 0.0) -> bool:
        """Make room on ``p`` with the real eviction decision, then add the copy. A copy added for
        traffic starts with its share of that traffic as its rate (``rpm``), so it is not the
        first eviction victim before its own rate window has counted a period (ModelMesh treats
        new copies as used slightly in the future for the same reason)."""
        size = self.sizes[m]
        if not self._make_room(p, m, size):
            return False
        if not rpm and self.eviction == "model":
            rpm = self.model_used.get(m, 0.0) / (len(self.holders.get(m, ())) + 1)
        elif self.eviction == "record" and m in self.record_use:
            count, counted_ms = self.record_use[m]
            carried = carried_use(count, counted_ms, t)
            if carried > 0:
                self.carrying.add(p * self.n_models + m)
                rpm += carried
        long = 0.0
        if self.long_term and m in self.record_long:
            long = decayed_count(*self.record_long[m], t)
            if self.steady[p]:
                rpm = steady_use(rpm, long_use_rpm(long, t, t, self.since_ms))
        credit = self._credit(rpm, m, p)
        self.resident[p][m] = [t, credit, t, rpm, long, t, -1.0]
        key = p * self.n_models + m
        if key in self.period_hits:
            self.hits_before_load[key] = self.period_hits[key]
        if rpm > 0:
            self.rated.add(p * self.n_models + m)
        heapq.heappush(self.heaps[p], (t + credit, self.mids[m], m))
        self.used[p] += size
        holders = self.holders.setdefault(m, [])
        holders.append(p)
        assert self.tally is not None
        self.tally.load(t)
        if m == self.watched:
            self.tally.copies(t, len(holders))
        return True

    def _make_room(self, p: int, m: int, size: int) -> bool:
        need = size - (self.capacity - self.used[p])
        heap, res = self.heaps[p], self.resident[p]
        head: list[CachedModel] = []
        popped: list[tuple[float, str, int]] = []
        seen: set[int] = set()
        idle_bytes = 0
        while idle_bytes < need and heap:
            entry = heapq.heappop(heap)
            score, mid, x = entry
            st = res.get(x)
            if st is None or x in seen or st[_LAST] + st[_CREDIT] != score:
                continue
            seen.add(x)
            popped.append(entry)
            busy = self.in_flight_copy.get(p * self.n_models + x, 0) > 0
            head.append(CachedModel(mid, self.sizes[x], int(st[_LAST]), busy, st[_RPM] if self.weighted else 0.0,
                                    steady=self.steady[p]))
            if not busy:
                idle_bytes += self.sizes[x]
        rest = self.used[p] - sum(c.size_bytes for c in head)
        cache = [*head, CachedModel("<rest of the cache>", rest, 0, busy=True)] if rest else head
        decision = choose_evictions(cache, self.capacity, size, typical_size_bytes=self.typical)
        if self.check_evictions:
            whole = choose_evictions(self._cached_models(p), self.capacity, size, typical_size_bytes=self.typical)
            assert whole.victims == decision.victims, (whole, decision)
        victims = set(decision.victims)
        for entry in popped:
            if entry[1] not in victims:
                heapq.heappush(heap, entry)
        for entry in popped:
            if entry[1] in victims:
                self._unload(p, entry[2])
                self.evictions += 1
        return decision.fits

    def _cached_models(self, p: int) -> list[CachedModel]:
        return [
            CachedModel(self.mids[x], self.sizes[x], int(st[_LAST]),
                        self.in_flight_copy.get(p * self.n_models + x, 0) > 0,
                        st[_RPM] if self.weighted else 0.0, steady=self.steady[p])
            for x, st in self.resident[p].items()
        ]

    def _credit(self, rpm: float, m: int, p: int) -> float:
        """What ``eviction_score`` adds to a last use for this rate on pod ``p`` (0 with plain LRU)."""
        if not self.weighted or rpm <= 0:
            return 0.0
        entry = CachedModel("", self.sizes[m], 0, request_rate_rpm=rpm, steady=self.steady[p])
        return eviction_score(entry, self.typical)

    def _own_hits(self, key: int) -> int:
        return self.period_hits.get(key, 0) - self.hits_before_load.get(key, 0)

    def _unload(self, p: int, m: int) -> None:
        if self.eviction == "record":
            # the record write that removes the copy also keeps its use: its requests of the
            # complete periods of the last minute and of the period being counted
            # (RateWindow.recent_uses), plus what it still carried from the record, and when
            key = p * self.n_models + m
            now = self.clock.ms
            window = self.copy_windows.get(key)
            count = (window.minute_rpm(now) if window else 0.0) + self._own_hits(key)
            if key in self.carrying:
                count += carried_use(*self.record_use[m], now)
                self.carrying.discard(key)
            self.record_use[m] = (count, now)
        if self.long_term:
            st = self.resident[p][m]
            self.record_long[m] = (decayed_count(st[_LONG], int(st[_LONG_MS]), self.clock.ms), self.clock.ms)
        del self.resident[p][m]
        self.rated.discard(p * self.n_models + m)
        self.used[p] -= self.sizes[m]
        holders = self.holders[m]
        holders.remove(p)
        if not holders:
            del self.holders[m]
        if m == self.watched:
            assert self.tally is not None
            self.tally.copies(0, len(holders))
        self.copy_windows.pop(p * self.n_models + m, None)

    # ------------------------------------------------------------------ records

    def _publish(self, t: int) -> None:
        """Every pod republishes its record; the loads pending against them are now in it."""
        instances = []
        for p, iid in enumerate(self.ids):
            victim = self._next_victim(p)
            # The LRU time of weighted eviction: the first victim's eviction score, capped at now.
            # Uncapped, a credit puts it in the future, and the few pods whose next victim has
            # no credit rank far ahead of the rest: they draw every miss until they republish
            # (max/mean pod load 3.7 at 100 pods, against 1.3 capped).
            if victim >= 0:
                st = self.resident[p][victim]
                lru = int(min(st[_LAST] + st[_CREDIT], t))
            else:
                lru = 0
            instances.append(InstanceView(
                iid, self.capacity, self.used[p], len(self.resident[p]), lru,
                request_rate_rpm=self.meters[p].rpm(),
            ))
        # copies added in the last minute show in their pods' rates only in part (a minute's count)
        while self.recent_copies and t - self.recent_copies[0][0] >= _RATE_SPAN_MS:
            self.recent_copies.popleft()
        unseen: dict[str, float] = {}
        for added_ms, iid, rpm in self.recent_copies:
            unseen[iid] = unseen.get(iid, 0.0) + rpm * (1 - (t - added_ms) / _RATE_SPAN_MS)
        view = ClusterView(tuple(instances), default_model_size_bytes=self.cfg.size_median)
        self.view = project_traffic(view, unseen)
        self.pod_rpm = [i.request_rate_rpm for i in self.view.instances]
        self.entry_views = [self.view] * len(self.ids)
        self.copy_view = self.view

    # ------------------------------------------------------------------ the rate period

    def _tick(self, now: int) -> None:
        n = self.n_models
        last_ms = now - 1
        model_hits: dict[int, int] = {}
        for key, hits in self.period_hits.items():
            own = hits - self.hits_before_load.get(key, 0)
            if own:
                self.copy_windows[key] = self.copy_windows.get(key, RateWindow()).add(last_ms, own)
            m = key % n
            model_hits[m] = model_hits.get(m, 0) + hits
        period_own = {key: hits - self.hits_before_load.get(key, 0) for key, hits in self.period_hits.items()}
        self.period_hits.clear()
        self.hits_before_load.clear()
        for m, hits in model_hits.items():
            self.model_windows[m] = self.model_windows.get(m, RateWindow()).add(last_ms, hits)
            self.history[m] = self.history.get(m, UseHistory()).record(last_ms)

        model_rpm: dict[int, float] = {}
        self.model_used = {}
        for m, window in list(self.model_windows.items()):
            if window.idle(now):
                del self.model_windows[m]
                continue
            model_rpm[m] = window.rpm(now)
            self.model_used[m] = window.minute_rpm(now)
        copy_used: dict[int, float] = {}
        for key, window in list(self.copy_windows.items()):
            p, m = divmod(key, n)
            if m not in self.resident[p] or window.idle(now):
                del self.copy_windows[key]
                continue
            copy_used[key] = window.minute_rpm(now)
        self.copy_used = copy_used

        # each copy's use for eviction, and so its credit: what it served in the last minute, or
        # (eviction "model") its share of what its model served anywhere in the last minute
        if self.eviction == "model":
            used = {}
            for m, count in self.model_used.items():
                holders = self.holders.get(m)
                if holders:
                    for p in holders:
                        used[p * n + m] = count / len(holders)
        elif self.eviction == "record":
            used = dict(copy_used)
            for key in list(self.carrying):
                p, m = divmod(key, n)
                count, counted_ms = self.record_use[m]
                carried = carried_use(count, counted_ms, now)
                if carried <= 0:
                    self.carrying.discard(key)
                else:
                    used[key] = used.get(key, 0.0) + carried
        else:
            used = copy_used
        if self.long_term:
            used = self._long_term_uses(now, used, period_own)
        for key in self.rated - used.keys():
            p, m = divmod(key, n)
            st = self.resident[p].get(m)
            if st is not None:
                st[_RPM] = 0.0
                st[_CREDIT] = 0.0
        for key, count in used.items():
            p, m = divmod(key, n)
            st = self.resident[p][m]
            st[_RPM] = count
            st[_CREDIT] = self._credit(count, m, p)
        self.rated = set(used)
        # the credits moved: rebuild each pod's eviction order
        for p, res in enumerate(self.resident):
            heap = [(st[_LAST] + st[_CREDIT], self.mids[x], x) for x, st in res.items()]
            heapq.heapify(heap)
            self.heaps[p] = heap
        self._copy_rules(now, model_rpm)

    def _long_term_uses(self, now: int, used: dict[int, float], period_own: dict[int, int]) -> dict[int, float]:
        """Each pod's fit after the period that ends at ``now`` (each copy's count in it against the
        long-term rate predicted at its start), then each copy's use: on a steady pod
        ``steady_use`` of its minute's use (``used``) and its long-term rate, else the minute's."""
        n = self.n_models
        out: dict[int, float] = {}
        since = self.since_ms
        for p, res in enumerate(self.resident):
            base = p * n
            terms, counted = 0.0, 0
            for x, st in res.items():
                if fits_the_test(len(self.holders[x]), st[_PREDICTED]):
                    terms += fit_term(period_own.get(base + x, 0), st[_PREDICTED], RATE_PERIOD_MS)
                    counted += 1
            fit = self.fits[p] = self.fits[p].add(terms, counted)
            steady = self.steady[p] = fit.steady
            self.steady_pod_periods += steady
            for x, st in res.items():
                minute = used.get(base + x, 0.0)
                long = st[_PREDICTED] = long_use_rpm(st[_LONG], int(st[_LONG_MS]), now, since)
                use = steady_use(minute, long) if steady else minute
                if use > 0:
                    out[base + x] = use
        self.periods += 1
        return out

    def _copy_rules(self, now: int, model_rpm: dict[int, float]) -> None:
        cfg = self.cfg
        fullness = sum(self.used) / (self.capacity * cfg.pods)
        mean_pod_rpm = sum(self.pod_rpm) / len(self.pod_rpm)
        for m, rpm in model_rpm.items():
            holders = self.holders.get(m)
            if not holders:
                continue
            view = CopyModelView(self.mids[m], len(holders), rpm, self.history.get(m, UseHistory()),
                                 copies_changed_ms=self.copies_changed.get(m, 0))
            decision = copy_targets(view, now_ms=now, threshold_rpm=cfg.threshold_rpm,
                                    cluster_fullness=fullness, cluster_size=cfg.pods, mean_pod_rpm=mean_pod_rpm,
                                    busiest_holder_rpm=max(self.pod_rpm[h] for h in holders))
            if decision.target_copies > len(holders):
                self._add_copies(m, decision.target_copies - len(holders), now, rpm)
            elif decision.target_copies < len(holders):
                self._remove_copies(m, len(holders) - decision.target_copies, now)

    def _add_copies(self, m: int, count: int, now: int, rpm: float) -> None:
        holders = self.holders[m]
        model = ModelView(self.mids[m], "any", self.sizes[m], self.model_last_used[m],
                          holders=frozenset(self.ids[h] for h in holders))
        share = rpm / (len(holders) + count)
        placed = choose_new_copy_pods(self.copy_view, model, count, now_ms=now, rng=self.rng, copy_rpm=share)
        self.copy_view = placed.view
        for iid in placed.instance_ids:
            if self._load(self.index[iid], m, now, share):
                self.copies_changed[m] = now
                self.recent_copies.append((now, iid, share))

    def _remove_copies(self, m: int, count: int, now: int) -> None:
        n = self.n_models
        copies = [HeldCopy(self.ids[h], self.copy_used.get(h * n + m, 0.0), self.in_flight_copy.get(h * n + m, 0))
                  for h in self.holders[m]]
        for iid in choose_copies_to_remove(copies, count).instance_ids:
            self._unload(self.index[iid], m)
            self.copies_changed[m] = now


def run_mesh(cfg: SimConfig, trace: Trace, sizes: list[int], capacity: int, tally: Tally, *,
             eviction: str = "record", name: str = "mesh") -> PolicyResult:
    started = time.perf_counter()
    MeshSim(cfg, sizes, capacity, eviction=eviction).run(trace, tally)
    return tally.result(name, time.perf_counter() - started)
