"""Request rates, cheap enough to count on every request.

A pod's published request rate (its instance record) counts every request it routes: those
entering it and those other pods forward to it. Per-copy rates (``placement.copies.RateWindow``)
drive copies and eviction. Publishing only what a pod's copies served instead was tried: the
simulator's load imbalance at 100 pods went from 1.51 to 3.15, because served rates lag a period
behind and quiet pods then draw every new load.
"""

from __future__ import annotations

from modelmesh.clock import Clock

_BUCKET_S = 10
_BUCKETS = 6  # one minute


class RateMeter:
    """Requests per minute over the last full minute, in 10-second buckets. ``hit`` is an
    integer add and an occasional bucket turn; ``rpm`` sums six ints."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._counts = [0] * _BUCKETS
        self._started = clock.monotonic()
        self._bucket = int(self._started) // _BUCKET_S

    def _turn(self) -> None:
        bucket = int(self._clock.monotonic()) // _BUCKET_S
        if bucket != self._bucket:
            for b in range(self._bucket + 1, min(bucket, self._bucket + _BUCKETS) + 1):
                self._counts[b % _BUCKETS] = 0
            self._bucket = bucket

    def hit(self, n: int = 1) -> None:
        self._turn()
        self._counts[self._bucket % _BUCKETS] += n

    def rpm(self) -> int:
        """The count of the last minute; in the meter's first minute, the count so far scaled to a
        minute (from 10 s on), so a new pod's rate is not a fraction of what it serves."""
        self._turn()
        total = sum(self._counts)
        age = self._clock.monotonic() - self._started
        if age < _BUCKET_S * _BUCKETS:
            return round(total * _BUCKET_S * _BUCKETS / max(age, _BUCKET_S))
        return total
