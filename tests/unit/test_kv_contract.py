"""The KVStore contract (``kv/base.py``): every store implementation passes the same tests.

Each store is built by a factory in ``STORE_FACTORIES``; the ``store_ctx`` fixture runs every
contract test once per factory. To add a store, add a factory that yields an empty store in
a ``StoreCtx`` whose ``let_time_pass`` sleeps for real and whose ``compact`` calls the store's
compaction, and that cleans up after itself. Tests assert only relative revisions, since a shared
server does not start at revision 0. Tests of one implementation's extras sit at the end.

The etcd factory runs the suite against a real etcd, one per module (``etcd_server``); each test
sees its own key prefix of it, with lease time running faster (``tests/etcd_server.py``'s
``EtcdTestView``). The etcd store's own tests (restarts, outages, real lease expiry) are in
``tests/integration/test_kv_etcd.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import pytest

from modelmesh.clock import FakeClock
from modelmesh.errors import StoreUnavailable
from modelmesh.kv.base import (
    CasFailed,
    Compacted,
    EventKind,
    KVStore,
    LeaseExpired,
    WatchEvent,
)
from modelmesh.kv.etcd import EtcdStore
from modelmesh.kv.memory import MemoryStore
from tests.etcd_server import EtcdServer, EtcdTestView

TIMEOUT_S = 2.0  # bound on any single wait, so a broken watch fails fast instead of hanging


@dataclass
class StoreCtx:
    store: KVStore
    let_time_pass: Callable[[float], Awaitable[None]]
    """Move the store's time forward by that many seconds and let it expire leases."""
    compact: Callable[[int], Awaitable[None]]
    """Make the store forget the watch history before that revision."""


@contextlib.asynccontextmanager
async def make_memory_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreCtx]:
    clock = FakeClock()
    store = MemoryStore(clock)

    async def let_time_pass(seconds: float) -> None:
        clock.advance(seconds)
        store.expire_leases()

    async def compact(revision: int) -> None:
        store.compact(revision)

    try:
        yield StoreCtx(store, let_time_pass, compact)
    finally:
        await store.close()


# ---- etcd ----------------------------------------------------------------------------------

_etcd_prefixes: Iterator[int] = itertools.count()


@contextlib.asynccontextmanager
async def make_etcd_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreCtx]:
    server: EtcdServer = request.getfixturevalue("etcd_server")
    store = EtcdStore(server.endpoint, timeout_s=5.0)
    view = EtcdTestView(store, prefix=f"contract-{next(_etcd_prefixes)}/")
    try:
        yield StoreCtx(view, view.let_time_pass, store.compact)
    finally:
        if leftover := view.leases_left():
            cleanup = EtcdStore(server.endpoint)  # the test may have closed its own store
            try:
                for lease in leftover:
                    await cleanup.revoke_lease(lease)
            finally:
                await cleanup.close()
        await store.close()
        await grpc_calls_finished()


async def grpc_calls_finished() -> None:
    """Wait for gRPC's own bookkeeping of cancelled calls (a task per call, done a few loop
    turns after the cancel), so ``assert_no_tasks_left`` sees only tasks of ours."""
    async with asyncio.timeout(TIMEOUT_S):
        while any(
            task.get_coro().__qualname__.startswith("_AioCall.")  # type: ignore[union-attr]
            for task in asyncio.all_tasks()
            if not task.done()
        ):
            await asyncio.sleep(0)


# A factory gets the test's fixture request: the etcd one asks it for the module's etcd server.
STORE_FACTORIES: dict[
    str, Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[StoreCtx]]
] = {
    "memory": make_memory_store,
    "etcd": make_etcd_store,
}


def assert_no_tasks_left() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert others == []


@pytest.fixture(params=sorted(STORE_FACTORIES))
async def store_ctx(request: pytest.FixtureRequest) -> AsyncIterator[StoreCtx]:
    async with STORE_FACTORIES[request.param](request) as ctx:
        yield ctx
    assert_no_tasks_left()


@pytest.fixture
def store(store_ctx: StoreCtx) -> KVStore:
    return store_ctx.store


async def expire(ctx: StoreCtx, seconds: float) -> None:
    await ctx.let_time_pass(seconds)


