"""What the mesh policy is measured against, on the same trace, sizes and pod memory.

- **Ray Serve-style multiplexing**: each replica (pod) keeps an LRU cache of models (by bytes, the
  same capacity as the mesh's pods, where Ray counts models). A request goes to a replica that
  holds its model, the less loaded of two sampled holders (power of two choices over requests in
  flight, which Ray probes); when that one already has ``ray_max_ongoing`` requests in flight, or
  no replica holds the model, to the one with fewer models of two sampled replicas, which loads it.
- **Random placement**: a request goes to a random holder; a miss loads on a random pod (LRU).
- **Belady** (the offline optimum for the hit ratio, the bound): the whole cluster's memory as one
  cache, evicting the model whose next request is farthest away (the newcomer included, so a model
  used once is served and dropped). It sees the future, ignores pod boundaries and sizes in its
  choice, so it bounds what any placement over these pods can hit (with equal sizes exactly; with
  varied sizes it is the standard bound, not a proof).
"""

from __future__ import annotations

import heapq
import random
import time
from collections import OrderedDict, deque

from loadtest.sim.config import SimConfig
from loadtest.sim.tally import PolicyResult, Tally
from loadtest.sim.trace import Trace, next_uses

__all__ = ["LruPods", "run_belady", "run_random", "run_ray"]


class LruPods:
    """Per-pod LRU caches by bytes, and which pods hold each model."""

    def __init__(self, pods: int, capacity: int, sizes: list[int], tally: Tally, watched: int) -> None:
        self.caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(pods)]
        self.used = [0] * pods
        self.capacity = capacity
        self.sizes = sizes
        self.holders: dict[int, list[int]] = {}
        self.tally = tally
        self.watched = watched

    def touch(self, p: int, m: int) -> None:
        self.caches[p].move_to_end(m)

    def load(self, p: int, m: int, t: int) -> None:
        cache = self.caches[p]
        size = self.sizes[m]
        while self.used[p] + size > self.capacity and cache:
            victim, _ = cache.popitem(last=False)
            self.used[p] -= self.sizes[victim]
            holders = self.holders[victim]
            holders.remove(p)
            if not holders:
                del self.holders[victim]
            if victim == self.watched:
                self.tally.copies(t, len(holders))
        cache[m] = None
        self.used[p] += size
        holders = self.holders.setdefault(m, [])
        holders.append(p)
        self.tally.load(t)
        if m == self.watched:
            self.tally.copies(t, len(holders))


def run_ray(cfg: SimConfig, trace: Trace, sizes: list[int], capacity: int, tally: Tally) -> PolicyResult:
    started = time.perf_counter()
    pods = cfg.pods
    rng = random.Random(cfg.seed)
    cache = LruPods(pods, capacity, sizes, tally, trace.watched_model)
    in_flight = [0] * pods
    finishing: deque[tuple[int, int]] = deque()
    limit = cfg.ray_max_ongoing
    for t, m in zip(trace.times_ms.tolist(), trace.models.tolist()):
        while finishing and finishing[0][0] <= t:
            in_flight[finishing.popleft()[1]] -= 1
        holders = cache.holders.get(m)
        p = -1
        if holders:
            p = holders[rng.randrange(len(holders))]
            if len(holders) > 1:
                q = holders[rng.randrange(len(holders))]
                if in_flight[q] < in_flight[p]:
                    p = q
            if in_flight[p] >= limit:
                p = -1
        if p >= 0:
            hit = True
            cache.touch(p, m)
        else:
            a, b = rng.randrange(pods), rng.randrange(pods)
            p = a if (len(cache.caches[a]), in_flight[a]) <= (len(cache.caches[b]), in_flight[b]) else b
            hit = m in cache.caches[p]
            if hit:
                cache.touch(p, m)
            else:
                cache.load(p, m, t)
        in_flight[p] += 1
        finishing.append((t + cfg.service_ms, p))
        tally.request(t, p, hit)
    return tally.result("ray-style", time.perf_counter() - started)


def run_random(cfg: SimConfig, trace: Trace, sizes: list[int], capacity: int, tally: Tally) -> PolicyResult:
    started = time.perf_counter()
    rng = random.Random(cfg.seed)
    cache = LruPods(cfg.pods, capacity, sizes, tally, trace.watched_model)
    for t, m in zip(trace.times_ms.tolist(), trace.models.tolist()):
        holders = cache.holders.get(m)
        if holders:
            p = holders[rng.randrange(len(holders))]
            cache.touch(p, m)
            tally.request(t, p, True)
        else:
            p = rng.randrange(cfg.pods)
            cache.load(p, m, t)
            tally.request(t, p, False)
    return tally.result("random", time.perf_counter() - started)


def run_belady(cfg: SimConfig, trace: Trace, sizes: list[int], capacity: int, tally: Tally) -> PolicyResult:
    """Belady's MIN over the cluster's whole memory (``capacity`` x pods) as one cache."""
    started = time.perf_counter()
    total = capacity * cfg.pods
    following = next_uses(trace.models).tolist()
    cached: dict[int, int] = {}
    # (-next use, model): the farthest next use on top; entries whose next use moved are stale
    farthest: list[tuple[int, int]] = []
    used = 0
    for i, (t, m) in enumerate(zip(trace.times_ms.tolist(), trace.models.tolist())):
        nxt = following[i]
        hit = m in cached
        cached[m] = nxt
        heapq.heappush(farthest, (-nxt, m))
        if not hit:
            used += sizes[m]
            tally.load(t)
            while used > total:
                neg, victim = heapq.heappop(farthest)
                if cached.get(victim) == -neg:
                    del cached[victim]
                    used -= sizes[victim]
        tally.request(t, -1, hit)
    return tally.result("belady (bound)", time.perf_counter() - started, per_pod=False, copies=False)
