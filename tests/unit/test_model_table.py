"""The model table on real onnxruntime sessions: shared loads, unloads racing loads, sizes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from modelmesh.demo import demo_model_id, demo_weights, write_demo_models
from modelmesh.errors import ModelLoadFailed, ModelNotFound
from modelmesh.runtime.onnx.models import INLINE_BUDGET_S, ModelTable
from modelmesh.settings import RuntimeSettings


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_demo_models(tmp_path_factory.mktemp("demo"), 4, 256)


@pytest.fixture
async def table() -> AsyncIterator[ModelTable]:
    table = ModelTable(RuntimeSettings(capacity_bytes=1 << 30, max_loading_concurrency=1))
    await asyncio.to_thread(table.prime)
    try:
        yield table
    finally:
        await table.close()


async def test_concurrent_loads_share_one_and_unload_is_idempotent(table: ModelTable, models: list[Path]) -> None:
    sizes = await asyncio.gather(*(table.load("m", "onnx", str(models[0])) for _ in range(5)))
    assert len(set(sizes)) == 1 and len(table) == 1
    # weights are 256 x 256 + 256 FP32; the session adds its own overhead on top
    assert sizes[0] >= (256 * 256 + 256) * 4
    await table.unload("m")
    await table.unload("m")
    with pytest.raises(ModelNotFound):
        table.size("m")


async def test_unload_of_a_load_being_built_waits_and_leaves_nothing(table: ModelTable, models: list[Path]) -> None:
    load = asyncio.ensure_future(table.load("m", "onnx", str(models[1])))
    await asyncio.sleep(0)  # the load takes the free slot and starts building in its thread
    await table.unload("m")
    with pytest.raises(ModelLoadFailed, match="unloaded while it was loading"):
        await load
    assert len(table) == 0


async def test_unload_of_a_queued_load_cancels_it(table: ModelTable, models: list[Path]) -> None:
    first = asyncio.ensure_future(table.load(demo_model_id(0), "onnx", str(models[0])))
    queued = asyncio.ensure_future(table.load("m", "onnx", str(models[2])))
    await asyncio.sleep(0)
    await table.unload("m")
    with pytest.raises(ModelLoadFailed, match="unloaded while it was loading"):
        await queued
    assert await first > 0
    assert len(table) == 1
    # loading it again after the unload works
    assert await table.load("m", "onnx", str(models[2])) > 0


async def test_unload_returns_the_memory(table: ModelTable, models: list[Path]) -> None:
    before = table.meter.in_use()
    size = await table.load("m", "onnx", str(models[3]))
    await table.unload("m")
    # what stays behind is small beside the model (onnxruntime keeps a few caches)
    assert table.meter.in_use() - before < size / 4


async def test_small_runs_inline_and_large_ones_in_the_pool_agree_with_numpy(
    table: ModelTable, models: list[Path]
) -> None:
    await table.load("m", "onnx", str(models[0]))
    model = table.get("m")
    w, b = demo_weights(0, 256)
    small = np.ones((1, 256), np.float32)
    large = np.random.default_rng(0).standard_normal((2000, 256)).astype(np.float32)
    # the warm-up timed a batch of one (~20 us, so the small batch runs inline unless the machine
    # stalled that run); the large batch is predicted far over the budget and goes to the pool
    assert model.run_cost.predict(large.nbytes) > INLINE_BUDGET_S
    for x in (small, large):
        ((name, y),) = await table.infer(model, {"x": x}, [])
        assert name == "y"
        np.testing.assert_allclose(y, x @ w + b, rtol=1e-4, atol=1e-4)