def watch(
    store: KVStore, prefix: str, start_revision: int
) -> AsyncGenerator[list[WatchEvent], None]:
    stream = store.watch_prefix(prefix, start_revision)
    # Part of the contract: callers must be able to aclose() a watch they leave.
    assert isinstance(stream, AsyncGenerator)
    return stream


async def next_events(
    store: KVStore, prefix: str, start_revision: int, n: int
) -> list[WatchEvent]:
    """The first ``n`` events of a watch, however they are batched."""
    events: list[WatchEvent] = []
    async with asyncio.timeout(TIMEOUT_S):
        async with contextlib.aclosing(watch(store, prefix, start_revision)) as stream:
            async for batch in stream:
                events.extend(batch)
                if len(events) >= n:
                    break
    assert len(events) == n, events
    return events


def summary(events: list[WatchEvent]) -> list[tuple[EventKind, str, bytes]]:
    return [(e.kind, e.key, e.value) for e in events]


async def let_watches_wait() -> None:
    """Let started watch tasks reach their wait, so writes after this arrive as live events."""
    for _ in range(3):
        await asyncio.sleep(0)


# ---- compare-and-set -----------------------------------------------------------------------


async def test_put_creates_and_get_reads_back(store: KVStore) -> None:
    assert await store.get("m/a") is None
    rev = await store.put("m/a", b"1")
    kv = await store.get("m/a")
    assert kv is not None
    assert (kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.lease) == (
        "m/a", b"1", rev, rev, 0,
    )


async def test_put_expecting_zero_creates_only_when_absent(store: KVStore) -> None:
    rev = await store.put("m/a", b"1", expected_revision=0)
    with pytest.raises(CasFailed):
        await store.put("m/a", b"2", expected_revision=0)
    kv = await store.get("m/a")
    assert kv is not None and (kv.value, kv.mod_revision) == (b"1", rev)


async def test_put_expecting_revision_updates_only_on_match(store: KVStore) -> None:
    created = await store.put("m/a", b"1")
    updated = await store.put("m/a", b"2", expected_revision=created)
    kv = await store.get("m/a")
    assert kv is not None
    assert (kv.value, kv.mod_revision, kv.create_revision) == (b"2", updated, created)
    with pytest.raises(CasFailed):
        await store.put("m/a", b"3", expected_revision=created)  # stale: someone wrote since
    with pytest.raises(CasFailed):
        await store.put("m/absent", b"x", expected_revision=created)
    assert await store.get("m/absent") is None


async def test_delete_compares_revision(store: KVStore) -> None:
    rev = await store.put("m/a", b"1")
    for wrong in (0, rev + 1):
        with pytest.raises(CasFailed):
            await store.delete("m/a", expected_revision=wrong)
    assert await store.get("m/a") is not None
    assert await store.delete("m/a", expected_revision=rev) is True
    assert await store.get("m/a") is None
    assert await store.delete("m/a") is False
    assert await store.delete("m/a", expected_revision=0) is False  # absent, as expected
    with pytest.raises(CasFailed):
        await store.delete("m/a", expected_revision=rev)


async def current_revision(store: KVStore) -> int:
    return (await store.list_prefix("")).revision


async def test_revisions_increase_with_every_write_and_only_then(store: KVStore) -> None:
    revs = [await store.put(key, b"1") for key in ("m/a", "m/b", "m/a")]
    assert await current_revision(store) == revs[-1]
    assert await store.delete("m/a")
    revs.append(await current_revision(store))
    revs.append(await store.put("m/a", b"3"))
    assert all(a < b for a, b in zip(revs, revs[1:])), revs
    # Failed compares and deletes of nothing write nothing.
    with pytest.raises(CasFailed):
        await store.put("m/a", b"4", expected_revision=0)
    assert await store.delete("m/none") is False
    assert await current_revision(store) == revs[-1]


# ---- listing -------------------------------------------------------------------------------


