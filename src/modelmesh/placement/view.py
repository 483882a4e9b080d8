"""Snapshot types that placement decides over: the cluster as one pod sees it, and one model.

These are plain frozen values built by the caller (the mesh) from its watched view of the instance
and model records; placement never reads the store. Sizes are bytes, times are ms since the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class LabelConstraint:
    """The labels a pod must have (``required``) and should have (``preferred``) to load a type."""

    required: frozenset[str] = frozenset()
    preferred: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TypeConstraints:
    """``MM_TYPE_CONSTRAINTS`` parsed: a :class:`LabelConstraint` per model type.

    A type without an entry falls back to ``default`` (the ``"_default"`` key); an entry replaces the
    default, it does not add to it. Build one with ``placement.load.parse_type_constraints``.
    """

    by_type: tuple[tuple[str, LabelConstraint], ...] = ()
    default: LabelConstraint = LabelConstraint()

    def for_type(self, model_type: str) -> LabelConstraint:
        for name, constraint in self.by_type:
            if name == model_type:
                return constraint
        return self.default


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One mesh pod (its instance record), as placement sees it."""

    instance_id: str
    capacity_bytes: int
    used_bytes: int
    model_count: int
    # last-use time of its least recently used model: how cheap an eviction there would be.
    # An empty pod passes 0; emptiness already ranks it first through model count and free space.
    lru_time_ms: int
    loading_in_flight: int = 0
    loading_slots: int = 1
    request_rate_rpm: int = 0
    labels: frozenset[str] = frozenset()
    # zone and start time are published for zone-aware copies and readiness; load placement
    # does not rank on them yet
    zone: str = ""
    # deployment version; compared in natural order ("1.10" is newer than "1.9"), "" is oldest
    version: str = ""
    start_time_ms: int = 0
    shutting_down: bool = False
    # loads this pod sent here that the record does not show yet (set by ``project_pending``; its
    # size, model count and loading slot are already added to the figures above)
    pending_loads: int = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    @property
    def free_loading_slots(self) -> int:
        return self.loading_slots - self.loading_in_flight


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The pods placement may choose from, with the settings that shape the choice.

    ``default_model_size_bytes`` is the runtimes' ``defaultModelSizeInBytes``: the unit of the
    "full" rule. ``constraints`` is the parsed ``MM_TYPE_CONSTRAINTS``.
    """

    instances: tuple[InstanceView, ...]
    default_model_size_bytes: int = MIB
    constraints: TypeConstraints = field(default_factory=TypeConstraints)


@dataclass(frozen=True, slots=True)
class ModelView:
    """The model to place: its type, predicted size, and where it already is or failed."""

    model_id: str
    model_type: str
    # predicted size; 0 or less means unknown and counts as the cluster's default model size
    predicted_size_bytes: int = 0
    # last use of the model anywhere; 0 when never used
    last_used_ms: int = 0
    # instances that hold a copy or are loading one (the record's copies)
    holders: frozenset[str] = frozenset()
    # instances where a load failed and the failure has not expired yet
    failed: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PendingLoad:
    """A load this pod sent to an instance whose record does not show it yet.

    The caller keeps these per instance id and drops one when the instance republishes its record
    after ``chosen_ms`` (or after a few seconds, whichever is first); see ``project_pending``.
    """

    model_id: str
    size_bytes: int
    chosen_ms: int


@dataclass(frozen=True, slots=True)
class CopyView:
    """One loaded copy of a model, as request routing sees it."""

    instance_id: str
    # requests this pod knows to be in flight on that copy
    in_flight: int
    # when the copy finished loading (or was recorded); may be slightly in the future
    loaded_since_ms: int
    # the request rate the holding pod publishes (its instance record); 0 when unknown
    pod_rate_rpm: int = 0
