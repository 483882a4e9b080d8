"""Model records in the store, and the pod's local view of them.

Keys: ``<prefix>/<service>/registry/<modelId>``, JSON values (``ModelRecord``), every write a
compare-and-set on the key's revision. The view is filled by one listing and kept current by a
watch, so the request path reads a dict and never the store. Writes made through this object are
applied to the view at once (the watch later brings the same revision and is ignored), so a model
registered through a pod can be used on that pod immediately.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from modelmesh.errors import Conflict, ModelNotFound
from modelmesh.kv.base import CasFailed, Compacted, EventKind, KVStore, WatchEvent
from modelmesh.types import ModelRecord

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class VersionedRecord:
    record: ModelRecord
    revision: int


class Registry:
    def __init__(self, store: KVStore, key_root: str) -> None:
        self._store = store
        self._prefix = f"{key_root}/registry/"
        self._view: dict[str, VersionedRecord] = {}
        self._watch_task: asyncio.Task[None] | None = None
        # ids deleted through this object whose DELETE event has not come back yet: older PUT
        # events still queued in the watch must not bring them back
        self._tombstones: set[str] = set()
        # called with a model id when its record disappears (unregistered anywhere)
        self.on_removed: list[Callable[[str], None]] = []

    # ---- view (request path: no store access)

    def cached(self, model_id: str) -> ModelRecord | None:
        entry = self._view.get(model_id)
        return entry.record if entry else None

    def items(self) -> Iterator[tuple[str, ModelRecord]]:
        return ((k, v.record) for k, v in self._view.items())

    def __len__(self) -> int:
        return len(self._view)

    # ---- lifecycle

    async def start(self) -> None:
        revision = await self._relist()
        self._watch_task = asyncio.create_task(self._watch(revision + 1), name="registry-watch")

    async def close(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            try:
                await self._watch_task
            except asyncio.CancelledError:
                pass
            self._watch_task = None

    async def _relist(self) -> int:
        listing = await self._store.list_prefix(self._prefix)
        fresh = {
            kv.key[len(self._prefix):]: VersionedRecord(ModelRecord.from_json(kv.value), kv.mod_revision)
            for kv in listing.items
        }
        gone = [k for k in self._view if k not in fresh]
        self._view = fresh
        for model_id in gone:
            self._notify_removed(model_id)
        return listing.revision

    async def _watch(self, start_revision: int) -> None:
        while True:
            try:
                async for batch in self._store.watch_prefix(self._prefix, start_revision):
                    for event in batch:
                        self._apply(event)
                        start_revision = event.mod_revision + 1
                return  # the store closed
            except Compacted:
                log.warning("registry watch fell behind the store's history; re-listing")
                start_revision = await self._relist() + 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry watch failed; retrying in 1 s")
                await asyncio.sleep(1.0)

    def _apply(self, event: WatchEvent) -> None:
        model_id = event.key[len(self._prefix):]
        if event.kind is EventKind.DELETE:
            self._tombstones.discard(model_id)
        elif model_id in self._tombstones:
            return
        current = self._view.get(model_id)
        if current is not None and current.revision >= event.mod_revision:
            return
        if event.kind is EventKind.PUT:
            self._view[model_id] = VersionedRecord(ModelRecord.from_json(event.value), event.mod_revision)
        elif current is not None:
            del self._view[model_id]
            self._notify_removed(model_id)

    def _notify_removed(self, model_id: str) -> None:
        for callback in self.on_removed:
            try:
                callback(model_id)
            except Exception:
                log.exception("on_removed callback failed for %s", model_id)

    # ---- writes (management path)

    def _key(self, model_id: str) -> str:
        return self._prefix + model_id

    async def get(self, model_id: str) -> VersionedRecord | None:
        kv = await self._store.get(self._key(model_id))
        if kv is None:
            return None
        return VersionedRecord(ModelRecord.from_json(kv.value), kv.mod_revision)

    async def create(self, model_id: str, record: ModelRecord) -> bool:
        """Store a new record; False when the id exists already."""
        try:
            revision = await self._store.put(self._key(model_id), record.to_json(), expected_revision=0)
        except CasFailed:
            return False
        self._remember(model_id, record, revision)
        return True

    async def update(
        self, model_id: str, change: Callable[[ModelRecord], ModelRecord | None]
    ) -> ModelRecord:
        """Read-modify-write with compare-and-set, retried on conflicts. ``change`` gets a fresh
        copy and returns the new record, or None to leave it as it is."""
        for _ in range(_CAS_ATTEMPTS):
            current = await self.get(model_id)
            if current is None:
                raise ModelNotFound(f"model '{model_id}' is not registered")
            updated = change(ModelRecord.from_json(current.record.to_json()))
            if updated is None:
                return current.record
            try:
                revision = await self._store.put(
                    self._key(model_id), updated.to_json(), expected_revision=current.revision
                )
            except CasFailed:
                continue
            self._remember(model_id, updated, revision)
            return updated
        raise Conflict(f"model '{model_id}' changed {_CAS_ATTEMPTS} times while being updated; try again")

    async def delete(self, model_id: str) -> bool:
        deleted = await self._store.delete(self._key(model_id))
        if deleted:
            self._tombstones.add(model_id)
        if model_id in self._view:
            del self._view[model_id]
            self._notify_removed(model_id)
        return deleted

    def _remember(self, model_id: str, record: ModelRecord, revision: int) -> None:
        self._tombstones.discard(model_id)
        current = self._view.get(model_id)
        if current is None or current.revision < revision:
            self._view[model_id] = VersionedRecord(record, revision)
