"""PrefixView on a store that lists in pages (as ``EtcdStore.list_prefix_pages`` does): the view
is built page by page, a listing compacted away part-way is read again, and the registry's view
keeps records compactly (``registry.decode_record``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from modelmesh.kv.base import Compacted, Listing
from modelmesh.kv.memory import MemoryStore
from modelmesh.registry import Registry, decode_record
from modelmesh.types import ModelInfo, ModelRecord
from modelmesh.watched import PrefixView

pytestmark = pytest.mark.filterwarnings("error")

PREFIX = "mm/svc/things/"


class PagedStore(MemoryStore):
    """A MemoryStore that also lists in pages of ``page_keys``, all at one revision, and can
    report a compaction after the first page of its next ``compactions`` listings."""

    def __init__(self, page_keys: int) -> None:
        super().__init__()
        self.page_keys = page_keys
        self.compactions = 0
        self.pages_read: list[int] = []

    async def list_prefix_pages(self, prefix: str) -> AsyncGenerator[Listing, None]:
        listing = await self.list_prefix(prefix)
        items = listing.items
        for start in range(0, max(len(items), 1), self.page_keys):
            page = items[start:start + self.page_keys]
            self.pages_read.append(len(page))
            yield Listing(items=page, revision=listing.revision)
            if self.compactions and start + self.page_keys < len(items):
                self.compactions -= 1
                raise Compacted("compacted while listing", listing.revision)


@pytest.fixture
async def store() -> AsyncIterator[PagedStore]:
    store = PagedStore(page_keys=3)
    yield store
    await store.close()


async def start_view(store: PagedStore) -> PrefixView[int]:
    view: PrefixView[int] = PrefixView(store, PREFIX, int, name="things")
    await view.start()
    return view


async def test_the_view_is_built_from_every_page(store: PagedStore) -> None:
    for i in range(8):
        last = await store.put(f"{PREFIX}k{i}", str(i).encode())
    await store.put(f"{PREFIX}bad", b"junk")  # skipped, as in a single listing
    view = await start_view(store)
    try:
        assert dict(view.items()) == {f"k{i}": i for i in range(8)}
        assert store.pages_read == [3, 3, 3]
        # and it watches from after the listing's revision: a later write arrives
        await store.put(f"{PREFIX}k9", b"9")
        async with asyncio.timeout(2):
            while view.get("k9") is None:
                await asyncio.sleep(0.002)
        assert view.versioned("k7") is not None and view.versioned("k7").revision == last  # type: ignore[union-attr]
    finally:
        await view.close()


async def test_an_empty_paged_listing_gives_an_empty_synced_view(store: PagedStore) -> None:
    view = await start_view(store)
    try:
        assert len(view) == 0 and view.synced.is_set()
    finally:
        await view.close()


async def test_a_listing_compacted_part_way_is_read_again(store: PagedStore) -> None:
    for i in range(5):
        await store.put(f"{PREFIX}k{i}", str(i).encode())
    store.compactions = 1
    view = await start_view(store)
    try:
        assert dict(view.items()) == {f"k{i}": i for i in range(5)}
        assert store.pages_read == [3, 3, 2]  # one page, compacted; then the whole listing
    finally:
        await view.close()


async def test_a_listing_compacted_every_time_fails_the_start(store: PagedStore) -> None:
    for i in range(5):
        await store.put(f"{PREFIX}k{i}", str(i).encode())
    store.compactions = 10
    view: PrefixView[int] = PrefixView(store, PREFIX, int, name="things")
    with pytest.raises(Compacted):
        await view.start()


# ---- registry records as the view keeps them ------------------------------------------------------


def test_decoded_records_share_their_type_and_equal_timestamps() -> None:
    raw = [ModelRecord(ModelInfo("onnx", f"/m/{i}.onnx"), 1763856000000 + i, 1763856000000 + i).to_json()
           for i in range(3)]
    records = [decode_record(r) for r in raw]
    assert records == [ModelRecord.from_json(r) for r in raw]  # same values
    assert records[0].info.type is records[1].info.type is records[2].info.type
    assert all(r.last_used_ms is r.registered_ms for r in records)
    used = ModelRecord(ModelInfo("onnx", "/m/x.onnx"), 1, 2).to_json()
    assert (decode_record(used).registered_ms, decode_record(used).last_used_ms) == (1, 2)


async def test_the_registry_view_holds_decoded_records() -> None:
    store = MemoryStore()
    try:
        await store.put("mm/svc/registry/a", ModelRecord(ModelInfo("onnx", "/m/a.onnx"), 5, 5).to_json())
        registry = Registry(store, "mm/svc")
        await registry.start()
        try:
            record = registry.cached("a")
            assert record is not None and record.info == ModelInfo("onnx", "/m/a.onnx")
            assert record.last_used_ms is record.registered_ms
        finally:
            await registry.close()
    finally:
        await store.close()
