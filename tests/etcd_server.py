"""A real etcd process for tests: free loopback ports, a fresh data dir, health-checked start.

etcd cannot listen on port 0 and report the port it got, so ports are picked here: random ports
below the kernel's ephemeral range (where outgoing connections never take them), checked with a
bind, and when etcd still loses the race for one it exits with "address already in use" and the
start is retried on new ports. A restart (``stop()`` then ``start()``) keeps the data dir and the
ports, so clients reconnect to the same endpoint and find the same data; ``pause()`` and
``resume()`` freeze and thaw it, for a server that accepts connections but never answers.

etcd is required, not optional: when it is missing the helper raises ``EtcdNotInstalled`` with
what to install, so the tests fail loudly instead of skipping.

``EtcdTestView`` gives one test its own corner of an etcd that many tests share.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from modelmesh.kv.base import KeyValue, Listing, WatchEvent
from modelmesh.kv.etcd import EtcdStore

__all__ = ["EtcdNotInstalled", "EtcdServer", "EtcdTestView", "etcd_binary"]

_NAME = "modelmesh-test"
_START_ATTEMPTS = 5
_PORT_IN_USE = "address already in use"
# tmpfs makes etcd's fsync per write nearly free, which keeps write-heavy tests fast.
_FAST_TMP = Path("/dev/shm")

_running: set[EtcdServer] = set()


class EtcdNotInstalled(RuntimeError):
    pass


def etcd_binary() -> str:
    """The etcd executable; ``EtcdNotInstalled`` says how to get one when there is none."""
    path = shutil.which("etcd")
    if path is None and os.access("/usr/bin/etcd", os.X_OK):
        path = "/usr/bin/etcd"  # PATH may not have /usr/bin under some CI runners
    if path is None:
        raise EtcdNotInstalled(
            "etcd is not installed (no 'etcd' on PATH): the etcd store tests need a real "
            "etcd 3.4+; install it with `apt-get install etcd-server` (Debian/Ubuntu) or put "
            "the release binary on PATH"
        )
    return path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _free_port(taken: set[int]) -> int:
    low, _ = _ephemeral_range()
    lowest = max(1024, low - 12_000) if low > 2048 else 20_000
    highest = low - 1 if low > 2048 else 30_000
    for _ in range(200):
        port = random.randint(lowest, highest)
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Like etcd (Go sets SO_REUSEADDR), so a port in TIME_WAIT counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"found no free loopback port in {lowest}-{highest}")


def _all_stopped(tasks: Path) -> bool:
    """Whether every thread under ``/proc/<pid>/task`` is stopped (state T) or gone."""
    for stat in tasks.glob("*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread exited meanwhile
        if state not in ("T", "t"):
            return False
    return True


class EtcdServer:
    """One single-member etcd cluster on loopback; use as a context manager or call close().

    ``endpoint`` is the client URL (``http://127.0.0.1:<port>``). ``stop()`` ends the process
    (SIGTERM, then SIGKILL); ``start()`` starts it again on the same ports and data dir.
    """

    def __init__(self, data_dir: Path | None = None, *, start_timeout_s: float = 20.0) -> None:
        self._binary = etcd_binary()
        self._owns_data_dir = data_dir is None
        self._data_dir = data_dir  # made at the first start when not given
        self._start_timeout_s = start_timeout_s
        self._client_port = 0
        self._peer_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if not self._client_port:
            raise RuntimeError("etcd has not been started")
        return f"http://127.0.0.1:{self._client_port}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            parent = _FAST_TMP if os.access(_FAST_TMP, os.W_OK) else None
            self._data_dir = Path(tempfile.mkdtemp(prefix="modelmesh-etcd-", dir=parent))
        return self._data_dir

    @property
    def _log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        if self._data_dir is None:
            return ""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start etcd and return once it answers its health check."""
        if self.running:
            return
        if self._client_port:
            # A restart: same ports, so clients find it where it was.
            self._launch()
            return
        taken: set[int] = set()
        for _ in range(_START_ATTEMPTS):
            self._client_port = _free_port(taken)
            self._peer_port = _free_port(taken | {self._client_port})
            taken |= {self._client_port, self._peer_port}
            try:
                self._launch()
                return
            except _PortTaken:
                continue
        raise RuntimeError(f"etcd found no free ports in {_START_ATTEMPTS} attempts:\n{self.log()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if etcd has not exited within ``timeout_s``."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)  # a paused etcd handles SIGTERM only once resumed
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pause(self) -> None:
        """Freeze etcd (SIGSTOP): connections stay open but nothing answers, as with a hung host.
        Returns once every thread of etcd is stopped: the signal is only queued when kill()
        returns, and a thread running on another CPU went on to answer a request sent right after
        (a test's list_prefix succeeded against a "frozen" etcd once in CI)."""
        assert self._proc is not None, "etcd is not running"
        self._proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self._proc.pid}/task")
        deadline = time.monotonic() + 5.0
        while not _all_stopped(tasks):
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd (pid {self._proc.pid}) did not stop within 5 s of SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        """Undo ``pause()``."""
        assert self._proc is not None, "etcd is not running"
        self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop etcd and delete the data dir and log if this server created them."""
        self.stop()
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._log_path.unlink(missing_ok=True)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _launch(self) -> None:
        client_url = f"http://127.0.0.1:{self._client_port}"
        peer_url = f"http://127.0.0.1:{self._peer_port}"
        args = [
            self._binary,
            "--name", _NAME,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{_NAME}={peer_url}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
            # A restarted single member waits one election timeout before it leads again; a short
            # one keeps restart tests quick. It also lowers etcd's minimum lease TTL to 1 s.
            "--heartbeat-interval", "25",
            "--election-timeout", "250",
        ]
        # ETCD_* variables would override these flags (etcd reads its config from the env too).
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self._log_path, "ab") as log_file:
            log_offset = log_file.tell()
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env
            )
        _running.add(self)
        self._wait_healthy(log_offset)

    def _wait_healthy(self, log_offset: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout_s
        url = f"http://127.0.0.1:{self._client_port}/health"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc.wait()
                self._proc = None
                _running.discard(self)
                with open(self._log_path, "rb") as log_file:
                    log_file.seek(log_offset)
                    log = log_file.read().decode(errors="replace")
                if _PORT_IN_USE in log:
                    raise _PortTaken()
                raise RuntimeError(f"etcd exited during start:\n{log}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if json.loads(response.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass  # not listening yet, or no leader yet
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"etcd was not healthy within {self._start_timeout_s} s:\n{self.log()}")


class _PortTaken(Exception):
    pass


@atexit.register
def _stop_leftovers() -> None:
    # A safety net: fixtures stop their servers, but an interrupted run must not leave etcd behind.
    for server in list(_running):
        server.stop(timeout_s=2.0)


# ---- a view of a shared etcd for one test --------------------------------------------------

LEASE_TIME_SCALE = 0.2
"""etcd seconds per second of a test's clock: a test's 10 s lease is a 2 s lease in etcd."""
EXPIRY_SLACK_S = 1.0
"""How long after a lease's TTL etcd may take to delete it: its lessor looks every 0.5 s."""
CATCH_UP_TIMEOUT_S = 2.0
"""Bound on waiting for open watches to deliver the view's writes before it closes."""


