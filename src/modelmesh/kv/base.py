"""The store interface the registry and membership use; ``kv/memory.py`` and ``kv/etcd.py`` implement it.

Semantics follow etcd so both stores behave the same:
- one revision counter for the whole store, raised by every write;
- ``mod_revision`` of a key is the revision of its last write; compare-and-set compares it
  (``expected_revision=0`` means "the key must not exist");
- a watch delivers, in revision order, every change under a prefix after ``start_revision``;
  when that revision is no longer kept it raises ``Compacted`` and the caller re-lists;
- a key written with a lease is deleted when the lease expires or is revoked.
Errors reaching the store raise ``StoreUnavailable``; a failed compare raises ``CasFailed``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from modelmesh.errors import MeshError


class CasFailed(MeshError):
    """The key's revision was not the expected one (someone else wrote first)."""


class Compacted(MeshError):
    """A watch asked for history the store no longer keeps; re-list and watch from there."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    key: str
    value: bytes  # empty for DELETE
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Listing:
    items: list[KeyValue]
    revision: int  # the store's revision at the time of the read; watch from revision + 1


class KVStore(Protocol):
    async def get(self, key: str) -> KeyValue | None: ...

    async def list_prefix(self, prefix: str) -> Listing: ...

    async def put(
        self, key: str, value: bytes, *, expected_revision: int | None = None, lease: int = 0
    ) -> int:
        """Write ``value``; return the new revision. With ``expected_revision`` the write happens
        only if the key's mod_revision equals it (0: only if absent), else CasFailed."""

    async def delete(self, key: str, *, expected_revision: int | None = None) -> bool:
        """Delete; True when something was deleted. CasFailed on a revision mismatch."""

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events under ``prefix`` with mod_revision >= start_revision, until close().

        ``start_revision`` is at least 1; to follow a table, list it and watch from
        ``Listing.revision + 1``. Events come in revision order, and all events of one revision
        (a lease's keys vanish in one) come in one batch. Raises ``Compacted`` when that history is
        gone, at the start or later for a consumer that falls too far behind. The result is an
        async generator: stop it with ``aclose()`` or by cancelling the task that iterates it."""

    async def grant_lease(self, ttl_s: float) -> int:
        """A new lease id; keys written with it vanish ttl_s after the last keepalive."""

    async def keepalive(self, lease: int) -> None:
        """Refresh a lease once; raises ``LeaseExpired`` when it is gone."""

    async def revoke_lease(self, lease: int) -> None:
        """Delete the lease and its keys now; a lease that is already gone is not an error."""

    async def close(self) -> None:
        """Release everything and end active watches; idempotent. Later calls may raise
        ``StoreUnavailable``."""


class LeaseExpired(MeshError):
    """The lease no longer exists (expired or revoked)."""
