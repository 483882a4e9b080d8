"""The mesh core: the pod's model cache, on-demand loads, eviction and the request path.

Callable and testable without gRPC: the servicers in ``api/`` convert wire messages and call
these methods. One instance per pod.

Request path (``invoke``): a loaded copy is used at once, with no store access. On a miss the
request joins the model's one load task (check, then re-check under the same event-loop step, then
load), so any number of concurrent first requests cause exactly one load. A load first makes room
by unloading the least recently used idle models, then takes one of the runtime's loading slots,
records this pod as holding a copy (compare-and-set on the model record), and calls the runtime.
A failed load is remembered with the runtime's message; requests for that model fail fast with it
until the failure expires, and the next request after that tries again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Protocol

from cachetools import TTLCache
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from modelmesh import __version__
from modelmesh.clock import Clock
from modelmesh.cluster import Cluster
from modelmesh.errors import (
    CapacityExhausted,
    InvalidRequest,
    MeshError,
    ModelExists,
    ModelLoadFailed,
    ModelNotFound,
    RuntimeUnavailable,
    Unavailable,
    UpstreamError,
)
from modelmesh.localcopy import (
    CopyState,
    LocalCopy,
    backdate,
    carried,
    last_use,
    policy_of,
    with_copy,
    with_failure,
    without_copies,
    without_copy,
)
from modelmesh.metrics import MeshMetrics, ModelFigures
from modelmesh.peers import Peers
from modelmesh.placement.copies import choose_new_copy_pods
from modelmesh.placement.eviction import (
    CachedModel,
    PopularityFit,
    choose_evictions,
    churn_guard,
    decayed_count,
    long_use_rpm,
    steady_use,
)
from modelmesh.placement.load import choose_copy, choose_load_target
from modelmesh.placement.proactive import PROACTIVE_MAX_LOADS, plan_proactive_loads
from modelmesh.placement.view import CopyView, ModelView, TypeConstraints
from modelmesh.podviews import PodViews
from modelmesh.rates import RateMeter
from modelmesh.registry import Registry
from modelmesh.routing import (
    LOAD_AHEAD_HEADER,
    MODEL_METADATA_METHOD,
    RouteTarget,
    encode_string_field,
    forwarded_metadata,
)
from modelmesh.runtime.base import Forwarder, Metadata, ModelRuntimeClient
from modelmesh.types import (
    CopyStatus,
    InstanceRecord,
    LoadFailure,
    ModelInfo,
    ModelRecord,
    ModelState,
    ModelStatus,
    PlacementPolicy,
    RuntimeStatus,
)

log = logging.getLogger(__name__)

MAX_MODEL_ID_LENGTH = 512
# a sanity bound on minCopies: more than this is a typo, not a plan
MAX_MIN_COPIES = 1000
# a freshly loaded copy no request has used yet is not evicted for this long (ms)
FRESH_COPY_GRACE_MS = 5_000
# at shutdown, models used this recently and held nowhere else are loaded on other pods first
# (ModelMesh's rule: the last hour)
REHOME_RECENT_MS = 3_600_000
# loads a stopping pod has running on the others at once
REHOME_PARALLEL = 8
# pods tried for one request before giving up (a copy or placement, then others after failures)
MAX_ROUTE_ATTEMPTS = 3
# gRPC codes from a peer that mean "try another pod": unreachable, its load failed, no room there
_RETRY_ELSEWHERE = frozenset({"UNAVAILABLE", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"})


def validate_model_id(model_id: str) -> None:
    if not model_id or not model_id.strip():
        raise InvalidRequest("model id must not be empty")
    if len(model_id) > MAX_MODEL_ID_LENGTH:
        raise InvalidRequest(f"model id is longer than {MAX_MODEL_ID_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in model_id):
        raise InvalidRequest("model id must not contain control characters")


def _validate_registration(model_id: str, info: ModelInfo) -> None:
    validate_model_id(model_id)
    if not info.type:
        raise InvalidRequest("model info needs a type (for example 'onnx')")


class Aliases(Protocol):
    """Names that stand for a model (vmodels, ``vmodels.VModels``), as the request path sees them."""

    def active(self, vmodel_id: str) -> str | None:
        """The model a vmodel id serves now, from the pod's view; None when it is no vmodel."""

    async def fetch(self, vmodel_id: str) -> None:
        """Read the vmodel from the store into the view."""


