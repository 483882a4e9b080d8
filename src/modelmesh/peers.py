"""The other pods, as this pod forwards requests to them: one client each, and the requests in flight.

A pod's client (a ``Forwarder``, in production a ``runtime.grpc_client.PeerClient`` with its own
channel) is made on the first request to it and kept, so a hop costs no connection set-up; it is
made again when the pod's advertised endpoint changes (a restart elsewhere under the same id) and
closed when the pod leaves the cluster. The requests this pod has in flight to each peer feed the
choice between copies (``placement.load.choose_copy``: the fewest in flight).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from modelmesh.routing import HOP_HEADER
from modelmesh.runtime.base import Forwarder, Metadata

log = logging.getLogger(__name__)

# how long a departed (or moved) pod's client stays open for the requests already on it
CLOSE_GRACE_S = 30.0


class Peers:
    def __init__(self, factory: Callable[[str], Forwarder] | None, *, this_instance: str) -> None:
        self._factory = factory
        self._this = this_instance
        self._clients: dict[str, tuple[str, Forwarder]] = {}
        self._in_flight: dict[str, int] = {}
        # clients closing after their grace period, by the task closing each
        self._closing: dict[asyncio.Task[None], Forwarder] = {}

    def in_flight(self, instance_id: str) -> int:
        return self._in_flight.get(instance_id, 0)

    async def invoke(
        self, instance_id: str, endpoint: str, method: str, body: bytes, metadata: Metadata,
        timeout_s: float | None,
    ) -> bytes:
        """Send the request to the pod at ``endpoint``, marked as forwarded (``HOP_HEADER``) so it
        is served there and never forwarded again."""
        if self._factory is None:
            raise RuntimeError("this mesh was built without a way to reach other pods")
        known = self._clients.get(instance_id)
        if known is None or known[0] != endpoint:
            if known is not None:
                self._close_later(known[1])
            known = self._clients[instance_id] = (endpoint, self._factory(endpoint))
        self._in_flight[instance_id] = self._in_flight.get(instance_id, 0) + 1
        try:
            return await known[1].invoke(method, body, [*metadata, (HOP_HEADER, self._this)], timeout_s)
        finally:
            left = self._in_flight[instance_id] - 1
            if left:
                self._in_flight[instance_id] = left
            else:
                del self._in_flight[instance_id]

    def forget(self, instance_id: str) -> None:
        """The pod left the cluster: close its client once the requests on it have finished or
        failed (up to ``CLOSE_GRACE_S``)."""
        known = self._clients.pop(instance_id, None)
        if known is not None:
            self._close_later(known[1])

    def _close_later(self, client: Forwarder) -> None:
        task = asyncio.create_task(client.close(CLOSE_GRACE_S), name="close-peer")
        self._closing[task] = client
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("closing a peer's client failed: %s", task.exception())

    async def close(self) -> None:
        """Close every client now, those still in their grace period too."""
        clients = [client for _, client in self._clients.values()] + list(self._closing.values())
        self._clients.clear()
        await asyncio.gather(*(c.close() for c in clients), *self._closing, return_exceptions=True)