@dataclass
class _LeaseClock:
    deadline: float  # on the test's clock
    ttl_s: float  # on the test's clock
    etcd_ttl_s: int
    expires_by: float  # time.monotonic() after which etcd has certainly expired it


@dataclass
class _OpenWatch:
    prefix: str
    next_revision: int


class EtcdTestView:
    """``KVStore`` over an ``EtcdStore``: one test's keys under its own prefix, faster leases.

    It lets the store contract suite, written for a store with a fake clock and a keyspace of its
    own, run on an etcd shared by many tests. Keys are kept under ``prefix`` (and shown without
    it). Lease TTLs are scaled by ``LEASE_TIME_SCALE``, and ``let_time_pass`` follows the test's
    clock: it sleeps the scaled time, and as long as etcd needs to expire every lease the test
    expects gone by then. The test's leases left at the end are revoked by the factory, so none
    expires during a later test and moves the shared revision under it.

    ``close()`` first lets open watches deliver the puts made through this view. The in-memory
    store gets that from ``let_watches_wait``'s few loop turns; an etcd watch needs round trips
    (and etcd hands history to a new watch on a 100 ms tick), and closing earlier would end it
    before the events it was started to see.
    """

    def __init__(self, store: EtcdStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self._now = 0.0  # the test's clock
        self._leases: dict[int, _LeaseClock] = {}
        self._puts: list[tuple[str, int]] = []  # (key, revision)
        self._open_watches: list[_OpenWatch] = []

    def _key_value(self, kv: KeyValue) -> KeyValue:
        return dataclasses.replace(kv, key=kv.key.removeprefix(self._prefix))

    async def get(self, key: str) -> KeyValue | None:
        kv = await self._store.get(self._prefix + key)
        return None if kv is None else self._key_value(kv)

    async def list_prefix(self, prefix: str) -> Listing:
        listing = await self._store.list_prefix(self._prefix + prefix)
        return Listing([self._key_value(kv) for kv in listing.items], listing.revision)

    async def put(
        self, key: str, value: bytes, *, expected_revision: int | None = None, lease: int = 0
    ) -> int:
        revision = await self._store.put(
            self._prefix + key, value, expected_revision=expected_revision, lease=lease
        )
        self._puts.append((key, revision))
        return revision

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        return await self._store.delete(self._prefix + key, expected_revision=expected_revision)

    def watch_prefix(
        self, prefix: str, start_revision: int
    ) -> AsyncGenerator[list[WatchEvent], None]:
        stream = self._store.watch_prefix(self._prefix + prefix, start_revision)
        return self._unprefixed(stream, _OpenWatch(prefix, start_revision))

    async def _unprefixed(
        self, stream: AsyncGenerator[list[WatchEvent], None], watch: _OpenWatch
    ) -> AsyncGenerator[list[WatchEvent], None]:
        self._open_watches.append(watch)
        try:
            async with contextlib.aclosing(stream):
                async for batch in stream:
                    watch.next_revision = batch[-1].mod_revision + 1
                    yield [
                        dataclasses.replace(e, key=e.key.removeprefix(self._prefix))
                        for e in batch
                    ]
        finally:
            self._open_watches.remove(watch)

    def _watches_caught_up(self) -> bool:
        return all(
            revision < watch.next_revision
            for watch in self._open_watches
            for key, revision in self._puts
            if key.startswith(watch.prefix)
        )

    async def grant_lease(self, ttl_s: float) -> int:
        etcd_ttl_s = max(1, math.ceil(ttl_s * LEASE_TIME_SCALE))
        lease = await self._store.grant_lease(etcd_ttl_s)
        self._leases[lease] = _LeaseClock(0, ttl_s, etcd_ttl_s, 0)
        self._refreshed(lease)
        return lease

    async def keepalive(self, lease: int) -> None:
        await self._store.keepalive(lease)
        self._refreshed(lease)

    def _refreshed(self, lease: int) -> None:
        if (clock := self._leases.get(lease)) is not None:
            clock.deadline = self._now + clock.ttl_s
            # Taken after etcd answered, so etcd's own deadline is no later than this one.
            clock.expires_by = time.monotonic() + clock.etcd_ttl_s + EXPIRY_SLACK_S

    async def revoke_lease(self, lease: int) -> None:
        await self._store.revoke_lease(lease)
        self._leases.pop(lease, None)

    async def let_time_pass(self, seconds: float) -> None:
        self._now += seconds
        until = time.monotonic() + seconds * LEASE_TIME_SCALE
        for lease, clock in list(self._leases.items()):
            if clock.deadline <= self._now:  # the test expects it gone now
                until = max(until, clock.expires_by)
                del self._leases[lease]
        await asyncio.sleep(until - time.monotonic())

    def leases_left(self) -> list[int]:
        """Leases granted and not yet revoked or expired."""
        return list(self._leases)

    async def close(self) -> None:
        async with asyncio.timeout(CATCH_UP_TIMEOUT_S):
            while not self._watches_caught_up():
                await asyncio.sleep(0.01)
        await self._store.close()
