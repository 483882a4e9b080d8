"""Registry.update: compare-and-set from the view's copy, corrected by the store when the view is behind."""

from __future__ import annotations

import pytest

from modelmesh.clock import FakeClock
from modelmesh.kv.memory import MemoryStore
from modelmesh.registry import Registry
from modelmesh.types import ModelInfo, ModelRecord


def with_copy(pod: str):
    def change(record: ModelRecord) -> ModelRecord | None:
        if pod in record.copies:
            return None
        record.copies[pod] = 1
        return record
    return change


def without_copy(pod: str):
    def change(record: ModelRecord) -> ModelRecord | None:
        if pod not in record.copies:
            return None
        del record.copies[pod]
        return record
    return change


class CountingStore(MemoryStore):
    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.gets = 0

    async def get(self, key):
        self.gets += 1
        return await super().get(key)


@pytest.fixture
async def two_pods():
    """Two registries on one store; the second's view is frozen (its watch stopped), so it stays
    behind every write made through the first."""
    store = CountingStore(FakeClock())
    a, b = Registry(store, "mm/t"), Registry(store, "mm/t")
    await a.start()
    await a.create("m", ModelRecord(info=ModelInfo("onnx", "/m"), registered_ms=1))
    await b.start()
    await b.view.close()
    yield store, a, b
    await a.close()
    await store.close()


async def test_an_update_on_a_current_view_writes_without_reading_the_store(two_pods):
    store, a, _ = two_pods
    before = store.gets
    updated = await a.update("m", with_copy("pod-a"))
    assert updated.copies == {"pod-a": 1}
    assert store.gets == before
    assert (await a.get("m")).record.copies == {"pod-a": 1}


async def test_an_update_on_a_view_that_is_behind_lands_on_the_stores_record(two_pods):
    store, a, b = two_pods
    await a.update("m", with_copy("pod-a"))
    assert b.cached("m").copies == {}  # b has not seen it
    updated = await b.update("m", with_copy("pod-b"))
    assert updated.copies == {"pod-a": 1, "pod-b": 1}
    assert (await a.get("m")).record.copies == {"pod-a": 1, "pod-b": 1}


async def test_nothing_to_do_on_the_views_word_is_checked_against_the_store(two_pods):
    store, a, b = two_pods
    await a.update("m", with_copy("pod-b"))  # a copy b's view does not show
    await b.update("m", without_copy("pod-b"))
    assert (await a.get("m")).record.copies == {}
