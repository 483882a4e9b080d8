"""Every pod as this pod's placement sees it.

The mesh core asks here for what the pure placement code (``placement/``) takes as input: the live
pods' published records as a :class:`~modelmesh.placement.view.ClusterView`, plus the loads this
pod has sent to each since that pod last republished (*pending loads*: without them every pod
would send its next loads to the same emptiest pod until the records caught up), and the figures
the copy keeper decides by (pod rates, the cluster's fullness, the pods a model may live on).

This pod is judged by the same yardstick as the others: its published record plus its pending
loads, so it neither favours nor shuns itself. Its own request rate is the one figure read live.
Without a cluster (unit tests of the cache alone) there are no other pods: this pod's own figures
stand for the cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from modelmesh.clock import Clock
from modelmesh.cluster import Cluster
from modelmesh.placement.load import project_pending
from modelmesh.placement.view import (
    ClusterView,
    InstanceView,
    LabelConstraint,
    PendingLoad,
    TypeConstraints,
)
from modelmesh.types import InstanceRecord, ModelRecord

__all__ = ["PENDING_TTL_MS", "PodViews"]

# a load sent to another pod counts against it in placement until it republishes, or this long
PENDING_TTL_MS: Final = 30_000


class PodViews:
    def __init__(
        self,
        *,
        instance_id: str,
        clock: Clock,
        constraints: TypeConstraints,
        own_rate_rpm: Callable[[], int],
        own_used_bytes: Callable[[], int],
        own_capacity_bytes: Callable[[], int],
        default_size: Callable[[], int],
    ) -> None:
        self.instance_id = instance_id
        self.constraints = constraints
        self.cluster: Cluster | None = None
        self._clock = clock
        self._own_rate_rpm = own_rate_rpm
        self._own_used_bytes = own_used_bytes
        self._own_capacity_bytes = own_capacity_bytes
        self._default_size = default_size
        # loads sent to other pods that their records may not show yet: (load, record revision then)
        self._pending: dict[str, list[tuple[PendingLoad, int]]] = {}

    # ------------------------------------------------------------------ holders and eligibility

    def is_live(self, instance_id: str) -> bool:
        """This pod, or a pod whose lease holds; every pod counts as live without a cluster."""
        return instance_id == self.instance_id or self.cluster is None or self.cluster.is_live(instance_id)

    def live_holders(self, record: ModelRecord) -> list[str]:
        """The pods the record lists as holding a copy that are still here, sorted."""
        return sorted(i for i in record.copies if self.is_live(i))

    def eligible_pods(self, record: ModelRecord) -> list[str]:
        """Pods that may hold the model: not shutting down, with its type's required labels and its
        pin labels."""
        needed = self.constraints.for_type(record.info.type).required | frozenset(record.pin_labels)
        instances = self.published() if self.cluster is not None else {}
        return sorted(i for i, r in instances.items() if not r.shutting_down and needed <= set(r.labels))

    # ------------------------------------------------------------------ rates and fullness

    def pod_rate(self, instance_id: str) -> int:
        """A pod's request rate as placement sees it: this pod's own, live; another's as published."""
        if instance_id == self.instance_id:
            return self._own_rate_rpm()
        record = self.cluster.view.get(instance_id) if self.cluster is not None else None
        return record.request_rate_rpm if record is not None else 0

    def mean_pod_rate(self) -> float:
        """The mean request rate over the live pods' records (this pod's live): the copy limit's base."""
        if self.cluster is None:
            return float(self._own_rate_rpm())
        instances = self.published()
        return sum(self.pod_rate(i) for i in instances) / len(instances)

    def cluster_fullness(self) -> float:
        """Used over capacity, summed over the live pods' records."""
        if self.cluster is None:
            capacity, used = self._own_capacity_bytes(), self._own_used_bytes()
        else:
            instances = self.published().values()
            capacity = sum(r.capacity_bytes for r in instances) or self._own_capacity_bytes()
            used = sum(r.used_bytes for r in instances)
        return used / capacity if capacity else 1.0

    # ------------------------------------------------------------------ pending loads

    def add_pending(self, instance_id: str, model_id: str, now_ms: int) -> None:
        """Count a load sent to ``instance_id`` (this pod included) against it until its record is
        republished: every pod is judged by its published record plus what we sent it since, alike."""
        assert self.cluster is not None
        revision = self.cluster.view.versioned(instance_id)
        self._pending.setdefault(instance_id, []).append(
            (PendingLoad(model_id, self._default_size(), now_ms), revision.revision if revision else 0))

    def pending_loads(self) -> dict[str, list[PendingLoad]]:
        """Pending loads still worth counting: the pod has not republished since, and they are young."""
        if self.cluster is None:
            return {}
        now = self._clock.now_ms()
        out: dict[str, list[PendingLoad]] = {}
        for instance_id, entries in list(self._pending.items()):
            current = self.cluster.view.versioned(instance_id)
            kept = [(p, rev) for p, rev in entries
                    if current is not None and current.revision == rev and now - p.chosen_ms < PENDING_TTL_MS]
            if kept:
                self._pending[instance_id] = kept
                out[instance_id] = [p for p, _ in kept]
            else:
                del self._pending[instance_id]
        return out

    def pending_for(self, model_id: str) -> int:
        """How many pending loads are of this model."""
        return sum(1 for loads in self.pending_loads().values() for p in loads if p.model_id == model_id)

    def forget(self, instance_id: str) -> None:
        """A pod left: its pending loads no longer count."""
        self._pending.pop(instance_id, None)

    # ------------------------------------------------------------------ placement's input

    def placement_view(self, record: ModelRecord | None = None,
                       pending: dict[str, list[PendingLoad]] | None = None) -> ClusterView:
        """The pods as placement sees them, pending loads projected onto their records (``pending``:
        the pending loads already read, else read now). A model pinned to labels adds them to its
        type's required labels."""
        assert self.cluster is not None
        constraints = self.constraints
        if record is not None and record.pin_labels:
            base = constraints.for_type(record.info.type)
            pinned = LabelConstraint(required=base.required | frozenset(record.pin_labels), preferred=base.preferred)
            constraints = TypeConstraints(
                by_type=(*[(t, c) for t, c in constraints.by_type if t != record.info.type],
                         (record.info.type, pinned)),
                default=constraints.default,
            )
        instances = tuple(
            InstanceView(
                instance_id=i, capacity_bytes=r.capacity_bytes, used_bytes=r.used_bytes,
                model_count=r.model_count, lru_time_ms=r.lru_time_ms,
                loading_in_flight=r.loading_in_flight, loading_slots=r.loading_slots,
                request_rate_rpm=r.request_rate_rpm, labels=frozenset(r.labels), zone=r.zone,
                version=r.version, start_time_ms=r.start_time_ms, shutting_down=r.shutting_down,
            )
            for i, r in self.published().items()
        )
        view = ClusterView(instances, default_model_size_bytes=self._default_size(), constraints=constraints)
        return project_pending(view, self.pending_loads() if pending is None else pending)

    def published(self) -> dict[str, InstanceRecord]:
        """Every live pod's published record, this pod's included (its current one until the first
        publish)."""
        assert self.cluster is not None
        instances = dict(self.cluster.view.items())
        if self.instance_id not in instances:
            instances[self.instance_id] = self.cluster.current()
        return instances
