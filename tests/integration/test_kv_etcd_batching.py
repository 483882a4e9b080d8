"""The etcd store's group commit and paged listings against a real etcd: concurrent gets and
compare-and-set puts leave as shared transactions yet each caller gets the answer it would have
got alone; listings read in pages see one revision. (``_Batcher`` alone: tests/unit/test_kv_batcher.py.)
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator

import pytest

from modelmesh.errors import StoreUnavailable
from modelmesh.kv import etcd as etcd_module
from modelmesh.kv.base import CasFailed, Compacted, EventKind, LeaseExpired
from modelmesh.kv.etcd import EtcdStore
from tests.etcd_server import EtcdServer

_prefixes: Iterator[int] = itertools.count()


@pytest.fixture
def prefix() -> str:
    return f"batch-{next(_prefixes)}/"


@pytest.fixture
async def store(etcd_server: EtcdServer) -> AsyncIterator[EtcdStore]:
    store = EtcdStore(etcd_server.endpoint, timeout_s=5.0)
    try:
        yield store
    finally:
        await store.close()


def batch_sizes(store: EtcdStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the put batches the store sends from now on (retries of parts included)."""
    sizes: list[int] = []
    real = store._cas_put_batch

    async def recorded(ops):  # type: ignore[no-untyped-def]
        sizes.append(len(ops))
        return await real(ops)

    monkeypatch.setattr(store, "_cas_put_batch", recorded)  # parts sent again
    monkeypatch.setattr(store._cas_puts, "_run", recorded)  # batches as they leave
    return sizes


async def test_concurrent_creates_share_transactions_and_each_gets_its_revision(
    store: EtcdStore, prefix: str
) -> None:
    keys = [f"{prefix}m{i:03d}" for i in range(60)]
    revisions = await asyncio.gather(*(store.put(k, k.encode(), expected_revision=0) for k in keys))
    assert len(set(revisions)) < len(keys)  # batched: writes of one transaction share a revision
    for k, rev in zip(keys, revisions, strict=True):
        kv = await store.get(k)
        assert kv is not None and kv.value == k.encode() and kv.mod_revision == rev
    # The watch brings every write, each at the revision its caller was told.
    events = []
    async with asyncio.timeout(5):
        async for batch in store.watch_prefix(prefix, min(revisions)):
            events.extend(batch)
            if len(events) >= len(keys):
                break
    assert sorted((e.key, e.mod_revision) for e in events) == sorted(zip(keys, revisions, strict=True))
    assert all(e.kind is EventKind.PUT for e in events)


async def test_concurrent_gets_answer_each_key(store: EtcdStore, prefix: str) -> None:
    await store.put(prefix + "a", b"1")
    await store.put(prefix + "b", b"2")
    found = await asyncio.gather(*(store.get(prefix + name) for name in ("a", "missing", "b", "a")))
    assert [kv.value if kv else None for kv in found] == [b"1", None, b"2", b"1"]


