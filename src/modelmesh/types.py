"""Plain data shared by the layers: model info and records, runtime status, load results."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any


def _json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object: {type(value).__name__}")
    return value


class ModelState(enum.IntEnum):
    """Status of a model, numbered as ``mmesh.ModelStatusInfo.ModelStatus``."""

    NOT_FOUND = 0
    NOT_LOADED = 1
    LOADING = 2
    LOADED = 3
    LOADING_FAILED = 4
    UNKNOWN = 5


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a runtime needs to load a model: passed to ``loadModel`` as is."""

    type: str
    path: str = ""
    key: str = ""


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """Copies and pinning asked for at registration (a modelmesh extension of the API)."""

    min_copies: int = 0
    all_pods: bool = False
    pin_labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadFailure:
    time_ms: int
    message: str


@dataclass(slots=True)
class ModelRecord:
    """A registered model, stored as JSON at ``<prefix>/<service>/registry/<modelId>``.

    ``copies`` maps an instance id to the time (ms) its load started; ``failures`` maps an instance
    id to its latest load failure there.
    """

    info: ModelInfo
    registered_ms: int
    last_used_ms: int = 0
    copies: dict[str, int] = field(default_factory=dict)
    failures: dict[str, LoadFailure] = field(default_factory=dict)
    refs: int = 0
    auto_delete: bool = False
    # placement asked for at registration: at least this many copies; a copy on every pod; only
    # on pods with all these labels
    min_copies: int = 0
    all_pods: bool = False
    pin_labels: tuple[str, ...] = ()
    # the model's use when its last copy went: requests in the minute before use_count_ms
    # (placement.eviction.carried_use gives a new copy what is left of it)
    use_count: float = 0.0
    use_count_ms: int = 0
    # the model's long-term use when its last copy went: requests decayed over
    # placement.eviction.LONG_USE_TAU_MS, as of long_use_ms (the next copy counts on from it)
    long_use: float = 0.0
    long_use_ms: int = 0

    def to_json(self) -> bytes:
        # Written out rather than through dataclasses.asdict, which deep-copies every field: 8 us
        # against 31 us per record, on every registration and copy change (a test checks the two
        # agree, so a new field cannot be forgotten here).
        return json.dumps({
            "info": {"type": self.info.type, "path": self.info.path, "key": self.info.key},
            "registered_ms": self.registered_ms,
            "last_used_ms": self.last_used_ms,
            "copies": self.copies,
            "failures": {i: {"time_ms": f.time_ms, "message": f.message} for i, f in self.failures.items()},
            "refs": self.refs,
            "auto_delete": self.auto_delete,
            "min_copies": self.min_copies,
            "all_pods": self.all_pods,
            "pin_labels": list(self.pin_labels),
            "use_count": self.use_count,
            "use_count_ms": self.use_count_ms,
            "long_use": self.long_use,
            "long_use_ms": self.long_use_ms,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelRecord:
        d = _json_object(raw, "model record")
        return cls(
            info=ModelInfo(**d["info"]),
            registered_ms=d["registered_ms"],
            last_used_ms=d.get("last_used_ms", 0),
            copies=dict(d.get("copies", {})),
            failures={k: LoadFailure(**v) for k, v in d.get("failures", {}).items()},
            refs=d.get("refs", 0),
            auto_delete=d.get("auto_delete", False),
            min_copies=d.get("min_copies", 0),
            all_pods=d.get("all_pods", False),
            pin_labels=tuple(d.get("pin_labels", ())),
            use_count=d.get("use_count", 0.0),
            use_count_ms=d.get("use_count_ms", 0),
            long_use=d.get("long_use", 0.0),
            long_use_ms=d.get("long_use_ms", 0),
        )


@dataclass(frozen=True, slots=True)
class CopyStatus:
    instance_id: str
    state: ModelState
    time_ms: int


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """What getModelStatus reports."""

    state: ModelState
    errors: tuple[str, ...] = ()
    copies: tuple[CopyStatus, ...] = ()


@dataclass(frozen=True, slots=True)
class RuntimeStatus:
    """A runtime's answer to ``runtimeStatus``."""

    ready: bool
    capacity_bytes: int
    max_loading_concurrency: int
    loading_timeout_ms: int
    default_model_size_bytes: int
    runtime_version: str = ""
    # fully qualified "package.Service/Method" -> field path where the model id is injected
    method_infos: dict[str, tuple[int, ...]] = field(default_factory=dict)
    allow_any_method: bool = True
    limit_model_concurrency: bool = False


@dataclass(frozen=True, slots=True)
class LoadResult:
    size_bytes: int
    max_concurrency: int = 0


@dataclass(slots=True)
class InstanceRecord:
    """A pod, stored as JSON at ``<prefix>/<service>/instances/<instanceId>`` under its lease, so it
    vanishes when the pod does."""

    endpoint: str
    capacity_bytes: int
    used_bytes: int = 0
    model_count: int = 0
    # last-use time of the least recently used model here (ms); the start time when empty
    lru_time_ms: int = 0
    loading_in_flight: int = 0
    loading_slots: int = 1
    request_rate_rpm: int = 0
    labels: tuple[str, ...] = ()
    zone: str = ""
    version: str = ""
    start_time_ms: int = 0
    shutting_down: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> InstanceRecord:
        d = _json_object(raw, "instance record")
        d["labels"] = tuple(d.get("labels", ()))
        return cls(**d)
