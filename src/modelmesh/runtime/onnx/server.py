"""The gRPC face of the built-in ONNX runtime: ``mmesh.ModelRuntime`` and ``inference.GRPCInferenceService``.

The servicers convert, delegate to the ``ModelTable`` and convert back. Errors become gRPC statuses
through the pod's one table (``api/status.py``), applied to every handler by an interceptor.

A mesh pod starts this as a child process (``modelmesh runtime``) and reads the one line
``modelmesh runtime listening on <address>`` from its stdout to learn where it listens.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from modelmesh import __version__
from modelmesh.api.status import guard_stream, guard_unary
from modelmesh.errors import InvalidRequest, MeshError, ModelNotFound, NotImplementedYet
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.proto import grpc_predict_v2_pb2_grpc, model_runtime_pb2, model_runtime_pb2_grpc
from modelmesh.runtime.onnx import tensors
from modelmesh.runtime.onnx.models import ModelTable, TensorSpec, predict_size
from modelmesh.settings import RuntimeSettings

__all__ = ["RuntimeServer", "run_runtime", "start_runtime"]

log = logging.getLogger(__name__)

SERVER_NAME = "modelmesh-onnx-runtime"
# Triton's platform name for ONNX models, which v2 clients know
PLATFORM = "onnxruntime_onnx"
MODEL_ID_HEADER = "mm-model-id"
STOP_GRACE_S = 5.0


class _StatusMapping(grpc.aio.ServerInterceptor):
    """Wraps every handler in ``api/status.py``'s guards, the one table from errors to status
    codes, so no servicer maps errors itself and none can forget to. Wrapped handlers are built
    once per method and reused: this runs on every request."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                guard_unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        elif handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(
                guard_stream(handler.stream_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        else:
            return handler
        self._wrapped[method] = wrapped
        return wrapped


class ModelRuntimeServicer(model_runtime_pb2_grpc.ModelRuntimeServicer):
    """``mmesh.ModelRuntime``: the SPI a mesh pod drives."""

    def __init__(self, table: ModelTable, settings: RuntimeSettings) -> None:
        self._table = table
        self._settings = settings

    async def loadModel(
        self, request: model_runtime_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> model_runtime_pb2.LoadModelResponse:
        size = await self._table.load(request.modelId, request.modelType, request.modelPath)
        return model_runtime_pb2.LoadModelResponse(sizeInBytes=size)

    async def unloadModel(
        self, request: model_runtime_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> model_runtime_pb2.UnloadModelResponse:
        await self._table.unload(request.modelId)
        return model_runtime_pb2.UnloadModelResponse()

    async def predictModelSize(
        self, request: model_runtime_pb2.PredictModelSizeRequest, context: grpc.aio.ServicerContext
    ) -> model_runtime_pb2.PredictModelSizeResponse:
        # stats and a header scan touch the disk: keep them off the event loop
        size = await asyncio.to_thread(predict_size, request.modelType, request.modelPath)
        return model_runtime_pb2.PredictModelSizeResponse(sizeInBytes=size)

    async def modelSize(
        self, request: model_runtime_pb2.ModelSizeRequest, context: grpc.aio.ServicerContext
    ) -> model_runtime_pb2.ModelSizeResponse:
        return model_runtime_pb2.ModelSizeResponse(sizeInBytes=self._table.size(request.modelId))

    async def runtimeStatus(
        self, request: model_runtime_pb2.RuntimeStatusRequest, context: grpc.aio.ServicerContext
    ) -> model_runtime_pb2.RuntimeStatusResponse:
        s = self._settings
        # no methodInfos: the mesh names the model in the mm-model-id header, never in the body
        return runtime_status(self._table, s)


def _header_model_id(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == MODEL_ID_HEADER:
            return str(value)
        if key == MODEL_ID_HEADER + "-bin":
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _model_id(context: grpc.aio.ServicerContext, name_in_request: str) -> str:
    """The model a data-plane call is for: the mesh's header, else the name in the request."""
    model_id = _header_model_id(context) or name_in_request
    if not model_id:
        raise InvalidRequest("no model named: set the request's model name or the mm-model-id header")
    return model_id


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype or spec.onnx_type, shape=spec.shape
    )


def model_metadata(table: ModelTable, model_id: str, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
    """ModelMetadata for a loaded model; shared by the gRPC servicer and the in-process runtime."""
    model = table.get(model_id)
    return pb.ModelMetadataResponse(
        name=request.name or model_id,
        platform=PLATFORM,
        inputs=[_tensor_metadata(s) for s in model.inputs],
        outputs=[_tensor_metadata(s) for s in model.outputs],
    )


async def model_infer(table: ModelTable, model_id: str, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """ModelInfer on a loaded model; shared by the gRPC servicer and the in-process runtime."""
    model = table.get(model_id)
    inputs, raw = tensors.decode_inputs(request, label=f"model '{model_id}'")
    outputs = await table.infer(model, inputs, [o.name for o in request.outputs])
    response = pb.ModelInferResponse(
        model_name=request.model_name or model_id,
        model_version=request.model_version,
        id=request.id,
    )
    tensors.encode_outputs(response, outputs, raw=raw)
    return response


def runtime_status(table: ModelTable, s: RuntimeSettings) -> model_runtime_pb2.RuntimeStatusResponse:
    return model_runtime_pb2.RuntimeStatusResponse(
        status=model_runtime_pb2.RuntimeStatusResponse.READY,
        capacityInBytes=table.capacity_bytes,
        maxLoadingConcurrency=s.max_loading_concurrency,
        modelLoadingTimeoutMs=s.loading_timeout_ms,
        defaultModelSizeInBytes=s.default_model_size_bytes,
        runtimeVersion=__version__,
        allowAnyMethod=True,
    )


class InferenceServicer(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` for the loaded models."""

    def __init__(self, table: ModelTable) -> None:
        self._table = table

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._table.get(_model_id(context, request.name))
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return model_metadata(self._table, _model_id(context, request.name), request)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await model_infer(self._table, _model_id(context, request.model_name), request)

    async def _infer(self, model_id: str, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return await model_infer(self._table, model_id, request)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # the header names the model for the whole stream; an error answers only its own request
        header_id = _header_model_id(context)
        async for request in request_iterator:
            try:
                model_id = _model_id(context, request.model_name) if header_id is None else header_id
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(model_id, request))
            except MeshError as err:
                yield pb.ModelStreamInferResponse(error_message=err.message)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise NotImplementedYet("the repository extension is not served; load models with loadModel")

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise NotImplementedYet("the repository extension is not served; load models with loadModel")

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise NotImplementedYet("the repository extension is not served; use unloadModel")


class RuntimeServer:
    """A running runtime: its gRPC server and model table."""

    def __init__(self, server: grpc.aio.Server, table: ModelTable, port: int, address: str) -> None:
        self._server = server
        self.table = table
        self.port = port
        self.address = address

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop taking calls, let calls in flight finish for up to ``grace_s``, free the models."""
        await self._server.stop(grace_s)
        await self.table.close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _listen_address(settings: RuntimeSettings) -> str:
    if settings.socket_path:
        return f"unix:{settings.socket_path}"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.grpc_port}"


async def start_runtime(settings: RuntimeSettings) -> RuntimeServer:
    """Start the runtime's gRPC server in this event loop; ``grpc_port`` 0 picks a free port."""
    table = ModelTable(settings)
    table.meter.fix_mmap_threshold()
    await asyncio.to_thread(table.prime)
    # the SPI wants stale models purged before READY; a fresh process has none, but say so
    table.purge()
    server = grpc.aio.server(
        interceptors=[_StatusMapping()],
        options=[
            ("grpc.max_receive_message_length", settings.max_msg_size),
            ("grpc.max_send_message_length", settings.max_msg_size),
            # a second runtime on the same port must fail to start, not share it
            ("grpc.so_reuseport", 0),
        ],
    )
    model_runtime_pb2_grpc.add_ModelRuntimeServicer_to_server(
        ModelRuntimeServicer(table, settings), server
    )
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(table), server)
    address = _listen_address(settings)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:
        await table.close()
        raise OSError(f"cannot listen on {address}: {err}") from err
    if not settings.socket_path:
        address = address.rsplit(":", 1)[0] + f":{port}"
    await server.start()
    log.info(
        "runtime listening on %s (capacity %d bytes, size measurement by %s)",
        address, table.capacity_bytes, table.meter.method,
    )
    return RuntimeServer(server, table, port if not settings.socket_path else 0, address)


async def _serve(settings: RuntimeSettings) -> None:
    runtime = await start_runtime(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"modelmesh runtime listening on {runtime.address}", flush=True)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await runtime.stop()


def run_runtime(settings: RuntimeSettings) -> int:
    """Run the runtime until SIGTERM or SIGINT, then stop gracefully and return 0 (1 when it
    cannot listen)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(settings))
    except OSError as err:  # the port or socket cannot be bound
        log.error("%s", err)
        return 1
    return 0
