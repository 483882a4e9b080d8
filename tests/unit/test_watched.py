"""PrefixView (``watched.py``) on a real MemoryStore: list, then watch; own writes; re-listing.

Values here are ASCII integers (``int(raw)``), so ``b"junk"`` is an undecodable record. The
MemoryStore applies a write without yielding, so a test can line up several writes before the
view's watch task runs, which is how the orderings below are produced deterministically. A
sentinel key written last tells a test that the watch has caught up with everything before it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from modelmesh.clock import FakeClock
from modelmesh.kv.memory import MemoryStore
from modelmesh.types import InstanceRecord
from modelmesh.watched import PrefixView

pytestmark = pytest.mark.filterwarnings("error")

PREFIX = "mm/svc/things/"
WAIT_S = 2.0  # bound on any wait for the watch, so a broken one fails fast


def key(name: str) -> str:
    return PREFIX + name


def decode(raw: bytes) -> int:
    return int(raw)


@dataclass
class Seen:
    """What the view's callbacks reported, in order."""

    changed: list[tuple[str, int]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def watch(self, view: PrefixView[int]) -> None:
        view.on_changed.append(lambda k, v: self.changed.append((k, v)))
        view.on_removed.append(self.removed.append)

    def clear(self) -> None:
        self.changed.clear()
        self.removed.clear()


async def eventually(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.002)


_sentinels = itertools.count()


async def caught_up(store: MemoryStore, view: PrefixView[int], timeout_s: float = WAIT_S) -> None:
    """Write a sentinel under the prefix and wait until the view has it: every event before
    it has been applied. The sentinel is deleted again (and that too awaited)."""
    name = f"~sentinel-{next(_sentinels)}"
    await store.put(key(name), b"0")
    await eventually(lambda: name in view, timeout_s)
    await store.delete(key(name))
    await eventually(lambda: name not in view, timeout_s)


def without_sentinels(seen: Seen) -> Seen:
    return Seen(
        [(k, v) for k, v in seen.changed if not k.startswith("~sentinel")],
        [k for k in seen.removed if not k.startswith("~sentinel")],
    )


def assert_no_tasks_left() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert others == []


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    yield store
    await store.close()
    assert_no_tasks_left()


MakeView = Callable[..., Awaitable[PrefixView[int]]]


@pytest.fixture
async def make_view(store: MemoryStore) -> AsyncIterator[MakeView]:
    """Builds a view of PREFIX (callbacks into ``seen`` when given) and starts it; all are
    closed at teardown."""
    views: list[PrefixView[int]] = []

    async def make(seen: Seen | None = None, *, on: MemoryStore | None = None) -> PrefixView[int]:
        view = PrefixView(on or store, PREFIX, decode, name="things")
        views.append(view)
        if seen is not None:
            seen.watch(view)
        await view.start()
        return view

    yield make
    for view in views:
        await view.close()


# ---- list, then watch --------------------------------------------------------------------------


async def test_lists_then_watches(store: MemoryStore, make_view: MakeView) -> None:
    await store.put(key("a"), b"1")
    rev_b = await store.put(key("b"), b"2")
    await store.put("mm/svc/other/x", b"9")  # outside the prefix
    seen = Seen()

    view = await make_view(seen)

    assert view.synced.is_set()
    assert dict(view.items()) == {"a": 1, "b": 2}
    assert view.versioned("b") is not None and view.versioned("b").revision == rev_b  # type: ignore[union-attr]
    assert sorted(seen.changed) == [("a", 1), ("b", 2)]
    seen.clear()

    await store.put(key("c"), b"3")
    await store.put(key("b"), b"20")
    await store.delete(key("a"))
    await store.put("mm/svc/other/y", b"9")
    await caught_up(store, view)

    assert dict(view.items()) == {"b": 20, "c": 3}
    assert without_sentinels(seen) == Seen([("c", 3), ("b", 20)], ["a"])
    assert "a" not in view and view.get("a") is None and len(view) == 2


async def test_a_delete_by_another_writer_fires_on_removed(
    store: MemoryStore, make_view: MakeView
) -> None:
    await store.put(key("a"), b"1")
    seen = Seen()
    view = await make_view(seen)
    seen.clear()

    await store.delete(key("a"))

    await eventually(lambda: seen.removed == ["a"])
    assert "a" not in view
    assert seen.changed == []


async def test_keys_of_an_expired_lease_leave_the_view(make_view: MakeView) -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    try:
        lease = await store.grant_lease(10)
        await store.put(key("a"), b"1", lease=lease)
        await store.put(key("b"), b"2", lease=lease)
        await store.put(key("c"), b"3")
        seen = Seen()
        view = await make_view(seen, on=store)

        clock.advance(11)
        store.expire_leases()

        await eventually(lambda: sorted(seen.removed) == ["a", "b"])
        assert dict(view.items()) == {"c": 3}
        await view.close()
    finally:
        await store.close()


# ---- this pod's own writes ---------------------------------------------------------------------


async def test_own_writes_are_visible_at_once_and_their_echo_is_ignored(
    store: MemoryStore, make_view: MakeView
) -> None:
    seen = Seen()
    view = await make_view(seen)

    revision = await store.put(key("a"), b"1")
    view.remember("a", 1, revision)

    assert view.get("a") == 1  # before the watch has had a chance to run
    assert seen.changed == [("a", 1)]

    await caught_up(store, view)  # the watch brings the same revision back
    assert without_sentinels(seen) == Seen([("a", 1)], [])

    # a slower report of an older write does not overwrite a newer one
    view.remember("a", 0, revision - 1)
    assert view.get("a") == 1


async def test_an_older_put_arriving_after_a_local_delete_does_not_resurrect_the_key(
    store: MemoryStore, make_view: MakeView
) -> None:
    await store.put(key("a"), b"1")
    seen = Seen()
    view = await make_view(seen)
    seen.clear()

    # another writer updates "a", then this pod deletes it, all before the watch runs:
    # the watch will bring PUT a=2 after the view has forgotten "a"
    await store.put(key("a"), b"2")
    deleted = await store.delete(key("a"))
    view.forget("a", deleted=deleted)
    assert "a" not in view and seen.removed == ["a"]

    await caught_up(store, view)
    assert "a" not in view
    assert without_sentinels(seen) == Seen([], ["a"])  # never came back, never removed twice

    # once the delete's own event has been seen, a new "a" from another writer is shown
    await store.put(key("a"), b"3")
    await eventually(lambda: view.get("a") == 3)


async def test_a_key_recreated_after_a_local_delete_whose_event_came_first_is_shown(
    store: MemoryStore, make_view: MakeView
) -> None:
    await store.put(key("a"), b"1")
    view = await make_view()

    deleted = await store.delete(key("a"))
    await eventually(lambda: "a" not in view)  # the watch saw the DELETE first
    view.forget("a", deleted=deleted)

    await store.put(key("a"), b"3")  # another writer registers "a" again
    await caught_up(store, view)
    assert view.get("a") == 3


# ---- falling behind ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("history_size", "compact"),
    [(10_000, True), (2, False)],
    ids=["compacted", "history-overflow"],
)
async def test_a_watch_that_falls_behind_relists_and_reports_what_changed(
    history_size: int, compact: bool, make_view: MakeView, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemoryStore(history_size=history_size)
    try:
        for name, value in (("a", b"1"), ("b", b"2"), ("c", b"3")):
            await store.put(key(name), value)
        seen = Seen()
        view = await make_view(seen, on=store)
        seen.clear()

        # all before the watch runs; then its next revision is no longer kept
        await store.put(key("a"), b"10")
        await store.delete(key("b"))
        await store.put(key("d"), b"4")
        await store.put(key("a"), b"11")
        if compact:
            store.compact(store.revision)  # else the small history has already dropped them

        with caplog.at_level(logging.WARNING, logger="modelmesh.watched"):
            await caught_up(store, view)

        assert dict(view.items()) == {"a": 11, "c": 3, "d": 4}
        assert sorted(without_sentinels(seen).changed) == [("a", 11), ("d", 4)]  # not "c"
        assert without_sentinels(seen).removed == ["b"]
        assert "re-listing" in caplog.text

        # and it goes on watching from the re-listed revision
        await store.put(key("e"), b"5")
        await eventually(lambda: view.get("e") == 5)
        await view.close()
    finally:
        await store.close()


# ---- bad data ----------------------------------------------------------------------------------


async def test_undecodable_values_are_skipped_with_a_log_line(
    store: MemoryStore, make_view: MakeView, caplog: pytest.LogCaptureFixture
) -> None:
    await store.put(key("a"), b"1")
    await store.put(key("listed-junk"), b"junk")
    seen = Seen()

    with caplog.at_level(logging.ERROR, logger="modelmesh.watched"):
        view = await make_view(seen)
        assert dict(view.items()) == {"a": 1}
        assert key("listed-junk") in caplog.text
        caplog.clear()

        await store.put(key("watched-junk"), b"\xff\xfe")
        await store.put(key("b"), b"2")  # the watch goes on past the bad record
        await eventually(lambda: view.get("b") == 2)

    assert "watched-junk" not in view
    assert key("watched-junk") in caplog.text
    assert all(k != "watched-junk" for k, _ in seen.changed)


async def test_a_failing_callback_is_logged_and_the_others_still_run(
    store: MemoryStore, make_view: MakeView, caplog: pytest.LogCaptureFixture
) -> None:
    view = await make_view()
    seen = Seen()

    def broken(_key: str, _value: int) -> None:
        raise RuntimeError("callback bug")

    view.on_changed.append(broken)
    seen.watch(view)

    with caplog.at_level(logging.ERROR, logger="modelmesh.watched"):
        await store.put(key("a"), b"1")
        await eventually(lambda: seen.changed == [("a", 1)])
        await store.put(key("b"), b"2")
        await eventually(lambda: view.get("b") == 2)

    assert "callback bug" in caplog.text


# The decoder Cluster uses on every pod's record: it raises AttributeError, not one of the errors
# PrefixView treats as "unreadable", for JSON that is not an object.
NOT_AN_OBJECT = [b"[]", b"null", b"42", b'"pod"']


async def test_instance_records_that_are_not_json_objects_are_skipped_by_the_watch(
    store: MemoryStore,
) -> None:
    view = PrefixView(store, PREFIX, InstanceRecord.from_json, name="instances")
    await view.start()
    try:
        for i, raw in enumerate(NOT_AN_OBJECT):
            await store.put(key(f"pod-x{i}"), raw)
        await store.put(key("pod-b"), InstanceRecord("pod-b:8033", 1).to_json())
        # a working watch applies this within milliseconds; the broken one retries every 0.2 s
        await eventually(lambda: "pod-b" in view, timeout_s=0.3)
        assert len(view) == 1
    finally:
        await view.close()


async def test_an_instance_record_that_is_not_a_json_object_is_skipped_by_the_listing(
    store: MemoryStore,
) -> None:
    await store.put(key("pod-x"), b"[]")
    await store.put(key("pod-b"), InstanceRecord("pod-b:8033", 1).to_json())
    view = PrefixView(store, PREFIX, InstanceRecord.from_json, name="instances")
    try:
        await view.start()
        assert list(view.items()) == [("pod-b", InstanceRecord("pod-b:8033", 1))]
    finally:
        await view.close()
