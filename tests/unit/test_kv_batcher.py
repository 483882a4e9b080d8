"""Group commit in the etcd store (``kv/etcd.py``'s ``_Batcher``), without etcd: which ops leave
together, what each caller gets back, and callers that give up. The store's use of it against a
real etcd is in ``tests/integration/test_kv_etcd_batching.py``."""

from __future__ import annotations

import asyncio

import pytest

from modelmesh.errors import StoreUnavailable
from modelmesh.kv.base import CasFailed
from modelmesh.kv.etcd import _Batcher

pytestmark = pytest.mark.filterwarnings("error")


class Recorder:
    """A ``run`` that records its batches and waits for ``release`` before answering."""

    def __init__(self, *, hold: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.fail_with: Exception | None = None

    async def run(self, ops: list[str]) -> list[str | BaseException]:
        self.batches.append(list(ops))
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [CasFailed(f"{op} failed") if op.startswith("bad") else op.upper() for op in ops]


def batcher(recorder: Recorder, **kw: int) -> _Batcher[str, str]:
    return _Batcher(recorder.run, lambda batch, op: op not in batch, **kw)


async def test_a_lone_op_goes_alone_and_gets_its_answer() -> None:
    rec = Recorder()
    assert await batcher(rec).submit("a") == "A"
    assert rec.batches == [["a"]]


async def test_ops_of_one_loop_turn_leave_as_one_batch() -> None:
    rec = Recorder()
    b = batcher(rec)
    assert await asyncio.gather(*(b.submit(op) for op in "abcd")) == ["A", "B", "C", "D"]
    assert rec.batches == [["a", "b", "c", "d"]]


async def test_ops_made_while_a_batch_is_out_leave_together_when_it_returns() -> None:
    rec = Recorder(hold=True)
    b = batcher(rec)
    first = asyncio.ensure_future(b.submit("a"))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(b.submit(op)) for op in "bcd"]
    await asyncio.sleep(0.01)
    assert rec.batches == [["a"]]  # one batch out at a time: the others wait
    rec.release.set()
    assert await first == "A"
    assert await asyncio.gather(*later) == ["B", "C", "D"]
    assert rec.batches == [["a"], ["b", "c", "d"]]


async def test_batches_keep_to_their_limits_and_order() -> None:
    rec = Recorder()
    b = batcher(rec, max_ops=3)
    # "a" twice: the second must not join the first's batch (fits() says no), nor can those behind it
    ops = ["a", "b", "a", "c", "d", "e", "f"]
    assert await asyncio.gather(*(b.submit(op) for op in ops)) == [op.upper() for op in ops]
    assert rec.batches == [["a", "b"], ["a", "c", "d"], ["e", "f"]]


async def test_each_caller_gets_its_own_outcome() -> None:
    rec = Recorder()
    b = batcher(rec)
    results = await asyncio.gather(b.submit("a"), b.submit("bad-b"), b.submit("c"), return_exceptions=True)
    assert results[0] == "A" and results[2] == "C"
    assert isinstance(results[1], CasFailed) and str(results[1]) == "bad-b failed"


async def test_a_failed_batch_fails_every_caller_with_an_exception_of_its_own() -> None:
    rec = Recorder()
    rec.fail_with = StoreUnavailable("etcd at x is unavailable: gone")
    b = batcher(rec)
    results = await asyncio.gather(*(b.submit(op) for op in "abc"), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) and "gone" in str(r) for r in results)
    assert len({id(r) for r in results}) == 3


async def test_a_caller_that_gives_up_before_its_batch_leaves_is_dropped() -> None:
    rec = Recorder(hold=True)
    b = batcher(rec)
    first = asyncio.ensure_future(b.submit("a"))
    await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await b.submit("b")
    kept = asyncio.ensure_future(b.submit("c"))
    rec.release.set()
    assert (await first, await kept) == ("A", "C")
    assert rec.batches == [["a"], ["c"]]
    await b.wait_idle()


async def test_a_caller_that_gives_up_after_its_batch_left_changes_nothing_for_the_others() -> None:
    rec = Recorder(hold=True)
    b = batcher(rec)
    gives_up = asyncio.ensure_future(b.submit("a"))
    stays = asyncio.ensure_future(b.submit("b"))
    await asyncio.sleep(0.01)
    gives_up.cancel()
    rec.release.set()
    assert await stays == "B"
    with pytest.raises(asyncio.CancelledError):
        await gives_up
    await b.wait_idle()
    assert rec.batches == [["a", "b"]]
