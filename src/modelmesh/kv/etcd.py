"""The etcd store: ``KVStore`` on an etcd 3.4+ cluster (cluster mode); the only importer of aetcd.

How the contract of ``kv/base.py`` maps onto etcd:
- ``get``/``list_prefix`` are Range reads; a listing is one read at one revision, and its revision
  is the response header's (the store's revision when it was read);
- ``put``/``delete`` with ``expected_revision`` are transactions comparing the key's mod_revision
  (``0``: its create_revision is 0, i.e. the key is absent); etcd's own revision counter is the
  store's, so revisions here are etcd's;
- ``watch_prefix`` opens one Watch stream per call, driven by the generator itself (no background
  task), and yields each etcd response as one batch: etcd never splits a revision across
  responses. When the stream breaks it reconnects with backoff and resumes from the last delivered
  revision + 1, so a caller sees no gap and no repeat; when etcd reports that history compacted it
  raises ``Compacted`` with etcd's compact revision;
- leases are etcd leases: TTLs are whole seconds (rounded up) and etcd raises short ones to its
  minimum (a couple of seconds with default timing); ``keepalive`` is one LeaseKeepAlive exchange.

Group commit: ``get`` and compare-and-set ``put`` calls made in one turn of the event loop, or
while a batch of their kind is out, leave together as one etcd transaction (``_Batcher``): a lone
call is one call, as before, and under load (a bulk registration) a pod sends one Txn per batch
instead of one RPC per key, which is what costs CPU in the pod and in etcd. Each call keeps
its own outcome: a batch of gets is a read-only Txn of Range ops (linearizable, like a Range); a
batch of puts is one Txn comparing every key, so its writes share one revision (and arrive in one
watch batch); when a compare fails, the failure branch's reads tell which keys failed (those raise
``CasFailed``) and the others are sent again. Keys in one batch are distinct, and a batch stays
within etcd's default limits (128 ops, 1.5 MiB requests).

Endpoints: ``EtcdStore("http://10.0.0.1:2379,http://10.0.0.2:2379")`` uses the first endpoint, in
the order given, that answers a linearizable read (so a member cut off from its leader is passed
over). After a connection failure or timeout the next call looks again from the first, so the
store moves to another member when its member goes away and back when it returns. Only plain
``http://`` endpoints are supported for now (no TLS, no auth).

Errors: every aetcd and gRPC error becomes a store error in one place, ``_translated_errors``,
by one table, ``_ERRORS_BY_CODE``: connection failures and timeouts become
``StoreUnavailable("etcd at <endpoint> is unavailable: ...")``. Every call is bounded by
``timeout_s`` (``_bounded_call`` applies both); only a watch waits longer, for events, with gRPC
keepalive pings to notice a dead connection.

aetcd 1.0.0 is used for connections, plain puts, deletes, lease grant and revoke, and
compaction. Where it does not fit, its generated stubs (``aetcd.rpc``) are used on its channel
instead:
- gets, compare-and-set puts and listings: a batch is one Txn of many ops and a listing is read
  in pages (``limit``, ``revision``), which its helpers do not build, and its per-call wrappers
  cost the pod measurable CPU when thousands of models are registered;
- its watch delivers events one at a time (losing etcd's per-revision batches), keeps a shared
  stream task running for as long as the client lives, and neither reconnects nor resumes;
- ``refresh_lease`` reads one reply and leaves the keepalive stream (and a gRPC task) open;
- ``get_prefix(b"")`` reads only the key ``""`` instead of every key (its range end for an empty
  prefix is empty), so prefixes are turned into ranges here;
- its error table has no NOT_FOUND, so "lease not found" arrives as a bare ``ClientError``; the
  gRPC status is read from the error's ``__cause__``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import aetcd  # type: ignore[import-untyped]
import grpc
from aetcd import rpc

from modelmesh.errors import InvalidRequest, MeshError, StoreUnavailable
from modelmesh.kv.base import (
    CasFailed,
    Compacted,
    EventKind,
    KeyValue,
    LeaseExpired,
    Listing,
    WatchEvent,
)

__all__ = ["DEFAULT_TIMEOUT_S", "EtcdStore"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
"""Bound on every store call (a watch's wait for events excepted)."""

_DEFAULT_PORT = 2379
# A broken watch retries quickly at first (a restart takes well under a second) and then every
# couple of seconds, so a long outage costs a reconnect attempt every 2 s per watch.
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 2.0

_CHANNEL_OPTIONS: Final[Mapping[str, int]] = {
    # gRPC's reconnect backoff grows to 120 s by default; an etcd back after an outage should be
    # found within about a second.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1_000,
    # Pings find a connection whose peer vanished without closing it (a host gone), which would
    # otherwise leave a watch waiting forever. etcd refuses pings more often than every 5 s
    # (--grpc-keepalive-min-time) and pings without an open stream.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # A listing of the whole registry is one message; gRPC's default limit is 4 MiB.
    "grpc.max_receive_message_length": 2**31 - 1,
}

_UNAVAILABLE = "etcd at {endpoint} is unavailable: {details}"
# One table for every gRPC status etcd or the channel can produce; codes not listed are failures
# of the store all the same (``_OTHER_ERROR``). etcd's codes are listed in its rpctypes package.
_ERRORS_BY_CODE: Final[Mapping[grpc.StatusCode, tuple[type[MeshError], str]]] = {
    grpc.StatusCode.UNAVAILABLE: (StoreUnavailable, _UNAVAILABLE),
    grpc.StatusCode.DEADLINE_EXCEEDED: (
        StoreUnavailable,
        "etcd at {endpoint} is unavailable: no answer within {timeout_s:g} s",
    ),
    # Out of space (the NOSPACE alarm) or too many requests.
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        StoreUnavailable,
        "etcd at {endpoint} cannot take the request: {details}",
    ),
    # etcd answers NOT_FOUND only for leases ("requested lease not found").
    grpc.StatusCode.NOT_FOUND: (LeaseExpired, "the lease has expired or was revoked ({details})"),
    # An empty key or a value over etcd's request size limit (--max-request-bytes, 1.5 MiB).
    grpc.StatusCode.INVALID_ARGUMENT: (
        InvalidRequest,
        "etcd at {endpoint} rejected the request: {details}",
    ),
}
_OTHER_ERROR: Final = (StoreUnavailable, "etcd at {endpoint} failed: {code}: {details}")
# After these the member may be gone: the next call looks for a reachable endpoint again.
_CONNECTION_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)
# What aetcd and gRPC raise; anything else is a bug and passes through untranslated.
_CLIENT_ERRORS: Final = (aetcd.ClientError, grpc.RpcError, grpc.aio.BaseError, TimeoutError)

