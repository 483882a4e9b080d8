"""A local, always-current copy of every key under a store prefix: one listing, then a watch.

The request path reads these views (plain dicts), never the store. Writes made by this pod are
applied at once through ``remember``/``forget`` (the watch later brings the same revision and it is
ignored), so a pod sees its own writes immediately. When the watch falls behind the store's history
it re-lists; when the store is unreachable it keeps the last known state and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from modelmesh.errors import MeshError
from modelmesh.kv.base import Compacted, EventKind, KVStore, Listing, WatchEvent

log = logging.getLogger(__name__)

T = TypeVar("T")

# A listing that the store compacts away while it is being read in pages is read again this often.
_RELIST_ATTEMPTS = 3


def _listing_pages(store: KVStore, prefix: str) -> AsyncGenerator[Listing, None]:
    """The listing of ``prefix`` in pages at one revision when the store reads it so
    (``EtcdStore.list_prefix_pages``), else as one page. Decoding page by page means the raw
    listing of 10,000 records is never in memory at once, and the memory of one page is reused
    for the next: read whole, the listing left a pod about 0.7 KB per record larger after it was
    gone (1.5 KB per record in all, against 0.8 KB; ``loadtest/bench_registry.py``)."""
    pages = getattr(store, "list_prefix_pages", None)
    if pages is not None:
        return cast(AsyncGenerator[Listing, None], pages(prefix))

    async def whole() -> AsyncGenerator[Listing, None]:
        yield await store.list_prefix(prefix)

    return whole()


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    value: T
    revision: int


class PrefixView(Generic[T]):
    def __init__(self, store: KVStore, prefix: str, decode: Callable[[bytes], T], *, name: str) -> None:
        self._store = store
        self.prefix = prefix
        self._decode = decode
        self._name = name
        self._items: dict[str, Versioned[T]] = {}
        self._task: asyncio.Task[None] | None = None
        # keys deleted through this pod whose DELETE event has not come back yet: PUT events still
        # queued in the watch (older than the delete, since the watch delivers in revision order)
        # must not bring them back; the DELETE event itself ends the guard
        self._tombstones: set[str] = set()
        self.on_removed: list[Callable[[str], None]] = []
        self.on_changed: list[Callable[[str, T], None]] = []
        self.synced = asyncio.Event()

    # ---- reads

    def get(self, key: str) -> T | None:
        entry = self._items.get(key)
        return entry.value if entry else None

    def versioned(self, key: str) -> Versioned[T] | None:
        return self._items.get(key)

    def items(self) -> Iterator[tuple[str, T]]:
        return ((k, v.value) for k, v in list(self._items.items()))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    # ---- lifecycle

    async def start(self) -> None:
        revision = await self._relist()
        self._task = asyncio.create_task(self._watch(revision + 1), name=f"watch:{self._name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _read_all(self) -> tuple[dict[str, Versioned[T]], int]:
        fresh: dict[str, Versioned[T]] = {}
        revision = 0
        cut = len(self.prefix)
        decode = self._decode
        async with contextlib.aclosing(_listing_pages(self._store, self.prefix)) as pages:
            async for page in pages:
                revision = page.revision
                for kv in page.items:
                    try:
                        fresh[kv.key[cut:]] = Versioned(decode(kv.value), kv.mod_revision)
                    except (ValueError, KeyError, TypeError, AttributeError) as err:
                        log.error("%s: ignoring unreadable record %s: %s", self._name, kv.key, err)
        return fresh, revision

    async def _relist(self) -> int:
        for attempt in range(1, _RELIST_ATTEMPTS + 1):
            try:
                fresh, revision = await self._read_all()
                break
            except Compacted:
                if attempt == _RELIST_ATTEMPTS:
                    raise
                log.info("%s: the store compacted the listing while it was read; reading it again", self._name)
        gone = [k for k in self._items if k not in fresh]
        changed = [k for k, v in fresh.items() if (old := self._items.get(k)) is None or old.revision != v.revision]
        self._items = fresh
        self._tombstones.clear()
        for key in gone:
            self._notify_removed(key)
        for key in changed:
            self._notify_changed(key, fresh[key].value)
        self.synced.set()
        return revision

    async def _watch(self, start_revision: int) -> None:
        backoff = 0.2
        while True:
            try:
                async for batch in self._store.watch_prefix(self.prefix, start_revision):
                    backoff = 0.2
                    for event in batch:
                        self._apply(event)
                        start_revision = event.mod_revision + 1
                return  # the store closed
            except Compacted:
                log.warning("%s: watch fell behind the store's history; re-listing", self._name)
                try:
                    start_revision = await self._relist() + 1
                except MeshError as err:
                    log.warning("%s: re-list failed (%s); retrying", self._name, err)
                    await asyncio.sleep(backoff)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("%s: watch failed (%s); retrying in %.1f s", self._name, err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _apply(self, event: WatchEvent) -> None:
        key = event.key[len(self.prefix):]
        if event.kind is EventKind.DELETE:
            self._tombstones.discard(key)
        elif key in self._tombstones:
            return
        current = self._items.get(key)
        if current is not None and current.revision >= event.mod_revision:
            return
        if event.kind is EventKind.PUT:
            try:
                value = self._decode(event.value)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                log.error("%s: ignoring unreadable record %s: %s", self._name, event.key, err)
                return
            self._items[key] = Versioned(value, event.mod_revision)
            self._notify_changed(key, value)
        elif current is not None:
            del self._items[key]
            self._notify_removed(key)

    # ---- this pod's own writes

    def remember(self, key: str, value: T, revision: int) -> None:
        self._tombstones.discard(key)
        current = self._items.get(key)
        if current is None or current.revision < revision:
            self._items[key] = Versioned(value, revision)
            self._notify_changed(key, value)

    def forget(self, key: str, *, deleted: bool) -> None:
        """The key was deleted through this pod (``deleted``: the store really deleted it)."""
        if self._items.pop(key, None) is None:
            return  # its DELETE event came first: nothing left to guard against
        if deleted:
            self._tombstones.add(key)
        self._notify_removed(key)

    def _notify_removed(self, key: str) -> None:
        for callback in self.on_removed:
            try:
                callback(key)
            except Exception:
                log.exception("%s: on_removed callback failed for %s", self._name, key)

    def _notify_changed(self, key: str, value: T) -> None:
        for callback in self.on_changed:
            try:
                callback(key, value)
            except Exception:
                log.exception("%s: on_changed callback failed for %s", self._name, key)