async def test_list_prefix_is_sorted_and_isolated(store: KVStore) -> None:
    for key in ("a/bc/1", "a/b/2", "a/b", "a/b/1", "a/a/1", "b/1"):
        await store.put(key, key.encode())
    last = await store.put("a/b/3", b"a/b/3")
    listing = await store.list_prefix("a/b/")
    assert [kv.key for kv in listing.items] == ["a/b/1", "a/b/2", "a/b/3"]
    assert [kv.value for kv in listing.items] == [b"a/b/1", b"a/b/2", b"a/b/3"]
    assert listing.revision == last
    assert [kv.key for kv in (await store.list_prefix("a/bc/")).items] == ["a/bc/1"]
    assert (await store.list_prefix("a/c/")).items == []
    assert len((await store.list_prefix("")).items) == 7


async def test_list_prefix_with_many_keys(store: KVStore) -> None:
    keys = [f"many/{i:05d}" for i in range(10_000)]
    for key in random.Random(7).sample(keys, len(keys)):
        await store.put(key, b"")
    await store.put("manz", b"")  # sorts right after the prefix: must not leak in
    assert [kv.key for kv in (await store.list_prefix("many/")).items] == keys


# ---- watches -------------------------------------------------------------------------------


async def test_watch_delivers_puts_and_deletes_in_order(store: KVStore) -> None:
    start = (await store.list_prefix("w/")).revision + 1
    watch = asyncio.create_task(next_events(store, "w/", start, 4))
    await let_watches_wait()
    r1 = await store.put("w/a", b"1")
    await store.put("other/a", b"x")
    r2 = await store.put("w/b", b"2")
    assert await store.delete("w/a")
    r3 = await current_revision(store)
    r4 = await store.put("w/b", b"3")
    events = await watch
    assert summary(events) == [
        (EventKind.PUT, "w/a", b"1"),
        (EventKind.PUT, "w/b", b"2"),
        (EventKind.DELETE, "w/a", b""),
        (EventKind.PUT, "w/b", b"3"),
    ]
    assert [e.mod_revision for e in events] == [r1, r2, r3, r4]


async def test_watch_resumes_from_a_past_revision(store: KVStore) -> None:
    await store.put("w/a", b"1")
    missed_from = await store.put("w/b", b"2")
    await store.delete("w/a")
    events = await next_events(store, "w/", missed_from, 2)
    assert summary(events) == [(EventKind.PUT, "w/b", b"2"), (EventKind.DELETE, "w/a", b"")]
    # A watch from the past goes on with live events after the missed ones.
    watch = asyncio.create_task(next_events(store, "w/", missed_from, 3))
    await let_watches_wait()
    await store.put("w/c", b"3")
    assert summary(await watch)[-1] == (EventKind.PUT, "w/c", b"3")


async def test_watch_from_forgotten_history_raises_compacted(store_ctx: StoreCtx) -> None:
    store = store_ctx.store
    first = await store.put("w/a", b"1")
    await store.put("w/a", b"2")
    kept = await store.put("w/a", b"3")
    await store_ctx.compact(kept)
    with pytest.raises(Compacted) as caught:
        await next_events(store, "w/", first, 1)
    assert first < caught.value.compact_revision <= kept
    events = await next_events(store, "w/", caught.value.compact_revision, 1)
    assert events[-1].mod_revision == kept


async def test_watch_rejects_revisions_below_one(store: KVStore) -> None:
    # 0 means "from now" in etcd; the contract wants list-then-watch from Listing.revision + 1.
    with pytest.raises(ValueError):
        await next_events(store, "w/", 0, 1)


async def test_abandoned_watches_leave_nothing_behind(store: KVStore) -> None:
    start = await current_revision(store) + 1
    cancelled = asyncio.create_task(next_events(store, "w/", start, 1_000))
    closed = watch(store, "w/", start)
    await store.put("w/a", b"1")
    await let_watches_wait()
    assert [e.key for e in await anext(closed)] == ["w/a"]
    await closed.aclose()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await store.put("w/b", b"2")  # writes still work with the watchers gone
    assert_no_tasks_left()