# Group commit: batches of one kind out at once, and how big one may be. etcd's defaults:
# --max-txn-ops 128, --max-request-bytes 1.5 MiB (keys and values, plus framing). One batch out
# at a time makes the biggest batches: measured with register-bulk (10,000 models, 32 in flight),
# 2 or 4 out at once sent most ops alone and cost the pod 30-60% more CPU per registration.
_MAX_IN_FLIGHT = 1
_MAX_BATCH_OPS = 128
_MAX_BATCH_BYTES = 1024 * 1024

# Listings are read in pages of this many keys (a model record is a few hundred bytes), all at one
# revision; a listing compacted away while being read is started again this many times.
_LIST_PAGE_KEYS = 1000
_LIST_ATTEMPTS = 3

_Op = TypeVar("_Op")
_Result = TypeVar("_Result")


class _Batcher(Generic[_Op, _Result]):
    """Group commit of single-key operations: ``submit`` queues its op; at the event loop's next
    turn, if fewer than ``max_in_flight`` batches are out, the queue leaves as one batch,
    otherwise it leaves when a batch comes back. A lone op costs one loop turn of waiting.

    ``run`` gets a batch of ops and returns one outcome per op, a value or an exception to raise
    in that op's caller; an exception ``run`` raises is every op's outcome. ``fits(batch, op)``
    says whether ``op`` may join ``batch`` (ops that do not wait for the next one, in order). A
    caller that gives up (cancelled, timed out) before its batch leaves is dropped from it.
    """

    def __init__(
        self,
        run: Callable[[list[_Op]], Awaitable[list[_Result | BaseException]]],
        fits: Callable[[list[_Op], _Op], bool],
        *,
        max_in_flight: int = _MAX_IN_FLIGHT,
        max_ops: int = _MAX_BATCH_OPS,
    ) -> None:
        self._run = run
        self._fits = fits
        self._max_in_flight = max_in_flight
        self._max_ops = max_ops
        self._queue: collections.deque[tuple[_Op, asyncio.Future[_Result]]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_scheduled = False

    async def submit(self, op: _Op) -> _Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Result] = loop.create_future()
        self._queue.append((op, future))
        if not self._start_scheduled and len(self._tasks) < self._max_in_flight:
            # Not at once but at the loop's next turn, so the ops of callers woken together (a
            # burst of requests) leave as one batch.
            self._start_scheduled = True
            loop.call_soon(self._start_batches)
        return await future

    def _start_batches(self) -> None:
        self._start_scheduled = False
        while self._queue and len(self._tasks) < self._max_in_flight and self._start_batch():
            pass

    def _start_batch(self) -> bool:
        ops: list[_Op] = []
        futures: list[asyncio.Future[_Result]] = []
        while self._queue and len(ops) < self._max_ops:
            op, future = self._queue[0]
            if future.done():  # its caller gave up
                self._queue.popleft()
                continue
            if ops and not self._fits(ops, op):
                break
            self._queue.popleft()
            ops.append(op)
            futures.append(future)
        if not ops:
            return False
        task = asyncio.get_running_loop().create_task(self._run_batch(ops, futures))
        self._tasks.add(task)
        task.add_done_callback(self._batch_done)
        return True

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._start_batches()

    async def _run_batch(self, ops: list[_Op], futures: list[asyncio.Future[_Result]]) -> None:
        try:
            outcomes = await self._run(ops)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as err:  # every caller gets it, as if it had made the call alone
            for future in futures:
                if not future.done():
                    future.set_exception(_copy_error(err))
            return
        for future, outcome in zip(futures, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def wait_idle(self) -> None:
        """Until the batches out now have ended."""
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _copy_error(err: BaseException) -> BaseException:
    """One exception per caller, so their tracebacks do not pile up on one object."""
    if type(err) in (StoreUnavailable, InvalidRequest, LeaseExpired, CasFailed):
        copy = type(err)(*err.args)
        copy.__cause__ = err.__cause__
        return copy
    return err


@dataclass(frozen=True, slots=True)
class _CasPut:
    key: bytes
    value: bytes
    expected_revision: int
    lease: int


def _put_fits(batch: list[_CasPut], op: _CasPut) -> bool:
    # etcd refuses a Txn that puts one key twice; a second write of a key waits for the next batch.
    return (all(other.key != op.key for other in batch)
            and sum(len(o.key) + len(o.value) for o in batch) + len(op.key) + len(op.value) <= _MAX_BATCH_BYTES)


def _get_fits(batch: list[bytes], key: bytes) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: str  # as given, for messages
    host: str
    port: int


class EtcdStore:
    """``KVStore`` on etcd; see the module docstring for how the contract maps onto etcd.

    ``endpoints`` is one client URL or several separated by commas (the first reachable is used).
    ``timeout_s`` bounds every call, including finding a reachable endpoint; a call that runs out
    raises ``StoreUnavailable``. Nothing connects until the first call. After ``close()`` every
    call raises ``StoreUnavailable`` and active watches end.
    """

    def __init__(self, endpoints: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self._endpoints = _parse_endpoints(endpoints)
        self._timeout_s = timeout_s
        self._clients: dict[_Endpoint, Any] = {}  # aetcd.Client, one per endpoint tried
        self._current: _Endpoint | None = None  # None: find the first reachable on the next call
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._closed_event = asyncio.Event()
        self._gets: _Batcher[bytes, KeyValue | None] = _Batcher(self._get_batch, _get_fits)
        self._cas_puts: _Batcher[_CasPut, int] = _Batcher(self._cas_put_batch, _put_fits)

    @property
    def endpoint(self) -> str:
        """The endpoint in use, or all of them while none is (for messages and logs)."""
        if self._current is not None:
            return self._current.url
        return ", ".join(endpoint.url for endpoint in self._endpoints)

    # ---- errors and timeouts ---------------------------------------------------------------

    @contextlib.contextmanager
    def _translated_errors(self) -> Iterator[None]:
        """Turn what aetcd and gRPC raise into the store's errors; the only place that does."""
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                # Not this task being cancelled: close() cancelled the gRPC call under it.
                raise StoreUnavailable("the etcd store is closed") from None
            raise
        except _CLIENT_ERRORS as err:
            raise self._translate(err) from err

    @contextlib.asynccontextmanager
    async def _bounded_call(self) -> AsyncIterator[None]:
        """One store call: done within ``timeout_s``, its errors translated."""
        with self._translated_errors():
            async with asyncio.timeout(self._timeout_s):
                yield

    def _translate(self, err: BaseException) -> MeshError:
        if self._closed:
            return StoreUnavailable("the etcd store is closed")
        code, details = _status_of(err)
        message_endpoint = self.endpoint
        if code in _CONNECTION_CODES:
            self._current = None
        error_type, template = _ERRORS_BY_CODE.get(code, _OTHER_ERROR)
        message = template.format(
            endpoint=message_endpoint, details=details, code=code.name, timeout_s=self._timeout_s
        )
        return error_type(message)

    # ---- connections -----------------------------------------------------------------------

    async def _client(self) -> Any:
        """The aetcd client of the endpoint in use, looking for a reachable one when needed."""
        self._check_open()
        if self._current is None:
            async with self._connect_lock:
                if self._current is None:
                    self._current = await self._first_reachable()
        # Checked again right before use: close() may have run while this waited, and aetcd
        # would quietly open a new channel on a closed client.
        self._check_open()
        return self._clients[self._current]

    async def _first_reachable(self) -> _Endpoint:
        # Each endpoint gets its share of the call's time, so a member that swallows packets
        # cannot starve the ones after it.
        probe_timeout_s = self._timeout_s / len(self._endpoints)
        failures: list[str] = []
        for endpoint in self._endpoints:
            self._check_open()  # a client made after close() would never be closed
            client = self._clients.get(endpoint)
            if client is None:
                client = aetcd.Client(
                    endpoint.host,
                    endpoint.port,
                    timeout=self._timeout_s,
                    options=dict(_CHANNEL_OPTIONS),
                )
                self._clients[endpoint] = client
            try:
                async with asyncio.timeout(probe_timeout_s):
                    # Linearizable, so it needs the member to reach its leader, not just to answer.
                    await client.get(b"\0")
            except _CLIENT_ERRORS as err:
                details = _status_of(err)[1] or f"no answer within {probe_timeout_s:g} s"
                many = len(self._endpoints) > 1
                failures.append(f"{endpoint.url}: {details}" if many else details)
                continue
            if len(self._endpoints) > 1:
                log.info("etcd store using %s", endpoint.url)
            return endpoint
        raise StoreUnavailable(f"etcd at {self.endpoint} is unavailable: {'; '.join(failures)}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")

    # ---- reads -----------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._check_open()
        async with self._bounded_call():
            return await self._gets.submit(key.encode())

    async def _get_batch(self, keys: list[bytes]) -> list[KeyValue | None | BaseException]:
        async with self._bounded_call():
            client = await self._client()
            if len(keys) == 1:
                found = await client.kvstub.Range(
                    rpc.RangeRequest(key=keys[0]), timeout=self._timeout_s, metadata=client.metadata
                )
                return [_key_value(found.kvs[0]) if found.kvs else None]
            request = rpc.TxnRequest(success=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k)) for k in keys])
            response = await client.kvstub.Txn(request, timeout=self._timeout_s, metadata=client.metadata)
        return [_key_value(op.response_range.kvs[0]) if op.response_range.kvs else None for op in response.responses]

    async def list_prefix(self, prefix: str) -> Listing:
        for _ in range(_LIST_ATTEMPTS):
            items: list[KeyValue] = []
            revision = 0
            try:
                async for page in self.list_prefix_pages(prefix):
                    items.extend(page.items)
                    revision = page.revision
            except Compacted:
                continue  # compacted between two pages: read it all again, at the new revision
            return Listing(items=items, revision=revision)
        raise StoreUnavailable(
            f"etcd at {self.endpoint} compacted its history {_LIST_ATTEMPTS} times while {prefix!r} was being listed"
        )

    async def list_prefix_pages(
        self, prefix: str, page_keys: int = _LIST_PAGE_KEYS
    ) -> AsyncGenerator[Listing, None]:
        """``list_prefix`` in pages of at most ``page_keys`` keys, sorted by key, all read at one
        revision (the first page's, which every page carries): a consumer that decodes each page
        before asking for the next never holds the whole listing, nor does gRPC get one huge
        message. There is always at least one page. Raises ``Compacted`` when etcd compacts that
        revision before the last page is read (the listing must then start again); the
        exception's ``compact_revision`` is then the listing's revision.
        """
        start, end = _prefix_range(prefix.encode())
        revision = 0
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=page_keys, revision=revision)
            async with self._bounded_call():
                client = await self._client()
                try:
                    found = await client.kvstub.Range(request, timeout=self._timeout_s, metadata=client.metadata)
                except grpc.aio.AioRpcError as err:
                    # etcd: "mvcc: required revision has been compacted"
                    if revision and err.code() == grpc.StatusCode.OUT_OF_RANGE:
                        raise Compacted(
                            f"etcd compacted revision {revision} while {prefix!r} was being listed", revision
                        ) from None
                    raise
            # Later pages are read at the first page's revision; the header has the store's current one.
            revision = revision or int(found.header.revision)
            yield Listing(items=[_key_value(kv) for kv in found.kvs], revision=revision)
            if not found.more or not found.kvs:
                return
            start = found.kvs[-1].key + b"\0"  # the next key after the last one read

    # ---- writes ----------------------------------------------------------------------------

    async def put(
        self, key: str, value: bytes, *, expected_revision: int | None = None, lease: int = 0
    ) -> int:
        if not isinstance(value, bytes):
            raise TypeError(f"values are bytes, got {type(value).__name__}")
        raw_key = key.encode()
        if expected_revision is not None:
            self._check_open()
            async with self._bounded_call():
                return await self._cas_puts.submit(_CasPut(raw_key, value, expected_revision, lease))
        async with self._bounded_call():
            client = await self._client()
            return int((await client.put(raw_key, value, lease=lease)).header.revision)

    async def _cas_put_batch(self, ops: list[_CasPut]) -> list[int | BaseException]:
        request = rpc.TxnRequest(
            compare=[_compare_revision(op.key, op.expected_revision) for op in ops],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=op.key, value=op.value, lease=op.lease))
                     for op in ops],
            # for the message, and to tell which compares failed
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=op.key, keys_only=True)) for op in ops],
        )
        try:
            async with self._bounded_call():
                client = await self._client()
                response = await client.kvstub.Txn(request, timeout=self._timeout_s, metadata=client.metadata)
        except (LeaseExpired, InvalidRequest):
            if len(ops) == 1:
                raise
            # One op's lease is gone, or the batch is more than etcd takes: alone, each op gets
            # its own answer.
            return await self._cas_put_each(ops)
        if response.succeeded:
            return [int(response.header.revision)] * len(ops)
        # The reads ran at the revision the compares failed at: they say which ops failed. The
        # others wrote nothing either, and go again (without the failed ones).
        failed = [
            (kvs[0].mod_revision if (kvs := read.response_range.kvs) else 0) != op.expected_revision
            for op, read in zip(ops, response.responses, strict=True)
        ]
        again = [op for op, no in zip(ops, failed, strict=True) if not no]
        retried = iter(await self._cas_put_batch(again) if again and len(again) < len(ops) else ())
        outcomes: list[int | BaseException] = []
        for op, read, no in zip(ops, response.responses, failed, strict=True):
            if no or len(again) == len(ops):
                kvs = read.response_range.kvs
                actual = kvs[0].mod_revision if kvs else 0
                outcomes.append(CasFailed(
                    f"key {op.key.decode()!r} is at revision {actual}, expected {op.expected_revision}"))
            else:
                outcomes.append(next(retried))
        return outcomes

    async def _cas_put_each(self, ops: list[_CasPut]) -> list[int | BaseException]:
        alone = await asyncio.gather(*(self._cas_put_batch([op]) for op in ops), return_exceptions=True)
        return [outcome[0] if isinstance(outcome, list) else outcome for outcome in alone]

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        raw_key = key.encode()
        async with self._bounded_call():
            client = await self._client()
            if expected_revision is None:
                return await client.delete(raw_key) is not None
            txn = client.transactions
            succeeded, responses = await client.transaction(
                compare=[_expect_revision(txn, raw_key, expected_revision)],
                # Expecting absence and finding it: there is nothing to delete.
                success=[txn.delete(raw_key)] if expected_revision else [],
                failure=[txn.get(raw_key)],
            )
        if not succeeded:
            raise _cas_failed(key, expected_revision, responses)
        return bool(expected_revision) and responses[0].response_delete_range.deleted > 0

    async def compact(self, revision: int) -> None:
        """Make etcd forget the history before ``revision`` (keys stay), as its compaction does.

        Returns once the history is gone: watches from older revisions then raise ``Compacted``.
        Compacting to a revision already compacted is a no-op.
        """
        async with self._bounded_call():
            client = await self._client()
            try:
                await client.compact(revision, physical=True)
            except aetcd.ClientError as err:
                if "compacted" not in str(err):  # etcd: "required revision has been compacted"
                    raise

    # ---- watches ---------------------------------------------------------------------------

    def watch_prefix(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of events under ``prefix`` from ``start_revision`` on, until ``close()``.

        Survives lost connections and etcd restarts (it resumes where it was); raises
        ``Compacted`` when etcd no longer has the revisions it needs.
        """
        if start_revision < 1:
            # etcd reads 0 as "from now"; refusing it keeps callers on the list-then-watch path.
            raise ValueError(f"start_revision must be at least 1, got {start_revision}")
        return self._watch(prefix.encode(), start_revision)

    async def _watch(
        self, prefix: bytes, next_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        self._check_open()
        retry_s = _RETRY_MIN_S
        while True:
            call: grpc.aio.StreamStreamCall[Any, Any] | None = None
            try:
                call = await self._start_watch(prefix, next_revision)
                first = True
                while True:
                    batch = await self._next_watch_events(call, next_revision, first=first)
                    first = False
                    if batch:
                        next_revision = batch[-1].mod_revision + 1
                        retry_s = _RETRY_MIN_S
                        yield batch
            except StoreUnavailable as err:
                if self._closed:
                    return
                # Loud when a working watch breaks, quiet while etcd stays away.
                log.log(
                    logging.WARNING if retry_s == _RETRY_MIN_S else logging.DEBUG,
                    "etcd watch of %r broke (%s); resuming from revision %d in %.2f s",
                    prefix.decode(errors="replace"), err, next_revision, retry_s,
                )
            finally:
                if call is not None:
                    call.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_s):
                    await self._closed_event.wait()
            retry_s = min(retry_s * 2, _RETRY_MAX_S)

    async def _start_watch(
        self, prefix: bytes, start_revision: int
    ) -> grpc.aio.StreamStreamCall[Any, Any]:
        start, end = _prefix_range(prefix)
        request = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=start, range_end=end, start_revision=start_revision
            )
        )
        async with self._bounded_call():
            client = await self._client()
            call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
            try:
                await call.write(request)
            except BaseException:
                call.cancel()
                raise
        return call

    async def _next_watch_events(
        self, call: grpc.aio.StreamStreamCall[Any, Any], next_revision: int, *, first: bool
    ) -> list[WatchEvent]:
        # Only the answer to the create request has a deadline; events may take any time.
        with self._translated_errors():
            async with asyncio.timeout(self._timeout_s if first else None):
                response = await call.read()
        if response is grpc.aio.EOF:
            raise StoreUnavailable(
                _UNAVAILABLE.format(endpoint=self.endpoint, details="it ended the watch")
            )
        if response.compact_revision:
            raise Compacted(
                f"etcd has compacted revision {next_revision}; the oldest kept is "
                f"{response.compact_revision}",
                response.compact_revision,
            )
        if response.canceled:
            raise StoreUnavailable(
                f"etcd at {self.endpoint} cancelled the watch: {response.cancel_reason}"
            )
        # Past revisions are dropped in case a resumed stream repeats one.
        return [
            _watch_event(event)
            for event in response.events
            if event.kv.mod_revision >= next_revision
        ]

    # ---- leases ----------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: float) -> int:
        """A lease of ``ttl_s`` rounded up to whole seconds (etcd may raise it to its minimum)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        async with self._bounded_call():
            client = await self._client()
            lease = await client.lease(max(1, math.ceil(ttl_s)))
        return int(lease.id)

    async def keepalive(self, lease: int) -> None:
        async with self._bounded_call():
            client = await self._client()
            call = client.leasestub.LeaseKeepAlive(metadata=client.metadata)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                # Closing our side lets etcd end the stream after its one answer; waiting for
                # that end (rather than cancelling) leaves gRPC nothing to finish later.
                await call.done_writing()
                response = await call.read()
                await call.code()
            finally:
                call.cancel()  # on error paths; a no-op once the call has ended
        # etcd answers a keepalive of an unknown lease with TTL 0 rather than an error.
        if response is grpc.aio.EOF or response.TTL <= 0:
            raise LeaseExpired(f"lease {lease} has expired or was revoked")

    async def revoke_lease(self, lease: int) -> None:
        """Delete the lease and its keys now; a lease that is already gone is not an error."""
        with contextlib.suppress(LeaseExpired):
            async with self._bounded_call():
                client = await self._client()
                await client.revoke_lease(lease)

    # ---- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connections, which ends active watches; later calls raise StoreUnavailable."""
        if self._closed:
            return
        self._closed = True
        self._closed_event.set()  # wakes watches waiting to reconnect
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            # Closing the channel cancels its calls; watches reading from them end quietly.
            await client.close()
        # Batches out now end with "closed"; their callers are told so.
        await self._gets.wait_idle()
        await self._cas_puts.wait_idle()


# ---- conversions -----------------------------------------------------------------------------


def _parse_endpoints(endpoints: str) -> list[_Endpoint]:
    parsed: list[_Endpoint] = []
    for raw in endpoints.split(","):
        url = raw.strip()
        if not url:
            continue
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                f"etcd endpoint {url!r} is not an http://host:port URL (TLS is not supported yet)"
            )
        # gRPC wants IPv6 literals in brackets, as in a URL.
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        parsed.append(_Endpoint(url, host, parts.port or _DEFAULT_PORT))
    if not parsed:
        raise ValueError(f"no etcd endpoint in {endpoints!r}")
    return parsed


