"""Which loaded models to unload so a new one fits, and when a full pod should refuse to load at all.

Eviction order is least recently used, weighted by use per byte. Each idle model gets an *eviction
score*, a last-use time moved later by a credit for its traffic, and the lowest score goes first::

    score = last_used_ms + USE_CREDIT_MS * log2(1 + uses * typical_size / size)

``uses`` is the copy's requests over the last minute (``request_rate_rpm``: ``RateWindow.minute_rpm``
in ``placement.copies``), plus what the model's record still carries from copies evicted in the
last minute (:func:`carried_use`), so the credit fades a minute after the traffic stops, an unused
model falls back to plain LRU, and a model evicted a moment ago comes back with its credit.
Every doubling of the use is worth another 15 s of recency: a model used every 5 s (12 rpm,
credit 56 s) outlives a model used once (1 rpm, credit 15 s) that happened to be used a few
seconds later, and among models with no traffic the order is exactly LRU. The logarithm keeps a
model at 2,000 rpm worth under 3 minutes, so a hot model that goes quiet soon leaves.

Per byte: ``typical_size`` (the pod's typical model size, when the caller passes it) over the
model's size scales the use, so a model twice the typical size needs twice the requests to keep
the same place: memory buys the most hits when it holds the most requests per byte.

Evidence (``python -m loadtest.sim``, memory for 10% of the models, Zipf 1.0; the figures are in
``docs/benchmarks.md``): 15 s beat 60 s, 4 min and plain LRU at 10 pods x 10,000 models, on steady
popularity and on a hot set that moves every 2 minutes (67.3% against 64.3% with 60 s: a large
credit keeps the last hot set for the minute its counts take to age out). At 30 pods x 30,000
models (the mesh's other rules as in the benchmark): weighing use per byte 77.5% -> 78.4% hits;
the use carried by the record 74.2% -> 78.7% (a copy's own count alone forgets, at each eviction,
everything the model did before; the LRU age there is seconds, so it forgets often); credits of
30 s and 60 s, or not counting a model's first request, within 0.1 point of 15 s.

**Steady popularity: long-term counts.** At the cache's edge a model is used a few times a minute,
and a minute's count of that is mostly noise (5 +- 2.2), so the order above is mostly recency.
Where popularity holds still, a longer count knows it far better; where it moves, a long count
remembers the wrong models. So each copy also keeps a *long-term use*: its requests decayed with a
time constant of :data:`LONG_USE_TAU_MS` (10 minutes), carried by the model's record through
evictions like ``carried_use`` (:func:`decayed_count`, :func:`long_use_rpm`), and each pod tests,
every rate period, whether its copies' counts fit their long-term rates as Poisson noise
(:func:`fit_term`, :class:`PopularityFit`: the mean Pearson chi-square of one period's count
against the rate predicted at its start, over the pod's single copies under
:data:`FIT_MAX_RPM`, averaged over about a minute, at most :data:`STEADY_CHI2_MAX`). While
it does, the pod is *steady*: a copy's use is its long-term rate unless its minute count is more
than :data:`STEADY_Z` standard deviations away from it (:func:`steady_use`: a model whose traffic
moved is judged on its minute), and the credit is linear in the use per byte,
:data:`STEADY_CREDIT_MS_PER_USE` a request per minute (:func:`use_credit_ms` with ``steady``):
the ranking by known rate per byte, which is what the cache should keep when rates are known.
Otherwise everything is as above.

Evidence (``python -m loadtest.sim``, memory for 10%, Zipf 1.0): at 100 pods x 100,000 models,
600 s measured after 300 s (``--duration-s 600 --warmup-s 300 --policies mesh,mesh-minute,belady``),
81.46% hits = 95.5% of Belady (85.29%) against 80.88% = 94.8% with the minute's counts alone,
111,195 loads a minute against 114,666, imbalance 1.04 both, the hot model's 25 copies in 10 s
both. In the default 100 s trace no pod turns steady (the fit needs a few minutes of counts):
the figures are the minute rule's, 94.3%. At 10 pods x 10,000 models, 1,200 s measured after
600 s: the minute's rule 77.0%, this rule 77.63%, the same credit fed the true rates (each
model's count over the whole trace) 77.76%. The chi-square per copy is about 1.0 on Zipf once
the counts have a few minutes; on a hot set that moves 1,000 ranks every 30 s it stays far above
(the pods' averaged clamped means 3.4-8) and the pods never turn steady,
so the shift trace gives exactly the minute rule's figures; a burst after the pods turned steady
did better (10 pods, burst at 400 s of 600 s: 78.8% against 78.3%). Tried and lost on the shift
trace (10 pods x 10,000 models, 180 s, where the minute's rule gets 66.35%): the larger of the
minute's and the long-term use (57.7% with the linear credit), the long-term use unless far
below the minute's (61.1-62.5%), the pod choosing by which of the two predicted its last period
better (a log-likelihood ratio: 64.1%, it chose the long-term use half the time): a count cannot
tell a model at 6 rpm that halves every 30 s from one that holds still; the whole pod's fit can.
Linear at 100 s a use beat 60 s a doubling by 0.03-0.06 point at 10 and 100 pods.

A model whose eviction would leave it below its minimum number of copies (``min_copies_pinned``)
is never a victim, like a busy one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CHURN_FACTOR",
    "CHURN_MIN_MS",
    "FIT_AVERAGING",
    "FIT_CLAMP",
    "FIT_FLOOR_RPM",
    "FIT_MAX_RPM",
    "LONG_USE_TAU_MS",
    "STEADY_CHI2_MAX",
    "STEADY_CREDIT_MS_PER_USE",
    "STEADY_Z",
    "USE_CREDIT_MS",
    "USE_WINDOW_MS",
    "CachedModel",
    "PopularityFit",
    "carried_use",
    "decayed_count",
    "fit_term",
    "fits_the_test",
    "long_use_rpm",
    "steady_use",
    "EvictionDecision",
    "choose_evictions",
    "churn_guard",
    "churn_threshold_ms",
    "eviction_key",
    "eviction_score",
    "use_credit_ms",
]

# recency credit per doubling of a copy's request rate (see the module docstring)
USE_CREDIT_MS: Final = 15_000
# a copy's use counts the requests of this last window (RateWindow.minute_rpm)
USE_WINDOW_MS: Final = 60_000
_MINUTE_MS: Final = 60_000
# churn guard: a full pod refuses loads while its oldest entry is younger than
# CHURN_FACTOR x max(CHURN_MIN_MS, load timeout / 3) (ModelMesh's rule)
CHURN_FACTOR: Final = 10
CHURN_MIN_MS: Final = 3_000

# steady popularity (see the module docstring): the long-term use's time constant
LONG_USE_TAU_MS: Final = 600_000
# a pod is steady while the mean chi-square per copy of its counts against their long-term rates
# (each term clamped at FIT_CLAMP, over single copies predicted under FIT_MAX_RPM, rates floored at
# FIT_FLOOR_RPM, averaged with weight FIT_AVERAGING per rate period: about a minute) is at most this
STEADY_CHI2_MAX: Final = 1.5
FIT_CLAMP: Final = 10.0
FIT_MAX_RPM: Final = 60.0
FIT_FLOOR_RPM: Final = 0.5
FIT_AVERAGING: Final = 5 / 6
# a pod starts unsteady: its fit starts at this chi-square
FIT_START: Final = FIT_CLAMP
# on a steady pod, a copy whose minute count is more than this many standard deviations from its
# long-term rate is judged on its minute count
STEADY_Z: Final = 2.5
# on a steady pod, the credit per request a minute (per typical byte)
STEADY_CREDIT_MS_PER_USE: Final = 100_000


@dataclass(frozen=True, slots=True)
class CachedModel:
    """One model in a pod's cache, as eviction sees it."""

    model_id: str
    size_bytes: int
    last_used_ms: int
    # loading, or serving requests right now: never evicted
    busy: bool = False
    # requests to this copy over the last minute, plus the model's use its record carries
    # (carried_use) when the copy is younger than a minute; 0 (unknown or unused) means plain LRU
    request_rate_rpm: float = 0.0
    # evicting this copy would take the model below its minimum copies, or off the last pod it is
    # pinned to: never evicted
    min_copies_pinned: bool = False
    # the pod's popularity is steady (PopularityFit.steady): request_rate_rpm is steady_use's
    # figure and the credit is linear in it
    steady: bool = False


