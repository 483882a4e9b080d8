"""The built-in ONNX runtime hosted inside the pod's own process, behind the same interface as a
sidecar (``ModelRuntimeClient``). It removes the pod-to-runtime hop from every request: no second
gRPC call, no second serialization; the request bytes are parsed once, here.

Errors come out as they would from the sidecar over gRPC (a failed load is ModelLoadFailed with
the runtime's message, a bad request an UpstreamError with its code), so the mesh behaves the same
with either.
"""

from __future__ import annotations

import asyncio

from modelmesh.errors import (
    InvalidRequest,
    MeshError,
    ModelLoadFailed,
    ModelNotFound,
    NotImplementedYet,
    Unavailable,
    UpstreamError,
)
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.runtime.base import Metadata
from modelmesh.runtime.onnx.models import ModelTable, predict_size
from modelmesh.runtime.onnx.server import model_infer, model_metadata
from modelmesh.settings import RuntimeSettings
from modelmesh.types import LoadResult, ModelInfo, RuntimeStatus

_SERVICE = "/inference.GRPCInferenceService/"
# what the sidecar's gRPC status table would say for each runtime error
_CODES: tuple[tuple[type[MeshError], str], ...] = (
    (ModelNotFound, "NOT_FOUND"),
    (InvalidRequest, "INVALID_ARGUMENT"),
    (NotImplementedYet, "UNIMPLEMENTED"),
)


def _as_upstream(err: MeshError) -> MeshError:
    if isinstance(err, (Unavailable, UpstreamError)):
        return err
    for cls, code in _CODES:
        if isinstance(err, cls):
            return UpstreamError(code, err.message)
    return UpstreamError("FAILED_PRECONDITION", err.message)


def _model_id(metadata: Metadata) -> str:
    for key, value in metadata:
        if key == "mm-model-id":
            return value.decode() if isinstance(value, bytes) else value
    raise UpstreamError("INVALID_ARGUMENT", "no mm-model-id header")


class InProcessRuntime:
    """``ModelRuntimeClient`` over a ``ModelTable`` in this process."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self._settings = settings
        self._table = ModelTable(settings)

    async def start(self) -> None:
        self._table.meter.fix_mmap_threshold()
        await asyncio.to_thread(self._table.prime)

    async def status(self) -> RuntimeStatus:
        s = self._settings
        return RuntimeStatus(
            ready=True,
            capacity_bytes=self._table.capacity_bytes,
            max_loading_concurrency=s.max_loading_concurrency,
            loading_timeout_ms=s.loading_timeout_ms,
            default_model_size_bytes=s.default_model_size_bytes,
            runtime_version="in-process",
        )

    async def load_model(self, model_id: str, info: ModelInfo, timeout_s: float | None) -> LoadResult:
        try:
            async with asyncio.timeout(timeout_s):
                size = await self._table.load(model_id, info.type, info.path)
        except TimeoutError:
            await self._table.unload(model_id)
            raise ModelLoadFailed(f"loading '{model_id}' timed out after {timeout_s:.0f} s") from None
        except MeshError as err:
            raise ModelLoadFailed(err.message) from err
        return LoadResult(size_bytes=size)

    async def unload_model(self, model_id: str) -> None:
        await self._table.unload(model_id)

    async def predict_model_size(self, model_id: str, info: ModelInfo) -> int:
        try:
            return await asyncio.to_thread(predict_size, info.type, info.path)
        except MeshError:
            return 0  # the load itself will say what is wrong

    async def model_size(self, model_id: str) -> int:
        return self._table.size(model_id)

    async def invoke(
        self, method: str, body: bytes, metadata: Metadata, timeout_s: float | None
    ) -> bytes:
        name = method.removeprefix(_SERVICE)
        try:
            model_id = _model_id(metadata)
            if name == "ModelInfer":
                response = await model_infer(self._table, model_id, pb.ModelInferRequest.FromString(body))
            elif name == "ModelMetadata":
                response = model_metadata(self._table, model_id, pb.ModelMetadataRequest.FromString(body))
            else:
                raise UpstreamError("UNIMPLEMENTED", f"the in-process runtime does not serve {method}")
        except MeshError as err:
            raise _as_upstream(err) from err
        except Exception as err:  # protobuf DecodeError and the like: the request was malformed
            if type(err).__name__ == "DecodeError":
                raise UpstreamError("INVALID_ARGUMENT", f"malformed request: {err}") from err
            raise
        return response.SerializeToString()

    async def close(self) -> None:
        await self._table.close()