def _prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    """etcd's [key, range_end) for every key starting with ``prefix``."""
    if not prefix:
        return b"\0", b"\0"  # range_end "\0" means "to the end": every key
    # The smallest key greater than every key with the prefix: drop trailing 0xff bytes, then
    # increment the last byte.
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return prefix, b"\0"
    return prefix, stripped[:-1] + bytes([stripped[-1] + 1])


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(
        key=kv.key.decode(),
        value=bytes(kv.value),
        mod_revision=kv.mod_revision,
        create_revision=kv.create_revision,
        lease=kv.lease,
    )


def _watch_event(event: Any) -> WatchEvent:
    kv = event.kv
    if event.type == rpc.Event.DELETE:
        return WatchEvent(EventKind.DELETE, kv.key.decode(), b"", kv.mod_revision)
    return WatchEvent(EventKind.PUT, kv.key.decode(), bytes(kv.value), kv.mod_revision)


def _expect_revision(txn: Any, key: bytes, expected_revision: int) -> Any:
    """The compare of a compare-and-set: 0 means absent (never created, or deleted since)."""
    if expected_revision == 0:
        return txn.create(key) == 0
    return txn.mod(key) == expected_revision


def _compare_revision(key: bytes, expected_revision: int) -> Any:
    """``_expect_revision`` as the wire message, for a batch's Txn."""
    if expected_revision == 0:
        return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=0)
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=expected_revision)


def _cas_failed(key: str, expected_revision: int, responses: list[Any]) -> CasFailed:
    # The failure branch read the key: [(value, kv)] when it exists, [] when it does not.
    found = responses[0] if responses else []
    actual = found[0][1].mod_revision if found else 0
    return CasFailed(f"key {key!r} is at revision {actual}, expected {expected_revision}")


def _status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status behind a gRPC error, or an aetcd one (aetcd keeps gRPC's as the cause)."""
    rpc_error = err if isinstance(err, grpc.aio.AioRpcError) else err.__cause__
    if isinstance(rpc_error, grpc.aio.AioRpcError):
        return rpc_error.code(), rpc_error.details() or ""
    if isinstance(err, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, ""
    return grpc.StatusCode.UNKNOWN, f"{type(err).__name__}: {err}"