class Mesh:
    def __init__(
        self,
        *,
        instance_id: str,
        registry: Registry,
        runtime: ModelRuntimeClient,
        metrics: MeshMetrics,
        clock: Clock,
        load_failure_expiry_ms: int,
        peer_factory: Callable[[str], Forwarder] | None = None,
        constraints: TypeConstraints | None = None,
        rng: random.Random | None = None,
        churn_guard_ms: int = 0,
    ) -> None:
        self.instance_id = instance_id
        self._registry = registry
        self._runtime = runtime
        self._metrics = metrics
        self._clock = clock
        self._failure_expiry_ms = load_failure_expiry_ms
        self._rng = rng or random.Random()
        # refuse loads that would evict a model used this recently (0: off); see settings
        self._churn_guard_ms = churn_guard_ms
        self.cluster: Cluster | None = None
        self._peers = Peers(peer_factory, this_instance=instance_id)
        self.requests = RateMeter(clock)
        # every pod as placement sees it from here (the published records plus our pending loads)
        self.pods = PodViews(
            instance_id=instance_id, clock=clock, constraints=constraints or TypeConstraints(),
            own_rate_rpm=self.requests.rpm, own_used_bytes=self.used_bytes,
            own_capacity_bytes=lambda: self.capacity_bytes, default_size=self._default_size,
        )
        # whether this pod's copies' counts fit their long-term rates (the copy keeper updates it
        # every rate period): while they do, eviction ranks by long-term use
        self.popularity = PopularityFit()
        # requests waiting in _ensure_local for a model's load to end, by model id
        self._waiting: dict[str, int] = {}
        # (kind, id) recently looked up in the store and not found there (see _read_through)
        self._unknown: TTLCache[tuple[str, str], bool] = TTLCache(maxsize=10_000, ttl=1.0, timer=clock.monotonic)
        # vmodels, when the app has them (set after construction: VModels needs the mesh)
        self.aliases: Aliases | None = None
        self._copies: dict[str, LocalCopy] = {}
        self._loads: dict[str, asyncio.Task[LocalCopy]] = {}
        self._unloads: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, LoadFailure] = {}
        self._background: set[asyncio.Task[object]] = set()
        # models being dropped after an unregister seen in the registry
        self._drops: dict[str, asyncio.Task[object]] = {}
        self._status: RuntimeStatus | None = None
        self._load_slots = asyncio.Semaphore(1)
        self.capacity_bytes = 0
        # running mean of predicted model sizes: the headroom kept free for the next load
        self._typical_size = 0
        self._headroom_task: asyncio.Task[object] | None = None
        # record writes removing this pod's copy after an unload, by model
        self._record_writes: dict[str, asyncio.Task[object]] = {}
        registry.on_removed.append(self._on_model_removed)
        self._export_gauges()

    # ------------------------------------------------------------------ lifecycle

    def start(self, status: RuntimeStatus) -> None:
        """Take the runtime's limits; called once the runtime reports READY."""
        self._status = status
        self.capacity_bytes = status.capacity_bytes
        self._load_slots = asyncio.Semaphore(max(1, status.max_loading_concurrency))
        log.info(
            "runtime ready: capacity %d bytes, %d loading slots, load timeout %d ms",
            status.capacity_bytes, status.max_loading_concurrency, status.loading_timeout_ms,
        )

    def attach(self, cluster: Cluster) -> None:
        """Join the cluster view: route to peers, sweep the copies of pods that leave."""
        self.cluster = cluster
        self.pods.cluster = cluster
        cluster.view.on_removed.append(self._on_instance_removed)

    async def close(self) -> None:
        tasks = [*self._loads.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._unloads.values(), return_exceptions=True)
        await self._peers.close()

    def _spawn(self, coro: object, name: str) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._background.add(task)

        def done(t: asyncio.Task[object]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                if isinstance(exc, MeshError):
                    log.info("%s: %s", name, exc)
                else:
                    log.error("%s failed", name, exc_info=exc)

        task.add_done_callback(done)
        return task

    # ------------------------------------------------------------------ data plane

    def resolve(self, target: RouteTarget) -> str:
        """The concrete model id a request is for: a vmodel's active model (header
        ``mm-vmodel-id``, or a ``model_name`` that is a vmodel id), else the model id itself;
        ModelNotFound when nothing matches."""
        active = self.aliases.active(target.id) if target.kind != "model" and self.aliases is not None else None
        if active is not None:
            if self._registry.cached(active) is None:
                raise ModelNotFound(f"vmodel '{target.id}' serves model '{active}', which is not registered")
            return active
        if target.kind == "vmodel":
            raise ModelNotFound(f"vmodel '{target.id}' not found")
        if self._registry.cached(target.id) is None:
            raise ModelNotFound(f"model '{target.id}' not found")
        return target.id

    async def route(
        self,
        target: RouteTarget,
        method: str,
        body: bytes,
        metadata: Metadata,
        timeout_s: float | None,
        *,
        forwarded: bool = False,
        prefer_local: bool = False,
    ) -> bytes:
        """Serve a request here or on the pod that should: the whole request path. ``metadata``
        is the caller's; what goes on is it minus the mesh's own headers, plus ``mm-model-id``.

        A copy loaded here is used at once. A request another pod forwarded is always served here
        (loading if needed), so a request is never forwarded twice. Otherwise: a live copy on another
        pod gets it (the one with the fewest of our requests in flight); loaded nowhere, placement
        picks a pod, maybe this one. A pod that cannot be reached, whose load failed, or that has no
        room is excluded and the next choice tried, at most MAX_ROUTE_ATTEMPTS pods in all.
        """
        self.requests.hit()
        try:
            model_id = self.resolve(target)
        except ModelNotFound:
            await self._read_through(target)
            model_id = self.resolve(target)
        if forwarded and method == MODEL_METADATA_METHOD:
            ahead = _load_ahead_of(metadata)
            if ahead is not None:
                return await self._load_ahead(model_id, ahead, method, body, forwarded_metadata(metadata, model_id))
        metadata = forwarded_metadata(metadata, model_id)
        copy = self._copies.get(model_id)
        if forwarded or (copy is not None and copy.state is CopyState.LOADED) or model_id in self._loads \
                or self.cluster is None:
            return await self.invoke(model_id, method, body, metadata, timeout_s)
        excluded: set[str] = set()
        last_error: MeshError | None = None
        for _ in range(MAX_ROUTE_ATTEMPTS):
            chosen = self._choose_pod(model_id, excluded, prefer_local, last_error)
            try:
                if chosen == self.instance_id:
                    return await self.invoke(model_id, method, body, metadata, timeout_s)
                return await self._forward(chosen, method, body, metadata, timeout_s)
            except (Unavailable, ModelLoadFailed, CapacityExhausted) as err:
                last_error = err
            except UpstreamError as err:
                if err.code not in _RETRY_ELSEWHERE:
                    raise
                last_error = err
            log.info("pod %s could not serve '%s' (%s); trying another", chosen, model_id, last_error)
            excluded.add(chosen)
        assert last_error is not None
        raise last_error

    async def _read_through(self, target: RouteTarget) -> None:
        """A model or vmodel this pod's views do not know may have been registered through another
        pod a moment ago (the watch has not brought it yet): ask the store once. Ids found missing
        are remembered for a second, so requests for unknown names cannot turn into store traffic."""
        aliases = self.aliases if target.kind != "model" else None
        if aliases is not None and aliases.active(target.id) is None:
            await self._fetch_once("vmodel", target.id)
        active = aliases.active(target.id) if aliases is not None else None
        model_id = active or (None if target.kind == "vmodel" else target.id)
        if model_id is not None and self._registry.cached(model_id) is None:
            await self._fetch_once("model", model_id)

    async def _fetch_once(self, kind: str, name: str) -> None:
        """Read one model or vmodel record into its view, unless it was found missing in the last
        second."""
        if (kind, name) in self._unknown:
            return
        try:
            if kind == "vmodel":
                assert self.aliases is not None
                await self.aliases.fetch(name)
                found = self.aliases.active(name) is not None
            else:
                found = await self._registry.get(name) is not None
        except Unavailable as err:
            log.debug("read-through for %s '%s' failed: %s", kind, name, err)
            found = False
        if not found:
            self._unknown[(kind, name)] = True

    def _choose_pod(
        self, model_id: str, excluded: set[str], prefer_local: bool, last_error: MeshError | None
    ) -> str:
        assert self.cluster is not None
        record = self._registry.cached(model_id)
        if record is None:
            raise ModelNotFound(f"model '{model_id}' not found")
        now = self._clock.now_ms()
        live = [i for i in record.copies if i not in excluded and self.cluster.is_live(i)]
        # a holder that is shutting down serves until it goes, but copies elsewhere go first (its
        # models in use are being loaded on other pods)
        staying = [i for i in live if not self._stopping(i)]
        live = staying or live
        if live:
            copies = [CopyView(i, self._peers.in_flight(i), record.copies[i], pod_rate_rpm=self.pods.pod_rate(i))
                      for i in live]
            return choose_copy(copies, local_instance=self.instance_id, prefer_local=prefer_local,
                               now_ms=now, rng=self._rng)
        failed = self._recent_failures(record, now)
        if self._failures.get(model_id) and now - self._failures[model_id].time_ms < self._failure_expiry_ms:
            failed[self.instance_id] = self._failures[model_id]
        model = ModelView(
            model_id, record.info.type, last_used_ms=last_use(record),
            holders=frozenset(record.copies), failed=frozenset(failed),
        )
        decision = choose_load_target(
            self.pods.placement_view(record), model,
            now_ms=now, rng=self._rng, exclude=frozenset(excluded),
        )
        if decision.instance_id is None:
            if last_error is not None:
                raise last_error
            if failed:
                reasons = "; ".join(sorted({f.message for f in failed.values()}))
                raise ModelLoadFailed(f"model '{model_id}' failed to load: {reasons}")
            raise CapacityExhausted(f"no pod can load '{model_id}': {decision.reason}")
        self.pods.add_pending(decision.instance_id, model_id, now)
        return decision.instance_id

    def _stopping(self, instance_id: str) -> bool:
        assert self.cluster is not None
        record = self.cluster.view.get(instance_id)
        return record is not None and record.shutting_down

    def _recent_failures(self, record: ModelRecord, now: int) -> dict[str, LoadFailure]:
        """The record's load failures that have not expired, by instance."""
        return {i: f for i, f in record.failures.items() if now - f.time_ms < self._failure_expiry_ms}

    async def _forward(
        self, instance_id: str, method: str, body: bytes, metadata: Metadata, timeout_s: float | None
    ) -> bytes:
        assert self.cluster is not None
        endpoint = self.cluster.endpoint(instance_id)
        if endpoint is None:
            raise Unavailable(f"pod {instance_id} has left the cluster")
        return await self._peers.invoke(instance_id, endpoint, method, body, metadata, timeout_s)

    # ------------------------------------------------------------------ copies (see scaling.py)

    def loaded_copies(self) -> list[LocalCopy]:
        return [c for c in self._copies.values() if c.state is CopyState.LOADED]

    def record(self, model_id: str) -> ModelRecord | None:
        return self._registry.cached(model_id)

    def records(self) -> list[tuple[str, ModelRecord]]:
        return list(self._registry.items())

    def place_copies(self, model_id: str, count: int, *, copy_rpm: float = 0.0) -> tuple[str, ...]:
        """Start ``count`` more copies of the model on the pods placement picks (not waiting for
        the loads); returns the pods chosen."""
        return tuple(self._start_copies(model_id, count, copy_rpm))

    async def match_copies(self, model_id: str, like: str, timeout_s: float) -> None:
        """Load more copies of ``model_id`` until it has as many live copies as ``like`` (a vmodel's
        new target next to its active model), waiting up to ``timeout_s`` for those loads. Loads
        that fail or find no room leave it with fewer."""
        target, current = self._registry.cached(model_id), self._registry.cached(like)
        if target is None or current is None:
            return
        missing = len(self.pods.live_holders(current)) - len(self.pods.live_holders(target))
        loads = list(self._start_copies(model_id, missing).values())
        if loads:
            await asyncio.wait(loads, timeout=timeout_s)

    def _start_copies(self, model_id: str, count: int, copy_rpm: float = 0.0) -> dict[str, asyncio.Task[object]]:
        """``place_copies``, returning each chosen pod's load task (done once the copy is loaded)."""
        record = self._registry.cached(model_id)
        if record is None or count <= 0 or self.cluster is None:
            return {}
        now = self._clock.now_ms()
        failed = frozenset(self._recent_failures(record, now))
        model = ModelView(model_id, record.info.type, last_used_ms=record.last_used_ms,
                          holders=frozenset(self.pods.live_holders(record)), failed=failed)
        placement = choose_new_copy_pods(
            self.pods.placement_view(record), model, count,
            now_ms=now, rng=self._rng, copy_rpm=copy_rpm, required_labels=frozenset(record.pin_labels),
        )
        tasks = {}
        for instance_id in placement.instance_ids:
            self.pods.add_pending(instance_id, model_id, now)
            tasks[instance_id] = self._spawn(self._load_on(instance_id, model_id), f"copy:{model_id}@{instance_id}")
        if placement.instance_ids:
            log.info("adding %d copies of '%s': %s", len(placement.instance_ids), model_id, placement.reason)
        return tasks

    async def rehome(self, timeout_s: float) -> tuple[int, int]:
        """At shutdown (this pod already published as shutting down, so placement passes it over):
        load the models used here in the last ``REHOME_RECENT_MS`` that no other live pod holds onto
        other pods, most recently used first, and wait up to ``timeout_s`` for those loads to
        finish, or until no other pod is left that is not shutting down too. Returns (models now
        loaded elsewhere, models it tried); the requests that keep arriving meanwhile are still
        served here."""
        if self.cluster is None or timeout_s <= 0:
            return 0, 0
        now = self._clock.now_ms()

        def elsewhere(model_id: str) -> bool:
            record = self._registry.cached(model_id)
            return record is None or any(i != self.instance_id and self.pods.is_live(i) for i in record.copies)

        def somewhere_to_go() -> bool:  # pods stopping together stop waiting for each other
            return any(i != self.instance_id and not r.shutting_down for i, r in self.pods.published().items())

        recent = sorted((c for c in self.loaded_copies() if now - c.last_used_ms <= REHOME_RECENT_MS),
                        key=lambda c: c.last_used_ms, reverse=True)
        wanted = [c.model_id for c in recent if not elsewhere(c.model_id)]
        if not wanted:
            return 0, 0
        if not somewhere_to_go():
            if len(self.pods.published()) > 1:
                log.info("shutting down: %d models in use here, and every other pod is stopping too", len(wanted))
            return 0, len(wanted)
        log.info("shutting down: loading %d recently used models held only here on other pods, %d at a time",
                 len(wanted), REHOME_PARALLEL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        queue = iter(wanted)
        pending: set[asyncio.Task[object]] = set()
        moved = 0
        while somewhere_to_go() and loop.time() < deadline:
            # at most REHOME_PARALLEL loads at once, so a pod that served thousands of models in
            # its last hour does not start thousands of loads on the others together; a model
            # that a request has meanwhile loaded elsewhere is skipped
            while len(pending) < REHOME_PARALLEL and (model_id := next(queue, None)) is not None:
                if elsewhere(model_id):
                    moved += 1
                else:
                    pending.update(self._start_copies(model_id, 1).values())
            if not pending:
                break
            done, pending = await asyncio.wait(pending, timeout=min(0.05, max(0.0, deadline - loop.time())),
                                               return_when=asyncio.FIRST_COMPLETED)
            moved += sum(1 for t in done if not t.cancelled() and t.exception() is None)
        log.info("shutting down: %d of %d models re-homed", moved, len(wanted))
        return moved, len(wanted)

    async def _load_on(self, instance_id: str, model_id: str, *, ahead_of_ms: int = 0) -> None:
        """Load the model on that pod. ``ahead_of_ms``: a proactive load; the copy takes that time
        (the model's last use) as its own, so it is the first to go when its pod needs room."""
        if instance_id == self.instance_id:
            if ahead_of_ms:
                self._check_room_ahead(model_id)
            copy = await self._ensure_local(model_id)
            if ahead_of_ms:
                backdate(copy, ahead_of_ms)
            return
        # a forwarded ModelMetadata is served where it lands, so that pod loads the model
        metadata = [("mm-model-id", model_id)]
        if ahead_of_ms:
            metadata.append((LOAD_AHEAD_HEADER, str(ahead_of_ms)))
        await self._forward(instance_id, MODEL_METADATA_METHOD, encode_string_field(1, model_id), metadata, None)

    async def _load_ahead(self, model_id: str, last_used_ms: int, method: str, body: bytes,
                          metadata: Metadata) -> bytes:
        """Another pod's proactive load: load here and answer, without counting it as a use."""
        self._check_room_ahead(model_id)
        copy = await self._ensure_local(model_id)
        backdate(copy, last_used_ms)
        copy.in_flight += 1
        try:
            return await self._runtime.invoke(method, body, metadata, None)
        finally:
            copy.in_flight -= 1

    def _check_room_ahead(self, model_id: str) -> None:
        """A load ahead of need uses free room only: the planner judged this pod's room from its
        published record, which may be behind; it must never evict a model in use for a guess."""
        copy = self._copies.get(model_id)
        if copy is not None or model_id in self._loads:
            return  # loaded or on its way already: nothing to place
        free = self.capacity_bytes - self.used_bytes()
        needed = 2 * self._default_size()  # the model and a default model's room to spare
        if free < needed:
            raise CapacityExhausted(
                f"no free room to load '{model_id}' ahead of need: {free} bytes free, {needed} wanted")

    def load_into_free_space(self) -> tuple[str, ...]:
        """Leader's chore: start loads of models held nowhere into the cluster's free space, most
        recently used first (``placement/proactive.py``); returns the models. Models pinned to
        labels, or kept at a minimum number of copies, are left to their own rules."""
        if self.cluster is None:
            return ()
        now = self._clock.now_ms()
        pending = self.pods.pending_loads()
        on_their_way = {p.model_id for loads in pending.values() for p in loads} | self._loads.keys()
        candidates = [
            ModelView(model_id, record.info.type, last_used_ms=record.last_used_ms,
                      failed=frozenset(self._recent_failures(record, now)))
            for model_id, record in self._registry.items()
            if not record.pin_labels and not record.all_pods and record.min_copies <= 1
            and model_id not in on_their_way and not self.pods.live_holders(record)
        ]
        if not candidates:
            return ()
        plan = plan_proactive_loads(self.pods.placement_view(pending=pending), candidates,
                                    now_ms=now, rng=self._rng, max_loads=PROACTIVE_MAX_LOADS)
        last_used = {m.model_id: m.last_used_ms for m in candidates}
        for load in plan.loads:
            self.pods.add_pending(load.instance_id, load.model_id, now)
            self._spawn(self._load_on(load.instance_id, load.model_id, ahead_of_ms=max(1, last_used[load.model_id])),
                        f"ahead:{load.model_id}@{load.instance_id}")
        if plan.loads:
            log.info("loading %d models ahead of need: %s", len(plan.loads), plan.reason)
        return tuple(load.model_id for load in plan.loads)

    async def drop_copy(self, model_id: str) -> None:
        """Unload this pod's copy (scaling down); the model stays registered and loaded elsewhere."""
        log.info("removing this pod's copy of '%s' (traffic cooled)", model_id)
        await self._drop_local(model_id)

    def ensure_min_copies(self, model_id: str) -> tuple[str, ...]:
        """Load more copies when the model has fewer than its minimum (or all-pods) asks."""
        record = self._registry.cached(model_id)
        if record is None or not (record.min_copies > 1 or record.all_pods):
            return ()
        eligible = self.pods.eligible_pods(record)
        wanted = len(eligible) if record.all_pods else min(record.min_copies, len(eligible))
        missing = wanted - len(self.pods.live_holders(record)) - self.pods.pending_for(model_id)
        if self.cluster is None:
            if missing > 0 and model_id not in self._copies:
                self._spawn(self._ensure_local(model_id), f"min-copies:{model_id}")
            return ()
        return self.place_copies(model_id, missing)

    def _default_size(self) -> int:
        """The size placement assumes for a model it knows nothing of: what models here have
        typically been predicted at, else the runtime's default."""
        if self._typical_size:
            return self._typical_size
        return self._status.default_model_size_bytes if self._status else 1024 * 1024

    def instance_figures(self, endpoint: str, labels: tuple[str, ...], zone: str, start_ms: int) -> InstanceRecord:
        """This pod's instance record, from its live figures."""
        status = self._status
        return InstanceRecord(
            endpoint=endpoint,
            capacity_bytes=self.capacity_bytes,
            used_bytes=self.used_bytes(),
            model_count=len(self._copies),
            lru_time_ms=self._lru_ms() if self._copies else 0,
            loading_in_flight=len(self._loads),
            loading_slots=status.max_loading_concurrency if status else 1,
            request_rate_rpm=self.requests.rpm(),
            labels=labels, zone=zone, version=__version__, start_time_ms=start_ms,
        )

    def _on_instance_removed(self, instance_id: str) -> None:
        self.pods.forget(instance_id)
        self._peers.forget(instance_id)
        if self.cluster is not None and self.cluster.is_leader():
            self._spawn(self.sweep_dead_copies(), "sweep-dead-copies")

    async def sweep_dead_copies(self) -> int:
        """Remove copies of pods that are gone from every model record (leader's chore)."""
        assert self.cluster is not None
        cluster = self.cluster

        def departed(model_id: str, record: ModelRecord) -> list[str]:
            return [i for i in record.copies if i != self.instance_id and not cluster.is_live(i)]

        swept = await self._registry.update_where(
            lambda m, r: bool(departed(m, r)), lambda m, r: without_copies(r, departed(m, r)))
        if swept:
            log.info("removed copies of departed pods from %d model records", swept)
        return swept

    async def forget_own_copies(self) -> int:
        """Records that list this pod for a model it does not hold (or load) are corrected: at start
        the runtime holds nothing, whatever records say from an earlier life (a restarted pod keeps
        its name, so its id); later, an unload whose record write failed leaves the same."""

        def stale(model_id: str, record: ModelRecord) -> bool:
            return self.instance_id in record.copies and model_id not in self._copies

        swept = await self._registry.update_where(
            stale, lambda m, r: without_copies(r, [self.instance_id] if stale(m, r) else []))
        if swept:
            log.info("removed stale copies of this instance from %d model records", swept)
        return swept

    async def restore_own_copies(self) -> int:
        """Records that lack a copy this pod holds get it back. A pod whose lease lapsed (the
        store out of its reach for longer than the TTL) has its copies swept from the records by
        the leader while it still holds and serves them; so does a load whose record write failed
        while the store was down. Returns how many records changed."""

        def held_since(model_id: str) -> int | None:
            copy = self._copies.get(model_id)
            return copy.state_ms if copy is not None and copy.state is CopyState.LOADED else None

        def missing(model_id: str, record: ModelRecord) -> bool:
            return self.instance_id not in record.copies and held_since(model_id) is not None

        def with_own_copy(model_id: str, record: ModelRecord) -> ModelRecord | None:
            # decided again on the fresh record: an eviction may have begun meanwhile
            since = held_since(model_id)
            if since is None or self.instance_id in record.copies:
                return None
            return with_copy(record, self.instance_id, since)

        restored = await self._registry.update_where(missing, with_own_copy, model_ids=list(self._copies))
        if restored:
            log.info("recorded this instance's copies again in %d model records", restored)
        return restored

    async def expire_failures(self) -> int:
        """Drop load failures older than the expiry from model records (leader's chore)."""
        now = self._clock.now_ms()

        def old(record: ModelRecord) -> set[str]:
            return record.failures.keys() - self._recent_failures(record, now).keys()

        def fresh_only(model_id: str, record: ModelRecord) -> ModelRecord | None:
            gone = old(record)
            for i in gone:
                del record.failures[i]
            return record if gone else None

        return await self._registry.update_where(lambda m, r: bool(old(r)), fresh_only)

    async def invoke(
        self, model_id: str, method: str, body: bytes, metadata: Metadata, timeout_s: float | None
    ) -> bytes:
        """Send one request to the model's copy in the runtime, loading it first if needed."""
        for attempt in (1, 2):
            copy = self._copies.get(model_id)
            if copy is None or copy.state is not CopyState.LOADED:
                copy = await self._ensure_local(model_id)
            copy.in_flight += 1
            copy.requests += 1
            copy.last_used_ms = self._clock.now_ms()
            started = self._clock.monotonic()
            code = "OK"
            try:
                return await self._runtime.invoke(method, body, metadata, timeout_s)
            except UpstreamError as err:
                code = err.code
                # The runtime lost the model (it restarted): forget the copy and load it again, once.
                if attempt == 1 and err.code == "NOT_FOUND" and self._copies.get(model_id) is copy:
                    log.warning("runtime no longer has '%s'; loading it again", model_id)
                    del self._copies[model_id]
                    continue
                raise
            except BaseException as err:
                code = type(err).__name__
                raise
            finally:
                copy.in_flight -= 1
                self._metrics.invoke_model.labels(method.rsplit("/", 1)[-1], code).observe(
                    (self._clock.monotonic() - started) * 1000
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ensure_local(self, model_id: str) -> LocalCopy:
        """The loaded local copy, loading it if needed; concurrent callers share one load."""
        started = self._clock.monotonic()
        try:
            while True:
                copy = self._copies.get(model_id)
                if copy is not None and copy.state is CopyState.LOADED:
                    return copy
                task = self._loads.get(model_id)
                if task is None:
                    record = self._registry.cached(model_id)
                    if record is None:
                        raise ModelNotFound(f"model '{model_id}' not found")
                    self._raise_if_failed_recently(model_id)
                    task = asyncio.create_task(self._load(model_id, record.info), name=f"load:{model_id}")
                    self._loads[model_id] = task
                    task.add_done_callback(self._load_done)
                # shield: a caller that gives up must not cancel a load others wait for
                self._waiting[model_id] = self._waiting.get(model_id, 0) + 1
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if task.cancelled() and not (current and current.cancelling()):
                        # the load was stopped by an unregister or unload, not by this caller
                        if self._registry.cached(model_id) is None:
                            raise ModelNotFound(f"model '{model_id}' was unregistered") from None
                        continue
                    raise
                finally:
                    left = self._waiting[model_id] - 1
                    if left:
                        self._waiting[model_id] = left
                    else:
                        del self._waiting[model_id]
        finally:
            self._metrics.cache_miss.observe((self._clock.monotonic() - started) * 1000)

    def _load_done(self, task: asyncio.Task[LocalCopy]) -> None:
        model_id = task.get_name().removeprefix("load:")
        if self._loads.get(model_id) is task:
            del self._loads[model_id]
        if not task.cancelled():
            task.exception()  # retrieved here so an unwaited failure is not reported as lost

    def _raise_if_failed_recently(self, model_id: str) -> None:
        failure = self._failures.get(model_id)
        if failure is None:
            return
        age = self._clock.now_ms() - failure.time_ms
        if age >= self._failure_expiry_ms:
            del self._failures[model_id]
            return
        retry_in = (self._failure_expiry_ms - age) / 1000
        raise ModelLoadFailed(
            f"model '{model_id}' failed to load: {failure.message} (next attempt in {retry_in:.0f} s)"
        )

    # ------------------------------------------------------------------ loading and eviction

    async def _load(self, model_id: str, info: ModelInfo) -> LocalCopy:
        pending_unload = self._unloads.get(model_id)
        if pending_unload is not None:
            await asyncio.gather(pending_unload, return_exceptions=True)
        status = self._require_status()
        now = self._clock.now_ms()
        predicted = await self._predict_size(model_id, info, status)
        copy = LocalCopy(model_id, CopyState.LOADING, predicted, now, now)
        record = self._registry.cached(model_id)
        if record is not None and record.long_use > 0:
            # the model's long-term use goes on from where its last copy left it
            copy.long_use, copy.long_use_ms = decayed_count(record.long_use, record.long_use_ms, now), now
        self._copies[model_id] = copy
        try:
            await self._make_room(model_id, predicted)
            queued = self._clock.monotonic()
            async with self._load_slots:
                self._metrics.loading_queue_delay.observe((self._clock.monotonic() - queued) * 1000)
                # The copy goes into the model record while the runtime loads, not before: other
                # pods see it within a store round trip either way, and the request does not wait
                # for the write.
                recorded = asyncio.create_task(self._record_copy(model_id, now), name=f"record:{model_id}")
                started = self._clock.monotonic()
                try:
                    result = await self._runtime.load_model(
                        model_id, info, status.loading_timeout_ms / 1000
                    )
                except ModelLoadFailed as err:
                    await asyncio.gather(recorded, return_exceptions=True)
                    await self._record_failure(model_id, err.message)
                    raise ModelLoadFailed(f"model '{model_id}' failed to load: {err.message}") from err
                except BaseException:
                    # cancelled or the runtime vanished mid-load: make sure nothing stays loaded
                    self._spawn(self._unload_after(recorded, model_id), f"unload:{model_id}")
                    raise
                self._metrics.load_model.observe((self._clock.monotonic() - started) * 1000)
            try:
                await recorded
            except ModelNotFound:
                await self._start_unload(model_id)  # unregistered while it loaded
                raise
            except MeshError as err:
                # the store is down: serve anyway; the copy is recorded when the model is next loaded
                log.warning("serving '%s' though its copy could not be recorded: %s", model_id, err)
            size = result.size_bytes or await self._runtime.model_size(model_id) or predicted
            copy.size_bytes = size
            copy.state = CopyState.LOADED
            copy.state_ms = self._clock.now_ms()
            self._metrics.loaded_model_size.observe(size)
            if size > predicted:
                await self._settle_after_load(model_id, size)
            log.info("loaded '%s' (%d bytes)", model_id, size)
            self._typical_size = (3 * self._typical_size + predicted) // 4 if self._typical_size else predicted
            if self._headroom_task is None or self._headroom_task.done():
                self._headroom_task = self._spawn(self._keep_headroom(), "headroom")
            return copy
        except BaseException:
            if self._copies.get(model_id) is copy:
                del self._copies[model_id]
            raise

    async def _record_copy(self, model_id: str, started_ms: int) -> ModelRecord:
        # after any removal of an earlier copy still being written, so the two land in order
        pending = self._record_writes.get(model_id)
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        return await self._registry.update(model_id, lambda r: with_copy(r, self.instance_id, started_ms))

    async def _unload_after(self, recorded: asyncio.Task[ModelRecord], model_id: str) -> None:
        """Unload once the copy's record write is done, so its removal from the record wins."""
        await asyncio.gather(recorded, return_exceptions=True)
        await self._unload(model_id)

    async def _predict_size(self, model_id: str, info: ModelInfo, status: RuntimeStatus) -> int:
        try:
            predicted = await self._runtime.predict_model_size(model_id, info)
        except MeshError as err:
            log.warning("predictModelSize for '%s' failed (%s); using the default size", model_id, err)
            predicted = 0
        return predicted or status.default_model_size_bytes

    async def _make_room(self, model_id: str, needed: int) -> None:
        """Evict least recently used idle models until ``needed`` bytes fit beside the rest."""
        others = [self._cached(c) for c in self._copies.values() if c.model_id != model_id]
        decision = choose_evictions(others, self.capacity_bytes, needed, typical_size_bytes=self._typical_size)
        if not decision.fits:
            raise CapacityExhausted(f"cannot load '{model_id}': {decision.reason}")
        refusal = self._churning(decision.victims[0]) if decision.victims else None
        if refusal is not None:
            raise CapacityExhausted(f"cannot load '{model_id}': {refusal}")
        await self._evict(decision.victims, f"to make room for '{model_id}'")

    def _churning(self, first_victim: str) -> str | None:
        """The churn guard's refusal when evicting ``first_victim`` would displace a model in
        recent use (off unless MM_CHURN_GUARD_MS is set)."""
        if self._churn_guard_ms <= 0:
            return None
        return churn_guard(self._copies[first_victim].last_used_ms, self._clock.now_ms(), 0, True,
                           threshold_ms=self._churn_guard_ms)

    def _cached(self, c: LocalCopy) -> CachedModel:
        """A copy as eviction sees it: busy ones stay, used ones outlive idle ones, and a copy that
        holds its model at its minimum (or is its only copy on an all-pods model) stays."""
        record = self._registry.cached(c.model_id)
        pinned = record is not None and (record.all_pods or (
            record.min_copies > 1 and len(self.pods.live_holders(record)) <= record.min_copies))
        now = self._clock.now_ms()
        # Just loaded and not yet used: the requests that waited for it have not run yet (they wake
        # after the load task ends), so evicting it now would make them load it again — a thrash
        # loop. Such a copy counts as busy for a short grace.
        fresh = c.requests == 0 and c.state is CopyState.LOADED and now - c.state_ms < FRESH_COPY_GRACE_MS \
            and c.rate.idle(now)
        # eviction weighs the plain count of the last minute (one request is one: the window's
        # and those since the copy keeper last folded them in), plus what the record still carries
        # of the model's use when its last copy went; on a pod whose counts fit their long-term
        # rates, the long-term rate unless the minute says the traffic moved
        uses = c.minute_uses(now) + (carried(record, c, now) if record is not None else 0.0)
        steady = self.popularity.steady and record is not None
        if steady:
            assert record is not None
            uses = steady_use(uses, long_use_rpm(c.long_use, c.long_use_ms, now, record.registered_ms))
        return CachedModel(
            c.model_id, c.size_bytes, c.last_used_ms,
            # requests waiting for its load count as in flight: they are served by this copy once
            # they wake, which is after the load ends (and after a headroom eviction that runs then)
            busy=c.state is CopyState.LOADING or c.in_flight > 0 or fresh or c.model_id in self._waiting,
            request_rate_rpm=uses, min_copies_pinned=pinned, steady=steady,
        )

    async def _evict(self, victims: tuple[str, ...], why: str) -> None:
        # Removed from the table before any await, so a concurrent load sees the space as taken
        # by the model being loaded, and a new request for a victim starts a fresh load (which
        # waits for this unload first).
        now = self._clock.now_ms()
        unloads = []
        for victim in victims:
            evicted = self._copies.pop(victim)
            self._metrics.model_evicted.inc()
            self._metrics.age_at_eviction.observe(now - evicted.last_used_ms)
            log.info("evicting '%s' (%d bytes) %s", victim, evicted.size_bytes, why)
            unloads.append(self._start_unload(victim, gone=evicted))
        if unloads:
            await asyncio.gather(*unloads, return_exceptions=True)

    async def _keep_headroom(self) -> None:
        """Keep room for about one more model free, evicting least recently used idle models in
        the background, so the next cold request loads at once instead of waiting for unloads (as
        ModelMesh treats a pod as full below one or two model sizes of free space). The headroom is
        the typical predicted size, at most a tenth of the capacity so small caches stay useful."""
        target = min(self._typical_size, self.capacity_bytes // 10)
        if target <= 0 or self.capacity_bytes - self.used_bytes() >= target:
            return
        cache = [self._cached(c) for c in self._copies.values()]
        decision = choose_evictions(cache, self.capacity_bytes, target, typical_size_bytes=self._typical_size)
        if decision.fits and decision.victims and not self._churning(decision.victims[0]):
            await self._evict(decision.victims, "to keep room for the next load")

    async def _settle_after_load(self, model_id: str, size: int) -> None:
        """The model turned out larger than predicted: evict more, or give it up if it cannot fit."""
        try:
            await self._make_room(model_id, size)
        except CapacityExhausted as err:
            if size > self.capacity_bytes:
                await self._record_failure(model_id, err.message)
                self._copies.pop(model_id, None)
                await self._start_unload(model_id)
                raise ModelLoadFailed(err.message) from err
            log.warning("over capacity after loading '%s': %s", model_id, err.message)

    def _start_unload(self, model_id: str, *, gone: LocalCopy | None = None) -> asyncio.Task[None]:
        """Unload the model from the runtime, then take the copy out of its record. ``gone``, the
        copy as it was when it left the table, leaves its last use and use count in the record."""
        task = asyncio.create_task(self._unload(model_id, gone=gone), name=f"unload:{model_id}")
        self._unloads[model_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._unloads.get(model_id) is t:
                del self._unloads[model_id]
            if not t.cancelled():
                t.exception()

        task.add_done_callback(done)
        return task

    async def _unload(self, model_id: str, *, gone: LocalCopy | None = None) -> None:
        started = self._clock.monotonic()
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(3),
                wait=wait_exponential(multiplier=0.2, max=2),
                retry=retry_if_exception_type(RuntimeUnavailable),
                reraise=True,
            ):
                with attempt:
                    await self._runtime.unload_model(model_id)
            self._metrics.unload_model.observe((self._clock.monotonic() - started) * 1000)
        except MeshError as err:
            self._metrics.unload_model_failure.inc()
            log.error("unloading '%s' failed: %s", model_id, err)
        # The memory is free now; whoever waits for this unload (a load making room) need not
        # wait for the store too. A reload of the same model waits for this write (_load).
        self._record_writes[model_id] = self._spawn(self._forget_copy(model_id, gone), f"forget:{model_id}")

    async def _forget_copy(self, model_id: str, gone: LocalCopy | None = None) -> None:
        """Take this pod's copy out of the record, which keeps the copy's last use as the model's
        (the order proactive loading brings models back in) and its use of the last minute (the
        credit eviction gives the model's next copy)."""
        now = self._clock.now_ms()
        try:
            await self._registry.update(model_id, lambda r: without_copy(r, self.instance_id, gone, now))
        except ModelNotFound:
            pass
        except MeshError as err:
            log.warning("could not remove the copy of '%s' from its record: %s", model_id, err)
        finally:
            task = asyncio.current_task()
            if self._record_writes.get(model_id) is task:
                del self._record_writes[model_id]

    async def _record_failure(self, model_id: str, message: str) -> None:
        failure = LoadFailure(self._clock.now_ms(), message)
        self._failures[model_id] = failure
        self._metrics.load_model_failure.inc()
        log.warning("loading '%s' failed: %s", model_id, message)
        try:
            await self._registry.update(model_id, lambda r: with_failure(r, self.instance_id, failure))
        except MeshError as err:
            log.warning("could not record the failure of '%s': %s", model_id, err)

    async def _drop_local(self, model_id: str) -> None:
        """Stop any load of the model here and unload it from the runtime."""
        task = self._loads.get(model_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        copy = self._copies.pop(model_id, None)
        if copy is not None:
            await self._start_unload(model_id, gone=copy)

    def _on_model_removed(self, model_id: str) -> None:
        self._failures.pop(model_id, None)
        if (model_id in self._copies or model_id in self._loads) and model_id not in self._drops:
            task = self._spawn(self._drop_local(model_id), f"drop:{model_id}")
            self._drops[model_id] = task
            task.add_done_callback(lambda t: self._drops.pop(model_id, None))

    def _require_status(self) -> RuntimeStatus:
        if self._status is None:
            raise RuntimeUnavailable("the runtime is not ready yet")
        return self._status

    # ------------------------------------------------------------------ management

    async def register(
        self,
        model_id: str,
        info: ModelInfo,
        *,
        load_now: bool,
        sync: bool,
        last_used_ms: int = 0,
        policy: PlacementPolicy | None = None,
    ) -> ModelStatus:
        _validate_registration(model_id, info)
        policy = policy or PlacementPolicy()
        if policy.min_copies > MAX_MIN_COPIES:
            raise InvalidRequest(f"minCopies {policy.min_copies} is more than {MAX_MIN_COPIES}")
        now = self._clock.now_ms()
        record = ModelRecord(
            info=info, registered_ms=now, last_used_ms=last_used_ms or now,
            min_copies=policy.min_copies, all_pods=policy.all_pods,
            pin_labels=tuple(sorted(set(policy.pin_labels))),
        )
        created = await self._create_record(
            model_id, record, lambda r: (r.info, policy_of(r)) == (info, policy_of(record)))
        if policy.min_copies > 1 or policy.all_pods:
            self.ensure_min_copies(model_id)
        if load_now:
            return await self.ensure_loaded(model_id, sync=sync)
        if created:
            # the record just written is the state: no store read needed to report it
            return self._status_of(model_id, record)
        return await self.status(model_id)

    async def register_for_vmodel(self, model_id: str, info: ModelInfo, *, auto_delete: bool) -> bool:
        """Register a vmodel's target (setVModel with modelInfo): True when this call created the
        record; a model registered already with the same info is used as it is (its auto-delete
        flag unchanged, as in ModelMesh), with other info it is ALREADY_EXISTS."""
        _validate_registration(model_id, info)
        now = self._clock.now_ms()
        record = ModelRecord(info=info, registered_ms=now, last_used_ms=now, auto_delete=auto_delete)
        return await self._create_record(model_id, record, lambda r: r.info == info)

    async def _create_record(self, model_id: str, record: ModelRecord, same: Callable[[ModelRecord], bool]) -> bool:
        """Store a new model record: True when created; False when the id is registered already
        with a record ``same`` accepts (a repeated registration); ModelExists when it differs."""
        if await self._registry.create(model_id, record):
            return True
        existing = await self._registry.get(model_id)
        if existing is None:  # unregistered in between: try once more
            return await self._registry.create(model_id, record)
        if not same(existing.record):
            raise ModelExists(
                f"model '{model_id}' is already registered with different info "
                f"(type={existing.record.info.type!r}, path={existing.record.info.path!r}); "
                "unregister it first"
            )
        return False

    async def fetch_record(self, model_id: str) -> ModelRecord | None:
        """The model's record as the store has it now (management path)."""
        versioned = await self._registry.get(model_id)
        return None if versioned is None else versioned.record

    async def unregister(self, model_id: str) -> None:
        """Remove the model's record and unload it here; unknown ids are a no-op."""
        # Deleting the record first stops new requests from loading it again; the registry then
        # tells _on_model_removed, which starts the unload awaited here.
        await self._registry.delete(model_id)
        drop = self._drops.get(model_id)
        if drop is not None:
            await asyncio.gather(drop, return_exceptions=True)

    async def ensure_loaded(self, model_id: str, *, sync: bool, last_used_ms: int = 0) -> ModelStatus:
        """Make sure a copy exists somewhere, placed like a request's load would be."""
        if (await self._registry.get(model_id)) is None:
            raise ModelNotFound(f"model '{model_id}' not found")
        if sync:
            try:
                await self._load_somewhere(model_id, last_used_ms)
            except ModelLoadFailed:
                pass  # reported through the status below
            except UpstreamError as err:
                if err.code != "FAILED_PRECONDITION":
                    raise
        else:
            self._spawn(self._load_somewhere(model_id, last_used_ms), f"ensure:{model_id}")
            await asyncio.sleep(0)  # let the load register itself so the status says LOADING
        return await self.status(model_id)

    async def _load_somewhere(self, model_id: str, last_used_ms: int) -> None:
        copy = self._copies.get(model_id)
        if self.cluster is None or copy is not None or model_id in self._loads:
            copy = await self._ensure_local(model_id)
            if last_used_ms:
                copy.last_used_ms = last_used_ms
            return
        # Through the request path, so placement (labels, space, pending loads) decides the pod;
        # ModelMetadata makes that pod load the model and costs nothing more.
        await self.route(RouteTarget(model_id, "model"), MODEL_METADATA_METHOD,
                         encode_string_field(1, model_id), [], None)

    async def unload(self, model_id: str) -> None:
        """Unload the model here but keep it registered (repository unload)."""
        if self._registry.cached(model_id) is None:
            raise ModelNotFound(f"model '{model_id}' not found")
        await self._drop_local(model_id)

    async def status(self, model_id: str) -> ModelStatus:
        versioned = await self._registry.get(model_id)
        if versioned is None:
            return ModelStatus(ModelState.NOT_FOUND)
        return self._status_of(model_id, versioned.record)

    def cached_status(self, model_id: str) -> ModelStatus:
        """Status from this pod's view: no store access (for the data plane's ModelReady)."""
        record = self._registry.cached(model_id)
        return ModelStatus(ModelState.NOT_FOUND) if record is None else self._status_of(model_id, record)

    def list_models(self) -> list[tuple[str, ModelStatus]]:
        return sorted((mid, self._status_of(mid, rec)) for mid, rec in self._registry.items())

    def _status_of(self, model_id: str, record: ModelRecord) -> ModelStatus:
        now = self._clock.now_ms()
        copies: list[CopyStatus] = []
        local = self._copies.get(model_id)
        if local is not None:
            state = ModelState.LOADED if local.state is CopyState.LOADED else ModelState.LOADING
            copies.append(CopyStatus(self.instance_id, state, local.state_ms))
        elif model_id in self._loads:
            copies.append(CopyStatus(self.instance_id, ModelState.LOADING, now))
        for instance, started in record.copies.items():
            if instance != self.instance_id and self.pods.is_live(instance):
                copies.append(CopyStatus(instance, ModelState.LOADED, started))
        errors = tuple(
            f.message for f in self._recent_failures(record, now).values()
        )
        local_failure = self._failures.get(model_id)
        if local_failure is not None and local_failure.message not in errors:
            errors += (local_failure.message,)
        copies.sort(key=lambda c: c.time_ms, reverse=True)
        if any(c.state is ModelState.LOADED for c in copies):
            state = ModelState.LOADED
        elif copies:
            state = ModelState.LOADING
        elif errors:
            state = ModelState.LOADING_FAILED
        else:
            state = ModelState.NOT_LOADED
        return ModelStatus(state, errors, tuple(copies))

    # ------------------------------------------------------------------ metrics

    def used_bytes(self) -> int:
        return sum(c.size_bytes for c in self._copies.values())

    def loaded_count(self) -> int:
        return sum(1 for c in self._copies.values() if c.state is CopyState.LOADED)

    def model_figures(self) -> list[ModelFigures]:
        """Each copy loaded here, for the per-model gauges (``metrics.TopModels``)."""
        now = self._clock.now_ms()
        figures = []
        for c in self._copies.values():
            if c.state is not CopyState.LOADED:
                continue
            record = self._registry.cached(c.model_id)
            figures.append(ModelFigures(c.model_id, c.minute_uses(now), c.size_bytes,
                                        len(record.copies) if record is not None else 1))
        return figures

    def _lru_ms(self) -> int:
        return min((c.last_used_ms for c in self._copies.values()), default=self._clock.now_ms())

    def _export_gauges(self) -> None:
        # computed when scraped, so they are never stale and cost nothing per request
        m = self._metrics
        gauges: list[tuple[object, Callable[[], float]]] = [
            (m.instance_capacity, lambda: self.capacity_bytes),
            (m.instance_used, self.used_bytes),
            (m.instance_used_bps, lambda: (10000 * self.used_bytes() // self.capacity_bytes)
             if self.capacity_bytes else 0),
            (m.instance_models, self.loaded_count),
            (m.models_loaded, self.loaded_count),
            (m.models_managed, lambda: len(self._registry)),
            (m.models_with_failure, lambda: len(self._failures)),
            (m.instance_lru, lambda: self._lru_ms() / 1000),
            (m.instance_lru_age, lambda: (self._clock.now_ms() - self._lru_ms()) / 1000),
            (m.popularity_fit, lambda: self.popularity.chi2),
            (m.popularity_steady, lambda: 1 if self.popularity.steady else 0),
        ]
        for gauge, fn in gauges:
            gauge.set_function(fn)  # type: ignore[attr-defined]


def _load_ahead_of(metadata: Metadata) -> int | None:
    """The model's last use carried by a proactive load's LOAD_AHEAD_HEADER, if there is one."""
    for key, value in metadata:
        if key == LOAD_AHEAD_HEADER:
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest(f"{LOAD_AHEAD_HEADER} must be a time in ms, got {value!r}") from None
    return None