async def test_close_ends_watches_and_leaves_no_tasks(store: KVStore) -> None:
    start = await current_revision(store) + 1

    async def drain(prefix: str) -> int:
        return sum([len(batch) async for batch in store.watch_prefix(prefix, start)])

    await store.grant_lease(30)  # a store may run lease work in the background
    watches = [asyncio.create_task(drain(p)) for p in ("w/", "x/")]
    await store.put("w/a", b"1")
    await let_watches_wait()
    await store.close()
    async with asyncio.timeout(TIMEOUT_S):
        assert await asyncio.gather(*watches) == [1, 0]
    assert_no_tasks_left()


# ---- leases --------------------------------------------------------------------------------


async def test_lease_expiry_deletes_its_keys_with_delete_events(store_ctx: StoreCtx) -> None:
    store = store_ctx.store
    lease = await store.grant_lease(10)
    await store.put("l/a", b"1", lease=lease)
    await store.put("l/b", b"2", lease=lease)
    kept = await store.put("l/c", b"3")
    kv = await store.get("l/a")
    assert kv is not None and kv.lease == lease
    await expire(store_ctx, 11)
    assert [kv.key for kv in (await store.list_prefix("l/")).items] == ["l/c"]
    events = await next_events(store, "l/", kept + 1, 2)
    assert sorted(summary(events)) == [
        (EventKind.DELETE, "l/a", b""),
        (EventKind.DELETE, "l/b", b""),
    ]
    with pytest.raises(LeaseExpired):
        await store.keepalive(lease)


async def test_keepalive_keeps_keys_alive(store_ctx: StoreCtx) -> None:
    store = store_ctx.store
    lease = await store.grant_lease(10)
    await store.put("l/a", b"1", lease=lease)
    for _ in range(3):
        await expire(store_ctx, 6)
        await store.keepalive(lease)
    assert await store.get("l/a") is not None
    await expire(store_ctx, 11)
    assert await store.get("l/a") is None


async def test_revoke_deletes_keys_and_is_idempotent(store: KVStore) -> None:
    lease = await store.grant_lease(30)
    start = await store.put("l/a", b"1", lease=lease)
    await store.put("l/moved", b"1", lease=lease)
    await store.put("l/moved", b"2")  # rewritten without the lease: no longer bound to it
    await store.revoke_lease(lease)
    assert [kv.key for kv in (await store.list_prefix("l/")).items] == ["l/moved"]
    events = await next_events(store, "l/a", start, 2)
    assert summary(events)[-1] == (EventKind.DELETE, "l/a", b"")
    await store.revoke_lease(lease)  # already gone: not an error
    with pytest.raises(LeaseExpired):
        await store.keepalive(lease)


async def test_put_with_a_dead_lease_fails(store_ctx: StoreCtx) -> None:
    store = store_ctx.store
    revoked, expired = await store.grant_lease(30), await store.grant_lease(5)
    await store.revoke_lease(revoked)
    await expire(store_ctx, 6)
    for lease in (revoked, expired, 987_654_321):
        with pytest.raises(LeaseExpired):
            await store.put("l/a", b"1", lease=lease)
    assert await store.get("l/a") is None


# ---- the in-memory store's own behaviour ---------------------------------------------------


async def test_memory_history_is_bounded() -> None:
    store = MemoryStore(FakeClock(), history_size=3)
    try:
        revs = [await store.put(f"h/{i}", b"") for i in range(5)]
        with pytest.raises(Compacted) as caught:
            await next_events(store, "h/", revs[1], 1)
        assert caught.value.compact_revision == revs[2]
        assert [e.key for e in await next_events(store, "h/", revs[2], 3)] == ["h/2", "h/3", "h/4"]
    finally:
        await store.close()


async def test_memory_leases_expire_in_the_background() -> None:
    store = MemoryStore()  # the system clock: nobody calls expire_leases()
    try:
        lease = await store.grant_lease(0.05)
        rev = await store.put("l/a", b"1", lease=lease)
        events = await next_events(store, "l/", rev + 1, 1)
        assert summary(events) == [(EventKind.DELETE, "l/a", b"")]
    finally:
        await store.close()
    assert_no_tasks_left()


async def test_memory_store_refuses_work_after_close() -> None:
    store = MemoryStore(FakeClock())
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        await store.put("k", b"v")
    with pytest.raises(StoreUnavailable):
        await next_events(store, "", 1, 1)