@dataclass(frozen=True, slots=True)
class EvictionDecision:
    fits: bool
    victims: tuple[str, ...]
    reason: str


def carried_use(count: float, counted_ms: int, now_ms: int) -> float:
    """A model's use as its record carried it when its last copy went (``count`` requests in the
    minute before ``counted_ms``), as much of it as still falls in the last minute at ``now_ms``
    (the minute is taken as evenly used). A new copy adds this to its own count, so a model
    evicted a moment ago comes back with the credit it had, not as a stranger."""
    if count <= 0:
        return 0.0
    left = 1.0 - max(0, now_ms - counted_ms) / USE_WINDOW_MS
    return count * left if left > 0 else 0.0


def decayed_count(count: float, counted_ms: int, now_ms: int) -> float:
    """A long-term use ``count`` (requests, each weighing ``exp(-age / LONG_USE_TAU_MS)``) as of
    ``counted_ms``, decayed on to ``now_ms``. A copy counts a request as
    ``decayed_count(count, counted_ms, now) + 1`` at ``now``; the pod that removes a copy writes the
    decayed figure and the time into the model's record, and the next copy starts from it."""
    if count <= 0:
        return 0.0
    return count * math.exp(-max(0, now_ms - counted_ms) / LONG_USE_TAU_MS)


