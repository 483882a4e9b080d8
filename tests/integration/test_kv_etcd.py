"""The etcd store's own behaviour against a real etcd: outages, restarts, real lease expiry.

The KVStore contract itself runs against etcd in ``tests/unit/test_kv_contract.py``. Tests here
that stop or freeze etcd get an etcd of their own (``own_etcd``); the others share one per module
and keep their keys under a prefix of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator

import pytest

from modelmesh.errors import StoreUnavailable
from modelmesh.kv.base import Compacted, EventKind, LeaseExpired, WatchEvent
from modelmesh.kv.etcd import EtcdStore, _parse_endpoints
from tests.etcd_server import EtcdServer

TIMEOUT_S = 1.0  # the stores' call timeout here: outage tests wait for it
WAIT_S = 8.0  # bound on waiting for an event (a restart, a reconnect, a lease expiry)

_prefixes: Iterator[int] = itertools.count()


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd for one test, which may stop, restart or freeze it."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"etcd-{next(_prefixes)}/"


@contextlib.asynccontextmanager
async def open_store(server: EtcdServer) -> AsyncIterator[EtcdStore]:
    store = EtcdStore(server.endpoint, timeout_s=TIMEOUT_S)
    try:
        yield store
    finally:
        await store.close()


class WatchRecorder:
    """Runs a watch in a task and keeps its batches, so a test can write while it listens."""

    def __init__(self, stream: AsyncGenerator[list[WatchEvent], None]) -> None:
        self.batches: list[list[WatchEvent]] = []
        self.error: BaseException | None = None
        self._stream = stream
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    @property
    def events(self) -> list[WatchEvent]:
        return [event for batch in self.batches for event in batch]

    async def _run(self) -> None:
        try:
            async with contextlib.aclosing(self._stream):
                async for batch in self._stream:
                    self.batches.append(batch)
                    self._changed.set()
        except Exception as err:  # kept for the test to look at
            self.error = err
        finally:
            self._changed.set()

    async def wait_for(self, count: int) -> list[WatchEvent]:
        """The first ``count`` events, once they are there."""
        async with asyncio.timeout(WAIT_S):
            while len(self.events) < count and self.error is None:
                self._changed.clear()
                await self._changed.wait()
        assert len(self.events) >= count, (self.events, self.error)
        return self.events[:count]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def summary(events: list[WatchEvent]) -> list[tuple[EventKind, str, bytes]]:
    return [(e.kind, e.key, e.value) for e in events]


async def eventually(write: Callable[[], Awaitable[int]]) -> int:
    """Retry a write until etcd takes it: after a restart the client needs a moment to reconnect."""
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                return await write()
            except StoreUnavailable:
                await asyncio.sleep(0.05)


# ---- restarts and outages ------------------------------------------------------------------


async def test_watch_resumes_after_an_etcd_restart(own_etcd: EtcdServer) -> None:
    async with open_store(own_etcd) as store, open_store(own_etcd) as writer:
        start = (await store.list_prefix("r/")).revision + 1
        recorder = WatchRecorder(store.watch_prefix("r/", start))
        await writer.put("r/a", b"before")
        await recorder.wait_for(1)

        await asyncio.to_thread(own_etcd.stop)
        # A watch started while etcd is down waits for it instead of failing.
        late = WatchRecorder(store.watch_prefix("r/", start))
        await asyncio.sleep(0.3)  # the watch notices and retries with etcd gone
        await asyncio.to_thread(own_etcd.start)
        after = [await eventually(functools.partial(writer.put, "r/b", v)) for v in (b"1", b"2")]

        events = await recorder.wait_for(3)
        assert summary(events) == [
            (EventKind.PUT, "r/a", b"before"),
            (EventKind.PUT, "r/b", b"1"),
            (EventKind.PUT, "r/b", b"2"),
        ]
        assert [e.mod_revision for e in events[1:]] == after
        assert summary(await late.wait_for(3)) == summary(events)
        assert recorder.error is None and late.error is None
        await recorder.stop()
        await late.stop()


async def test_watch_resumes_from_where_its_consumer_is(own_etcd: EtcdServer) -> None:
    # The consumer reads slowly: the stream breaks while it holds a batch, writes happen, and
    # the next read resumes after the last delivered revision, with no gap and no repeat.
    async with open_store(own_etcd) as store, open_store(own_etcd) as writer:
        start = (await store.list_prefix("s/")).revision + 1
        await writer.put("s/a", b"1")
        async with contextlib.aclosing(store.watch_prefix("s/", start)) as stream:
            first = await anext(stream)
            await asyncio.to_thread(own_etcd.stop)
            await asyncio.to_thread(own_etcd.start)
            await eventually(lambda: writer.put("s/b", b"2"))
            await writer.put("s/a", b"3")
            later: list[WatchEvent] = []
            async with asyncio.timeout(WAIT_S):
                while len(later) < 2:
                    later.extend(await anext(stream))
        assert summary(first + later) == [
            (EventKind.PUT, "s/a", b"1"),
            (EventKind.PUT, "s/b", b"2"),
            (EventKind.PUT, "s/a", b"3"),
        ]


async def test_watch_resuming_into_compacted_history_raises_compacted(own_etcd: EtcdServer) -> None:
    async with open_store(own_etcd) as store, open_store(own_etcd) as writer:
        start = (await store.list_prefix("c/")).revision + 1
        await writer.put("c/a", b"1")
        async with contextlib.aclosing(store.watch_prefix("c/", start)) as stream:
            await anext(stream)
            await asyncio.to_thread(own_etcd.stop)
            await asyncio.to_thread(own_etcd.start)
            await eventually(lambda: writer.put("c/a", b"2"))
            kept = await writer.put("c/a", b"3")
            await writer.compact(kept)
            with pytest.raises(Compacted) as caught:
                async with asyncio.timeout(WAIT_S):
                    await anext(stream)
        assert caught.value.compact_revision == kept


def down_calls(store: EtcdStore) -> dict[str, Callable[[], Awaitable[object]]]:
    """One of every call, each of which needs etcd to answer."""
    return {
        "get": lambda: store.get("d/a"),
        "list_prefix": lambda: store.list_prefix("d/"),
        "put": lambda: store.put("d/a", b"2"),
        "put expecting a revision": lambda: store.put("d/a", b"2", expected_revision=1),
        "delete": lambda: store.delete("d/a"),
        "grant_lease": lambda: store.grant_lease(5),
        "keepalive": lambda: store.keepalive(1),
        "revoke_lease": lambda: store.revoke_lease(1),
        "compact": lambda: store.compact(1),
    }


async def assert_all_unavailable(store: EtcdStore, endpoint: str) -> None:
    """Every call fails with StoreUnavailable within the timeout, all at once (no queueing)."""

    async def outcome(call: Callable[[], Awaitable[object]]) -> tuple[BaseException | None, float]:
        started = time.monotonic()
        try:
            await call()
        except Exception as err:
            return err, time.monotonic() - started
        return None, time.monotonic() - started

    calls = down_calls(store)
    outcomes = await asyncio.gather(*(outcome(call) for call in calls.values()))
    for name, (error, elapsed) in zip(calls, outcomes):
        assert isinstance(error, StoreUnavailable), (name, error)
        assert f"etcd at {endpoint} is unavailable" in str(error), (name, error)
        # bounded, not hung: the slack covers a loaded CI machine, not a second timeout
        assert elapsed < TIMEOUT_S + 3, f"{name} took {elapsed:.2f} s"


async def test_calls_while_etcd_is_stopped_fail_promptly(own_etcd: EtcdServer) -> None:
    async with open_store(own_etcd) as store:
        await store.put("d/a", b"1")
        await asyncio.to_thread(own_etcd.stop)
        await assert_all_unavailable(store, own_etcd.endpoint)
        # The same store works again once etcd is back.
        await asyncio.to_thread(own_etcd.start)
        await eventually(lambda: store.put("d/a", b"3"))
        kv = await store.get("d/a")
        assert kv is not None and kv.value == b"3"


async def test_calls_to_a_frozen_etcd_time_out(own_etcd: EtcdServer) -> None:
    # Connections open but nothing answers (a hung host): every call ends at its timeout.
    async with open_store(own_etcd) as store:
        await store.put("d/a", b"1")
        own_etcd.pause()
        try:
            await assert_all_unavailable(store, own_etcd.endpoint)
        finally:
            own_etcd.resume()
        await eventually(lambda: store.put("d/a", b"3"))


async def test_a_store_that_never_reached_etcd_says_where_it_looked() -> None:
    with free_port() as port:
        endpoint = f"http://127.0.0.1:{port}"
        store = EtcdStore(endpoint, timeout_s=TIMEOUT_S)
        try:
            with pytest.raises(StoreUnavailable, match=f"etcd at {endpoint} is unavailable: "):
                await store.get("k")
        finally:
            await store.close()


async def test_the_first_reachable_endpoint_is_used(etcd_server: EtcdServer, prefix: str) -> None:
    with free_port() as port:
        store = EtcdStore(f"http://127.0.0.1:{port}, {etcd_server.endpoint}", timeout_s=TIMEOUT_S)
        try:
            rev = await store.put(prefix + "k", b"v")
            assert store.endpoint == etcd_server.endpoint
            kv = await store.get(prefix + "k")
            assert kv is not None and kv.mod_revision == rev
        finally:
            await store.close()


@contextlib.contextmanager
def free_port() -> Iterator[int]:
    """A loopback port where nothing listens (held, so nobody starts listening there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# ---- leases, compaction, lifecycle ----------------------------------------------------------


async def test_a_real_lease_expiry_deletes_keys_in_one_revision(
    etcd_server: EtcdServer, prefix: str
) -> None:
    async with open_store(etcd_server) as store:
        lease = await store.grant_lease(2)  # etcd's lessor then takes up to 0.5 s more
        await store.put(prefix + "a", b"1", lease=lease)
        kept = await store.put(prefix + "b", b"2", lease=lease)
        recorder = WatchRecorder(store.watch_prefix(prefix, kept + 1))
        events = await recorder.wait_for(2)
        await recorder.stop()
        assert sorted(summary(events)) == [
            (EventKind.DELETE, prefix + "a", b""),
            (EventKind.DELETE, prefix + "b", b""),
        ]
        assert len(recorder.batches[0]) == 2  # one revision, one batch
        assert (await store.list_prefix(prefix)).items == []
        with pytest.raises(LeaseExpired):
            await store.keepalive(lease)


async def test_compacting_twice_is_harmless(etcd_server: EtcdServer, prefix: str) -> None:
    async with open_store(etcd_server) as store:
        rev = await store.put(prefix + "a", b"1")
        await store.compact(rev)
        await store.compact(rev)
        with pytest.raises(Compacted):
            async with asyncio.timeout(WAIT_S):
                await anext(store.watch_prefix(prefix, rev - 1))


async def test_closed_store_refuses_work(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.endpoint, timeout_s=TIMEOUT_S)
    await store.get("k")
    await store.close()
    await store.close()  # idempotent
    for name, call in down_calls(store).items():
        with pytest.raises(StoreUnavailable, match="closed"):
            await call()
    with pytest.raises(StoreUnavailable, match="closed"):
        await anext(store.watch_prefix("k", 1))


@pytest.mark.parametrize(
    "endpoints",
    ["", " , ", "https://127.0.0.1:2379", "unix:///tmp/etcd.sock"],
)
def test_endpoints_must_be_http_urls(endpoints: str) -> None:
    with pytest.raises(ValueError):
        EtcdStore(endpoints)


def test_endpoints_are_parsed_in_order() -> None:
    parsed = _parse_endpoints("10.0.0.1:2379, http://[::1]:2380,http://etcd.local")
    assert [(e.host, e.port) for e in parsed] == [
        ("10.0.0.1", 2379), ("[::1]", 2380), ("etcd.local", 2379),
    ]
