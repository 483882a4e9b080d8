"""What a policy counts while it replays a trace, and the figures it reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """One policy's figures over the measured window (after the warm-up)."""

    policy: str
    requests: int
    hit_ratio: float
    loads_per_min: float
    # max / mean of the pods' served requests (None when pods do not apply: Belady's one cache)
    imbalance: float | None
    # seconds from the watched model's start until it had its target copies (None: never)
    copies_s: float | None
    copies_target: int
    # requests no pod would load for (churn guard, nothing fits)
    refused: int
    wall_s: float


class Tally:
    """Counters for one run. Requests before ``measure_from_ms`` only warm the caches up."""

    def __init__(self, pods: int, measure_from_ms: int, end_ms: int, watched_from_ms: int, copies_target: int):
        self.measure_from_ms = measure_from_ms
        self.end_ms = end_ms
        self.served = [0] * pods
        self.requests = 0
        self.hits = 0
        self.loads = 0
        self.refused = 0
        self.watched_from_ms = watched_from_ms
        self.copies_target = copies_target
        self.watched_copies = 0
        self.copies_reached_ms: int | None = None

    def request(self, t: int, pod: int, hit: bool) -> None:
        if self.copies_reached_ms is None and t >= self.watched_from_ms and self.watched_copies >= self.copies_target:
            self.copies_reached_ms = t
        if t < self.measure_from_ms:
            return
        self.requests += 1
        if pod >= 0:
            self.served[pod] += 1
        if hit:
            self.hits += 1

    def refuse(self, t: int) -> None:
        if t >= self.measure_from_ms:
            self.requests += 1
            self.refused += 1

    def load(self, t: int) -> None:
        if t >= self.measure_from_ms:
            self.loads += 1

    def copies(self, t: int, count: int) -> None:
        """The watched model now has ``count`` copies."""
        self.watched_copies = count
        if self.copies_reached_ms is None and t >= self.watched_from_ms and count >= self.copies_target:
            self.copies_reached_ms = t

    def result(self, policy: str, wall_s: float, *, per_pod: bool = True, copies: bool = True) -> PolicyResult:
        minutes = max(self.end_ms - self.measure_from_ms, 1) / 60_000
        served = sum(self.served)
        imbalance = max(self.served) / (served / len(self.served)) if per_pod and served else None
        reached = self.copies_reached_ms
        return PolicyResult(
            policy=policy,
            requests=self.requests,
            hit_ratio=self.hits / self.requests if self.requests else 0.0,
            loads_per_min=self.loads / minutes,
            imbalance=imbalance,
            copies_s=(reached - self.watched_from_ms) / 1000 if copies and reached is not None else None,
            copies_target=self.copies_target,
            refused=self.refused,
            wall_s=wall_s,
        )