def long_use_rpm(count: float, counted_ms: int, now_ms: int, since_ms: int) -> float:
    """The long-term use as requests per minute at ``now_ms``: the decayed count over the time
    constant, corrected for a count that started ``since_ms`` (the model's registration) less than
    a few time constants ago (a count over ``age`` holds ``1 - exp(-age / tau)`` of a full one)."""
    decayed = decayed_count(count, counted_ms, now_ms)
    if decayed <= 0:
        return 0.0
    age = max(now_ms - since_ms, 1)
    return decayed * _MINUTE_MS / LONG_USE_TAU_MS / -math.expm1(-age / LONG_USE_TAU_MS)


def steady_use(minute_uses: float, long_rpm: float) -> float:
    """A copy's use on a steady pod: its long-term rate ``long_rpm``, unless its minute's count
    ``minute_uses`` is more than :data:`STEADY_Z` Poisson standard deviations from it (the model's
    traffic moved: a burst, or a hot model gone quiet), then the minute's count."""
    if abs(minute_uses - long_rpm) > STEADY_Z * math.sqrt(long_rpm + 1.0):
        return minute_uses
    return long_rpm


def fit_term(count: int, predicted_rpm: float, period_ms: int) -> float:
    """One copy's term of a pod's :class:`PopularityFit`: the Pearson chi-square of ``count``
    requests in a period of ``period_ms`` against the long-term rate ``predicted_rpm`` taken at the
    period's start (floored at :data:`FIT_FLOOR_RPM`), clamped at :data:`FIT_CLAMP` so that one
    model whose traffic moved cannot decide for the pod. About 1 when the rate holds still."""
    expected = max(predicted_rpm, FIT_FLOOR_RPM) * period_ms / _MINUTE_MS
    term = (count - expected) ** 2 / expected
    return term if term < FIT_CLAMP else FIT_CLAMP


@dataclass(frozen=True, slots=True)
class PopularityFit:
    """How well a pod's long-term counts predict its copies' traffic: the mean :func:`fit_term` of a
    rate period, averaged over periods (weight :data:`FIT_AVERAGING` on the past: about a minute).
    A pod starts unsteady (:data:`FIT_START`)."""

    chi2: float = FIT_START

    def add(self, terms: float, copies: int) -> PopularityFit:
        """The fit after a period whose ``copies`` terms summed to ``terms`` (none: unchanged)."""
        if copies <= 0:
            return self
        return PopularityFit(self.chi2 * FIT_AVERAGING + terms / copies * (1.0 - FIT_AVERAGING))

    @property
    def steady(self) -> bool:
        """Counts fit their long-term rates as Poisson noise: eviction may trust long-term use."""
        return self.chi2 <= STEADY_CHI2_MAX


def fits_the_test(copies: int, predicted_rpm: float) -> bool:
    """Whether a copy's count enters its pod's fit: its model has one copy (a share of a model's
    traffic moves with routing) and its long-term rate is under :data:`FIT_MAX_RPM` (the cache's
    edge, where the order is decided; a negative prediction means none yet)."""
    return copies == 1 and 0 <= predicted_rpm <= FIT_MAX_RPM


def use_credit_ms(request_rate_rpm: float, size_bytes: int = 0, typical_size_bytes: int = 0, *,
                  steady: bool = False) -> float:
    """What a copy's use adds to its last use in :func:`eviction_score`: ``USE_CREDIT_MS`` per
    doubling of its use, the use scaled by ``typical_size_bytes / size_bytes`` when both are known;
    on a steady pod, :data:`STEADY_CREDIT_MS_PER_USE` per request a minute (linear)."""
    uses = request_rate_rpm
    if uses <= 0:
        return 0.0
    if typical_size_bytes > 0 and size_bytes > 0:
        uses *= typical_size_bytes / size_bytes
    if steady:
        return STEADY_CREDIT_MS_PER_USE * uses
    return USE_CREDIT_MS * math.log2(1.0 + uses)


