"""Operator commands against a running mesh pod: ``modelmesh models ...``.

    modelmesh models register ID --type T --path P [--key K] [--load-now] [--sync]
                              [--min-copies N] [--all-pods] [--pin LABEL ...]
    modelmesh models status ID
    modelmesh models unregister ID
    modelmesh models load ID [--sync]
    modelmesh models list [--ready] [--json]
    modelmesh models register-bulk SOURCE [--type T] [--load-now] [--concurrency N] [--fail-fast] [--unary]

The module has three layers, top to bottom:

1. pure functions, testable without a pod: reading a bulk source (a folder of ``.onnx`` files or a
   list file), formatting a model status, an aligned table, a bulk summary and a gRPC error;
2. thin async gRPC calls, one per command, that convert the wire messages to the dataclasses
   the formatters take (protobuf goes no further than this module);
3. the argparse wiring (``add_models_parser``) and the entry points that turn every outcome,
   including a gRPC error, into an exit code: 0 ok, 1 failed, 2 bad usage or unusable input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from modelmesh.proto import (
    grpc_predict_v2_pb2,
    grpc_predict_v2_pb2_grpc,
    model_mesh_pb2,
    model_mesh_pb2_grpc,
)

__all__ = [
    "BulkOutcome",
    "IndexRow",
    "ModelCopy",
    "ModelEntry",
    "ModelStatus",
    "RegistrationFailure",
    "SourceError",
    "absolute_model_path",
    "add_models_parser",
    "build_parser",
    "describe_rpc_error",
    "discover_models",
    "format_bulk_summary",
    "format_json_lines",
    "format_status",
    "format_table",
    "load_bulk_source",
    "main",
    "main_async",
    "parse_source_line",
    "read_model_list",
    "register_many",
    "run_models_command",
]

DEFAULT_ENDPOINT = "localhost:8033"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MODEL_TYPE = "onnx"
DEFAULT_BULK_CONCURRENCY = 32
# Same limit as the pod's (MM_SVC_GRPC_MAX_MSG_SIZE default), so the CLI never rejects what the pod accepts.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
# Paths like s3://bucket/m.onnx are for a storage puller on the pod, not files on this machine.
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_JSON_FIELDS = frozenset({"id", "type", "path", "key"})
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Pure part: bulk sources
# ---------------------------------------------------------------------------------------------


class SourceError(ValueError):
    """A bulk source cannot be used as given; nothing has been registered."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One model to register: the fields of ``mmesh.ModelInfo`` plus its id."""

    model_id: str
    model_type: str
    path: str
    key: str = ""
    # where the entry came from ("models.txt:12" or a file path), for error messages
    origin: str = ""


def absolute_model_path(path: str, base: Path | None = None) -> str:
    """``path`` made absolute against ``base`` (default: the current directory).

    The pod resolves paths on its own machine, where our current directory means nothing, so a
    relative path must be pinned here. URIs (``s3://...``) are left alone for the pod's pullers.
    """
    if _URI_SCHEME.match(path):
        return path
    expanded = Path(path).expanduser()
    if not expanded.is_absolute():
        expanded = (base if base is not None else Path.cwd()) / expanded
    # abspath, not resolve(): normalise ".." but keep symlinks as the operator named them.
    return os.path.abspath(expanded)


def _is_onnx_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".onnx" and not path.name.startswith(".")


def discover_models(folder: Path, model_type: str = DEFAULT_MODEL_TYPE) -> list[ModelEntry]:
    """Models in ``folder``: each ``*.onnx`` file directly inside (id = file stem) and each
    sub-folder holding ``.onnx`` files directly inside it (id = folder name), sorted by name.

    Hidden entries are skipped (editors and macOS leave ``.``-files that are not models).
    """
    folder = Path(absolute_model_path(str(folder)))
    entries: list[ModelEntry] = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if _is_onnx_file(child):
            entries.append(ModelEntry(child.stem, model_type, str(child), origin=str(child)))
        elif child.is_dir() and any(_is_onnx_file(f) for f in child.iterdir()):
            entries.append(ModelEntry(child.name, model_type, str(child), origin=str(child)))
    return entries


