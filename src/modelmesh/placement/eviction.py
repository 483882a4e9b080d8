"""Which loaded models to unload so a new one fits."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CachedModel:
    """One model in a pod's cache, as eviction sees it."""

    model_id: str
    size_bytes: int
    last_used_ms: int
    # loading, or serving requests right now: never evicted
    busy: bool = False


@dataclass(frozen=True, slots=True)
class EvictionDecision:
    fits: bool
    victims: tuple[str, ...]
    reason: str


def choose_evictions(
    cache: Iterable[CachedModel], capacity_bytes: int, needed_bytes: int
) -> EvictionDecision:
    """Pick the least recently used idle models whose removal makes room for ``needed_bytes``.

    ``cache`` holds everything that takes space now, busy or not (a loading model weighs its
    predicted size). Victims are taken oldest first (ties by id, so the choice is deterministic)
    until the free space covers the need; busy models are skipped. When even evicting every idle
    model leaves too little room, nothing is evicted: a partial eviction would only destroy warm
    models without letting the new one in.
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
    idle = sorted((e for e in entries if not e.busy), key=lambda e: (e.last_used_ms, e.model_id))
    victims: list[str] = []
    for entry in idle:
        victims.append(entry.model_id)
        free += entry.size_bytes
        if needed_bytes <= free:
            return EvictionDecision(
                True, tuple(victims),
                f"evict {len(victims)} least recently used to free {needed_bytes} bytes",
            )
    busy_bytes = sum(e.size_bytes for e in entries if e.busy)
    return EvictionDecision(
        False, (),
        f"needs {needed_bytes} bytes; {capacity_bytes - used} free and {busy_bytes} held by models "
        f"that are loading or serving requests",
    )
