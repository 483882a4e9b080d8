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
    "USE_CREDIT_MS",
    "USE_WINDOW_MS",
    "CachedModel",
    "carried_use",
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
# churn guard: a full pod refuses loads while its oldest entry is younger than
# CHURN_FACTOR x max(CHURN_MIN_MS, load timeout / 3) (ModelMesh's rule)
CHURN_FACTOR: Final = 10
CHURN_MIN_MS: Final = 3_000


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


def use_credit_ms(request_rate_rpm: float, size_bytes: int = 0, typical_size_bytes: int = 0) -> float:
    """What a copy's use adds to its last use in :func:`eviction_score`: ``USE_CREDIT_MS`` per
    doubling of its use, the use scaled by ``typical_size_bytes / size_bytes`` when both are known."""
    uses = request_rate_rpm
    if uses <= 0:
        return 0.0
    if typical_size_bytes > 0 and size_bytes > 0:
        uses *= typical_size_bytes / size_bytes
    return USE_CREDIT_MS * math.log2(1.0 + uses)


def eviction_score(entry: CachedModel, typical_size_bytes: int = 0) -> float:
    """The entry's last use, moved later by the credit for its traffic; the lowest goes first.
    ``typical_size_bytes`` (0: not known) weighs the traffic per byte (see the module docstring)."""
    if entry.request_rate_rpm <= 0:
        return float(entry.last_used_ms)
    return entry.last_used_ms + use_credit_ms(entry.request_rate_rpm, entry.size_bytes, typical_size_bytes)


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
