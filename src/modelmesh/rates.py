"""Request rates, cheap enough to count on every request."""

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
        self._bucket = int(clock.monotonic()) // _BUCKET_S

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
        self._turn()
        return sum(self._counts)
