"""Where to load a model: the pod for a new copy, and the copy that serves a request.

Both are pure functions of a snapshot (``placement.view``), the time and a seeded ``random.Random``:
the same inputs give the same answer, and every answer carries a reason a person can read.

Load placement follows KServe ModelMesh (see ``MODELMESH-NOTES.md``, "Placement of a new load"):

1. **exclude** pods that hold the model, where it failed, that the caller excludes, that are
   shutting down, that lack a required label of the model's type, or that are too small for it;
2. **order** the rest by one key (:meth:`CandidateOrder.key`);
3. **shortlist** the near-best (:func:`shortlist`);
4. **drop busy pods** whose request rate is high relative to the quietest (:func:`filter_by_load`);
5. **keep those this pod sent the fewest pending loads**, then **pick at random** among them.

Records are republished only every so often, so a burst of loads decided from one stale view would
all see the same best pod (ModelMesh sent ~30 of ~50 concurrent loads to one pod this way). Two
things spread a burst. The caller keeps the loads it sent that records do not show yet and folds
them into the view with :func:`project_pending` before each choice: they count in the order, and
step 5 turns this pod's own choices among near-equal pods into a rotation instead of a dice roll
(a pure random pick over three pods strays more than 20% from even about half the time in 50 loads).
The random pick spreads what one pod cannot know: the pending loads of the other pods.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from modelmesh.placement.view import (
    MIB,
    ClusterView,
    CopyView,
    InstanceView,
    LabelConstraint,
    ModelView,
    PendingLoad,
    TypeConstraints,
)

__all__ = [
    "COPY_CHOICES",
    "CandidateOrder",
    "PlacementDecision",
    "allowed_rate_ratio",
    "choose_copy",
    "choose_load_target",
    "filter_by_load",
    "parse_type_constraints",
    "project_pending",
    "shortlist",
    "tier",
]

# A pod is "full" when its free space is below this many default model sizes (or below the model's
# predicted size). ModelMesh uses one to two; two keeps room for the next load of a burst.
FULL_DEFAULT_SIZES: Final = 2
# Full pods: the shortlist keeps LRU times within max(45 s, 10% of the best's LRU age).
LRU_WINDOW_MIN_MS: Final = 45_000
LRU_WINDOW_AGE_SHARE: Final = 0.10
# Pods with room: the shortlist keeps more than 1/4 of the best's free space, at most 1.25x its models.
FREE_SPACE_SHARE: Final = 0.25
MODEL_COUNT_FACTOR: Final = 1.25
# Load filter: allowed request rate relative to the quietest pod, from a model in use now to a cold one.
HOT_RATE_RATIO: Final = 1.1
COLD_RATE_RATIO: Final = 4.0
COLD_AFTER_MS: Final = 10 * 60_000
# Rates below this are noise: records are republished only when the rate moves by 100 rpm or 10%.
RATE_FLOOR_RPM: Final = 100
# Copies loaded more recently than this are still warming up; routing avoids them while it can.
SETTLE_MS: Final = 1_000
# Routing among copies by pod rate: the less busy of this many copies drawn at random.
COPY_CHOICES: Final = 2


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    """Where to load (``None``: nowhere fits) and why."""

    instance_id: str | None
    reason: str
    # pods left after exclusions, before the shortlist
    candidates_considered: int


# --- type constraints ---------------------------------------------------------------------------

_ENV = "MM_TYPE_CONSTRAINTS"


def parse_type_constraints(raw: str | Mapping[str, object]) -> TypeConstraints:
    """Validate ``MM_TYPE_CONSTRAINTS`` (JSON text or already decoded) into :class:`TypeConstraints`.

    The shape is ``{"<model type>": {"required": [labels], "preferred": [labels]}, ...}``; the type
    ``"_default"`` applies to types without an entry. Both lists are optional. Anything else raises
    ``ValueError`` naming the offending entry, so a typo fails at start rather than at the first load.
    """
    if isinstance(raw, str):
        if not raw.strip():
            return TypeConstraints()
        try:
            decoded: object = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{_ENV} is not valid JSON: {err}") from None
    else:
        decoded = raw
    if not isinstance(decoded, Mapping):
        raise ValueError(
            f'{_ENV} must be a JSON object of model type -> {{"required": [...], "preferred": [...]}}, '
            f"got {type(decoded).__name__}"
        )
    by_type: list[tuple[str, LabelConstraint]] = []
    default = LabelConstraint()
    for model_type, entry in decoded.items():
        if not isinstance(model_type, str) or not model_type.strip():
            raise ValueError(f"{_ENV} has an empty or non-string model type: {model_type!r}")
        where = f"{_ENV}[{model_type!r}]"
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"{where} must be an object with 'required' and/or 'preferred', got {type(entry).__name__}"
            )
        unknown = sorted(str(k) for k in entry if k not in ("required", "preferred"))
        if unknown:
            raise ValueError(f"{where} has unknown key {unknown[0]!r} (expected 'required' or 'preferred')")
        constraint = LabelConstraint(
            required=_labels(entry.get("required", []), f"{where}['required']"),
            preferred=_labels(entry.get("preferred", []), f"{where}['preferred']"),
        )
        if model_type == "_default":
            default = constraint
        else:
            by_type.append((model_type, constraint))
    return TypeConstraints(tuple(sorted(by_type)), default)


def _labels(value: object, where: str) -> frozenset[str]:
    # a bare string would silently become a set of characters
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"{where} must be a list of label strings, got {value!r}")
    labels = frozenset(x.strip() for x in value)
    if "" in labels:
        raise ValueError(f"{where} contains an empty label")
    return labels


# --- the candidate order ------------------------------------------------------------------------

_NATURAL_SPLIT = re.compile(r"(\d+)")


def _natural(version: str) -> tuple[tuple[int, int, str], ...]:
    # "1.10" after "1.9"; digit runs compare as numbers, text as text (tagged so types never mix)
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in _NATURAL_SPLIT.split(version)
        if part
    )


CandidateKey = tuple[bool, int, int, bool, int, int, int, int, int, str]


@dataclass(frozen=True, slots=True)
class CandidateOrder:
    """The ModelMesh candidate order for one load, as a single sort key (:meth:`key`).

    ``needed_bytes`` is the model's predicted size; ``full_below_bytes`` the free space under which a
    pod counts as full (see :meth:`for_load`); ``version_rank`` numbers the versions present, newest
    highest.
    """

    needed_bytes: int
    full_below_bytes: int
    preferred: frozenset[str]
    version_rank: Mapping[str, int]

    @classmethod
    def for_load(
        cls,
        candidates: Iterable[InstanceView],
        *,
        needed_bytes: int,
        default_model_size_bytes: int,
        preferred: frozenset[str] = frozenset(),
    ) -> CandidateOrder:
        """The order for loading a model of ``needed_bytes`` onto one of ``candidates``.

        Full means free space below ``max(needed_bytes, 2 x default model size)``: the load would
        have to evict, or would leave too little room for the next load of a burst.
        """
        versions = sorted({c.version for c in candidates}, key=_natural)
        return cls(
            needed_bytes=needed_bytes,
            full_below_bytes=max(needed_bytes, FULL_DEFAULT_SIZES * default_model_size_bytes),
            preferred=preferred,
            version_rank={v: i for i, v in enumerate(versions)},
        )

    def is_full(self, inst: InstanceView) -> bool:
        return inst.free_bytes < self.full_below_bytes

    def key(self, inst: InstanceView) -> CandidateKey:
        """Sort key, best first. In order of precedence:

        1. not shutting down;
        2. more of the type's preferred labels;
        3. newer version, unless full (a full pod ranks as if it had the oldest version, so a
           rolling update fills new pods first without pushing evictions onto them);
        4. not full before full;
        5. among full pods, oldest LRU time first (the cheapest eviction);
        6. fewest models; 7. most free space; 8. oldest LRU time; 9. most free loading slots;
        10. instance id, only so that the order (and a seeded pick) never depends on input order.

        Elements 1-4 form the *tier* (:func:`tier`): the shortlist never mixes tiers.
        """
        full = self.is_full(inst)
        return (
            inst.shutting_down,
            -len(self.preferred & inst.labels),
            0 if full else -self.version_rank.get(inst.version, 0),
            full,
            inst.lru_time_ms if full else 0,
            inst.model_count,
            -inst.free_bytes,
            inst.lru_time_ms,
            -inst.free_loading_slots,
            inst.instance_id,
        )


def tier(key: CandidateKey) -> tuple[bool, int, int, bool]:
    """The strict part of a key: shutting down, preferred labels, version, full."""
    return key[0], key[1], key[2], key[3]


def shortlist(
    ranked: Sequence[InstanceView],
    order: CandidateOrder,
    *,
    now_ms: int,
    keys: Mapping[str, CandidateKey] | None = None,
) -> list[InstanceView]:
    """The near-best of ``ranked`` (sorted by ``order.key``, best first), best included.

    Only candidates in the best one's tier qualify, so preferred labels and newer versions are never
    traded for randomness. Within it:

    - best is full: LRU time within ``max(45 s, 10% of the best's LRU age)`` of the best's;
    - otherwise: more than 1/4 of the best's free space and at most 1.25x its model count.

    ``keys`` (instance id -> ``order.key``), when the caller has them, saves computing them again.
    """
    if not ranked:
        return []
    key = order.key if keys is None else (lambda c: keys[c.instance_id])
    best = ranked[0]
    best_tier = tier(key(best))
    same_tier = [c for c in ranked if tier(key(c)) == best_tier]
    if order.is_full(best):
        window = max(LRU_WINDOW_MIN_MS, LRU_WINDOW_AGE_SHARE * max(0, now_ms - best.lru_time_ms))
        return [c for c in same_tier if c.lru_time_ms - best.lru_time_ms <= window]
    return [
        c for c in same_tier
        if c.free_bytes > FREE_SPACE_SHARE * best.free_bytes
        and c.model_count <= MODEL_COUNT_FACTOR * best.model_count
    ]


def allowed_rate_ratio(idle_ms: int | None) -> float:
    """How much busier than the quietest candidate a pod may be, given how long the model has been idle.

    A model in use right now is being loaded because of its traffic, which will land on the new copy:
    only pods within 1.1x of the quietest qualify. The longer the model has been idle, the less traffic
    it brings, so the allowance grows linearly to 4x at 10 minutes idle and stays there. ``None``
    (never used) counts as cold.
    """
    if idle_ms is None:
        return COLD_RATE_RATIO
    share = min(max(idle_ms, 0), COLD_AFTER_MS) / COLD_AFTER_MS
    return HOT_RATE_RATIO + (COLD_RATE_RATIO - HOT_RATE_RATIO) * share


def filter_by_load(candidates: Sequence[InstanceView], ratio: float) -> list[InstanceView]:
    """Drop candidates whose request rate exceeds ``ratio`` x the quietest one's.

    Rates under 100 rpm count as 100: records move only by that much, so smaller differences are
    noise, and an idle quietest pod must not disqualify every pod serving a trickle. The quietest
    always stays, so the result is empty only when ``candidates`` is.
    """
    if not candidates:
        return []
    quietest = max(min(c.request_rate_rpm for c in candidates), RATE_FLOOR_RPM)
    return [c for c in candidates if c.request_rate_rpm <= ratio * quietest]


# --- pending loads ------------------------------------------------------------------------------

def project_pending(view: ClusterView, pending: Mapping[str, Collection[PendingLoad]]) -> ClusterView:
    """``view`` with the loads in ``pending`` (instance id -> loads sent there) counted as placed.

    Each pending load takes its size (the default model size when unknown), one model and one loading
    slot on its instance, as the instance's next record will show, and counts in ``pending_loads``.
    Without this, every choice made before that record arrives sees the same best pod. Instances not
    in the view are ignored.
    """
    if not pending:
        return view
    instances = []
    for inst in view.instances:
        loads = pending.get(inst.instance_id)
        if loads:
            size = sum(
                p.size_bytes if p.size_bytes > 0 else view.default_model_size_bytes for p in loads
            )
            inst = replace(
                inst,
                used_bytes=inst.used_bytes + size,
                model_count=inst.model_count + len(loads),
                loading_in_flight=inst.loading_in_flight + len(loads),
                pending_loads=inst.pending_loads + len(loads),
            )
        instances.append(inst)
    return replace(view, instances=tuple(instances))


# --- choosing a pod for a load ------------------------------------------------------------------

# why a pod was left out: (one pod, several pods)
_HOLDS = ("holds the model", "hold the model")
_FAILED = ("failed to load it", "failed to load it")
_EXCLUDED = ("is excluded by the caller", "are excluded by the caller")
_SHUTTING_DOWN = ("is shutting down", "are shutting down")


def _too_small(needed: int) -> tuple[str, str]:
    return (f"is too small for {_mib(needed)}", f"are too small for {_mib(needed)}")


def _lacks(missing: Collection[str]) -> tuple[str, str]:
    what = ("label " if len(missing) == 1 else "labels ") + ", ".join(repr(x) for x in sorted(missing))
    return f"lacks required {what}", f"lack required {what}"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _why_excluded(
    inst: InstanceView, model: ModelView, required: frozenset[str], needed: int, exclude: frozenset[str]
) -> tuple[str, str] | None:
    if inst.instance_id in model.holders:
        return _HOLDS
    if inst.instance_id in model.failed:
        return _FAILED
    if inst.instance_id in exclude:
        return _EXCLUDED
    if inst.shutting_down:
        return _SHUTTING_DOWN
    missing = required - inst.labels
    if missing:
        return _lacks(missing)
    if inst.capacity_bytes < needed:
        return _too_small(needed)
    return None


def _summary(skipped: Mapping[tuple[str, str], int]) -> str:
    return ", ".join(f"{n} {one if n == 1 else many}" for (one, many), n in skipped.items())


def choose_load_target(
    view: ClusterView,
    model: ModelView,
    *,
    now_ms: int,
    rng: random.Random,
    exclude: Iterable[str] = (),
) -> PlacementDecision:
    """Choose the pod to load ``model`` on, or none, with the reason.

    Pass ``project_pending(view, pending)`` as ``view`` so loads this pod sent recently count.
    The steps (exclude, order, shortlist, load filter, fewest pending loads, seeded pick) are
    described in the module docstring; order, shortlist and load filter can be tried alone.
    """
    constraint = view.constraints.for_type(model.model_type)
    needed = model.predicted_size_bytes if model.predicted_size_bytes > 0 else view.default_model_size_bytes
    excluded = frozenset(exclude)
    eligible: list[InstanceView] = []
    skipped: dict[tuple[str, str], int] = {}
    for inst in sorted(view.instances, key=lambda i: i.instance_id):
        why = _why_excluded(inst, model, constraint.required, needed, excluded)
        if why is None:
            eligible.append(inst)
        else:
            skipped[why] = skipped.get(why, 0) + 1
    if not eligible:
        total = len(view.instances)
        if total == 0:
            return PlacementDecision(None, "no pods in the cluster", 0)
        return PlacementDecision(None, f"{total} pod{'s' if total != 1 else ''}: {_summary(skipped)}", 0)

    order = CandidateOrder.for_load(
        eligible,
        needed_bytes=needed,
        default_model_size_bytes=view.default_model_size_bytes,
        preferred=constraint.preferred,
    )
    keys = {inst.instance_id: order.key(inst) for inst in eligible}
    ranked = sorted(eligible, key=lambda inst: keys[inst.instance_id])
    near = shortlist(ranked, order, now_ms=now_ms, keys=keys)
    idle_ms = now_ms - model.last_used_ms if model.last_used_ms > 0 else None
    quiet = filter_by_load(near, allowed_rate_ratio(idle_ms))
    fewest_pending = min(c.pending_loads for c in quiet)
    least_sent = [c for c in quiet if c.pending_loads == fewest_pending]
    chosen = rng.choice(least_sent)

    if order.is_full(chosen):
        state = f"full, evicts from LRU {max(0, now_ms - chosen.lru_time_ms) // 1000} s old"
    else:
        state = f"{chosen.model_count} models, {_mib(chosen.free_bytes)} free"
    reason = (
        f"random pick among {len(least_sent)} of {len(near)} near-best of {len(eligible)} eligible "
        f"({state}, {chosen.request_rate_rpm} rpm)"
    )
    if skipped:
        reason += f"; skipped {_summary(skipped)}"
    return PlacementDecision(chosen.instance_id, reason, len(eligible))


# --- choosing a copy for a request --------------------------------------------------------------

def choose_copy(
    copies: Sequence[CopyView],
    *,
    local_instance: str,
    prefer_local: bool,
    now_ms: int,
    rng: random.Random,
) -> str:
    """The instance whose copy of a model should serve the next request.

    1. With ``prefer_local`` (the client sent ``mm-balanced: true``: it spreads its own requests
       across pods, so a second hop would only add latency), the local copy if there is one.
    2. Otherwise only copies loaded at least 1 s ago are considered (a fresh copy may still be
       warming up), unless every copy is that new.
    3. When the pods' published request rates are known (``pod_rate_rpm``), the copy on the less
       busy pod of :data:`COPY_CHOICES` copies drawn at random wins (ties: fewer in flight, then
       instance id). The rates are a minute's count republished when they move by 10%: sending every
       request to the quietest pod would herd onto it until its record catches up, while a few
       random candidates steer traffic away from busy pods without herding (power of choices).
       A model with many copies then fills the pods that its other traffic leaves quiet.
    4. Otherwise the fewest requests in flight wins; ties go to the local copy (no network hop),
       else to a seeded random pick, so pods that see the same counts do not all pile onto the
       same copy.

    Raises ``ValueError`` when ``copies`` is empty: the caller places a load instead.
    """
    if not copies:
        raise ValueError("choose_copy needs at least one copy")
    local = [c for c in copies if c.instance_id == local_instance]
    if prefer_local and local:
        return local_instance
    settled = [c for c in copies if now_ms - c.loaded_since_ms >= SETTLE_MS] or list(copies)
    if len(settled) > 1 and any(c.pod_rate_rpm > 0 for c in settled):
        drawn = rng.sample(sorted(settled, key=lambda c: c.instance_id), min(COPY_CHOICES, len(settled)))
        return min(drawn, key=lambda c: (c.pod_rate_rpm, c.in_flight, c.instance_id)).instance_id
    fewest = min(c.in_flight for c in settled)
    best = sorted({c.instance_id for c in settled if c.in_flight == fewest})
    if local_instance in best:
        return local_instance
    return rng.choice(best)
