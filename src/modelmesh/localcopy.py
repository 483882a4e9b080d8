"""A model copy in this pod's runtime, and how copies show in their models' records.

The record edits are pure functions handed to ``Registry.update`` (compare-and-set): each takes
the record as stored and returns it changed, or None when there is nothing to write.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from modelmesh.placement.copies import RateWindow, UseHistory
from modelmesh.placement.eviction import carried_use, decayed_count
from modelmesh.types import LoadFailure, ModelRecord, PlacementPolicy

__all__ = [
    "CopyState",
    "LocalCopy",
    "backdate",
    "carried",
    "last_use",
    "policy_of",
    "with_copy",
    "with_failure",
    "without_copies",
    "without_copy",
]


class CopyState(enum.Enum):
    LOADING = "loading"
    LOADED = "loaded"


@dataclass(slots=True, eq=False)
class LocalCopy:
    """A model in this pod's runtime (or on its way there)."""

    model_id: str
    state: CopyState
    # predicted size while loading, measured size once loaded
    size_bytes: int
    last_used_ms: int
    state_ms: int
    in_flight: int = 0
    # requests since the copy keeper last folded them into ``rate`` and ``history``
    requests: int = 0
    rate: RateWindow = RateWindow()
    history: UseHistory = UseHistory()
    # long-term use (placement.eviction.decayed_count): requests decayed over 10 minutes as of
    # long_use_ms, starting from what the model's record carried when this copy loaded; and the
    # long-term rate predicted for the current rate period (-1: none yet), for the pod's fit
    long_use: float = 0.0
    long_use_ms: int = 0
    predicted_rpm: float = -1.0

    def minute_uses(self, now_ms: int) -> float:
        """Requests in the last minute: the rate window's, plus those not folded into it yet."""
        return self.rate.minute_rpm(now_ms) + self.requests


def last_use(record: ModelRecord) -> int:
    """The model's last use for placement's load filter, 0 when it has had none: a record keeps its
    registration time as its last use until then (so proactive loads and eviction see fresh models as
    recent), but a model nobody has used brings no known traffic to the pod that loads it."""
    return 0 if record.last_used_ms == record.registered_ms else record.last_used_ms


def backdate(copy: LocalCopy, last_used_ms: int) -> None:
    """A copy loaded ahead of need is as recently used as its model was, unless requests came."""
    if copy.requests == 0 and copy.history == UseHistory():
        copy.last_used_ms = min(copy.last_used_ms, last_used_ms)


def policy_of(record: ModelRecord) -> PlacementPolicy:
    return PlacementPolicy(record.min_copies, record.all_pods, record.pin_labels)


def with_copy(record: ModelRecord, instance_id: str, started_ms: int) -> ModelRecord:
    record.copies[instance_id] = started_ms
    record.failures.pop(instance_id, None)
    return record


def carried(record: ModelRecord, copy: LocalCopy, now_ms: int) -> float:
    """What the record carries of the model's use from before this copy was loaded."""
    if copy.state_ms <= record.use_count_ms:
        return 0.0  # counted already: the figure was written after this copy loaded
    return carried_use(record.use_count, record.use_count_ms, now_ms)


def without_copies(record: ModelRecord, instance_ids: list[str]) -> ModelRecord | None:
    for i in instance_ids:
        del record.copies[i]
    return record if instance_ids else None


def without_copy(record: ModelRecord, instance_id: str, gone: LocalCopy | None = None,
                  now_ms: int = 0) -> ModelRecord | None:
    if instance_id not in record.copies:
        return None
    del record.copies[instance_id]
    if gone is not None:
        record.last_used_ms = max(record.last_used_ms, gone.last_used_ms)
        uses = gone.rate.recent_uses(now_ms) + gone.requests + carried(record, gone, now_ms)
        record.use_count, record.use_count_ms = uses, now_ms
        record.long_use = decayed_count(gone.long_use, gone.long_use_ms, now_ms) + gone.requests
        record.long_use_ms = now_ms
    return record


def with_failure(record: ModelRecord, instance_id: str, failure: LoadFailure) -> ModelRecord:
    record.copies.pop(instance_id, None)
    record.failures[instance_id] = failure
    return record
