"""The operator CLI (``modelmesh models ...``): pure parsing and formatting, then every command
end to end against a real grpc.aio server running fakes of the wire API (mmesh.ModelMesh and
inference.GRPCInferenceService/RepositoryIndex)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from modelmesh import admin
from modelmesh.admin import (
    BulkOutcome,
    ModelCopy,
    ModelEntry,
    ModelStatus,
    RegistrationFailure,
    SourceError,
    absolute_model_path,
    describe_rpc_error,
    discover_models,
    format_bulk_summary,
    format_status,
    format_table,
    load_bulk_source,
    parse_source_line,
)
from modelmesh.proto import (
    grpc_predict_v2_pb2,
    grpc_predict_v2_pb2_grpc,
    model_mesh_pb2,
    model_mesh_pb2_grpc,
)

Status = model_mesh_pb2.ModelStatusInfo
Capsys = pytest.CaptureFixture[str]

# ---------------------------------------------------------------------------------------------
# Pure: bulk sources
# ---------------------------------------------------------------------------------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"onnx")
    return path


def test_discover_models_takes_onnx_files_and_model_folders(tmp_path: Path) -> None:
    _touch(tmp_path / "b.onnx")
    _touch(tmp_path / "A.ONNX")
    _touch(tmp_path / "folder-model" / "model.onnx")
    _touch(tmp_path / "deeper" / "inner" / "model.onnx")  # .onnx not directly inside: not a model
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    _touch(tmp_path / ".hidden.onnx")

    entries = discover_models(tmp_path)

    assert [(e.model_id, e.path, e.model_type) for e in entries] == [
        ("A", str(tmp_path / "A.ONNX"), "onnx"),
        ("b", str(tmp_path / "b.onnx"), "onnx"),
        ("folder-model", str(tmp_path / "folder-model"), "onnx"),
    ]


def test_folder_with_file_and_folder_of_one_id_is_rejected(tmp_path: Path) -> None:
    _touch(tmp_path / "m.onnx")
    _touch(tmp_path / "m" / "model.onnx")
    with pytest.raises(SourceError, match="'m' appears twice"):
        load_bulk_source(tmp_path)


def test_whitespace_list_file(tmp_path: Path) -> None:
    source = tmp_path / "lists" / "models.txt"
    source.parent.mkdir()
    source.write_text(
        "# id path [type]\n"
        "\n"
        "m1   /abs/m1.onnx\n"
        "m2\trel/m2.onnx  pytorch\n"
        "   # indented comment\n"
        "m3 s3://bucket/m3.onnx\n"
    )
    entries = load_bulk_source(source, "onnx")
    assert [(e.model_id, e.path, e.model_type, e.origin) for e in entries] == [
        ("m1", "/abs/m1.onnx", "onnx", f"{source}:3"),
        # relative to the list file's folder, not the current directory
        ("m2", str(tmp_path / "lists" / "rel" / "m2.onnx"), "pytorch", f"{source}:4"),
        ("m3", "s3://bucket/m3.onnx", "onnx", f"{source}:6"),
    ]


def test_json_lines_file(tmp_path: Path) -> None:
    source = tmp_path / "models.jsonl"
    lines = [
        {"id": "a", "path": "/m/a.onnx"},
        {"id": "b", "path": "b.onnx", "type": "custom", "key": "k1"},
    ]
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    entries = load_bulk_source(source, "onnx")
    assert entries == [
        ModelEntry("a", "onnx", "/m/a.onnx", "", f"{source}:1"),
        ModelEntry("b", "custom", str(tmp_path / "b.onnx"), "k1", f"{source}:2"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("only-an-id", r'expected "ID PATH \[TYPE\]", got 1 field'),
        ("a b c d", "got 4 field"),
        ('{"id": "a", "path": ', "not valid JSON"),
        ('{"path": "/x.onnx"}', 'missing "id"'),
        ('{"id": "a"}', 'missing "path"'),
        ('{"id": "a", "paht": "/x.onnx"}', "unknown field"),
        ('{"id": 7, "path": "/x.onnx"}', '"id" must be a non-empty string'),
    ],
)
def test_malformed_line_reports_its_line_number(tmp_path: Path, line: str, message: str) -> None:
    source = tmp_path / "models.txt"
    source.write_text(f"# header\nok /m/ok.onnx\n{line}\n")
    with pytest.raises(SourceError, match=message) as caught:
        load_bulk_source(source)
    assert f"{source}:3:" in str(caught.value)


def test_parse_source_line_skips_blank_and_comment_lines() -> None:
    assert parse_source_line("   \n", "f:1") is None
    assert parse_source_line("# m1 /x.onnx", "f:2") is None
    entry = parse_source_line(' {"id": "m", "path": "m.onnx"} ', "f:3", "onnx", Path("/models"))
    assert entry == ModelEntry("m", "onnx", "/models/m.onnx", "", "f:3")


def test_duplicate_ids_in_a_list_name_both_lines(tmp_path: Path) -> None:
    source = tmp_path / "models.txt"
    source.write_text("a /x.onnx\nb /y.onnx\na /z.onnx\n")
    with pytest.raises(SourceError, match=rf"'a' appears twice: {source}:1 and {source}:3"):
        load_bulk_source(source)


def test_missing_or_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        load_bulk_source(tmp_path / "nope")
    with pytest.raises(SourceError, match="no .onnx files"):
        load_bulk_source(tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(SourceError, match="no model lines"):
        load_bulk_source(tmp_path / "empty.txt")


def test_absolute_model_path(tmp_path: Path) -> None:
    assert absolute_model_path("a/../b.onnx", tmp_path) == str(tmp_path / "b.onnx")
    assert absolute_model_path("/x/y.onnx", tmp_path) == "/x/y.onnx"
    assert absolute_model_path("https://host/m.onnx") == "https://host/m.onnx"
    assert absolute_model_path("m.onnx") == os.path.join(os.getcwd(), "m.onnx")


# ---------------------------------------------------------------------------------------------
# Pure: formatting
# ---------------------------------------------------------------------------------------------


def test_bulk_summary_groups_failures_by_code() -> None:
    failures = [RegistrationFailure(f"m{i}7", "INVALID_ARGUMENT", f"bad id m{i}7") for i in range(5)]
    failures.insert(2, RegistrationFailure("x", "ALREADY_EXISTS", "registered with\nother info"))
    outcome = BulkOutcome(total=20, registered=10, failures=failures)

    assert format_bulk_summary(outcome, examples_per_code=3) == "\n".join(
        [
            "10 registered, 6 failed, 4 not attempted (of 20)",
            "INVALID_ARGUMENT: 5",
            "  m07: bad id m07",
            "  m17: bad id m17",
            "  m27: bad id m27",
            "  ... and 2 more",
            "ALREADY_EXISTS: 1",
            "  x: registered with other info",
        ]
    )


def test_bulk_summary_all_registered_and_lost_pod() -> None:
    assert format_bulk_summary(BulkOutcome(total=3, registered=3)) == "3 registered, 0 failed (of 3)"
    lost = BulkOutcome(total=3, registered=1, failures=[RegistrationFailure("b", "UNAVAILABLE", "gone")])
    lost.lost_endpoint = "pod:8033"
    assert format_bulk_summary(lost).endswith("stopped early: lost the connection to the modelmesh pod at pod:8033")


def test_format_table_aligns_all_but_the_last_column() -> None:
    rows = [("a-long-id", "LOADED", ""), ("b", "LOADING_FAILED", "no\nfile")]
    table = format_table(("MODEL", "STATE", "REASON"), rows)
    assert table.splitlines() == [
        "MODEL      STATE           REASON",
        "a-long-id  LOADED",
        "b          LOADING_FAILED  no file",
    ]


def test_format_status_with_copies_and_errors() -> None:
    copies = (ModelCopy("pod-a", "LOADED", 1_700_000_000_000), ModelCopy("pod-b", "LOADING"))
    status = ModelStatus("LOADED", ("older failure",), copies)
    assert format_status("m", status) == "m: LOADED\n  error: older failure"
    assert format_status("m", status, copies=True).splitlines() == [
        "m: LOADED",
        "  copy on pod-a: LOADED since 2023-11-14T22:13:20Z",
        "  copy on pod-b: LOADING",
        "  error: older failure",
    ]


def test_describe_rpc_error_names_the_endpoint_only_when_unreached() -> None:
    assert describe_rpc_error("UNAVAILABLE", "store down", "h:1", reached=True) == "error: UNAVAILABLE: store down"
    message = describe_rpc_error("UNAVAILABLE", "failed to connect", "h:1", reached=False)
    assert message.startswith("error: UNAVAILABLE: cannot reach a modelmesh pod at h:1")


# ---------------------------------------------------------------------------------------------
# End to end against a real grpc.aio server with fakes of the wire API
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeModel:
    info: model_mesh_pb2.ModelInfo
    status: int = Status.NOT_LOADED
    errors: list[str] = field(default_factory=list)


class FakeModelMesh(model_mesh_pb2_grpc.ModelMeshServicer):
    """An in-memory mmesh.ModelMesh: ids ending in 7 are rejected, "store-down" answers
    UNAVAILABLE, paths containing "broken" fail to load."""

    def __init__(self) -> None:
        self.models: dict[str, FakeModel] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    def _reply(self, model_id: str) -> model_mesh_pb2.ModelStatusInfo:
        model = self.models.get(model_id)
        if model is None:
            return Status(status=Status.NOT_FOUND)
        copies = []
        if model.status == Status.LOADED:
            copies.append(Status.ModelCopyInfo(location="pod-a", copyStatus=model.status, time=1_700_000_000_000))
        return Status(status=model.status, errors=model.errors, modelCopyInfos=copies)

    def _load(self, model: FakeModel) -> None:
        if "broken" in model.info.path:
            model.status, model.errors = Status.LOADING_FAILED, ["cannot open model file"]
        else:
            model.status = Status.LOADED

    async def registerModel(self, request, context):  # type: ignore[no-untyped-def]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # let other calls in, so concurrency is observable
            if request.modelId.endswith("7"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model id {request.modelId} is not allowed")
            if request.modelId == "store-down":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "registry store unavailable")
            existing = self.models.get(request.modelId)
            if existing is not None and existing.info != request.modelInfo:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"model {request.modelId} exists with other info")
            model = existing or self.models.setdefault(request.modelId, FakeModel(request.modelInfo))
            if request.loadNow:
                self._load(model)
            return self._reply(request.modelId)
        finally:
            self.in_flight -= 1

    async def getModelStatus(self, request, context):  # type: ignore[no-untyped-def]
        return self._reply(request.modelId)

    async def unregisterModel(self, request, context):  # type: ignore[no-untyped-def]
        self.models.pop(request.modelId, None)
        return model_mesh_pb2.UnregisterModelResponse()

    async def ensureLoaded(self, request, context):  # type: ignore[no-untyped-def]
        model = self.models.get(request.modelId)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.modelId} not found")
        self._load(model)
        return self._reply(request.modelId)


class FakeRepositoryIndex(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """RepositoryIndex as the mesh answers it: every registered model with its status name."""

    def __init__(self, mesh: FakeModelMesh) -> None:
        self.mesh = mesh

    async def RepositoryIndex(self, request, context):  # type: ignore[no-untyped-def]
        Index = grpc_predict_v2_pb2.RepositoryIndexResponse.ModelIndex
        models = [
            Index(name=model_id, state=Status.ModelStatus.Name(m.status), reason="; ".join(m.errors))
            for model_id, m in sorted(self.mesh.models.items())
            if not request.ready or m.status == Status.LOADED
        ]
        return grpc_predict_v2_pb2.RepositoryIndexResponse(models=models)


@dataclass
class Pod:
    endpoint: str
    mesh: FakeModelMesh


@pytest.fixture
async def pod() -> AsyncIterator[Pod]:
    mesh = FakeModelMesh()
    server = grpc.aio.server()
    model_mesh_pb2_grpc.add_ModelMeshServicer_to_server(mesh, server)
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FakeRepositoryIndex(mesh), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Pod(f"127.0.0.1:{port}", mesh)
    finally:
        await server.stop(None)


@pytest.fixture
def dead_endpoint(tmp_path: Path) -> str:
    """An endpoint nothing listens on. A Unix socket path that does not exist, not a closed TCP
    port: another process on the machine may bind that port before the test connects."""
    return f"unix:{tmp_path / 'no-pod.sock'}"


async def run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    code = await admin.main_async(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def test_register_status_load_unregister(
    pod: Pod, capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    e = ("--endpoint", pod.endpoint)

    result = await run(capsys, "register", "m1", "--type", "onnx", "--path", "models/m1.onnx", "--key", "k", *e)
    assert result == (0, "m1: NOT_LOADED\n", "")
    # the pod resolves paths on its own machine: a relative path goes out absolute
    expected = model_mesh_pb2.ModelInfo(type="onnx", path=str(tmp_path / "models" / "m1.onnx"), key="k")
    assert pod.mesh.models["m1"].info == expected

    code, out, _ = await run(capsys, "status", "m1", *e)
    assert (code, out) == (0, "m1: NOT_LOADED\n")

    code, out, _ = await run(capsys, "load", "m1", "--sync", *e)
    assert (code, out) == (0, "m1: LOADED\n  copy on pod-a: LOADED since 2023-11-14T22:13:20Z\n")

    assert await run(capsys, "unregister", "m1", *e) == (0, "m1: unregistered\n", "")
    assert await run(capsys, "status", "m1", *e) == (1, "m1: NOT_FOUND\n", "")


async def test_register_sync_failure_and_conflict(pod: Pod, capsys: Capsys) -> None:
    e = ("--endpoint", pod.endpoint)
    code, out, _ = await run(capsys, "register", "b", "--type", "onnx", "--path", "/m/broken.onnx", "--sync", *e)
    assert (code, out) == (1, "b: LOADING_FAILED\n  error: cannot open model file\n")

    # same id, same info: the server's business to accept; other info: ALREADY_EXISTS
    assert (await run(capsys, "register", "b", "--type", "onnx", "--path", "/m/broken.onnx", *e))[0] == 0
    code, out, err = await run(capsys, "register", "b", "--type", "onnx", "--path", "/m/other.onnx", *e)
    assert (code, out, err) == (1, "", "error: ALREADY_EXISTS: model b exists with other info\n")


async def test_errors_of_a_reached_pod_are_not_blamed_on_the_endpoint(pod: Pod, capsys: Capsys) -> None:
    e = ("--endpoint", pod.endpoint)
    code, _, err = await run(capsys, "register", "store-down", "--type", "onnx", "--path", "/x", *e)
    assert (code, err) == (1, "error: UNAVAILABLE: registry store unavailable\n")
    code, _, err = await run(capsys, "load", "nope", *e)
    assert (code, err) == (1, "error: NOT_FOUND: model nope not found\n")


async def test_list_table_json_and_ready(pod: Pod, capsys: Capsys) -> None:
    e = ("--endpoint", pod.endpoint)
    assert await run(capsys, "list", *e) == (0, "", "no models registered\n")
    await run(capsys, "register", "alpha", "--type", "onnx", "--path", "/m/a.onnx", "--load-now", *e)
    await run(capsys, "register", "b", "--type", "onnx", "--path", "/m/broken.onnx", "--load-now", *e)
    await run(capsys, "register", "c", "--type", "onnx", "--path", "/m/c.onnx", *e)

    code, out, _ = await run(capsys, "list", *e)
    assert code == 0
    assert out.splitlines() == [
        "MODEL  STATE           REASON",
        "alpha  LOADED",
        "b      LOADING_FAILED  cannot open model file",
        "c      NOT_LOADED",
    ]
    _, out, _ = await run(capsys, "list", "--json", *e)
    second = json.loads(out.splitlines()[1])
    assert second == {"id": "b", "state": "LOADING_FAILED", "reason": "cannot open model file"}
    _, out, _ = await run(capsys, "list", "--ready", "--json", *e)
    assert out == '{"id": "alpha", "state": "LOADED", "reason": ""}\n'


async def test_bulk_registration_of_2000_with_failures(pod: Pod, capsys: Capsys, tmp_path: Path) -> None:
    source = tmp_path / "models.txt"
    source.write_text("".join(f"m{i:04d} /models/m{i:04d}.onnx\n" for i in range(2000)))

    code, out, err = await run(capsys, "register-bulk", str(source), "--concurrency", "16", "--endpoint", pod.endpoint)

    assert code == 1
    assert out.splitlines() == [
        "1800 registered, 200 failed (of 2000)",
        "INVALID_ARGUMENT: 200",
        "  m0007: model id m0007 is not allowed",
        "  m0017: model id m0017 is not allowed",
        "  m0027: model id m0027 is not allowed",
        "  ... and 197 more",
    ]
    assert err == ""  # not a TTY: no progress bar
    assert len(pod.mesh.models) == 1800
    assert 1 < pod.mesh.max_in_flight <= 16


@pytest.mark.parametrize("flags", [(), ("--unary",)])
async def test_bulk_on_a_pod_without_the_stream_uses_unary_calls(
    pod: Pod, capsys: Capsys, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    """This fake pod serves mmesh.ModelMesh only, like KServe ModelMesh: the stream is answered
    UNIMPLEMENTED and every model goes through registerModel instead."""
    source = tmp_path / "models.txt"
    # ids ending in 7 are rejected by the fake: these end in x
    source.write_text("".join(f"u{i}x /models/u{i}.onnx\n" for i in range(40)))
    code, out, err = await run(capsys, "register-bulk", str(source), "--endpoint", pod.endpoint, *flags)
    assert (code, out, err) == (0, "40 registered, 0 failed (of 40)\n", "")
    assert sorted(pod.mesh.models) == sorted(f"u{i}x" for i in range(40))


async def test_bulk_from_folder_succeeds_with_progress(pod: Pod, capsys: Capsys, tmp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx", "c/model.onnx"):
        _touch(tmp_path / name)
    e = ("--endpoint", pod.endpoint)
    code, out, err = await run(capsys, "register-bulk", str(tmp_path), "--load-now", "--progress", *e)
    assert (code, out) == (0, "3 registered, 0 failed (of 3)\n")
    assert "3/3" in err
    assert pod.mesh.models["c"].info.path == str(tmp_path / "c")
    assert all(m.status == Status.LOADED for m in pod.mesh.models.values())


async def test_bulk_fail_fast_stops_taking_entries(pod: Pod, capsys: Capsys, tmp_path: Path) -> None:
    source = tmp_path / "models.jsonl"
    source.write_text("".join(json.dumps({"id": f"m{i}", "path": f"/m/{i}.onnx"}) + "\n" for i in range(100)))
    e = ("--endpoint", pod.endpoint)
    code, out, _ = await run(capsys, "register-bulk", str(source), "--fail-fast", "--concurrency", "1", *e)
    assert code == 1
    assert out.splitlines()[0] == "7 registered, 1 failed, 92 not attempted (of 100)"


async def test_bulk_with_malformed_source_registers_nothing(pod: Pod, capsys: Capsys, tmp_path: Path) -> None:
    source = tmp_path / "models.txt"
    source.write_text("a /m/a.onnx\nb\n")
    code, out, err = await run(capsys, "register-bulk", str(source), "--endpoint", pod.endpoint)
    assert (code, out) == (2, "")
    assert err == f'error: {source}:2: expected "ID PATH [TYPE]", got 1 field(s)\n'
    assert pod.mesh.models == {}


async def test_unreachable_pod_names_the_endpoint(dead_endpoint: str, capsys: Capsys, tmp_path: Path) -> None:
    code, out, err = await run(capsys, "status", "m1", "--endpoint", dead_endpoint, "--timeout", "5")
    assert (code, out) == (1, "")
    assert err.startswith(f"error: UNAVAILABLE: cannot reach a modelmesh pod at {dead_endpoint}")

    _touch(tmp_path / "a.onnx")
    code, out, err = await run(capsys, "register-bulk", str(tmp_path), "--endpoint", dead_endpoint, "--timeout", "5")
    assert (code, out) == (1, "")
    assert f"cannot reach a modelmesh pod at {dead_endpoint}" in err


async def test_usage_errors_exit_2(capsys: Capsys) -> None:
    assert (await run(capsys, "register", "m1", "--type", "onnx"))[0] == 2  # no --path
    assert (await run(capsys, "register-bulk", "x", "--concurrency", "0"))[0] == 2
    assert (await run(capsys, "status", "m1", "--timeout", "-1"))[0] == 2


def test_endpoint_default_comes_from_mm_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MM_ENDPOINT", raising=False)
    assert admin.build_parser().parse_args(["models", "list"]).endpoint == "localhost:8033"
    monkeypatch.setenv("MM_ENDPOINT", "mesh:9000")
    assert admin.build_parser().parse_args(["models", "list"]).endpoint == "mesh:9000"
    args = admin.build_parser().parse_args(["models", "list", "--endpoint", "other:1"])
    assert args.endpoint == "other:1"


def test_sync_main_returns_an_exit_code(dead_endpoint: str) -> None:
    """``main`` runs its own event loop, as ``modelmesh.cli`` does; no server needed to see it."""
    assert admin.main(["models", "unregister", "m1", "--endpoint", dead_endpoint]) == 1
    assert admin.main(["models", "--help"]) == 0


def test_models_parser_is_wired_into_the_program_cli() -> None:
    pytest.importorskip("modelmesh.demo")  # cli.build_parser imports the demo command too
    from modelmesh import cli

    args = cli.build_parser().parse_args(["models", "status", "m1"])
    assert args.func is admin._run_from_cli
    assert args.models_command is admin._cmd_status
