"""``mmesh.ModelMesh``: the management API. Converts wire messages, calls the mesh, converts back."""

from __future__ import annotations

import grpc

from modelmesh.errors import NotImplementedYet
from modelmesh.mesh import Mesh
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.types import ModelInfo, ModelStatus, PlacementPolicy

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

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

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
        raise NotImplementedYet("vmodels are not supported yet")

    async def deleteVModel(self, request: mpb.DeleteVModelRequest, context: grpc.aio.ServicerContext) -> mpb.DeleteVModelResponse:
        raise NotImplementedYet("vmodels are not supported yet")

    async def getVModelStatus(self, request: mpb.GetVModelStatusRequest, context: grpc.aio.ServicerContext) -> mpb.VModelStatusInfo:
        raise NotImplementedYet("vmodels are not supported yet")
