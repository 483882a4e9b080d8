"""The one interface through which a mesh pod reaches its model runtime.

For a sidecar process it is the ModelRuntime SPI plus the inference service over loopback or a Unix
socket (``runtime/grpc_client.py``). The data-plane calls carry request and response bodies as
serialized bytes: the mesh never parses more of them than the model id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from modelmesh.types import LoadResult, ModelInfo, RuntimeStatus

Metadata = Sequence[tuple[str, str | bytes]]


class Forwarder(Protocol):
    """Anything that takes serialized data-plane requests: a runtime, or another pod."""

    async def invoke(
        self, method: str, body: bytes, metadata: Metadata, timeout_s: float | None
    ) -> bytes: ...

    async def close(self, grace_s: float | None = None) -> None:
        """Close; with ``grace_s`` the requests in flight get that long to finish first."""


class ModelRuntimeClient(Protocol):
    async def status(self) -> RuntimeStatus:
        """runtimeStatus; raises RuntimeUnavailable when the runtime cannot be reached."""

    async def load_model(self, model_id: str, info: ModelInfo, timeout_s: float | None) -> LoadResult:
        """loadModel; raises ModelLoadFailed with the runtime's message when the load fails."""

    async def unload_model(self, model_id: str) -> None:
        """unloadModel; succeeds when the model is not loaded."""

    async def predict_model_size(self, model_id: str, info: ModelInfo) -> int:
        """predictModelSize; 0 when the runtime does not implement it."""

    async def model_size(self, model_id: str) -> int:
        """modelSize of a loaded model."""

    async def invoke(
        self, method: str, body: bytes, metadata: Metadata, timeout_s: float | None
    ) -> bytes:
        """Call a unary data-plane method (``/inference.GRPCInferenceService/ModelInfer``) with a
        serialized request; return the serialized response. gRPC errors from the runtime are raised
        as UpstreamError with their code."""

    async def close(self) -> None: ...