def _entry_from_json(text: str, where: str, default_type: str, base: Path) -> ModelEntry:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(f"{where}: not valid JSON: {err.msg}") from None
    assert isinstance(obj, dict)  # only called for lines starting with "{"
    unknown = sorted(set(obj) - _JSON_FIELDS)
    if unknown:
        # A typo such as "paht" would otherwise register a model with no path.
        raise SourceError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: id, type, path, key")
    values: dict[str, str] = {}
    for name in ("id", "path", "type", "key"):
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise SourceError(f"{where}: \"{name}\" must be a non-empty string")
        values[name] = value
    for required in ("id", "path"):
        if required not in values:
            raise SourceError(f"{where}: missing \"{required}\"")
    return ModelEntry(
        model_id=values["id"],
        model_type=values.get("type", default_type),
        path=absolute_model_path(values["path"], base),
        key=values.get("key", ""),
        origin=where,
    )


def parse_source_line(
    text: str, where: str, default_type: str = DEFAULT_MODEL_TYPE, base: Path | None = None
) -> ModelEntry | None:
    """One line of a list file as an entry, or None for a blank line or a ``#`` comment.

    A line starting with ``{`` is a JSON object ``{"id", "path", "type"?, "key"?}``; any other
    is ``ID PATH [TYPE]`` separated by whitespace. Relative paths are taken against ``base``.
    ``where`` ("models.txt:12") prefixes every error so the operator can find the line.
    """
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    base = base if base is not None else Path.cwd()
    if stripped.startswith("{"):
        return _entry_from_json(stripped, where, default_type, base)
    fields = stripped.split()
    if len(fields) not in (2, 3):
        raise SourceError(f"{where}: expected \"ID PATH [TYPE]\", got {len(fields)} field(s)")
    model_type = fields[2] if len(fields) == 3 else default_type
    return ModelEntry(fields[0], model_type, absolute_model_path(fields[1], base), origin=where)


def _reject_duplicate_ids(entries: Sequence[ModelEntry]) -> None:
    # Two entries with one id would race each other on the pod; one would fail with ALREADY_EXISTS
    # at random. Better to refuse the source before registering anything.
    seen: dict[str, ModelEntry] = {}
    for entry in entries:
        first = seen.setdefault(entry.model_id, entry)
        if first is not entry:
            raise SourceError(f"model id {entry.model_id!r} appears twice: {first.origin} and {entry.origin}")


def read_model_list(path: Path, default_type: str = DEFAULT_MODEL_TYPE) -> list[ModelEntry]:
    """Entries of a list file (JSON Lines, ``ID PATH [TYPE]`` lines, or a mix).

    Relative paths are taken against the list file's folder, so the list means the same thing
    wherever the command is run from.
    """
    base = Path(absolute_model_path(str(path))).parent
    entries: list[ModelEntry] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            entry = parse_source_line(line, f"{path}:{number}", default_type, base)
            if entry is not None:
                entries.append(entry)
    return entries


def load_bulk_source(source: str | Path, default_type: str = DEFAULT_MODEL_TYPE) -> list[ModelEntry]:
    """The entries of a bulk source: a folder (see ``discover_models``) or a list file
    (see ``read_model_list``). Raises ``SourceError`` when it is missing, empty or malformed."""
    path = Path(source)
    try:
        if path.is_dir():
            entries = discover_models(path, default_type)
        elif path.is_file():
            entries = read_model_list(path, default_type)
        else:
            raise SourceError(f"{source}: no such file or folder")
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"{source}: cannot read: {err}") from None
    if not entries:
        what = "no .onnx files or model folders" if path.is_dir() else "no model lines"
        raise SourceError(f"{source}: {what} found")
    _reject_duplicate_ids(entries)
    return entries


