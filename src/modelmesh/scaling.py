"""Copies that follow traffic: the rate tracker each pod runs every rate period (10 s).

Every period the pod folds each local copy's request count into its rate window and use history,
then, for the models it holds, applies the pure rules of ``placement/copies.py``:
- a copy carrying more than the threshold adds copies on the least busy eligible pods;
- a regularly used model keeps a second copy (unless the cluster is nearly full);
- minimum copies and "load on every pod" are kept;
- when space is needed and traffic has cooled, a surplus copy is removed.
Each model is decided by one pod only: the live holder with the smallest id (every holder sees the
same record, so they agree without talking). That pod estimates the model's traffic as its own
copy's rate times the number of copies: requests are routed to the copy with the fewest in
flight, so copies carry similar shares.

Each period every pod also reconciles the records with its cache (it is listed exactly for the
models it holds: stale entries go, and copies swept while its lease lapsed come back), and the
elected leader (``Cluster.is_leader``) sweeps departed pods' copies, expires old load failures
from records, loads models held nowhere into free space every 7 minutes
(``placement/proactive.py``) and restores minimum copies of models that lost them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from modelmesh.clock import Clock
from modelmesh.errors import MeshError
from modelmesh.mesh import Mesh
from modelmesh.placement.copies import (
    RATE_PERIOD_MS,
    CopyModelView,
    HeldCopy,
    choose_copies_to_remove,
    copy_targets,
)
from modelmesh.placement.eviction import decayed_count, fit_term, fits_the_test, long_use_rpm
from modelmesh.placement.proactive import PROACTIVE_PERIOD_MS

log = logging.getLogger(__name__)


class CopyKeeper:
    def __init__(
        self, mesh: Mesh, clock: Clock, *, threshold_rpm: Callable[[], float],
        period_ms: int = RATE_PERIOD_MS, leader_chores: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self._mesh = mesh
        # more chores of the elected pod, run after the copy chores (vmodel transitions)
        self._more_chores = tuple(leader_chores)
        self._clock = clock
        self._threshold = threshold_rpm
        self._period_ms = period_ms
        # when this pod last changed each model's copies (the scale-down cool-down)
        self._changed_ms: dict[str, int] = {}
        # when this pod (as leader) last loaded models into free space; 0 waits a whole period
        # from the first tick, so a starting cluster first serves what its requests ask for
        self._proactive_ms = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="copy-keeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            # wake just after each period boundary, so a fold closes exactly one period
            now = self._clock.now_ms()
            await asyncio.sleep((self._period_ms - now % self._period_ms + 5) / 1000)
            try:
                await self.tick()
            except Exception:
                log.exception("copy keeping failed; trying again next period")

    def fold(self, now_ms: int) -> None:
        """Move each copy's request count into its rate window and long-term use (as the period
        just ended), and update the pod's popularity fit: each single copy's count against the
        long-term rate predicted at the period's start (``placement.eviction.PopularityFit``)."""
        mesh = self._mesh
        ended = now_ms - now_ms % self._period_ms - 1
        terms, counted = 0.0, 0
        for copy in mesh.loaded_copies():
            n, copy.requests = copy.requests, 0
            if n:
                copy.rate = copy.rate.add(ended, n)
                copy.history = copy.history.record(ended)
            copy.rate = copy.rate.advanced(now_ms)
            copy.long_use = decayed_count(copy.long_use, copy.long_use_ms, ended) + n
            copy.long_use_ms = ended
            record = mesh.record(copy.model_id)
            if record is None:
                continue
            if fits_the_test(len(mesh.pods.live_holders(record)), copy.predicted_rpm):
                terms += fit_term(n, copy.predicted_rpm, self._period_ms)
                counted += 1
            copy.predicted_rpm = long_use_rpm(copy.long_use, copy.long_use_ms, now_ms, record.registered_ms)
        was = mesh.popularity.steady
        mesh.popularity = mesh.popularity.add(terms, counted)
        if mesh.popularity.steady != was:
            log.info("popularity %s (chi-square %.2f per copy): eviction ranks by %s",
                     "steady" if mesh.popularity.steady else "moving", mesh.popularity.chi2,
                     "long-term use" if mesh.popularity.steady else "the last minute's use")

    async def tick(self) -> None:
        mesh = self._mesh
        now = self._clock.now_ms()
        self.fold(now)
        threshold = self._threshold()
        fullness = mesh.pods.cluster_fullness()
        mean_pod_rpm = mesh.pods.mean_pod_rate()
        for copy in mesh.loaded_copies():
            record = mesh.record(copy.model_id)
            if record is None:
                continue
            holders = mesh.pods.live_holders(record)
            if not holders or holders[0] != mesh.instance_id:
                continue  # another holder decides for this model
            eligible = mesh.pods.eligible_pods(record)
            rpm = copy.rate.rpm(now)
            decision = copy_targets(
                CopyModelView(
                    copy.model_id, copies=len(holders), total_rpm=rpm * len(holders),
                    history=copy.history, min_copies=record.min_copies, all_pods=record.all_pods,
                    copies_changed_ms=self._changed_ms.get(copy.model_id, 0),
                ),
                now_ms=now, threshold_rpm=threshold, cluster_fullness=fullness,
                cluster_size=max(1, len(eligible)), mean_pod_rpm=mean_pod_rpm,
                busiest_holder_rpm=max(mesh.pods.pod_rate(i) for i in holders),
            )
            if decision.target_copies > len(holders):
                # each new copy will take about an equal share of the model's traffic
                added = mesh.place_copies(copy.model_id, decision.target_copies - len(holders),
                                          copy_rpm=rpm * len(holders) / decision.target_copies)
                if added:
                    self._changed_ms[copy.model_id] = now
                    log.info("'%s': %s", copy.model_id, decision.reason)
            elif decision.target_copies < len(holders):
                removal = choose_copies_to_remove(
                    [HeldCopy(i, rpm) for i in holders], len(holders) - decision.target_copies,
                    min_copies=record.min_copies, pin_labels=frozenset(record.pin_labels),
                )
                if mesh.instance_id in removal.instance_ids:
                    self._changed_ms[copy.model_id] = now
                    log.info("'%s': %s", copy.model_id, decision.reason)
                    await mesh.drop_copy(copy.model_id)
        # reconcile the records with this pod's cache, both ways
        await mesh.forget_own_copies()
        await mesh.restore_own_copies()
        if mesh.cluster is not None and mesh.cluster.is_leader():
            await self._leader_chores()
        self._changed_ms = {m: t for m, t in self._changed_ms.items() if mesh.record(m) is not None}

    async def _leader_chores(self) -> None:
        """Sweep copies of departed pods, expire old load failures, load models held nowhere into
        free space (every ``PROACTIVE_PERIOD_MS``), and restore minimum copies of models that have
        fallen below them (e.g. loaded nowhere after a pod died)."""
        await self._mesh.sweep_dead_copies()
        await self._mesh.expire_failures()
        now = self._clock.now_ms()
        if not self._proactive_ms:
            self._proactive_ms = now
        elif now - self._proactive_ms >= PROACTIVE_PERIOD_MS:
            self._proactive_ms = now
            self._mesh.load_into_free_space()
        for model_id, record in self._mesh.records():
            if record.min_copies > 1 or record.all_pods:
                try:
                    self._mesh.ensure_min_copies(model_id)
                except MeshError as err:
                    log.warning("could not keep the minimum copies of '%s': %s", model_id, err)
        for chore in self._more_chores:
            try:
                await chore()
            except MeshError as err:
                log.warning("leader chore %s failed: %s", getattr(chore, "__qualname__", chore), err)
