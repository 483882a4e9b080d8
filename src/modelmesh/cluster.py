"""Membership: this pod's instance record in the store, and the live view of every pod.

Each pod writes ``<prefix>/<service>/instances/<instanceId>`` bound to a lease, refreshed by a
keepalive loop, so a pod that dies (even by SIGKILL) leaves every view when its lease expires. The
record is checked every 200 ms and republished only when a figure moves beyond a threshold (or a long
interval passes), not per request: placement corrects for the staleness with locally counted pending
loads. The check is frequent because those pending loads cover only what this pod sent: with a 1 s
check, 300 first requests entering three pods at once landed up to 1.6x of even on one pod (pods
that had not republished yet looked emptier and quieter to all the others), with 200 ms within 1.1x.

In single-node mode the same code runs on the in-memory store, where the view holds only this pod.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from modelmesh.clock import Clock
from modelmesh.errors import MeshError
from modelmesh.kv.base import CasFailed, KVStore, LeaseExpired
from modelmesh.types import InstanceRecord
from modelmesh.watched import PrefixView

log = logging.getLogger(__name__)

# republish at least this often even when nothing moved (ms)
REPUBLISH_MAX_INTERVAL_MS = 60_000


def moved_enough(old: InstanceRecord, new: InstanceRecord) -> bool:
    """Whether ``new`` differs from the published ``old`` enough to republish (ModelMesh's
    thresholds: capacity 2%, model count 10 or 15%, used 20%, request rate 100 or 10%)."""
    if (old.shutting_down, old.endpoint, old.labels, old.zone, old.version) != (
        new.shutting_down, new.endpoint, new.labels, new.zone, new.version
    ):
        return True
    if abs(new.capacity_bytes - old.capacity_bytes) > 0.02 * max(old.capacity_bytes, 1):
        return True
    count_delta = abs(new.model_count - old.model_count)
    if count_delta >= 10 or count_delta > 0.15 * max(old.model_count, 1):
        return True
    if abs(new.used_bytes - old.used_bytes) > 0.2 * max(old.used_bytes, 1):
        return True
    rpm_delta = abs(new.request_rate_rpm - old.request_rate_rpm)
    if rpm_delta >= 100 or rpm_delta > 0.1 * max(old.request_rate_rpm, 1) and rpm_delta > 10:
        return True
    return new.loading_in_flight != old.loading_in_flight and (new.loading_in_flight == 0 or old.loading_in_flight == 0)


class Cluster:
    def __init__(
        self,
        store: KVStore,
        key_root: str,
        instance_id: str,
        *,
        clock: Clock,
        lease_ttl_s: float,
        figures: Callable[[], InstanceRecord],
        check_interval_s: float = 0.2,
        campaign_interval_s: float = 1.0,
    ) -> None:
        self.instance_id = instance_id
        self._store = store
        self._prefix = f"{key_root}/instances/"
        self._clock = clock
        self._ttl = lease_ttl_s
        self._figures = figures
        self._check_interval = check_interval_s
        self._campaign_interval = campaign_interval_s
        self.view: PrefixView[InstanceRecord] = PrefixView(
            store, self._prefix, InstanceRecord.from_json, name="instances")
        self._lease = 0
        self._published: InstanceRecord | None = None
        self._published_ms = 0
        self._shutting_down = False
        self._tasks: list[asyncio.Task[None]] = []
        self._leader_key = f"{key_root}/leader"
        self._leader: str | None = None

    # ---- reads (request path)

    def is_live(self, instance_id: str) -> bool:
        return instance_id in self.view

    def endpoint(self, instance_id: str) -> str | None:
        record = self.view.get(instance_id)
        return record.endpoint if record else None

    def others_stopping(self) -> list[str]:
        """The other pods published as shutting down, sorted."""
        return sorted(i for i, r in self.view.items() if i != self.instance_id and r.shutting_down)

    def instances(self) -> dict[str, InstanceRecord]:
        """Every live pod; this pod with its current figures rather than its last published ones."""
        out = dict(self.view.items())
        out[self.instance_id] = self.current()
        return out

    def current(self) -> InstanceRecord:
        record = self._figures()
        return replace(record, shutting_down=self._shutting_down) if self._shutting_down else record

    def is_leader(self) -> bool:
        """Whether this pod does the cluster's chores now. Elected through the store: the first pod
        to create ``<prefix>/<service>/leader`` under its lease leads until it resigns (shutting
        down) or its lease goes; the others try again every check. Chores are idempotent
        compare-and-set updates, so the moment of overlap a lease expiry allows does no harm."""
        return not self._shutting_down and self._leader == self.instance_id

    @property
    def leader(self) -> str | None:
        return self._leader

    async def _campaign(self) -> None:
        if self._shutting_down or not self._lease:
            return
        kv = await self._store.get(self._leader_key)
        if kv is None:
            try:
                await self._store.put(self._leader_key, self.instance_id.encode(), expected_revision=0,
                                      lease=self._lease)
                if self._leader != self.instance_id:
                    log.info("elected leader of the cluster's chores")
                self._leader = self.instance_id
                return
            except (CasFailed, LeaseExpired):
                kv = await self._store.get(self._leader_key)
        self._leader = kv.value.decode() if kv is not None else None

    async def _resign(self) -> None:
        kv = await self._store.get(self._leader_key)
        if kv is not None and kv.value.decode() == self.instance_id:
            try:
                await self._store.delete(self._leader_key, expected_revision=kv.mod_revision)
            except CasFailed:
                pass
        self._leader = None

    # ---- lifecycle

    async def start(self) -> None:
        await self._publish(force=True)
        await self.view.start()
        await self._campaign()
        self._tasks = [
            asyncio.create_task(self._keepalive_loop(), name="instance-keepalive"),
            asyncio.create_task(self._publish_loop(), name="instance-publish"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.view.close()
        if self._lease:
            try:
                # revoking deletes our record at once, so peers stop routing here now, not at expiry
                await self._store.revoke_lease(self._lease)
            except MeshError as err:
                log.warning("could not revoke the instance lease: %s", err)
            self._lease = 0

    async def mark_shutting_down(self) -> None:
        self._shutting_down = True
        try:
            await self._publish(force=True)
            await self._resign()
        except MeshError as err:
            log.warning("could not publish shutting-down: %s", err)

    # ---- publishing

    async def _publish(self, *, force: bool = False) -> None:
        record = self.current()
        now = self._clock.now_ms()
        if not force and self._published is not None and not moved_enough(self._published, record) \
                and now - self._published_ms < REPUBLISH_MAX_INTERVAL_MS:
            return
        if not self._lease:
            self._lease = await self._store.grant_lease(self._ttl)
        try:
            revision = await self._store.put(self._prefix + self.instance_id, record.to_json(), lease=self._lease)
        except LeaseExpired:
            self._lease = await self._store.grant_lease(self._ttl)
            revision = await self._store.put(self._prefix + self.instance_id, record.to_json(), lease=self._lease)
        self._published, self._published_ms = record, now
        self.view.remember(self.instance_id, record, revision)

    async def _publish_loop(self) -> None:
        # the record is checked often, so a burst of loads shows in the views within a fraction of
        # a second (placement's pending loads cover only what this pod sent); the leader key is
        # campaigned for every campaign interval, a store read each time
        checks_per_campaign = max(1, round(self._campaign_interval / self._check_interval))
        checks = 0
        while True:
            await asyncio.sleep(self._check_interval)
            checks += 1
            try:
                await self._publish()
                if checks % checks_per_campaign == 0:
                    await self._campaign()
            except MeshError as err:
                log.warning("could not publish this pod's record: %s", err)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                if self._lease:
                    await self._store.keepalive(self._lease)
            except LeaseExpired:
                log.warning("instance lease expired (store unreachable too long?); publishing again")
                self._lease = 0
                try:
                    await self._publish(force=True)
                except MeshError as err:
                    log.warning("could not publish this pod's record: %s", err)
            except MeshError as err:
                log.warning("instance lease keepalive failed: %s", err)
