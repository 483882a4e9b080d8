"""Bulk registration over ``mmesh.ModelMeshBulk/registerModels``: the pod's real gRPC server
(``api/server.py``) on the real mesh core, in-memory store and a fake runtime, driven by the
operator CLI and by a raw stream. The unary fallback against a pod without the stream is in
``test_admin.py`` (its fake pod serves only ``mmesh.ModelMesh``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health
from prometheus_client import CollectorRegistry

from modelmesh import admin
from modelmesh.api import bulk, dataplane, management
from modelmesh.api.server import build_server
from modelmesh.clock import FakeClock
from modelmesh.kv.memory import MemoryStore
from modelmesh.mesh import MAX_MODEL_ID_LENGTH, Mesh
from modelmesh.metrics import MeshMetrics
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc
from modelmesh.registry import Registry
from modelmesh.types import ModelInfo
from modelmesh.vmodels import VModels
from tests.fakes import FakeRuntime

Capsys = pytest.CaptureFixture[str]
IN_FLIGHT = 8


@dataclass
class Pod:
    endpoint: str
    mesh: Mesh
    registry: Registry
    store: MemoryStore
    runtime: FakeRuntime


@pytest.fixture
async def pod() -> AsyncIterator[Pod]:
    clock = FakeClock()
    store = MemoryStore(clock)
    registry = Registry(store, "mm/test")
    await registry.start()
    runtime = FakeRuntime(capacity=10**9)
    metrics = MeshMetrics(CollectorRegistry())
    mesh = Mesh(instance_id="pod-a", registry=registry, runtime=runtime, metrics=metrics, clock=clock,
                load_failure_expiry_ms=60_000)
    mesh.start(await runtime.status())
    server = build_server(
        management_servicer=management.ManagementServicer(mesh, VModels(store, "mm/test", mesh, clock)),
        bulk_servicer=bulk.BulkRegistrationServicer(mesh, in_flight=IN_FLIGHT),
        data_plane=dataplane.DataPlane(mesh, metrics, clock, ready=lambda: True),
        health_servicer=health.aio.HealthServicer(),
        max_msg_size=1 << 20,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Pod(f"127.0.0.1:{port}", mesh, registry, store, runtime)
    finally:
        if runtime.gate is not None:
            runtime.gate.set()
        await server.stop(None)
        await mesh.close()
        await registry.close()
        await store.close()


async def run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    code = await admin.main_async(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_source(path: Path, count: int) -> None:
    """``count`` models, of which every 100th (from 50) has a control character in its id and
    every 100th (from 99) has an id too long: INVALID_ARGUMENT from the mesh for 2 in 100."""
    lines = []
    for i in range(count):
        model_id = f"m{i:05d}"
        if i % 100 == 50:
            model_id += "\u0001"
        elif i % 100 == 99:
            model_id = model_id.ljust(MAX_MODEL_ID_LENGTH + 1, "x")
        lines.append(json.dumps({"id": model_id, "path": f"/models/m{i:05d}.onnx"}) + "\n")
    path.write_text("".join(lines))


@pytest.mark.parametrize("path", ["stream", "unary"])
async def test_bulk_registration_reports_each_invalid_model_and_registers_the_rest(
    pod: Pod, capsys: Capsys, tmp_path: Path, path: str
) -> None:
    source = tmp_path / "models.jsonl"
    write_source(source, 1000)
    # registered before with other info: ALREADY_EXISTS for that one model
    await pod.mesh.register("m00003", ModelInfo("onnx", "/elsewhere.onnx"), load_now=False, sync=False)
    flags = ("--unary",) if path == "unary" else ()

    code, out, err = await run(capsys, "register-bulk", str(source), "--endpoint", pod.endpoint, *flags)

    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == "979 registered, 21 failed (of 1000)"
    assert lines[1:4] == [
        "INVALID_ARGUMENT: 20",
        "  m00050\x01: model id must not contain control characters",
        f"  {'m00099'.ljust(MAX_MODEL_ID_LENGTH + 1, 'x')}: model id is longer than {MAX_MODEL_ID_LENGTH} characters",
    ]
    assert "ALREADY_EXISTS: 1" in lines
    assert any(line.startswith("  m00003: model 'm00003' is already registered with different info") for line in lines)
    # the records are in the store, not only in the pod's view
    stored = (await pod.store.list_prefix("mm/test/registry/")).items
    assert len(stored) == 980  # 979 + the one registered before
    assert json.loads(stored[0].value)["info"]["path"] == "/models/m00000.onnx"
    assert len(pod.registry) == 980


async def test_all_valid_over_the_stream_with_load_now(pod: Pod, capsys: Capsys, tmp_path: Path) -> None:
    source = tmp_path / "models.txt"
    source.write_text("".join(f"ok{i} /models/ok{i}.onnx\n" for i in range(300)))
    code, out, _ = await run(capsys, "register-bulk", str(source), "--load-now", "--concurrency", "100",
                             "--endpoint", pod.endpoint)
    assert (code, out) == (0, "300 registered, 0 failed (of 300)\n")
    assert len(pod.registry) == 300


async def test_fail_fast_over_the_stream_stops_sending(pod: Pod, capsys: Capsys, tmp_path: Path) -> None:
    source = tmp_path / "models.jsonl"
    write_source(source, 200)
    code, out, _ = await run(capsys, "register-bulk", str(source), "--fail-fast", "--concurrency", "1",
                             "--endpoint", pod.endpoint)
    assert code == 1
    assert out.splitlines()[0] == "50 registered, 1 failed, 149 not attempted (of 200)"
    assert len(pod.registry) == 50


async def test_results_carry_index_and_model_id_and_code(pod: Pod) -> None:
    requests = [
        mpb.RegisterModelRequest(modelId="a", modelInfo=mpb.ModelInfo(type="onnx", path="/a")),
        mpb.RegisterModelRequest(modelId="", modelInfo=mpb.ModelInfo(type="onnx", path="/b")),
        mpb.RegisterModelRequest(modelId="c", modelInfo=mpb.ModelInfo(type="", path="/c")),
        mpb.RegisterModelRequest(modelId="d", modelInfo=mpb.ModelInfo(type="onnx", path="/d"), loadNow=True,
                                 sync=True),
    ]
    async with grpc.aio.insecure_channel(pod.endpoint) as channel:
        call = model_mesh_pb2_grpc.ModelMeshBulkStub(channel).registerModels(iter(requests))
        results = {r.index: r async for response in call for r in response.results}
    assert sorted(results) == [0, 1, 2, 3]
    assert [results[i].modelId for i in range(4)] == ["a", "", "c", "d"]
    assert results[0].code == 0 and results[0].status.status == mpb.ModelStatusInfo.NOT_LOADED
    assert (results[1].code, results[1].message) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0], "model id must not be empty")
    assert results[2].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not results[2].HasField("status")
    assert results[3].status.status == mpb.ModelStatusInfo.LOADED
    assert [c.location for c in results[3].status.modelCopyInfos] == ["pod-a"]


async def test_the_pod_reads_no_further_ahead_than_its_bound(pod: Pod) -> None:
    """With every registration held (sync loads on a gated runtime), the pod has taken exactly
    its bound of requests off the stream; released, all complete."""
    pod.runtime.gate = asyncio.Event()
    requests = [
        mpb.RegisterModelRequest(modelId=f"g{i}", modelInfo=mpb.ModelInfo(type="onnx", path=f"/g{i}"), loadNow=True,
                                 sync=True)
        for i in range(5 * IN_FLIGHT)
    ]
    async with grpc.aio.insecure_channel(pod.endpoint) as channel:
        call = model_mesh_pb2_grpc.ModelMeshBulkStub(channel).registerModels(iter(requests))
        while len(pod.registry) < IN_FLIGHT:
            await asyncio.sleep(0.01)
        for _ in range(20):  # the pod gets every chance to read on
            await asyncio.sleep(0.01)
        assert len(pod.registry) == IN_FLIGHT
        pod.runtime.gate.set()
        results = [r async for response in call for r in response.results]
    assert sorted(r.index for r in results) == list(range(len(requests)))
    assert all(r.code == 0 and r.status.status == mpb.ModelStatusInfo.LOADED for r in results)


@contextlib.asynccontextmanager
async def bulk_server(servicer: model_mesh_pb2_grpc.ModelMeshBulkServicer) -> AsyncIterator[str]:
    """A bare gRPC server with only ``servicer`` as mmesh.ModelMeshBulk; yields its address."""
    server = grpc.aio.server()
    model_mesh_pb2_grpc.add_ModelMeshBulkServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


class SilentBulk(model_mesh_pb2_grpc.ModelMeshBulkServicer):
    """A pod that takes registrations and never answers them."""

    async def registerModels(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for _ in request_iterator:
            pass
        await asyncio.Event().wait()
        yield mpb.RegisterModelsResponse()  # pragma: no cover


async def test_no_answer_within_the_timeout_fails_the_unanswered(capsys: Capsys, tmp_path: Path) -> None:
    source = tmp_path / "models.txt"
    source.write_text("".join(f"s{i} /models/s{i}.onnx\n" for i in range(3)))
    async with bulk_server(SilentBulk()) as address:
        code, out, _ = await run(capsys, "register-bulk", str(source), "--timeout", "0.3", "--endpoint", address)
    # the first request goes alone (see admin._register_streamed): the others are never sent
    assert code == 1
    assert out.splitlines() == [
        "0 registered, 1 failed, 2 not attempted (of 3)",
        "DEADLINE_EXCEEDED: 1",
        "  s0: no answer from the pod within 0.3 s",
    ]


class BreakingBulk(model_mesh_pb2_grpc.ModelMeshBulkServicer):
    """Answers the first request, then ends the stream with an error after reading two more."""

    async def registerModels(self, request_iterator, context):  # type: ignore[no-untyped-def]
        index = 0
        async for request in request_iterator:
            if index == 0:
                yield mpb.RegisterModelsResponse(results=[mpb.RegisterModelResult(index=0, modelId=request.modelId)])
            elif index == 2:
                await context.abort(grpc.StatusCode.INTERNAL, "pod broke")
            index += 1


async def test_a_stream_ending_in_an_error_fails_the_unanswered_and_stops(capsys: Capsys, tmp_path: Path) -> None:
    source = tmp_path / "models.txt"
    source.write_text("".join(f"b{i} /models/b{i}.onnx\n" for i in range(10)))
    async with bulk_server(BreakingBulk()) as address:
        code, out, _ = await run(capsys, "register-bulk", str(source), "--concurrency", "2", "--endpoint", address)
    # b0 answered; b1 and b2 sent and unanswered when the stream ended; the rest never sent
    assert code == 1
    assert out.splitlines() == [
        "1 registered, 2 failed, 7 not attempted (of 10)",
        "INTERNAL: 2",
        "  b1: pod broke",
        "  b2: pod broke",
    ]