# ---------------------------------------------------------------------------------------------
# Pure part: what the commands print
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelCopy:
    """One loaded (or loading) copy of a model on a pod."""

    location: str
    status: str
    time_ms: int = 0


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A model's status as the mesh reports it (``mmesh.ModelStatusInfo``), wire-free."""

    status: str
    errors: tuple[str, ...] = ()
    copies: tuple[ModelCopy, ...] = ()


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One model in ``models list`` (an entry of ``RepositoryIndexResponse``)."""

    model_id: str
    state: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RegistrationFailure:
    """A model a bulk registration could not register, with the gRPC code name and details."""

    model_id: str
    code: str
    message: str


@dataclass(slots=True)
class BulkOutcome:
    """What a bulk registration did; entries neither registered nor failed were not attempted."""

    total: int
    registered: int = 0
    failures: list[RegistrationFailure] = field(default_factory=list)
    # set when the pod stopped answering part-way: the run ended early because of it
    lost_endpoint: str | None = None

    @property
    def not_attempted(self) -> int:
        return self.total - self.registered - len(self.failures)


def _format_time_ms(time_ms: int) -> str:
    return datetime.fromtimestamp(time_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_status(model_id: str, status: ModelStatus, *, copies: bool = False) -> str:
    """``ID: STATUS``, then one indented line per error and, with ``copies``, per copy."""
    lines = [f"{model_id}: {status.status}"]
    if copies:
        for copy in status.copies:
            since = f" since {_format_time_ms(copy.time_ms)}" if copy.time_ms else ""
            lines.append(f"  copy on {copy.location}: {copy.status}{since}")
    lines.extend(f"  error: {error}" for error in status.errors)
    return "\n".join(lines)


def _one_line(text: str) -> str:
    # A multi-line load error would break the table's columns.
    return " ".join(text.split())


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns aligned with two spaces between them; the last column is not padded."""
    table = [list(headers), *([_one_line(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers) - 1)]
    lines = []
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + row[len(widths) :]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_json_lines(rows: Iterable[IndexRow]) -> str:
    """One JSON object per model: ``{"id", "state", "reason"}``, in the bulk source's field names."""
    return "\n".join(json.dumps({"id": r.model_id, "state": r.state, "reason": r.reason}) for r in rows)


def format_bulk_summary(outcome: BulkOutcome, examples_per_code: int = 3) -> str:
    """``N registered, M failed``, then failures grouped by gRPC code (largest group first) with
    the first few messages of each, so 2,000 identical failures read as one line plus examples."""
    head = f"{outcome.registered} registered, {len(outcome.failures)} failed"
    if outcome.not_attempted:
        head += f", {outcome.not_attempted} not attempted"
    lines = [f"{head} (of {outcome.total})"]
    counts = Counter(failure.code for failure in outcome.failures)
    for code, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"{code}: {count}")
        group = [failure for failure in outcome.failures if failure.code == code]
        lines.extend(f"  {failure.model_id}: {_one_line(failure.message)}" for failure in group[:examples_per_code])
        if count > examples_per_code:
            lines.append(f"  ... and {count - examples_per_code} more")
    if outcome.lost_endpoint:
        lines.append(f"stopped early: lost the connection to the modelmesh pod at {outcome.lost_endpoint}")
    return "\n".join(lines)


def describe_rpc_error(code: str, details: str, endpoint: str, *, reached: bool) -> str:
    """The ``error: CODE: details`` line for a failed call.

    ``reached`` says whether the channel got connected: a pod that answers UNAVAILABLE (its store
    is down, say) is a different problem from one that cannot be reached at all, and only the
    latter should send the operator checking the endpoint.
    """
    if not reached and code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return (
            f"error: {code}: cannot reach a modelmesh pod at {endpoint} "
            f"(is it running? set --endpoint or MM_ENDPOINT): {_one_line(details)}"
        )
    return f"error: {code}: {_one_line(details)}"


# ---------------------------------------------------------------------------------------------
# gRPC part: thin calls, wire messages converted at the edge
# ---------------------------------------------------------------------------------------------


def _status_name(value: int, enum: Any = model_mesh_pb2.ModelStatusInfo.ModelStatus) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:  # a newer pod may send a status this client does not know yet
        return f"UNKNOWN({value})"


def _status_from_wire(info: model_mesh_pb2.ModelStatusInfo) -> ModelStatus:
    return ModelStatus(
        status=_status_name(info.status),
        errors=tuple(info.errors),
        copies=tuple(
            ModelCopy(copy.location, _status_name(copy.copyStatus), copy.time) for copy in info.modelCopyInfos
        ),
    )


def _register_request(
    entry: ModelEntry, *, load_now: bool, sync: bool = False, min_copies: int = 0, all_pods: bool = False,
    pin: Sequence[str] = (),
) -> model_mesh_pb2.RegisterModelRequest:
    request = model_mesh_pb2.RegisterModelRequest(
        modelId=entry.model_id,
        modelInfo=model_mesh_pb2.ModelInfo(type=entry.model_type, path=entry.path, key=entry.key),
        loadNow=load_now,
        sync=sync,
    )
    if min_copies or all_pods or pin:
        # our extension of the API; left unset otherwise, so the request is byte-for-byte
        # what a KServe ModelMesh client sends
        request.placement.minCopies = min_copies
        request.placement.allPods = all_pods
        request.placement.requiredLabels.extend(pin)
    return request


