"""``inference.GRPCInferenceService`` on the mesh: the KServe v2 data plane.

Requests are taken as raw bytes (no deserializer): only the model id is read from them, and the
bytes go to the runtime unchanged. Server-level methods and the repository extension are answered
by the mesh itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from modelmesh import __version__
from modelmesh.api.status import status_for
from modelmesh.clock import Clock
from modelmesh.errors import MeshError, ModelLoadFailed, ModelNotFound
from modelmesh.mesh import Mesh
from modelmesh.metrics import MeshMetrics
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.routing import RouteTarget, resolve_target
from modelmesh.types import ModelState

SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_METADATA = f"/{SERVICE}/ModelMetadata"
EXTENSIONS = ("model_repository", "streaming")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def stream_response(*, infer_response: bytes | None = None, error: str | None = None) -> bytes:
    """A serialized ModelStreamInferResponse built around already-serialized bytes (no re-parse)."""
    if error is not None:
        raw = error.encode()
        return b"\x0a" + _varint(len(raw)) + raw  # field 1: error_message
    body = infer_response or b""
    return b"\x12" + _varint(len(body)) + body  # field 2: infer_response


class DataPlane:
    def __init__(self, mesh: Mesh, metrics: MeshMetrics, clock: Clock, *, ready: Callable[[], bool]) -> None:
        self._mesh = mesh
        self._metrics = metrics
        self._clock = clock
        self._ready = ready

    # --- routed: the model's runtime answers

    async def _forward(self, method: str, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = self._clock.monotonic()
        code = "OK"
        try:
            metadata = context.invocation_metadata() or ()
            return await self._route(method, body, metadata, context)
        except BaseException as exc:
            code = status_for(exc)[0].name
            raise
        finally:
            self._metrics.api_request.labels(method.rsplit("/", 1)[-1], code).observe(
                (self._clock.monotonic() - started) * 1000
            )

    async def _route(self, method: str, body: bytes, metadata: Any, context: grpc.aio.ServicerContext) -> bytes:
        target = resolve_target(metadata, body)
        return await self._mesh.route(
            target, method, body, metadata, context.time_remaining(),
            forwarded=target.forwarded, prefer_local=target.prefer_local,
        )

    async def model_infer(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._forward(MODEL_INFER, body, context)

    async def model_metadata(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._forward(MODEL_METADATA, body, context)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One response per request, in order; a failed request answers with error_message and
        the stream goes on, as Triton does."""
        metadata = context.invocation_metadata() or ()
        async for body in requests:
            started = self._clock.monotonic()
            code = "OK"
            try:
                response = await self._route(MODEL_INFER, body, metadata, context)
                yield stream_response(infer_response=response)
            except (MeshError, TimeoutError) as exc:
                status, message = status_for(exc)
                code = status.name
                yield stream_response(error=f"{status.name}: {message}")
            finally:
                self._metrics.api_request.labels("ModelStreamInfer", code).observe(
                    (self._clock.monotonic() - started) * 1000
                )

    # --- answered by the mesh

    async def server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def server_metadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="modelmesh", version=__version__, extensions=list(EXTENSIONS))

    async def model_ready(self, body: bytes, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        """Ready when registered and not failing to load. Does not load the model: a readiness
        probe must not cause load storms; the first inference loads it."""
        model_id = self._mesh.resolve(resolve_target(context.invocation_metadata() or (), body))
        status = self._mesh.cached_status(model_id)
        return pb.ModelReadyResponse(ready=status.state not in (ModelState.NOT_FOUND, ModelState.LOADING_FAILED))

    async def repository_index(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        models = []
        for model_id, status in self._mesh.list_models():
            if request.ready and status.state is not ModelState.LOADED:
                continue
            models.append(pb.RepositoryIndexResponse.ModelIndex(
                name=model_id, state=status.state.name, reason="; ".join(status.errors)))
        return pb.RepositoryIndexResponse(models=models)

    async def repository_model_load(self, request: pb.RepositoryModelLoadRequest, context: Any) -> pb.RepositoryModelLoadResponse:
        model_id = self._mesh.resolve(RouteTarget(request.model_name, "model"))
        status = await self._mesh.ensure_loaded(model_id, sync=True)
        if status.state is ModelState.LOADING_FAILED:
            raise ModelLoadFailed(f"model '{model_id}' failed to load: {'; '.join(status.errors)}")
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: pb.RepositoryModelUnloadRequest, context: Any) -> pb.RepositoryModelUnloadResponse:
        if not request.model_name:
            raise ModelNotFound("no model named")
        await self._mesh.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
