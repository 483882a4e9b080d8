"""Fakes that implement our real interfaces (no mocks of our own internals)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from modelmesh.errors import ModelLoadFailed, UpstreamError
from modelmesh.types import LoadResult, ModelInfo, RuntimeStatus


class FakeRuntime:
    """A ``ModelRuntimeClient`` whose models are sized by ``sizes`` (path -> bytes).

    ``gate`` (when set) holds every load until released, so tests can pile up concurrent requests;
    paths in ``failing`` fail to load with ``failing[path]`` as the message.
    """

    def __init__(self, capacity: int, *, default_size: int = 100, loading_slots: int = 2) -> None:
        self.capacity = capacity
        self.default_size = default_size
        self.loading_slots = loading_slots
        self.sizes: dict[str, int] = {}
        self.predicted: dict[str, int] = {}
        self.failing: dict[str, str] = {}
        self.loaded: dict[str, int] = {}
        self.load_calls: list[str] = []
        self.unload_calls: list[str] = []
        self.invocations: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.max_loaded_bytes = 0
        # "load:<id>" / "unload:<id>" in the order the runtime saw them
        self.events: list[str] = []

    async def status(self) -> RuntimeStatus:
        return RuntimeStatus(
            ready=True, capacity_bytes=self.capacity, max_loading_concurrency=self.loading_slots,
            loading_timeout_ms=5000, default_model_size_bytes=self.default_size,
        )

    async def load_model(self, model_id: str, info: ModelInfo, timeout_s: float | None) -> LoadResult:
        self.load_calls.append(model_id)
        self.events.append(f"load:{model_id}")
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if info.path in self.failing:
            raise ModelLoadFailed(self.failing[info.path])
        size = self.sizes.get(info.path, self.default_size)
        self.loaded[model_id] = size
        self.max_loaded_bytes = max(self.max_loaded_bytes, sum(self.loaded.values()))
        return LoadResult(size_bytes=size)

    async def unload_model(self, model_id: str) -> None:
        self.unload_calls.append(model_id)
        self.events.append(f"unload:{model_id}")
        self.loaded.pop(model_id, None)

    async def predict_model_size(self, model_id: str, info: ModelInfo) -> int:
        return self.predicted.get(info.path, 0)

    async def model_size(self, model_id: str) -> int:
        return self.loaded[model_id]

    async def invoke(
        self, method: str, body: bytes, metadata: Sequence[tuple[str, str | bytes]], timeout_s: float | None
    ) -> bytes:
        model_id = dict(metadata).get("mm-model-id", "")
        assert isinstance(model_id, str)
        if model_id not in self.loaded:
            raise UpstreamError("NOT_FOUND", f"model '{model_id}' is not loaded")
        self.invocations.append((method, model_id))
        return body + b"|" + model_id.encode()

    async def close(self) -> None:
        pass


class FlakyStore:
    """A real MemoryStore whose writes fail with StoreUnavailable while ``down`` is set, as etcd's
    would during an outage (reads keep working, as from a pod's watched view)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.down = False

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def put(self, key, value, *, expected_revision=None, lease=0):
        from modelmesh.errors import StoreUnavailable

        if self.down:
            raise StoreUnavailable("etcd at test is unavailable: connection refused")
        return await self._inner.put(key, value, expected_revision=expected_revision, lease=lease)

    async def get(self, key):
        from modelmesh.errors import StoreUnavailable

        if self.down:
            raise StoreUnavailable("etcd at test is unavailable: connection refused")
        return await self._inner.get(key)