def _is_reached(channel: grpc.aio.Channel) -> bool:
    # After a failed call the channel is READY only if a connection was made, i.e. the pod
    # itself answered with the error.
    return channel.get_state() == grpc.ChannelConnectivity.READY


def _exit_code_for(status: ModelStatus) -> int:
    return EXIT_FAILED if status.status in ("NOT_FOUND", "LOADING_FAILED") else EXIT_OK


async def _cmd_register(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    entry = ModelEntry(args.model_id, args.type, absolute_model_path(args.path), args.key or "")
    # --sync only means something with loadNow, so it implies it rather than being silently ignored.
    load_now = args.load_now or args.sync
    request = _register_request(entry, load_now=load_now, sync=args.sync, min_copies=args.min_copies,
                                all_pods=args.all_pods, pin=args.pin or ())
    reply = await model_mesh_pb2_grpc.ModelMeshStub(channel).registerModel(request, timeout=args.timeout)
    status = _status_from_wire(reply)
    print(format_status(args.model_id, status))
    # Without a load asked for, the registration is what succeeded, whatever state an earlier
    # load left the model in; with one, a script needs to know that the load failed.
    return _exit_code_for(status) if load_now else EXIT_OK


async def _cmd_status(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    request = model_mesh_pb2.GetStatusRequest(modelId=args.model_id)
    reply = await model_mesh_pb2_grpc.ModelMeshStub(channel).getModelStatus(request, timeout=args.timeout)
    status = _status_from_wire(reply)
    print(format_status(args.model_id, status, copies=True))
    return EXIT_FAILED if status.status == "NOT_FOUND" else EXIT_OK


async def _cmd_unregister(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    request = model_mesh_pb2.UnregisterModelRequest(modelId=args.model_id)
    await model_mesh_pb2_grpc.ModelMeshStub(channel).unregisterModel(request, timeout=args.timeout)
    print(f"{args.model_id}: unregistered")
    return EXIT_OK


async def _cmd_load(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    request = model_mesh_pb2.EnsureLoadedRequest(modelId=args.model_id, sync=args.sync)
    reply = await model_mesh_pb2_grpc.ModelMeshStub(channel).ensureLoaded(request, timeout=args.timeout)
    status = _status_from_wire(reply)
    print(format_status(args.model_id, status, copies=True))
    return _exit_code_for(status)


def format_vmodel(vmodel_id: str, info: model_mesh_pb2.VModelStatusInfo) -> str:
    """``ID: STATE -> ACTIVE (its state)``, plus the target while the vmodel moves to it."""
    state = _status_name(info.status, model_mesh_pb2.VModelStatusInfo.VModelStatus)
    if info.status == model_mesh_pb2.VModelStatusInfo.NOT_FOUND:
        return f"{vmodel_id}: NOT_FOUND"
    line = f"{vmodel_id}: {state} -> {info.activeModelId} ({_status_name(info.activeModelStatus.status)})"
    if info.targetModelId and info.targetModelId != info.activeModelId:
        line += f", moving to {info.targetModelId} ({_status_name(info.targetModelStatus.status)})"
        errors = "; ".join(info.targetModelStatus.errors)
        if errors:
            line += f": {_one_line(errors)}"
    if info.owner:
        line += f" [owner {info.owner}]"
    return line


def _vmodel_exit_code(info: model_mesh_pb2.VModelStatusInfo) -> int:
    failed = (model_mesh_pb2.VModelStatusInfo.NOT_FOUND, model_mesh_pb2.VModelStatusInfo.TRANSITION_FAILED)
    return EXIT_FAILED if info.status in failed else EXIT_OK


async def _cmd_vmodel_set(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    request = model_mesh_pb2.SetVModelRequest(
        vModelId=args.vmodel_id, targetModelId=args.model_id, owner=args.owner or "",
        updateOnly=args.update_only, autoDeleteTargetModel=args.auto_delete, loadNow=args.load_now,
        force=args.force, sync=args.sync, expectedTargetModelId=args.expect or "",
    )
    if args.path is not None:
        request.modelInfo.CopyFrom(model_mesh_pb2.ModelInfo(
            type=args.type, path=absolute_model_path(args.path), key=args.key or ""))
    reply = await model_mesh_pb2_grpc.ModelMeshStub(channel).setVModel(request, timeout=args.timeout)
    print(format_vmodel(args.vmodel_id, reply))
    return _vmodel_exit_code(reply) if args.sync else EXIT_OK


async def _cmd_vmodel_status(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    request = model_mesh_pb2.GetVModelStatusRequest(vModelId=args.vmodel_id, owner=args.owner or "")
    reply = await model_mesh_pb2_grpc.ModelMeshStub(channel).getVModelStatus(request, timeout=args.timeout)
    print(format_vmodel(args.vmodel_id, reply))
    return _vmodel_exit_code(reply)


async def _cmd_vmodel_delete(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    request = model_mesh_pb2.DeleteVModelRequest(vModelId=args.vmodel_id, owner=args.owner or "")
    await model_mesh_pb2_grpc.ModelMeshStub(channel).deleteVModel(request, timeout=args.timeout)
    print(f"{args.vmodel_id}: deleted")
    return EXIT_OK


async def _cmd_list(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    request = grpc_predict_v2_pb2.RepositoryIndexRequest(ready=args.ready)
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    reply = await stub.RepositoryIndex(request, timeout=args.timeout)
    rows = [IndexRow(m.name, m.state, m.reason) for m in reply.models]
    if args.json:
        if rows:
            print(format_json_lines(rows))
    elif rows:
        print(format_table(("MODEL", "STATE", "REASON"), ((r.model_id, r.state, r.reason) for r in rows)))
    else:
        print("no models" + (" ready" if args.ready else " registered"), file=sys.stderr)
    return EXIT_OK


class _NoBulkStream(Exception):
    """The pod does not serve ``mmesh.ModelMeshBulk`` (KServe ModelMesh, an older modelmesh)."""


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class _BulkSettings:
    load_now: bool
    concurrency: int
    fail_fast: bool
    timeout: float | None
    on_done: Callable[[], None]


async def register_many(
    channel: grpc.aio.Channel,
    entries: Sequence[ModelEntry],
    *,
    endpoint: str,
    load_now: bool = False,
    concurrency: int = DEFAULT_BULK_CONCURRENCY,
    fail_fast: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    on_done: Callable[[], None] = lambda: None,
    unary: bool = False,
) -> BulkOutcome:
    """Register ``entries`` with at most ``concurrency`` registrations in flight.

    By default over one ``mmesh.ModelMeshBulk/registerModels`` stream (our extension: gRPC's
    per-call cost is paid once, not per model); when the pod answers that stream UNIMPLEMENTED,
    or with ``unary``, one ``registerModel`` call per model, as KServe ModelMesh's API has it.
    ``timeout`` is each unary call's deadline, or on the stream the longest wait for an answer.
    With ``fail_fast`` no entry is sent after the first failure. Losing the pod (a failure while
    the channel is not connected) always stops the run: every further call would fail the same
    way. If that happens before anything was registered the error is raised, since there is
    nothing to summarise; otherwise it is recorded in the outcome.
    """
    outcome = BulkOutcome(total=len(entries))
    how = _BulkSettings(load_now, concurrency, fail_fast, timeout, on_done)
    connection_error: grpc.aio.AioRpcError | None = None
    if not unary:
        try:
            connection_error = await _register_streamed(channel, entries, outcome, how)
        except _NoBulkStream:
            unary = True
    if unary:
        connection_error = await _register_unary(channel, entries, outcome, how)
    # failures in the source's order, not the order concurrent registrations happened to finish
    order = {entry.model_id: i for i, entry in enumerate(entries)}
    outcome.failures.sort(key=lambda f: order.get(f.model_id, len(order)))
    if connection_error is not None:
        if outcome.registered == 0:
            raise connection_error
        outcome.lost_endpoint = endpoint
    return outcome


async def _register_unary(
    channel: grpc.aio.Channel, entries: Sequence[ModelEntry], outcome: BulkOutcome, how: _BulkSettings
) -> grpc.aio.AioRpcError | None:
    """``concurrency`` worker tasks take entries from one shared iterator and make one
    registerModel call each; returns the error that lost the pod, if one did."""
    stub = model_mesh_pb2_grpc.ModelMeshStub(channel)
    # A plain iterator is enough: next() never awaits, so two workers cannot take one entry.
    pending = iter(entries)
    stop = False
    connection_error: grpc.aio.AioRpcError | None = None

    async def worker() -> None:
        nonlocal stop, connection_error
        while not stop and (entry := next(pending, None)) is not None:
            try:
                await stub.registerModel(_register_request(entry, load_now=how.load_now), timeout=how.timeout)
            except grpc.aio.AioRpcError as err:
                outcome.failures.append(RegistrationFailure(entry.model_id, err.code().name, err.details() or ""))
                if not _is_reached(channel):
                    connection_error = connection_error or err
                    stop = True
                stop = stop or how.fail_fast
            else:
                outcome.registered += 1
            how.on_done()

    # A TaskGroup, not gather: if a worker hits a bug, the others are cancelled rather than left running.
    async with asyncio.TaskGroup() as workers:
        for _ in range(min(how.concurrency, len(entries))):
            workers.create_task(worker())
    return connection_error


async def _register_streamed(
    channel: grpc.aio.Channel, entries: Sequence[ModelEntry], outcome: BulkOutcome, how: _BulkSettings
) -> grpc.aio.AioRpcError | None:
    """One registerModels stream: a task writes requests while at most ``how.concurrency`` are
    unanswered; this one reads results and matches them to entries by index. Raises
    ``_NoBulkStream`` when the pod answers UNIMPLEMENTED before any result.

    The first request goes alone and the rest only after its answer: a pod without the stream
    answers UNIMPLEMENTED at once, and writes racing that answer turn it into INTERNAL ("error
    from Core") in grpc.aio, which would hide that the fallback is needed.
    """
    call = model_mesh_pb2_grpc.ModelMeshBulkStub(channel).registerModels()
    window = asyncio.Semaphore(how.concurrency)
    unanswered: dict[int, ModelEntry] = {}
    first_answered = asyncio.Event()
    stop = False

    async def write() -> None:
        try:
            for index, entry in enumerate(entries):
                await window.acquire()
                if index == 1:
                    await first_answered.wait()
                if stop:
                    break
                unanswered[index] = entry
                await call.write(_register_request(entry, load_now=how.load_now))
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call has ended; reading its status below says how

    def fail_unanswered(code: str, message: str) -> None:
        for entry in unanswered.values():
            outcome.failures.append(RegistrationFailure(entry.model_id, code, message))
            how.on_done()
        unanswered.clear()

    writer = asyncio.create_task(write())
    try:
        while True:
            try:
                response = await asyncio.wait_for(call.read(), how.timeout)
            except TimeoutError:
                fail_unanswered("DEADLINE_EXCEEDED", f"no answer from the pod within {how.timeout:g} s")
                return None
            except grpc.aio.AioRpcError as err:
                answered = outcome.registered + len(outcome.failures)
                if err.code() is grpc.StatusCode.UNIMPLEMENTED and answered == 0:
                    raise _NoBulkStream from err
                fail_unanswered(err.code().name, err.details() or "")
                return None if _is_reached(channel) else err
            if response is grpc.aio.EOF:
                break
            for result in response.results:
                entry = unanswered.pop(result.index, None)
                if entry is None:
                    continue  # not a request of ours, or answered twice: nothing to count
                if result.code == 0:
                    outcome.registered += 1
                else:
                    code = _CODE_NAMES.get(result.code, f"UNKNOWN({result.code})")
                    outcome.failures.append(RegistrationFailure(entry.model_id, code, result.message))
                    stop = stop or how.fail_fast
                window.release()
                how.on_done()
            first_answered.set()
        await writer  # finished: the pod ends the stream only after the writer's done_writing
        return None
    finally:
        if not writer.done():
            call.cancel()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)


async def _cmd_register_bulk(channel: grpc.aio.Channel, args: argparse.Namespace) -> int:
    entries = load_bulk_source(args.source, args.type)
    # Auto (None): a bar on a terminal only, so logs and pipes get the summary and nothing else.
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    with tqdm(total=len(entries), unit="model", file=sys.stderr, disable=not show, desc="registering") as bar:
        outcome = await register_many(
            channel,
            entries,
            endpoint=args.endpoint,
            load_now=args.load_now,
            concurrency=args.concurrency,
            fail_fast=args.fail_fast,
            timeout=args.timeout,
            on_done=lambda: bar.update(1),
            unary=args.unary,
        )
    print(format_bulk_summary(outcome))
    return EXIT_OK if outcome.registered == outcome.total else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Entry points and argparse wiring
# ---------------------------------------------------------------------------------------------

# A command: one or a few calls on the channel, printing its result and returning the exit code.
_Command = Callable[[grpc.aio.Channel, argparse.Namespace], Awaitable[int]]


async def run_models_command(args: argparse.Namespace) -> int:
    """Run the parsed ``models`` sub-command against ``args.endpoint``; returns the exit code.

    The one place that turns a gRPC error or an unusable bulk source into a message and a code,
    so no command handles errors itself.
    """
    command: _Command = args.models_command
    try:
        async with _channel(args) as channel:
            try:
                return await command(channel, args)
            except grpc.aio.AioRpcError as err:
                code, details = err.code().name, err.details() or ""
                print(describe_rpc_error(code, details, args.endpoint, reached=_is_reached(channel)), file=sys.stderr)
                return EXIT_FAILED
    except SourceError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """Plaintext, or TLS when ``--ca-cert`` is given (with a client certificate when the pod
    requires one)."""
    if args.ca_cert is None:
        if args.client_cert or args.client_key:
            raise SourceError("--client-cert and --client-key need --ca-cert (TLS)")
        return grpc.aio.insecure_channel(args.endpoint, options=_CHANNEL_OPTIONS)
    if bool(args.client_cert) != bool(args.client_key):
        raise SourceError("give --client-cert and --client-key together")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise SourceError(f"cannot read {path}: {err.strerror or err}") from None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca_cert), private_key=read(args.client_key),
        certificate_chain=read(args.client_cert))
    return grpc.aio.secure_channel(args.endpoint, credentials, options=_CHANNEL_OPTIONS)


def _run_from_cli(args: argparse.Namespace) -> int:
    # modelmesh.cli calls handlers synchronously; each command gets its own event loop.
    return asyncio.run(run_models_command(args))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def add_models_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``models`` and its sub-commands to ``subparsers``; returns the ``models`` parser.

    Each sub-command's handler is ``args.func(args) -> int``, as ``modelmesh.cli.main`` expects.
    """
    # The one read of MM_ENDPOINT: as the flag's default, so --endpoint still wins and --help shows it.
    default_endpoint = os.environ.get("MM_ENDPOINT") or DEFAULT_ENDPOINT
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        metavar="HOST:PORT",
        default=default_endpoint,
        help=f"gRPC endpoint of a mesh pod (env MM_ENDPOINT; default now {default_endpoint})",
    )
    common.add_argument("--ca-cert", metavar="PEM", help="talk TLS to the pod, trusting these certificates")
    common.add_argument("--client-cert", metavar="PEM", help="with --ca-cert: this client certificate (chain)")
    common.add_argument("--client-key", metavar="PEM", help="with --client-cert: its private key")
    common.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        help=f"deadline of each call (default {DEFAULT_TIMEOUT_S:g})",
    )

    models = subparsers.add_parser(
        "models", help="manage the models of a running mesh", description="Operator commands against a mesh pod."
    )
    commands = models.add_subparsers(dest="models_command_name", required=True, metavar="COMMAND")

    def command(name: str, handler: _Command, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        parser.set_defaults(func=_run_from_cli, models_command=handler)
        return parser

    path_help = (
        "where the model is, as the pod sees it: the pod resolves paths on its own machine, so the "
        "file must exist there (same host or a shared volume); a relative path is made absolute "
        "against the current directory here; URIs such as s3://... are passed as they are"
    )

    register = command("register", _cmd_register, "register a model (mmesh.ModelMesh/registerModel)")
    register.add_argument("model_id", metavar="ID")
    register.add_argument("--type", required=True, help="model type, e.g. onnx")
    register.add_argument("--path", required=True, metavar="PATH", help=path_help)
    register.add_argument("--key", help="opaque key passed to the runtime with the model")
    register.add_argument("--load-now", action="store_true", help="start loading it right away")
    register.add_argument("--min-copies", type=int, default=0, metavar="N",
                          help="keep at least N copies loaded, on different pods")
    register.add_argument("--all-pods", action="store_true", help="keep a copy on every pod that may hold it")
    register.add_argument("--pin", action="append", metavar="LABEL",
                          help="only pods with this label (MM_LABELS) may hold it; repeatable")
    register.add_argument(
        "--sync", action="store_true", help="wait until the load has finished (implies --load-now); exit 1 if it failed"
    )

    status = command("status", _cmd_status, "show a model's status, errors and copies; exit 1 if not found")
    status.add_argument("model_id", metavar="ID")

    unregister = command("unregister", _cmd_unregister, "remove a model; a no-op for an unknown id")
    unregister.add_argument("model_id", metavar="ID")

    load = command("load", _cmd_load, "make sure a model is loaded somewhere (ensureLoaded)")
    load.add_argument("model_id", metavar="ID")
    load.add_argument("--sync", action="store_true", help="wait until it is loaded; exit 1 if the load failed")

    list_ = command("list", _cmd_list, "list registered models with their state (RepositoryIndex)")
    list_.add_argument("--ready", action="store_true", help="only models ready to serve")
    list_.add_argument("--json", action="store_true", help="JSON lines {id, state, reason} instead of a table")

    vset = command("vmodel-set", _cmd_vmodel_set,
                   "point a vmodel (a stable name) at a model, creating it or moving it (setVModel)")
    vset.add_argument("vmodel_id", metavar="VMODEL")
    vset.add_argument("model_id", metavar="MODEL", help="the target model")
    vset.add_argument("--path", metavar="PATH", help="register the target model too, from here; " + path_help)
    vset.add_argument("--type", default=DEFAULT_MODEL_TYPE, help="its type, with --path (default onnx)")
    vset.add_argument("--key", help="opaque key passed to the runtime, with --path")
    vset.add_argument("--auto-delete", action="store_true",
                      help="with --path: unregister the model once no vmodel refers to it")
    vset.add_argument("--owner", help="the vmodel's owner: it can then be changed only under this owner")
    vset.add_argument("--expect", metavar="MODEL", help="change it only if its target is this model now")
    vset.add_argument("--update-only", action="store_true", help="fail if the vmodel does not exist")
    vset.add_argument("--load-now", action="store_true", help="load the target right away")
    vset.add_argument("--force", action="store_true",
                      help="make the target active at once, not once it is loaded")
    vset.add_argument("--sync", action="store_true",
                      help="wait until the move (or the load, with --load-now) is done; exit 1 if it failed")

    vstatus = command("vmodel-status", _cmd_vmodel_status,
                      "show a vmodel's active and target models; exit 1 if not found or its move failed")
    vstatus.add_argument("vmodel_id", metavar="VMODEL")
    vstatus.add_argument("--owner", help="only if it has this owner")

    vdelete = command("vmodel-delete", _cmd_vmodel_delete,
                      "delete a vmodel, and its auto-delete models no other vmodel uses; a no-op if absent")
    vdelete.add_argument("vmodel_id", metavar="VMODEL")
    vdelete.add_argument("--owner", help="only if it has this owner")

    bulk = command(
        "register-bulk",
        _cmd_register_bulk,
        "register many models from a folder or a list file; exit 1 if any failed",
    )
    bulk.add_argument(
        "source",
        metavar="SOURCE",
        help="a folder (each *.onnx file directly inside -> id = file stem; each sub-folder holding "
        ".onnx files -> id = folder name) or a list file of JSON lines "
        '{"id", "path", "type"?, "key"?} or "ID PATH [TYPE]" lines (blank lines and # comments '
        "skipped; relative paths taken against the list file's folder). " + path_help.split(";")[0],
    )
    bulk.add_argument("--type", default=DEFAULT_MODEL_TYPE, help="type of entries that name none (default onnx)")
    bulk.add_argument("--load-now", action="store_true", help="start loading each model right away")
    bulk.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        default=DEFAULT_BULK_CONCURRENCY,
        help=f"registrations in flight at once (default {DEFAULT_BULK_CONCURRENCY})",
    )
    bulk.add_argument("--fail-fast", action="store_true", help="stop after the first failure")
    bulk.add_argument(
        "--unary",
        action="store_true",
        help="one registerModel call per model, as KServe ModelMesh's API has it, instead of one "
        "mmesh.ModelMeshBulk stream for all (used anyway when the pod does not serve that stream)",
    )
    bulk.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only when stderr is a terminal)",
    )
    return models


def build_parser() -> argparse.ArgumentParser:
    """A ``modelmesh`` parser holding only ``models``, for embedding and tests."""
    parser = argparse.ArgumentParser(prog="modelmesh")
    add_models_parser(parser.add_subparsers(dest="command", required=True))
    return parser


async def main_async(argv: Sequence[str]) -> int:
    """``modelmesh models ...`` from ``argv`` (starting with "models") in the running event loop."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on bad usage (2) and --help (0); hand back its code like any other outcome.
        return EXIT_OK if exit_.code is None else exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    return await run_models_command(args)


def main(argv: Sequence[str]) -> int:
    """``modelmesh models ...`` from ``argv``, on a new event loop; returns the exit code."""
    return asyncio.run(main_async(argv))
