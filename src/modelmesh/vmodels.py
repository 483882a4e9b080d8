"""vModels: stable names (aliases) that point at a concrete model, and move to a new one safely.

A vmodel record, ``<prefix>/<service>/vmodels/<vModelId>``, holds an owner, the *active* model
(where requests for the vmodel go) and the *target* model (where it is moving). The rules, from
KServe ModelMesh's ``setVModel``/``deleteVModel``/``getVModelStatus`` contract:

- ``set`` creates the vmodel pointing at its target (active = target), or gives an existing one a
  new target. With ``modelInfo`` the target model is registered too (``autoDeleteTargetModel``
  marks it for deletion once no vmodel refers to it); without, it must be registered already.
- A new target becomes active at once when ``force`` is set, or when the active model is loaded
  nowhere (there is nothing warm to keep serving). Otherwise the vmodel is TRANSITIONING: the target
  is loaded first, to as many copies as the active model has (as ModelMesh intends), and becomes
  active when they are loaded (or, for the copies beyond the first, after MATCH_COPIES_TIMEOUT_S).
  A failed load leaves TRANSITION_FAILED; the elected pod tries again once the failure has expired
  (``advance_all``, every rate period), and finishes transitions whose pod went away.
- A model an update leaves behind (the old active model, or a target replaced before it became
  active) is unregistered when it was registered with auto-delete and no vmodel refers to it.
  ModelMesh counts references in each model record and updates both records in one transaction;
  here the vmodel record is the only one written, and "no vmodel refers to it" is a listing of the
  vmodels at the time of deletion (management path only: one store read).
- Owners: a vmodel created with an owner can be changed (``set`` with another owner: ALREADY_EXISTS),
  read (``status`` with another owner: NOT_FOUND) and deleted (``delete`` with another owner: no-op)
  only under that owner; an empty owner in a request is no check.
- ``expectedTargetModelId`` makes ``set`` conditional: it fails with FAILED_PRECONDITION unless the
  vmodel's current target is that id (or, when it equals the request's target, the vmodel may also
  be absent, or already target it).

Requests name a vmodel with the ``mm-vmodel-id`` header, or by ``model_name`` (a vmodel id first,
then a model id): ``Mesh.resolve`` asks ``active`` on the request path, a dict lookup in the view.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from dataclasses import dataclass, replace

from modelmesh.clock import Clock
from modelmesh.errors import Conflict, InvalidRequest, ModelExists, ModelNotFound, PreconditionFailed
from modelmesh.kv.base import CasFailed, KVStore
from modelmesh.mesh import Mesh, validate_model_id
from modelmesh.types import ModelInfo, ModelState, ModelStatus, _json_object
from modelmesh.watched import PrefixView

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 20
# how long a sync set waits for its transition (ModelMesh: 4 minutes)
SYNC_TRANSITION_TIMEOUT_S = 240.0
# how long a model a vmodel stopped serving stays registered before auto-delete collects it
RETIRE_GRACE_S = 2.0
# how long a move waits for the target's extra copies (to match the active model's) before it
# makes the target active anyway
MATCH_COPIES_TIMEOUT_S = 60.0


class VModelState(enum.IntEnum):
    """Values of ``mmesh.VModelStatusInfo.VModelStatus``."""

    NOT_FOUND = 0
    DEFINED = 1
    TRANSITIONING = 2
    TRANSITION_FAILED = 3
    UNKNOWN = 5


@dataclass(frozen=True, slots=True)
class VModelRecord:
    active: str
    target: str
    owner: str = ""
    updated_ms: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"active": self.active, "target": self.target, "owner": self.owner,
                           "updated_ms": self.updated_ms}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> VModelRecord:
        d = _json_object(raw, "vmodel record")
        return cls(active=d["active"], target=d["target"], owner=d.get("owner", ""),
                   updated_ms=d.get("updated_ms", 0))

    @property
    def moving(self) -> bool:
        return self.active != self.target

    def refers_to(self, model_id: str) -> bool:
        return model_id in (self.active, self.target)


@dataclass(frozen=True, slots=True)
class VModelStatus:
    state: VModelState
    active: str = ""
    target: str = ""
    owner: str = ""
    active_status: ModelStatus | None = None
    target_status: ModelStatus | None = None  # only while the target is not the active model


NOT_FOUND = VModelStatus(VModelState.NOT_FOUND, active_status=ModelStatus(ModelState.NOT_FOUND))


class VModels:
    """The vmodel table: this pod's view of it (request path), and the management calls."""

    def __init__(self, store: KVStore, key_root: str, mesh: Mesh, clock: Clock, *,
                 retire_grace_s: float = RETIRE_GRACE_S) -> None:
        self._store = store
        self._prefix = f"{key_root}/vmodels/"
        self._mesh = mesh
        self._clock = clock
        self._retire_grace_s = retire_grace_s
        self.view: PrefixView[VModelRecord] = PrefixView(store, self._prefix, VModelRecord.from_json, name="vmodels")
        # transitions this pod is driving: vmodel id -> task (at most one per vmodel)
        self._moves: dict[str, tuple[str, asyncio.Task[None]]] = {}
        # former active models waiting out the grace before they are collected
        self._retiring: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.view.start()

    async def close(self) -> None:
        tasks = [task for _, task in self._moves.values()] + list(self._retiring)
        for task in tasks:
            task.cancel()  # a retiring model is collected at once (see _collect_after)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.view.close()

    # ---- request path: no store access

    def active(self, vmodel_id: str) -> str | None:
        record = self.view.get(vmodel_id)
        return None if record is None else record.active

    async def fetch(self, vmodel_id: str) -> None:
        """Read one record from the store into the view (a vmodel set through another pod a moment
        ago, which the watch has not brought yet)."""
        await self._get(vmodel_id)

    # ---- store

    def _key(self, vmodel_id: str) -> str:
        return self._prefix + vmodel_id

    async def _get(self, vmodel_id: str) -> tuple[VModelRecord, int] | None:
        kv = await self._store.get(self._key(vmodel_id))
        if kv is None:
            return None
        record = VModelRecord.from_json(kv.value)
        self.view.remember(vmodel_id, record, kv.mod_revision)
        return record, kv.mod_revision

    async def _put(self, vmodel_id: str, record: VModelRecord, expected_revision: int) -> None:
        revision = await self._store.put(self._key(vmodel_id), record.to_json(), expected_revision=expected_revision)
        self.view.remember(vmodel_id, record, revision)

    # ---- management

    async def set(
        self,
        vmodel_id: str,
        target: str,
        *,
        owner: str = "",
        update_only: bool = False,
        info: ModelInfo | None = None,
        auto_delete: bool = False,
        load_now: bool = False,
        force: bool = False,
        sync: bool = False,
        expected_target: str = "",
    ) -> VModelStatus:
        if not vmodel_id:
            raise InvalidRequest("give a vModelId")
        validate_model_id(vmodel_id)
        if not target:
            raise InvalidRequest(f"give a targetModelId for vmodel '{vmodel_id}'")
        validate_model_id(target)
        if expected_target:
            # checked before the target is registered, so a stale request changes nothing (and
            # again, atomically, when the record is written)
            found = await self._get(vmodel_id)
            self._check(vmodel_id, None if found is None else found[0], target, owner, expected_target)
        created_model = False
        if info is not None:
            created_model = await self._mesh.register_for_vmodel(target, info, auto_delete=auto_delete)
        elif self._mesh.record(target) is None and await self._mesh.fetch_record(target) is None:
            raise ModelNotFound(f"target model '{target}' of vmodel '{vmodel_id}' is not registered; "
                                "give modelInfo to register it")
        try:
            record, left_behind = await self._write_target(
                vmodel_id, target, owner=owner, update_only=update_only, force=force, expected_target=expected_target)
        except BaseException:
            if created_model:  # nothing refers to the model this call registered
                await self._mesh.unregister(target)
            raise
        for model_id, served in left_behind:
            if served:
                self._retire(model_id)
            else:
                await self._collect(model_id)
        if record.moving:
            move = self._move(vmodel_id, record.target)
            if sync:
                await asyncio.wait_for(asyncio.shield(move), SYNC_TRANSITION_TIMEOUT_S)
        elif load_now:
            await self._mesh.ensure_loaded(target, sync=sync)
        return await self.status(vmodel_id)

    async def _write_target(
        self, vmodel_id: str, target: str, *, owner: str, update_only: bool, force: bool, expected_target: str,
    ) -> tuple[VModelRecord, list[tuple[str, bool]]]:
        """Compare-and-set the vmodel's new target; returns the record and the models it no
        longer refers to, each with whether it was the active one (served requests)."""
        for _ in range(_CAS_ATTEMPTS):
            found = await self._get(vmodel_id)
            now = self._clock.now_ms()
            self._check(vmodel_id, None if found is None else found[0], target, owner, expected_target)
            if found is None:
                if update_only:
                    raise ModelNotFound(f"vmodel '{vmodel_id}' not found")
                record = VModelRecord(active=target, target=target, owner=owner, updated_ms=now)
                revision, left_behind = 0, []
            else:
                current, revision = found
                if current.target == target and not (force and current.moving):
                    return current, []
                left_behind = [(current.target, False)] if current.target not in (current.active, target) else []
                if force or self._loaded_nowhere(current.active):
                    record = replace(current, active=target, target=target, updated_ms=now)
                    if current.active != target:
                        left_behind.append((current.active, True))
                else:
                    record = replace(current, target=target, updated_ms=now)
            try:
                await self._put(vmodel_id, record, revision)
            except CasFailed:
                continue
            if found is None:
                log.info("vmodel '%s' created, serving model '%s'", vmodel_id, target)
            elif record.moving:
                log.info("vmodel '%s' moving from model '%s' to '%s'", vmodel_id, record.active, target)
            else:
                log.info("vmodel '%s' now serves model '%s'", vmodel_id, target)
            return record, left_behind
        raise Conflict(f"vmodel '{vmodel_id}' changed {_CAS_ATTEMPTS} times while being set; try again")

    @staticmethod
    def _check(vmodel_id: str, current: VModelRecord | None, target: str, owner: str, expected_target: str) -> None:
        """The owner and expected-target conditions of a set."""
        if current is None:
            if expected_target and expected_target != target:
                raise PreconditionFailed(f"vmodel '{vmodel_id}' not found, so its target is not '{expected_target}'")
            return
        if owner and current.owner != owner:
            raise ModelExists(f"vmodel '{vmodel_id}' exists with another owner ('{current.owner}')")
        if expected_target and current.target not in (expected_target, target):
            raise PreconditionFailed(f"vmodel '{vmodel_id}' targets '{current.target}', "
                                     f"not the expected '{expected_target}'")

    def _loaded_nowhere(self, model_id: str) -> bool:
        return self._mesh.cached_status(model_id).state not in (ModelState.LOADED, ModelState.LOADING)

    def _move(self, vmodel_id: str, target: str) -> asyncio.Task[None]:
        """This pod's transition task toward ``target``: a running one toward the same target is
        reused; one toward an older target is cancelled."""
        running = self._moves.get(vmodel_id)
        if running is not None:
            if running[0] == target and not running[1].done():
                return running[1]
            running[1].cancel()
        task = asyncio.create_task(self._transition(vmodel_id, target), name=f"vmodel:{vmodel_id}")
        self._moves[vmodel_id] = (target, task)

        def forget(t: asyncio.Task[None]) -> None:
            if self._moves.get(vmodel_id, (None, None))[1] is t:
                del self._moves[vmodel_id]
            if not t.cancelled() and t.exception() is not None:
                log.warning("vmodel '%s': the move to '%s' failed: %s", vmodel_id, target, t.exception())

        task.add_done_callback(forget)
        return task

    async def _transition(self, vmodel_id: str, target: str) -> None:
        """Load the target, as many copies of it as the active model has (waiting up to
        ``MATCH_COPIES_TIMEOUT_S`` for the extra ones), then make it active, unless the vmodel has
        moved on meanwhile."""
        try:
            status = await self._mesh.ensure_loaded(target, sync=True)
        except ModelNotFound:
            return  # unregistered: the vmodel was given another target, or the model was deleted
        if status.state is not ModelState.LOADED:
            return
        record = self.view.get(vmodel_id)
        if record is not None and record.target == target and record.moving:
            # a busy model's traffic moves all at once: give it the copies serving it now
            await self._mesh.match_copies(target, record.active, MATCH_COPIES_TIMEOUT_S)
        await self._promote(vmodel_id, target)

    async def _promote(self, vmodel_id: str, target: str) -> None:
        for _ in range(_CAS_ATTEMPTS):
            found = await self._get(vmodel_id)
            if found is None or found[0].target != target or not found[0].moving:
                return
            current, revision = found
            try:
                await self._put(vmodel_id, replace(current, active=target, updated_ms=self._clock.now_ms()), revision)
            except CasFailed:
                continue
            log.info("vmodel '%s' now serves model '%s' (was '%s')", vmodel_id, target, current.active)
            self._retire(current.active)
            return
        raise Conflict(f"vmodel '{vmodel_id}' changed {_CAS_ATTEMPTS} times while being promoted")

    def _retire(self, model_id: str) -> None:
        """Collect a model a vmodel served until now, after ``retire_grace_s``: other pods' views
        switch to the new model within a watch round trip, and until then they still send it
        requests (and requests resolved just before the switch are still on their way)."""
        task = asyncio.create_task(self._collect_after(model_id), name=f"vmodel-retire:{model_id}")
        self._retiring.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._retiring.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("could not collect model '%s': %s", model_id, t.exception())

        task.add_done_callback(done)

    async def _collect_after(self, model_id: str) -> None:
        try:
            await asyncio.sleep(self._retire_grace_s)
        finally:  # also when the pod stops meanwhile: collected now rather than never
            await self._collect(model_id)

    async def _collect(self, model_id: str) -> None:
        """Unregister a model left behind when it was registered for auto-deletion and no vmodel
        refers to it any more (read from the store, not the view)."""
        record = await self._mesh.fetch_record(model_id)
        if record is None or not record.auto_delete:
            return
        listing = await self._store.list_prefix(self._prefix)
        for kv in listing.items:
            if VModelRecord.from_json(kv.value).refers_to(model_id):
                return
        log.info("model '%s' unregistered: auto-delete, and no vmodel refers to it", model_id)
        await self._mesh.unregister(model_id)

    async def status(self, vmodel_id: str, owner: str = "") -> VModelStatus:
        if not vmodel_id:
            return NOT_FOUND
        found = await self._get(vmodel_id)
        if found is None or (owner and found[0].owner != owner):
            return NOT_FOUND
        record = found[0]
        active_status = await self._mesh.status(record.active)
        if not record.moving:
            return VModelStatus(VModelState.DEFINED, record.active, record.target, record.owner, active_status)
        target_status = await self._mesh.status(record.target)
        state = VModelState.TRANSITION_FAILED if target_status.state is ModelState.LOADING_FAILED \
            else VModelState.TRANSITIONING
        return VModelStatus(state, record.active, record.target, record.owner, active_status, target_status)

    async def delete(self, vmodel_id: str, owner: str = "") -> None:
        """Delete the vmodel (absent, or another owner's: nothing happens) and unregister its
        auto-delete models that no other vmodel refers to."""
        if not vmodel_id:
            raise InvalidRequest("give a vModelId")
        for _ in range(_CAS_ATTEMPTS):
            found = await self._get(vmodel_id)
            if found is None or (owner and found[0].owner != owner):
                return
            record, revision = found
            try:
                deleted = await self._store.delete(self._key(vmodel_id), expected_revision=revision)
            except CasFailed:
                continue
            self.view.forget(vmodel_id, deleted=deleted)
            running = self._moves.get(vmodel_id)
            if running is not None:
                running[1].cancel()
            log.info("vmodel '%s' deleted", vmodel_id)
            for model_id in dict.fromkeys((record.active, record.target)):
                await self._collect(model_id)
            return
        raise Conflict(f"vmodel '{vmodel_id}' changed {_CAS_ATTEMPTS} times while being deleted; try again")

    # ---- the elected pod's chore

    async def advance_all(self) -> None:
        """Drive every transition this pod is not driving already, unless its target is loading
        now: a loaded target is promoted; one loaded nowhere is loaded (the pod that was moving it
        went away); a failed one is tried again, which ends at once while its failures are recent
        on every pod (``Mesh`` keeps them for MM_LOAD_FAILURE_EXPIRY_MS)."""
        for vmodel_id, record in list(self.view.items()):
            if not record.moving or vmodel_id in self._moves:
                continue
            if self._mesh.cached_status(record.target).state in (ModelState.LOADING, ModelState.NOT_FOUND):
                continue
            self._move(vmodel_id, record.target)
