"""``mmesh.ModelMesh``: the management API. Converts wire messages, calls the mesh, converts back."""

from __future__ import annotations

import grpc

from modelmesh.mesh import Mesh
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.types import ModelInfo, ModelStatus, PlacementPolicy
from modelmesh.vmodels import VModels, VModelStatus

SERVICE = "mmesh.ModelMesh"


def status_info(status: ModelStatus) -> mpb.ModelStatusInfo:
    return mpb.ModelStatusInfo(
        status=int(status.state),
        errors=list(status.errors),
        modelCopyInfos=[
            mpb.ModelStatusInfo.ModelCopyInfo(location=c.instance_id, copyStatus=int(c.state), time=c.time_ms)
            for c in status.copies
        ],
    )


def vmodel_status_info(status: VModelStatus) -> mpb.VModelStatusInfo:
    info = mpb.VModelStatusInfo(status=int(status.state), activeModelId=status.active,
                                targetModelId=status.target, owner=status.owner)
    if status.active_status is not None:
        info.activeModelStatus.CopyFrom(status_info(status.active_status))
    if status.target_status is not None:
        info.targetModelStatus.CopyFrom(status_info(status.target_status))
    return info


async def register(mesh: Mesh, request: mpb.RegisterModelRequest) -> mpb.ModelStatusInfo:
    """One ``RegisterModelRequest`` through ``Mesh.register``: for registerModel and the bulk stream."""
    info = ModelInfo(request.modelInfo.type, request.modelInfo.path, request.modelInfo.key)
    p = request.placement
    policy = PlacementPolicy(p.minCopies, p.allPods, tuple(p.requiredLabels))
    status = await mesh.register(
        request.modelId, info, load_now=request.loadNow, sync=request.sync,
        last_used_ms=request.lastUsedTime, policy=policy,
    )
    return status_info(status)


class ManagementServicer:
    """Method names are the RPC names of ``mmesh.ModelMesh``."""

    def __init__(self, mesh: Mesh, vmodels: VModels) -> None:
        self._mesh = mesh
        self._vmodels = vmodels

    async def registerModel(self, request: mpb.RegisterModelRequest, context: grpc.aio.ServicerContext) -> mpb.ModelStatusInfo:
        return await register(self._mesh, request)

    async def unregisterModel(self, request: mpb.UnregisterModelRequest, context: grpc.aio.ServicerContext) -> mpb.UnregisterModelResponse:
        await self._mesh.unregister(request.modelId)
        return mpb.UnregisterModelResponse()

    async def getModelStatus(self, request: mpb.GetStatusRequest, context: grpc.aio.ServicerContext) -> mpb.ModelStatusInfo:
        return status_info(await self._mesh.status(request.modelId))

    async def ensureLoaded(self, request: mpb.EnsureLoadedRequest, context: grpc.aio.ServicerContext) -> mpb.ModelStatusInfo:
        status = await self._mesh.ensure_loaded(
            request.modelId, sync=request.sync, last_used_ms=request.lastUsedTime
        )
        return status_info(status)

    async def setVModel(self, request: mpb.SetVModelRequest, context: grpc.aio.ServicerContext) -> mpb.VModelStatusInfo:
        info = None
        if request.HasField("modelInfo") and request.modelInfo != mpb.ModelInfo():
            info = ModelInfo(request.modelInfo.type, request.modelInfo.path, request.modelInfo.key)
        status = await self._vmodels.set(
            request.vModelId, request.targetModelId, owner=request.owner, update_only=request.updateOnly,
            info=info, auto_delete=request.autoDeleteTargetModel, load_now=request.loadNow, force=request.force,
            sync=request.sync, expected_target=request.expectedTargetModelId,
        )
        return vmodel_status_info(status)

    async def deleteVModel(self, request: mpb.DeleteVModelRequest, context: grpc.aio.ServicerContext) -> mpb.DeleteVModelResponse:
        await self._vmodels.delete(request.vModelId, request.owner)
        return mpb.DeleteVModelResponse()

    async def getVModelStatus(self, request: mpb.GetVModelStatusRequest, context: grpc.aio.ServicerContext) -> mpb.VModelStatusInfo:
        return vmodel_status_info(await self._vmodels.status(request.vModelId, request.owner))