async def test_a_failed_compare_fails_only_its_own_put(
    store: EtcdStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = await store.put(prefix + "taken", b"old")
    current = await store.put(prefix + "upd", b"v1")
    sizes = batch_sizes(store, monkeypatch)
    results = await asyncio.gather(
        store.put(prefix + "new-1", b"x", expected_revision=0),
        store.put(prefix + "taken", b"x", expected_revision=0),  # exists: fails
        store.put(prefix + "upd", b"v2", expected_revision=current),  # right revision: succeeds
        store.put(prefix + "new-2", b"x", expected_revision=0),
        store.put(prefix + "stale", b"x", expected_revision=current),  # absent: fails
        return_exceptions=True,
    )
    assert isinstance(results[1], CasFailed) and f"is at revision {taken}, expected 0" in str(results[1])
    assert isinstance(results[4], CasFailed) and f"is at revision 0, expected {current}" in str(results[4])
    for i, name, value in ((0, "new-1", b"x"), (2, "upd", b"v2"), (3, "new-2", b"x")):
        assert isinstance(results[i], int), results[i]
        kv = await store.get(prefix + name)
        assert kv is not None and (kv.value, kv.mod_revision) == (value, results[i])
    kv = await store.get(prefix + "taken")
    assert kv is not None and kv.value == b"old"
    assert sizes == [5, 3]  # all five together; then the three whose compares held, again


async def test_two_creates_of_one_key_at_once_make_one_winner(store: EtcdStore, prefix: str) -> None:
    results = await asyncio.gather(
        *(store.put(prefix + "same", f"{i}".encode(), expected_revision=0) for i in range(4)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1 and sum(isinstance(r, CasFailed) for r in results) == 3


async def test_a_dead_lease_fails_only_the_put_that_uses_it(
    store: EtcdStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = await store.grant_lease(30)
    await store.revoke_lease(lease)
    sizes = batch_sizes(store, monkeypatch)
    results = await asyncio.gather(
        store.put(prefix + "a", b"1", expected_revision=0),
        store.put(prefix + "b", b"2", expected_revision=0, lease=lease),
        store.put(prefix + "c", b"3", expected_revision=0),
        return_exceptions=True,
    )
    assert isinstance(results[0], int) and isinstance(results[2], int)
    assert isinstance(results[1], LeaseExpired)
    assert await store.get(prefix + "b") is None
    assert sizes == [3, 1, 1, 1]  # together, refused for the lease; then each alone


async def test_listing_in_pages_reads_one_revision(store: EtcdStore, prefix: str) -> None:
    for i in range(7):
        await store.put(f"{prefix}k{i}", b"before")
    pages = store.list_prefix_pages(prefix, page_keys=3)
    first = await anext(pages)
    # Written between two pages: not in this listing, which is at the first page's revision.
    await store.put(prefix + "k1", b"after")
    await store.put(prefix + "k9", b"after")
    rest = [page async for page in pages]
    listing = [first, *rest]
    assert [len(p.items) for p in listing] == [3, 3, 1]
    assert {p.revision for p in listing} == {first.revision}
    assert [kv.key for p in listing for kv in p.items] == [f"{prefix}k{i}" for i in range(7)]
    assert all(kv.value == b"before" for p in listing for kv in p.items)


async def test_an_empty_listing_is_one_empty_page(store: EtcdStore, prefix: str) -> None:
    pages = [page async for page in store.list_prefix_pages(prefix)]
    assert len(pages) == 1 and pages[0].items == [] and pages[0].revision > 0


async def test_a_listing_compacted_between_pages_raises_compacted(store: EtcdStore, prefix: str) -> None:
    for i in range(4):
        await store.put(f"{prefix}k{i}", b"v")
    pages = store.list_prefix_pages(prefix, page_keys=2)
    first = await anext(pages)
    await store.compact(await store.put(prefix + "later", b"v"))
    with pytest.raises(Compacted) as caught:
        await anext(pages)
    assert caught.value.compact_revision == first.revision


async def test_list_prefix_reads_many_pages_and_starts_again_after_a_compaction(
    store: EtcdStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        await store.put(f"{prefix}k{i}", b"v")
    monkeypatch.setattr(etcd_module, "_LIST_PAGE_KEYS", 2)
    real_pages = store.list_prefix_pages
    compacted_once = False

    async def compacting_pages(p: str, page_keys: int = 2):  # type: ignore[no-untyped-def]
        nonlocal compacted_once
        async for page in real_pages(p, page_keys):
            yield page
            if not compacted_once:
                compacted_once = True
                await store.compact(await store.put(prefix + "k9", b"v"))

    monkeypatch.setattr(store, "list_prefix_pages", compacting_pages)
    listing = await store.list_prefix(prefix)
    assert compacted_once
    assert [kv.key for kv in listing.items] == [f"{prefix}k{i}" for i in (0, 1, 2, 3, 4, 9)]


async def test_batched_calls_to_a_closed_store_fail_as_closed(etcd_server: EtcdServer, prefix: str) -> None:
    store = EtcdStore(etcd_server.endpoint, timeout_s=5.0)
    await store.get(prefix + "x")
    calls = [asyncio.ensure_future(store.put(f"{prefix}{i}", b"v", expected_revision=0)) for i in range(5)]
    calls += [asyncio.ensure_future(store.get(f"{prefix}{i}")) for i in range(5)]
    await store.close()
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        # each call either made it before the close or says the store is closed
        assert not isinstance(outcome, BaseException) or isinstance(outcome, StoreUnavailable), outcome
