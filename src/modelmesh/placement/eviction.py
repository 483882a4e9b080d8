"""Which loaded models to unload so a new one fits, and when a full pod should refuse to load at all.

Eviction order is least recently used, weighted by use. Each idle model gets an *eviction score*,
a last-use time moved later by a credit for its traffic, and the lowest score goes first::

    score = last_used_ms + USE_CREDIT_MS * log2(1 + request_rate_rpm)

``request_rate_rpm`` is the copy's requests over the last minute (``RateWindow.minute_rpm`` in
``placement.copies``), so the credit fades a minute after the traffic stops and an unused model
falls back to plain LRU. Every doubling of the rate is worth another 15 s of recency: a model used
every 5 s (12 rpm, credit 56 s) outlives a model used once (1 rpm, credit 15 s) that happened to be
used a few seconds later, and among models with no traffic the order is exactly LRU. The logarithm
keeps a model at 2,000 rpm worth under 3 minutes, so a hot model that goes quiet soon leaves.

Why 15 s: in the simulator (``python -m loadtest.sim``, 10 pods x 10,000 models, memory for 10%)
it beat a credit of 60 s and 4 min, and plain LRU, both on steady Zipf popularity (72.5% hits, LRU
about 67%) and on popularity whose hot set moves every 2 minutes (67.3%, against 64.3% with 60 s:
a large credit keeps the last hot set for the minute its counts take to age out).

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
    "CachedModel",
    "EvictionDecision",
    "choose_evictions",
    "churn_guard",
    "churn_threshold_ms",
    "eviction_key",
    "eviction_score",
]

# recency credit per doubling of a copy's request rate (see the module docstring)
USE_CREDIT_MS: Final = 15_000
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
    # requests per minute to this copy over the last minute; 0 (unknown or unused) means plain LRU
    request_rate_rpm: float = 0.0
    # evicting this copy would take the model below its minimum copies, or off the last pod it is
    # pinned to: never evicted
    min_copies_pinned: bool = False


@dataclass(frozen=True, slots=True)
class EvictionDecision:
    fits: bool
    victims: tuple[str, ...]
    reason: str


def eviction_score(entry: CachedModel) -> float:
    """The entry's last use, moved later by the credit for its traffic; the lowest goes first."""
    if entry.request_rate_rpm <= 0:
        return float(entry.last_used_ms)
    return entry.last_used_ms + USE_CREDIT_MS * math.log2(1.0 + entry.request_rate_rpm)


def eviction_key(entry: CachedModel) -> tuple[float, str]:
    """The eviction order, first victim first: score, then id so the choice is deterministic.
    Callers that keep their cache in this order (a heap) can hand :func:`choose_evictions` only
    its head and get the same victims."""
    return eviction_score(entry), entry.model_id


def choose_evictions(
    cache: Iterable[CachedModel], capacity_bytes: int, needed_bytes: int
) -> EvictionDecision:
    """Pick the idle models with the lowest eviction score whose removal makes room for ``needed_bytes``.

    ``cache`` holds everything that takes space now, busy or not (a loading model weighs its
    predicted size). Victims are taken in :func:`eviction_key` order (plain least recently used
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
    idle = sorted((e for e in entries if not e.busy and not e.min_copies_pinned), key=eviction_key)
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
