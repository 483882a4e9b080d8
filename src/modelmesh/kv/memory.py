"""The in-memory store: ``KVStore`` with etcd's semantics for a single process (single-node mode).

Layout, chosen so every operation is O(1) or O(log n) plus the size of its answer:
- ``_kvs`` maps key -> ``KeyValue``; ``_sorted_keys`` keeps the same keys sorted so a prefix is
  one bisect and a forward scan (a plain list: inserts move memory, which stays fast well past
  100,000 keys and keeps the code obvious);
- ``_history`` holds the most recent writes, one entry per revision, bounded by ``history_size``
  events. Revisions in it are contiguous, so the entry of revision ``r`` is found by arithmetic;
- a watch is a generator reading ``_history`` from its next revision. It waits for new writes on
  an ``asyncio.Event`` that every write sets and replaces, so waiting costs nothing, and a watch
  registers nothing: a generator that is closed or whose task is cancelled leaves no trace;
- leases expire on the injected ``Clock``: a small background task checks them, and tests on a
  ``FakeClock`` call ``expire_leases()`` themselves after ``clock.advance(...)``.

All state is changed by synchronous code between awaits, so each operation is atomic without a lock.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from modelmesh.clock import Clock, SystemClock
from modelmesh.errors import StoreUnavailable
from modelmesh.kv.base import (
    CasFailed,
    Compacted,
    EventKind,
    KeyValue,
    LeaseExpired,
    Listing,
    WatchEvent,
)

__all__ = ["DEFAULT_HISTORY_SIZE", "MemoryStore"]

DEFAULT_HISTORY_SIZE = 10_000
"""Watch events kept for watches that resume from a past revision."""

# Upper bound on how long the background check sleeps, so a lease granted or refreshed while it
# sleeps still expires at most this late (etcd's own lessor checks on a similar tick).
_EXPIRY_TICK_S = 0.5
# Lower bound, so a clock that does not move (a FakeClock) can never make the check spin.
_MIN_EXPIRY_SLEEP_S = 0.01


@dataclass(frozen=True, slots=True)
class _Revision:
    """The events of one write; a lease expiry deletes all its keys in a single revision."""

    revision: int
    events: tuple[WatchEvent, ...]


@dataclass(slots=True)
class _Lease:
    ttl_s: float
    deadline: float  # Clock.monotonic() seconds
    keys: set[str] = field(default_factory=set)


class MemoryStore:
    """``KVStore`` kept in this process's memory; see ``kv/base.py`` for the semantics.

    ``history_size`` bounds the watch events kept for watches that start in the past; a watch
    from an older revision raises ``Compacted``. After ``close()`` every operation raises
    ``StoreUnavailable`` and active watches end.
    """

    def __init__(
        self, clock: Clock | None = None, *, history_size: int = DEFAULT_HISTORY_SIZE
    ) -> None:
        if history_size < 1:
            raise ValueError(f"history_size must be at least 1, got {history_size}")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._history_size = history_size
        self._revision = 0
        self._kvs: dict[str, KeyValue] = {}
        self._sorted_keys: list[str] = []
        self._history: deque[_Revision] = deque()
        self._history_events = 0
        self._first_kept_revision = 1  # the oldest revision a watch may still start from
        self._changed = asyncio.Event()
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)  # 0 means "no lease" in KeyValue and put()
        self._expiry_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def revision(self) -> int:
        """The store's current revision (that of the last write; 0 before any)."""
        return self._revision

    # ---- reads -----------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._check_open()
        return self._kvs.get(key)

    async def list_prefix(self, prefix: str) -> Listing:
        self._check_open()
        items: list[KeyValue] = []
        for i in range(bisect.bisect_left(self._sorted_keys, prefix), len(self._sorted_keys)):
            key = self._sorted_keys[i]
            if not key.startswith(prefix):
                break
            items.append(self._kvs[key])
        return Listing(items=items, revision=self._revision)

    # ---- writes ----------------------------------------------------------------------------

    async def put(
        self, key: str, value: bytes, *, expected_revision: int | None = None, lease: int = 0
    ) -> int:
        self._check_open()
        if not isinstance(value, bytes):
            raise TypeError(f"values are bytes, got {type(value).__name__}")
        if lease:
            # Before the compare: checking the lease may expire others and delete their keys.
            self._live_lease(lease)
        self._check_expected(key, expected_revision)
        self._revision += 1
        revision = self._revision
        old = self._kvs.get(key)
        if old is None:
            bisect.insort(self._sorted_keys, key)
            create_revision = revision
        else:
            create_revision = old.create_revision
            self._detach_from_lease(old)
        self._kvs[key] = KeyValue(key, value, revision, create_revision, lease)
        if lease:
            self._leases[lease].keys.add(key)
        self._record(revision, (WatchEvent(EventKind.PUT, key, value, revision),))
        return revision

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        self._check_open()
        self._check_expected(key, expected_revision)
        if key not in self._kvs:
            return False  # like etcd, deleting nothing writes nothing and keeps the revision
        self._revision += 1
        self._record(self._revision, (self._remove(key, self._revision),))
        return True

    # ---- watches ---------------------------------------------------------------------------

    def watch_prefix(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of events under ``prefix`` from ``start_revision`` on, until ``close()``.

        Raises ``Compacted`` when ``start_revision`` is older than the kept history, also later
        if the consumer falls so far behind that the events it has not read are dropped.
        """
        if start_revision < 1:
            # etcd reads 0 as "from now"; refusing it keeps callers on the list-then-watch path.
            raise ValueError(f"start_revision must be at least 1, got {start_revision}")
        return self._watch(prefix, start_revision)

    async def _watch(
        self, prefix: str, next_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        self._check_open()
        while not self._closed:
            if next_revision < self._first_kept_revision:
                raise Compacted(
                    f"revision {next_revision} is no longer kept; the oldest kept is "
                    f"{self._first_kept_revision}",
                    self._first_kept_revision,
                )
            # Taken before reading the history: a write after the read sets this very event.
            changed = self._changed
            batch = [
                event
                for entry in self._entries_from(next_revision)
                for event in entry.events
                if event.key.startswith(prefix)
            ]
            next_revision = max(next_revision, self._revision + 1)
            if batch:
                yield batch
            else:
                await changed.wait()

    def _entries_from(self, revision: int) -> list[_Revision]:
        """History entries with revision >= ``revision`` (which must still be kept)."""
        count = self._revision + 1 - max(revision, self._first_kept_revision)
        if count <= 0:
            return []
        # Read from the right end: a live watch wants the last few entries of a long deque.
        entries = list(itertools.islice(reversed(self._history), count))
        entries.reverse()
        return entries

    def compact(self, revision: int) -> None:
        """Forget the history before ``revision``, as etcd's compaction does (keys stay)."""
        self._check_open()
        while self._history and self._history[0].revision < revision:
            self._forget_oldest()

    # ---- leases ----------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: float) -> int:
        self._check_open()
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl_s=ttl_s, deadline=self._clock.monotonic() + ttl_s)
        if self._expiry_task is None:
            self._expiry_task = asyncio.create_task(
                self._expire_periodically(), name="MemoryStore lease expiry"
            )
        return lease_id

    async def keepalive(self, lease: int) -> None:
        self._check_open()
        state = self._live_lease(lease)
        state.deadline = self._clock.monotonic() + state.ttl_s

    async def revoke_lease(self, lease: int) -> None:
        """Delete the lease and its keys; a lease that is already gone is not an error."""
        self._check_open()
        if lease in self._leases:
            self._drop_lease(lease)

    def expire_leases(self) -> list[int]:
        """Drop every lease whose TTL has run out on the clock, with its keys; return their ids.

        The background task calls this on its tick; tests on a FakeClock call it directly.
        """
        now = self._clock.monotonic()
        # A scan is fine: a store holds a lease per pod, not per key.
        expired = [lease_id for lease_id, state in self._leases.items() if state.deadline <= now]
        for lease_id in expired:
            self._drop_lease(lease_id)
        return expired

    async def _expire_periodically(self) -> None:
        while True:
            self.expire_leases()
            delay = _EXPIRY_TICK_S
            if self._leases:
                soonest = min(state.deadline for state in self._leases.values())
                delay = min(delay, soonest - self._clock.monotonic())
            await asyncio.sleep(max(delay, _MIN_EXPIRY_SLEEP_S))

    def _live_lease(self, lease: int) -> _Lease:
        # Expire first, so a lease past its TTL is never refreshed or attached to a new key just
        # because the background check has not run yet.
        self.expire_leases()
        state = self._leases.get(lease)
        if state is None:
            raise LeaseExpired(f"lease {lease} has expired or was revoked")
        return state

    def _drop_lease(self, lease: int) -> None:
        keys = self._leases.pop(lease).keys
        if not keys:
            return
        # Like etcd, all the lease's keys go in one revision.
        self._revision += 1
        revision = self._revision
        self._record(revision, tuple(self._remove(key, revision) for key in sorted(keys)))

    # ---- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the lease task and end active watches; later calls raise StoreUnavailable."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()  # wakes every waiting watch, which then sees _closed and returns
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
            self._expiry_task = None

    # ---- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the in-memory store is closed")

    def _check_expected(self, key: str, expected_revision: int | None) -> None:
        if expected_revision is None:
            return
        current = self._kvs.get(key)
        actual = current.mod_revision if current is not None else 0
        if actual != expected_revision:
            raise CasFailed(
                f"key {key!r} is at revision {actual}, expected {expected_revision}"
            )

    def _remove(self, key: str, revision: int) -> WatchEvent:
        old = self._kvs.pop(key)
        del self._sorted_keys[bisect.bisect_left(self._sorted_keys, key)]
        self._detach_from_lease(old)
        return WatchEvent(EventKind.DELETE, key, b"", revision)

    def _detach_from_lease(self, kv: KeyValue) -> None:
        if kv.lease:
            state = self._leases.get(kv.lease)
            if state is not None:
                state.keys.discard(kv.key)

    def _record(self, revision: int, events: tuple[WatchEvent, ...]) -> None:
        self._history.append(_Revision(revision, events))
        self._history_events += len(events)
        # Whole revisions are dropped so a watch never sees half of one; the newest always stays.
        while self._history_events > self._history_size and len(self._history) > 1:
            self._forget_oldest()
        self._changed.set()
        self._changed = asyncio.Event()

    def _forget_oldest(self) -> None:
        oldest = self._history.popleft()
        self._history_events -= len(oldest.events)
        self._first_kept_revision = oldest.revision + 1
