"""The ModelRuntime SPI and the runtime's inference service, reached over gRPC.

Translates gRPC errors into modelmesh errors at this boundary: an unreachable runtime is
RuntimeUnavailable, a failed load is ModelLoadFailed with the runtime's own message, and any other
error on a data-plane call is passed on as UpstreamError with its code.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from modelmesh.errors import ModelLoadFailed, ModelNotFound, RequestTooLarge, RuntimeUnavailable, UpstreamError
from modelmesh.proto import model_runtime_pb2 as rpb
from modelmesh.proto import model_runtime_pb2_grpc as rgrpc
from modelmesh.runtime.base import Metadata
from modelmesh.types import LoadResult, ModelInfo, RuntimeStatus

log = logging.getLogger(__name__)

# What gRPC says of a message over the size limit, on either side, either way ("Received message
# larger than max (N vs. M)", "Sent message larger than max ..."); a pod passes it on when it
# answers that a hop's message was too large, so the pod before it can tell too.
_TOO_LARGE = "message larger than max"
# Loads and unloads are never retried by gRPC itself: the mesh decides what a failure means.
_CHANNEL_OPTIONS = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]


class GrpcForwarder:
    """Sends serialized data-plane requests to a gRPC server (a runtime or another pod) as bytes.

    One channel per target, reused; one multicallable per method, made once (building them costs
    more than a loopback call)."""

    what = "server"

    def __init__(self, target: str, max_msg_size: int, credentials: grpc.ChannelCredentials | None = None) -> None:
        """``credentials``: TLS (``tls.peer_credentials``), else plaintext."""
        self.target = target
        self.max_msg_size = max_msg_size
        options = [
            *_CHANNEL_OPTIONS,
            ("grpc.max_send_message_length", max_msg_size),
            ("grpc.max_receive_message_length", max_msg_size),
        ]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._callables: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    async def close(self, grace_s: float | None = None) -> None:
        await self._channel.close(grace_s)

    async def invoke(
        self, method: str, body: bytes, metadata: Metadata, timeout_s: float | None
    ) -> bytes:
        call = self._callables.get(method)
        if call is None:
            # no serializers: bodies pass through as bytes
            call = self._callables[method] = self._channel.unary_unary(method)
        try:
            return await call(body, metadata=metadata, timeout=timeout_s)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our caller gave up
            # grpc.aio cancels the calls of a channel that closes under them (a pod that left
            # the cluster): the request did not fail there, so it may be sent to another pod
            raise RuntimeUnavailable(f"{self.what} at {self.target} is unavailable: "
                                     "its channel closed while the request was in flight") from None
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise RuntimeUnavailable(f"{self.what} at {self.target} is unavailable: {err.details()}") from err
            details = err.details() or err.code().name
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in details:
                # the size limit, not a full pod: every pod has the same limit, so no other pod
                # would do better (a RESOURCE_EXHAUSTED that means "no room" sends the request on)
                raise RequestTooLarge(f"{details} (the limit is MM_SVC_GRPC_MAX_MSG_SIZE, "
                                      f"{self.max_msg_size} bytes here; {self.what} at {self.target})") from err
            raise UpstreamError(err.code().name, details) from err


class PeerClient(GrpcForwarder):
    """Another mesh pod, reached on its external port for pod-to-pod hops."""

    what = "pod"


class GrpcRuntimeClient(GrpcForwarder):
    """``ModelRuntimeClient`` for a runtime at ``target`` ("host:port" or "unix:/path")."""

    what = "runtime"

    def __init__(self, target: str, max_msg_size: int) -> None:
        super().__init__(target, max_msg_size)
        self._spi = rgrpc.ModelRuntimeStub(self._channel)

    def _err(self, what: str, err: grpc.aio.AioRpcError) -> Exception:
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            return RuntimeUnavailable(f"runtime at {self.target} is unavailable ({what}): {err.details()}")
        return UpstreamError(err.code().name, f"runtime {what} failed: {err.details()}")

    async def status(self) -> RuntimeStatus:
        try:
            r = await self._spi.runtimeStatus(rpb.RuntimeStatusRequest(), timeout=10)
        except grpc.aio.AioRpcError as err:
            raise self._err("runtimeStatus", err) from err
        return RuntimeStatus(
            ready=r.status == rpb.RuntimeStatusResponse.READY,
            capacity_bytes=r.capacityInBytes,
            max_loading_concurrency=r.maxLoadingConcurrency or 1,
            loading_timeout_ms=r.modelLoadingTimeoutMs or 240_000,
            default_model_size_bytes=r.defaultModelSizeInBytes or 1024 * 1024,
            runtime_version=r.runtimeVersion,
            method_infos={k: tuple(v.idInjectionPath) for k, v in r.methodInfos.items()},
            allow_any_method=r.allowAnyMethod or not r.methodInfos,
            limit_model_concurrency=r.limitModelConcurrency,
        )

    async def wait_ready(self, timeout_s: float) -> RuntimeStatus:
        """Poll runtimeStatus until READY; RuntimeUnavailable after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last = "no answer"
        while loop.time() < deadline:
            try:
                status = await self.status()
                if status.ready:
                    return status
                last = "runtime reports it is still starting"
            except (RuntimeUnavailable, UpstreamError) as err:
                last = err.message
            await asyncio.sleep(0.1)
        raise RuntimeUnavailable(f"runtime at {self.target} not ready after {timeout_s:.0f} s: {last}")

    async def load_model(self, model_id: str, info: ModelInfo, timeout_s: float | None) -> LoadResult:
        req = rpb.LoadModelRequest(modelId=model_id, modelType=info.type, modelPath=info.path, modelKey=info.key)
        try:
            r = await self._spi.loadModel(req, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise self._err("loadModel", err) from err
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ModelLoadFailed(f"loading '{model_id}' timed out after {timeout_s:.0f} s") from err
            raise ModelLoadFailed(err.details() or err.code().name) from err
        return LoadResult(size_bytes=r.sizeInBytes, max_concurrency=r.maxConcurrency)

    async def unload_model(self, model_id: str) -> None:
        try:
            await self._spi.unloadModel(rpb.UnloadModelRequest(modelId=model_id), timeout=60)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise self._err("unloadModel", err) from err

    async def predict_model_size(self, model_id: str, info: ModelInfo) -> int:
        req = rpb.PredictModelSizeRequest(
            modelId=model_id, modelType=info.type, modelPath=info.path, modelKey=info.key)
        try:
            return (await self._spi.predictModelSize(req, timeout=5)).sizeInBytes
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return 0
            raise self._err("predictModelSize", err) from err

    async def model_size(self, model_id: str) -> int:
        try:
            return (await self._spi.modelSize(rpb.ModelSizeRequest(modelId=model_id), timeout=30)).sizeInBytes
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise ModelNotFound(f"model '{model_id}' is not loaded in the runtime") from err
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return 0
            raise self._err("modelSize", err) from err