def eviction_score(entry: CachedModel, typical_size_bytes: int = 0) -> float:
    """The entry's last use, moved later by the credit for its traffic; the lowest goes first.
    ``typical_size_bytes`` (0: not known) weighs the traffic per byte (see the module docstring)."""
    if entry.request_rate_rpm <= 0:
        return float(entry.last_used_ms)
    return entry.last_used_ms + use_credit_ms(entry.request_rate_rpm, entry.size_bytes, typical_size_bytes,
                                              steady=entry.steady)


def eviction_key(entry: CachedModel, typical_size_bytes: int = 0) -> tuple[float, str]:
    """The eviction order, first victim first: score, then id so the choice is deterministic.
    Callers that keep their cache in this order (a heap) can hand :func:`choose_evictions` only
    its head and get the same victims."""
    return eviction_score(entry, typical_size_bytes), entry.model_id


def choose_evictions(
    cache: Iterable[CachedModel], capacity_bytes: int, needed_bytes: int, *, typical_size_bytes: int = 0
) -> EvictionDecision:
    """Pick the idle models with the lowest eviction score whose removal makes room for ``needed_bytes``.

    ``cache`` holds everything that takes space now, busy or not (a loading model weighs its
    predicted size). ``typical_size_bytes``, the pod's typical model size, weighs use per byte
    (0: per model). Victims are taken in :func:`eviction_key` order (plain least recently used
    when no entry has a request rate) until the free space covers the need; busy and pinned
    models are skipped. When even evicting every other model leaves too little room, nothing is
    evicted: a partial eviction would only destroy warm models without letting the new one in.
    """
    entries = list(cache)
    used = sum(e.size_bytes for e in entries)
    free = capacity_bytes - used
    if needed_bytes <= free:
        return EvictionDecision(True, (), f"fits: {needed_bytes} bytes needed, {free} free")
    if needed_bytes > capacity_bytes:
        return EvictionDecision(
            False, (),
            f"needs {needed_bytes} bytes, more than the runtime's whole capacity of {capacity_bytes}",
        )
    idle = sorted((e for e in entries if not e.busy and not e.min_copies_pinned),
                  key=lambda e: eviction_key(e, typical_size_bytes))
    weighted = any(e.request_rate_rpm > 0 for e in idle)
    victims: list[str] = []
    for entry in idle:
        victims.append(entry.model_id)
        free += entry.size_bytes
        if needed_bytes <= free:
            order = "least recently used, weighted by use," if weighted else "least recently used"
            return EvictionDecision(
                True, tuple(victims), f"evict {len(victims)} {order} to free {needed_bytes} bytes",
            )
    busy_bytes = sum(e.size_bytes for e in entries if e.busy)
    pinned_bytes = sum(e.size_bytes for e in entries if e.min_copies_pinned and not e.busy)
    pinned = f" and {pinned_bytes} by models at their minimum copies" if pinned_bytes else ""
    return EvictionDecision(
        False, (),
        f"needs {needed_bytes} bytes; {capacity_bytes - used} free, {busy_bytes} held by models "
        f"that are loading or serving requests{pinned}",
    )


def churn_threshold_ms(load_timeout_ms: int) -> int:
    """How young a full pod's oldest entry may be before it refuses loads: 10 x max(3 s, timeout / 3)."""
    return CHURN_FACTOR * max(CHURN_MIN_MS, load_timeout_ms // 3)


def churn_guard(
    oldest_last_used_ms: int, now_ms: int, load_timeout_ms: int, full: bool, *, threshold_ms: int | None = None
) -> str | None:
    """Why a load must be refused to stop a full pod from thrashing, or ``None`` to go ahead.

    A full pod whose first eviction victim was used less than :func:`churn_threshold_ms` ago
    would unload something still in use to load something else, and the next request for the
    victim would do the reverse: an endless load/evict cycle. Refusing (the mesh answers
    RESOURCE_EXHAUSTED with this reason) sheds the excess instead. ``oldest_last_used_ms`` is the
    last use of the entry that would be evicted first; 0 or less (nothing cached) never refuses.
    ``threshold_ms`` replaces ModelMesh's window (from the load timeout) when given.
    """
    if not full or oldest_last_used_ms <= 0:
        return None
    threshold = churn_threshold_ms(load_timeout_ms) if threshold_ms is None else threshold_ms
    age = now_ms - oldest_last_used_ms
    if age >= threshold:
        return None
    return (
        f"cache churn threshold exceeded: the pod is full and its oldest model was used "
        f"{age / 1000:.1f} s ago, under the {threshold / 1000:.0f} s a load may displace"
    )
