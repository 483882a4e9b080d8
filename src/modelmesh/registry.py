"""Model records in the store, and the pod's local view of them.

Keys: ``<prefix>/<service>/registry/<modelId>``, JSON values (``ModelRecord``), every write a
compare-and-set on the key's revision. The view (``watched.PrefixView``) is what the request path
reads; writes through this object show in it at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from modelmesh.errors import Conflict, ModelNotFound
from modelmesh.kv.base import CasFailed, KVStore
from modelmesh.types import ModelRecord
from modelmesh.watched import PrefixView

_CAS_ATTEMPTS = 20


def decode_record(raw: bytes | str) -> ModelRecord:
    """A record from the store as the pod keeps it (every record, in every pod): its model type
    string shared with every other record of that type, and ``last_used_ms`` the same int object
    as ``registered_ms`` when they are equal (as they are until the model is first used). The
    values are the same; 10,000 records take about 85 bytes less each."""
    record = ModelRecord.from_json(raw)
    info = record.info
    model_type = info.type
    if isinstance(model_type, str):
        shared = sys.intern(model_type)
        if shared is not model_type:
            # ModelInfo is frozen; this one was made just now and nothing else holds it yet.
            object.__setattr__(info, "type", shared)
    if record.last_used_ms == record.registered_ms:
        record.last_used_ms = record.registered_ms
    return record


@dataclass(frozen=True, slots=True)
class VersionedRecord:
    record: ModelRecord
    revision: int


class Registry:
    def __init__(self, store: KVStore, key_root: str) -> None:
        self._store = store
        self._prefix = f"{key_root}/registry/"
        self.view: PrefixView[ModelRecord] = PrefixView(store, self._prefix, decode_record, name="registry")
        # called with a model id when its record disappears (unregistered anywhere)
        self.on_removed: list[Callable[[str], None]] = self.view.on_removed

    # ---- view (request path: no store access)

    def cached(self, model_id: str) -> ModelRecord | None:
        return self.view.get(model_id)

    def items(self) -> Iterator[tuple[str, ModelRecord]]:
        return self.view.items()

    def __len__(self) -> int:
        return len(self.view)

    async def start(self) -> None:
        await self.view.start()

    async def close(self) -> None:
        await self.view.close()

    # ---- store (management path)

    def _key(self, model_id: str) -> str:
        return self._prefix + model_id

    async def get(self, model_id: str) -> VersionedRecord | None:
        kv = await self._store.get(self._key(model_id))
        if kv is None:
            return None
        record = decode_record(kv.value)
        self.view.remember(model_id, record, kv.mod_revision)
        return VersionedRecord(record, kv.mod_revision)

    async def create(self, model_id: str, record: ModelRecord) -> bool:
        """Store a new record; False when the id exists already."""
        try:
            revision = await self._store.put(self._key(model_id), record.to_json(), expected_revision=0)
        except CasFailed:
            return False
        self.view.remember(model_id, record, revision)
        return True

    async def update(
        self, model_id: str, change: Callable[[ModelRecord], ModelRecord | None]
    ) -> ModelRecord:
        """Read-modify-write with compare-and-set, retried on conflicts. ``change`` gets a fresh
        copy and returns the new record, or None to leave it as it is.

        The first attempt starts from the view's record and revision, not a store read: the
        compare-and-set fails if the store has moved on, and only then is the record read. A
        ``change`` that finds nothing to do is asked again on a fresh read (the view may be behind),
        so a write is never skipped on the view's word. This halves the store calls of a pod's copy
        changes (one Txn, not a Range and a Txn)."""
        from_view = True
        for _ in range(_CAS_ATTEMPTS):
            cached = self.view.versioned(model_id) if from_view else None
            from_view = False
            current = VersionedRecord(cached.value, cached.revision) if cached is not None else await self.get(model_id)
            if current is None:
                raise ModelNotFound(f"model '{model_id}' is not registered")
            updated = change(ModelRecord.from_json(current.record.to_json()))
            if updated is None:
                if cached is not None:
                    continue  # decided on the view's copy: decide again on the store's
                return current.record
            try:
                revision = await self._store.put(
                    self._key(model_id), updated.to_json(), expected_revision=current.revision
                )
            except CasFailed:
                continue
            self.view.remember(model_id, updated, revision)
            return updated
        raise Conflict(f"model '{model_id}' changed {_CAS_ATTEMPTS} times while being updated; try again")

    async def update_where(
        self,
        needs: Callable[[str, ModelRecord], bool],
        change: Callable[[str, ModelRecord], ModelRecord | None],
        model_ids: Iterable[str] | None = None,
    ) -> int:
        """:meth:`update` each record that ``needs`` picks from the view (every record, or those of
        ``model_ids``). ``change`` gets the fresh record under compare-and-set, so it decides again
        and may find nothing left to do; records unregistered meanwhile are skipped. Returns how
        many records were picked and written."""
        if model_ids is None:
            picked = list(self.view.items())
        else:
            picked = [(m, r) for m in list(model_ids) if (r := self.cached(m)) is not None]
        updated = 0
        for model_id, record in picked:
            if not needs(model_id, record):
                continue
            try:
                await self.update(model_id, lambda fresh, m=model_id: change(m, fresh))
                updated += 1
            except ModelNotFound:
                pass
        return updated

    async def delete(self, model_id: str) -> bool:
        deleted = await self._store.delete(self._key(model_id))
        self.view.forget(model_id, deleted=deleted)
        return deleted
