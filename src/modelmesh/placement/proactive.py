"""Loading models that are loaded nowhere into free space, ahead of their next request.

The elected leader runs this every :data:`PROACTIVE_PERIOD_MS` (ModelMesh's registry reaper ran
every 7 minutes and did the same). Free memory serves nobody; a model that comes back finds a
copy instead of waiting for a load. The rules:

- only models held nowhere (no live copy and none loading), the most recently used first (a model
  never used counts from its registration, so fresh registrations come early);
- only into room that is free: a pod qualifies while the model fits on it with one default model
  size to spare (ModelMesh's "full" line), so a proactive load never evicts anything and never
  eats the room a pod keeps for its next cold load; and only on a free loading slot, so requests'
  loads do not queue behind these;
- the pod is the one ``placement.load.choose_load_target`` picks among those, each choice counted
  as a pending load before the next, so the loads spread;
- at most :data:`PROACTIVE_MAX_LOADS` per run.

The copy a proactive load makes carries the model's last use from its record, not the time of the
load, so it is the first eviction victim when its pod needs room (unless requests come for it).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final

from modelmesh.placement.load import choose_load_target, project_pending
from modelmesh.placement.view import ClusterView, ModelView, PendingLoad

__all__ = ["PROACTIVE_MAX_LOADS", "PROACTIVE_PERIOD_MS", "ProactiveLoad", "ProactivePlan", "plan_proactive_loads"]

PROACTIVE_PERIOD_MS: Final = 7 * 60_000
PROACTIVE_MAX_LOADS: Final = 50


@dataclass(frozen=True, slots=True)
class ProactiveLoad:
    model_id: str
    instance_id: str


@dataclass(frozen=True, slots=True)
class ProactivePlan:
    loads: tuple[ProactiveLoad, ...]
    reason: str
    # the input view with the planned loads projected as pending
    view: ClusterView


def _needed(view: ClusterView, model: ModelView) -> int:
    return model.predicted_size_bytes if model.predicted_size_bytes > 0 else view.default_model_size_bytes


def plan_proactive_loads(
    view: ClusterView,
    models: Iterable[ModelView],
    *,
    now_ms: int,
    rng: random.Random,
    max_loads: int = PROACTIVE_MAX_LOADS,
) -> ProactivePlan:
    """Where to load which of ``models`` (each loaded nowhere; ``failed`` set where its load failed
    recently), by the rules in the module docstring."""
    planned: list[ProactiveLoad] = []
    considered = 0
    spare = view.default_model_size_bytes
    for model in sorted(models, key=lambda m: (-m.last_used_ms, m.model_id)):
        if len(planned) >= max_loads:
            break
        needed = _needed(view, model)
        roomy = tuple(
            i for i in view.instances
            if not i.shutting_down and i.free_bytes >= needed + spare and i.free_loading_slots > 0
        )
        if not roomy:
            if not any(i.free_bytes > spare and i.free_loading_slots > 0 and not i.shutting_down
                       for i in view.instances):
                break  # no pod has room to spare at all
            continue  # this one is too large for the room left; a smaller one may fit
        considered += 1
        decision = choose_load_target(replace(view, instances=roomy), model, now_ms=now_ms, rng=rng)
        if decision.instance_id is None:
            continue  # its labels or failures rule out every pod with room
        planned.append(ProactiveLoad(model.model_id, decision.instance_id))
        view = project_pending(view, {decision.instance_id: [PendingLoad(model.model_id, needed, now_ms)]})
    if planned:
        reason = f"{len(planned)} models loaded nowhere, most recently used first, into free space"
    elif considered:
        reason = "no pod with room may hold the models loaded nowhere"
    else:
        reason = "no pod has room to spare"
    return ProactivePlan(tuple(planned), reason, view)
