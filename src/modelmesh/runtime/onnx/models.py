"""The table of loaded ONNX models: load, unload, size measurement and inference via onnxruntime.

Transport-neutral: the gRPC servicers in ``server.py`` convert requests to the calls here and back.

Sizes are measured, not guessed (see docs/runtime.md for the figures): a model's size is the growth of
the native heap (glibc ``mallinfo2``: bytes in use in all arenas plus mmapped blocks) across creating
its InferenceSession and one warm-up run, floored at the bytes of its weights. Loads take a lock around
that window so two loads never blur each other's figure. Sessions run without onnxruntime's CPU memory
arena and with one thread each, so a model's memory is its own and goes back to the system on unload.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from modelmesh.errors import InvalidRequest, ModelLoadFailed, ModelNotFound, UpstreamError
from modelmesh.runtime.onnx.scan import OnnxLayout, scan_onnx
from modelmesh.runtime.onnx.tensors import datatype_of, format_shape, numpy_dtype
from modelmesh.settings import RuntimeSettings

__all__ = [
    "MODEL_TYPE",
    "LoadedModel",
    "ModelTable",
    "NativeMemoryMeter",
    "TensorSpec",
    "predict_size",
    "resolve_model_file",
]

log = logging.getLogger(__name__)

MODEL_TYPE = "onnx"
KIB = 1024

# predictModelSize = WEIGHT_FACTOR x max(bytes on disk, weight bytes) + NODE_BYTES x nodes + FIXED_BYTES.
# Measured with onnxruntime 1.32 (docs/runtime.md): a session costs ~75 KiB before any weights, each
# node 3-7 KiB, weights x1.00-1.07 once loaded. The constants leave headroom above all of those.
PREDICT_WEIGHT_FACTOR = 1.25
PREDICT_NODE_BYTES = 8 * KIB
PREDICT_FIXED_BYTES = 128 * KIB
# keeps a prediction from garbage files inside the uint64 of the reply
_PREDICT_CAP = 1 << 62

# A hop to the inference pool and back costs ~200 us on a 2-vCPU VM (measured, docs/runtime.md),
# while a tiny model runs in ~7 us: a call predicted to run within this budget runs on the event loop,
# which it then blocks for less time than the hop would have cost.
INLINE_BUDGET_S = 100e-6
# weight of the newest run in a model's smoothed cost per input byte
_RUN_COST_ALPHA = 0.2

_ONNX_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """An input or output of a model; ``-1`` marks a dimension of variable size."""

    name: str
    # v2 datatype, or "" when the ONNX type has none (sequences, maps, exotic element types)
    datatype: str
    shape: tuple[int, ...]
    onnx_type: str

    def describe(self) -> str:
        """``FP32 with shape [-1, 64]``: how messages name what a model expects."""
        return f"{self.datatype or self.onnx_type} with shape {format_shape(self.shape)}"

    def accepts(self, array: np.ndarray) -> bool:
        if datatype_of(array.dtype) != self.datatype or array.ndim != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, array.shape, strict=True))


def _spec(arg: Any) -> TensorSpec:
    # onnxruntime gives a symbolic dimension as a str and an unknown one as None
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, _ONNX_TO_V2.get(arg.type, ""), shape, arg.type)


class RunCost:
    """How long a model's runs take per input byte, smoothed over recent runs.

    Linear in the input size: for the small requests tiny models get, a fixed per-run cost makes
    this overestimate larger requests, which errs towards the thread pool. Unknown (infinite) until
    a first run is timed.
    """

    __slots__ = ("seconds_per_byte",)

    def __init__(self) -> None:
        self.seconds_per_byte = math.inf

    def predict(self, input_bytes: int) -> float:
        return self.seconds_per_byte * max(input_bytes, 1)

    def observe(self, seconds: float, input_bytes: int) -> None:
        sample = seconds / max(input_bytes, 1)
        if math.isinf(self.seconds_per_byte):
            self.seconds_per_byte = sample
        else:
            self.seconds_per_byte += _RUN_COST_ALPHA * (sample - self.seconds_per_byte)


@dataclass(slots=True)
class LoadedModel:
    """A model ready to serve."""

    model_id: str
    path: Path
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    size_bytes: int
    run_cost: RunCost = field(default_factory=RunCost)

    def output(self, name: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.name == name), None)


def _timed_run(
    session: ort.InferenceSession, names: Sequence[str], feed: Mapping[str, np.ndarray]
) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    results = session.run(names, feed)
    return results, time.perf_counter() - started


class NativeMemoryMeter:
    """Bytes of native heap in use in this process.

    glibc's ``mallinfo2`` counts bytes handed out by malloc in every arena plus mmapped blocks, which
    is what an onnxruntime session allocates with its arena off; freed memory that malloc keeps for
    reuse does not count. Where it is missing (musl, macOS) the process RSS is used, which also counts
    pages malloc has not returned and so errs high.
    """

    class _MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                         "uordblks", "fordblks", "keepcost")
        ]

    # mallopt parameter number of M_MMAP_THRESHOLD in glibc's malloc.h
    _M_MMAP_THRESHOLD = -3

    def __init__(self) -> None:
        self._libc: Any = None
        self._process = psutil.Process()
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            if libc is not None and hasattr(libc, "mallinfo2"):
                libc.mallinfo2.restype = self._MallInfo2
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                self._libc = libc
        except OSError:
            self._libc = None

    @property
    def method(self) -> str:
        return "mallinfo2" if self._libc is not None else "rss"

    def in_use(self) -> int:
        if self._libc is None:
            return int(self._process.memory_info().rss)
        info = self._libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def fix_mmap_threshold(self, threshold: int = 128 * KIB) -> None:
        """Serve every block of ``threshold`` bytes or more by mmap, so freeing it returns it.

        glibc raises the threshold after the first large free, after which a model's weights land
        in the heap between small blocks and are not given back when the model unloads: measured,
        50 models of 1 MiB grew RSS by 101 MiB instead of 54 MiB. Fixing the threshold stops that.
        """
        if self._libc is not None:
            self._libc.mallopt(self._M_MMAP_THRESHOLD, threshold)

    def release_free_memory(self) -> None:
        """Give freed heap pages back to the system (after an unload)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)


def resolve_model_file(model_path: str) -> Path:
    """The ``.onnx`` file of a model: the path itself, or the one ``.onnx`` file under a folder."""
    if not model_path:
        raise InvalidRequest("modelPath is empty; expected a .onnx file or a folder holding one")
    path = Path(model_path)
    try:
        if path.is_file():
            return path
        if not path.exists():
            raise ModelLoadFailed(f"model path '{model_path}' does not exist")
        if not path.is_dir():
            raise InvalidRequest(f"model path '{model_path}' is neither a file nor a folder")
        found = sorted(p for p in path.rglob("*.onnx") if p.is_file())
    except OSError as err:
        raise ModelLoadFailed(f"cannot read model path '{model_path}': {err.strerror or err}") from err
    if not found:
        raise InvalidRequest(f"model folder '{model_path}' holds no .onnx file")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(path)) for p in found[:5])
        more = ", ..." if len(found) > 5 else ""
        raise InvalidRequest(
            f"model folder '{model_path}' holds {len(found)} .onnx files ({names}{more}); "
            "expected exactly one"
        )
    return found[0]


def _check_type(model_type: str) -> None:
    if model_type.lower() != MODEL_TYPE:
        raise InvalidRequest(
            f"model type '{model_type}' is not supported by this runtime; it serves type '{MODEL_TYPE}'"
        )


def _disk_bytes(model_path: str, model_file: Path) -> int:
    # a folder's other files may be external weights, so all of them count
    root = Path(model_path)
    if root.is_dir():
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return model_file.stat().st_size


def predict_size(model_type: str, model_path: str) -> int:
    """A cheap, conservative size for a model not yet loaded, from its file's layout.

    Reads field headers only (``scan.py``), never the weights. A file that does not scan gets the
    on-disk estimate alone: its load will fail anyway and say why.
    """
    _check_type(model_type)
    model_file = resolve_model_file(model_path)
    try:
        disk = _disk_bytes(model_path, model_file)
    except OSError as err:
        raise ModelLoadFailed(f"cannot read model path '{model_path}': {err.strerror or err}") from err
    try:
        layout = scan_onnx(model_file)
    except (ValueError, OSError):
        layout = OnnxLayout(node_count=0, initializer_bytes=0)
    predicted = (
        math.ceil(PREDICT_WEIGHT_FACTOR * max(disk, layout.initializer_bytes))
        + PREDICT_NODE_BYTES * layout.node_count
        + PREDICT_FIXED_BYTES
    )
    return min(predicted, _PREDICT_CAP)


def _proto_field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: a varint for an int, length-delimited otherwise."""

    def varint(v: int) -> bytes:
        out = bytearray()
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
        return bytes(out)

    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def _primer_model() -> bytes:
    """``y = Identity(x)``, x and y FP32 [1], as ONNX bytes (IR 8, opset 17).

    Encoded here rather than with the onnx package, which the runtime process does not import.
    """
    f = _proto_field
    # ValueInfoProto{name, type: TypeProto{tensor_type{elem_type FLOAT, shape{dim{dim_value 1}}}}}
    tensor_type = f(1, f(1, 1) + f(2, f(1, f(1, 1))))
    graph = (
        f(1, f(1, "x") + f(2, "y") + f(4, "Identity"))
        + f(2, "primer")
        + f(11, f(1, "x") + f(2, tensor_type))
        + f(12, f(1, "y") + f(2, tensor_type))
    )
    return f(1, 8) + f(7, graph) + f(8, f(2, 17))


def _warm_up_feed(inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray] | None:
    feed = {}
    for spec in inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            feed[spec.name] = np.full(shape, "", dtype=object)
        elif spec.datatype in ("", "BF16"):
            return None
        else:
            feed[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
    return feed


# onnxruntime's exception classes share no base class beyond Exception
_ORT_RUN_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(ort_state, name)
    for name in ("Fail", "RuntimeException", "EngineError", "NotImplemented", "EPFail")
    if hasattr(ort_state, name)
)


@dataclass(slots=True, eq=False)
class _PendingLoad:
    task: asyncio.Task[LoadedModel] | None = None
    # set by unload: the load must not leave the model loaded
    unload_requested: bool = False
    # the session is being built in a thread, which cannot be interrupted
    building: bool = False


class ModelTable:
    """Loaded models by id, with shared concurrent loads and idempotent unloads.

    All methods are called from one event loop; sessions are built and run in thread pools.
    """

    def __init__(self, settings: RuntimeSettings, meter: NativeMemoryMeter | None = None) -> None:
        self._settings = settings
        self._meter = meter or NativeMemoryMeter()
        self._models: dict[str, LoadedModel] = {}
        self._loads: dict[str, _PendingLoad] = {}
        self._load_slots = asyncio.Semaphore(settings.max_loading_concurrency)
        self._measure_lock = threading.Lock()
        self._load_pool = ThreadPoolExecutor(
            settings.max_loading_concurrency, thread_name_prefix="onnx-load"
        )
        self._infer_pool = ThreadPoolExecutor(
            settings.inference_threads, thread_name_prefix="onnx-infer"
        )
        if settings.capacity_bytes is not None:
            self.capacity_bytes = settings.capacity_bytes
        else:
            available = psutil.virtual_memory().available
            self.capacity_bytes = int(settings.memory_share * available)

    @property
    def meter(self) -> NativeMemoryMeter:
        return self._meter

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model ``model_id``; ModelNotFound when it is not loaded (yet)."""
        model = self._models.get(model_id)
        if model is None:
            raise ModelNotFound(f"model '{model_id}' is not loaded")
        return model

    def size(self, model_id: str) -> int:
        return self.get(model_id).size_bytes

    def prime(self) -> None:
        """Pay onnxruntime's one-off costs (its environment, kernel registries: ~1.4 MB measured)
        now, so they are not counted in the size of the first model loaded. Blocking."""
        session = ort.InferenceSession(
            _primer_model(), self._session_options(), providers=["CPUExecutionProvider"]
        )
        session.run(None, {"x": np.zeros(1, dtype=np.float32)})

    def purge(self) -> None:
        """Forget every model (the SPI asks a runtime to start empty before it reports READY)."""
        self._models.clear()

    async def load(self, model_id: str, model_type: str, model_path: str) -> int:
        """Load a model and return its measured size in bytes.

        Idempotent: a loaded model returns its size at once; concurrent calls for one id share one
        load. A caller that is cancelled leaves the load running for the others (and for an unload
        that follows). The first call's type and path win.
        """
        if not model_id:
            raise InvalidRequest("modelId is empty")
        loaded = self._models.get(model_id)
        if loaded is not None:
            return loaded.size_bytes
        pending = self._loads.get(model_id)
        if pending is None:
            _check_type(model_type)
            pending = _PendingLoad()
            pending.task = asyncio.create_task(
                self._load(model_id, model_path, pending), name=f"load {model_id}"
            )
            # the outcome goes to the waiters; with none left it must not be reported as unretrieved
            pending.task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._loads[model_id] = pending
        task = pending.task
        assert task is not None
        try:
            model = await asyncio.shield(task)
        except asyncio.CancelledError:
            # the load itself was cancelled, by an unload, not this caller
            if task.cancelled() and pending.unload_requested:
                raise ModelLoadFailed(f"model '{model_id}' was unloaded while it was loading") from None
            raise
        return model.size_bytes

    async def _load(self, model_id: str, model_path: str, pending: _PendingLoad) -> LoadedModel:
        loop = asyncio.get_running_loop()
        try:
            async with self._load_slots:
                pending.building = True
                model = await loop.run_in_executor(
                    self._load_pool, self._build, model_id, model_path
                )
        finally:
            if self._loads.get(model_id) is pending:
                del self._loads[model_id]
        if pending.unload_requested:
            del model
            await self._release_free_memory()
            raise ModelLoadFailed(f"model '{model_id}' was unloaded while it was loading")
        self._models[model_id] = model
        log.info("loaded model %s from %s: %d bytes", model_id, model.path, model.size_bytes)
        return model

    async def unload(self, model_id: str) -> None:
        """Unload a model; nothing to do when it is not loaded.

        An unload during a load makes that load fail and returns once its session is freed: a load
        still queued is cancelled, one being built is waited for (a thread cannot be interrupted).
        """
        model = self._models.pop(model_id, None)
        pending = self._loads.pop(model_id, None)
        if pending is not None and pending.task is not None:
            pending.unload_requested = True
            if not pending.building:
                pending.task.cancel()
            await asyncio.wait([pending.task])
        if model is not None:
            size = model.size_bytes
            # the session is freed with its last reference; an inference in flight holds one and
            # frees it when it ends
            del model
            await self._release_free_memory()
            log.info("unloaded model %s (%d bytes)", model_id, size)

    async def _release_free_memory(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._load_pool, self._meter.release_free_memory
        )

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        # thousands of sessions must not each own thread pools; requests run in our executor
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        # the arena would keep freed blocks per session and reserve memory it never touches,
        # inflating measured sizes ~13x for small models and keeping memory after unload
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3
        return options

    def _build(self, model_id: str, model_path: str) -> LoadedModel:
        """Create the session of a model and measure its size (runs in a load thread)."""
        model_file = resolve_model_file(model_path)
        try:
            weights = scan_onnx(model_file).initializer_bytes
        except ValueError:
            weights = 0  # onnxruntime gives the better reason below
        except OSError as err:
            raise ModelLoadFailed(
                f"cannot read model file '{model_file}': {err.strerror or err}"
            ) from err
        with self._measure_lock:
            before = self._meter.in_use()
            try:
                session = ort.InferenceSession(
                    str(model_file), self._session_options(), providers=["CPUExecutionProvider"]
                )
            except Exception as err:  # onnxruntime raises its own classes, all of them reasons
                raise InvalidRequest(
                    f"model '{model_id}': onnxruntime cannot load '{model_file}': {err}"
                ) from err
            inputs = tuple(_spec(i) for i in session.get_inputs())
            outputs = tuple(_spec(o) for o in session.get_outputs())
            feed = _warm_up_feed(inputs)
            warmed_up = self._warm_up(model_id, session, feed)
            measured = self._meter.in_use() - before
        for spec in inputs:
            if spec.datatype in ("", "BF16"):
                raise InvalidRequest(
                    f"model '{model_id}' input '{spec.name}' has type {spec.onnx_type}, which "
                    "this runtime cannot feed (BF16, sequences and maps are not supported)"
                )
        model = LoadedModel(model_id, model_file, session, inputs, outputs, max(measured, weights))
        if warmed_up and feed is not None:
            # the first run pays one-off allocations; the second is what requests will see
            _, seconds = _timed_run(session, [o.name for o in outputs], feed)
            model.run_cost.observe(seconds, sum(a.nbytes for a in feed.values()))
        return model

    @staticmethod
    def _warm_up(
        model_id: str, session: ort.InferenceSession, feed: Mapping[str, np.ndarray] | None
    ) -> bool:
        # the first run allocates kernel state that stays with the session; zeros with variable
        # dimensions at 1 are a guess, so a model that rejects them still loads
        if feed is None:
            return False
        try:
            session.run(None, feed)
        except Exception as err:  # noqa: BLE001 - any failure only skips the warm-up
            log.debug("model %s: warm-up run failed, size excludes it: %s", model_id, err)
            return False
        return True

    async def infer(
        self, model: LoadedModel, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> list[tuple[str, np.ndarray]]:
        """Run ``model`` on ``inputs``; return the requested outputs (all when none are named)."""
        feed = self._feed(model, inputs)
        specs = self._requested_outputs(model, output_names)
        names = [s.name for s in specs]
        input_bytes = sum(a.nbytes for a in feed.values())
        run = functools.partial(_timed_run, model.session, names, feed)
        try:
            if model.run_cost.predict(input_bytes) <= INLINE_BUDGET_S:
                results, seconds = run()
            else:
                loop = asyncio.get_running_loop()
                results, seconds = await loop.run_in_executor(self._infer_pool, run)
        except ort_state.InvalidArgument as err:
            raise InvalidRequest(f"model '{model.model_id}': {err}") from err
        except _ORT_RUN_ERRORS as err:
            # onnxruntime is this runtime's upstream; its reason is more use than a generic one
            raise UpstreamError("INTERNAL", f"model '{model.model_id}' failed: {err}") from err
        model.run_cost.observe(seconds, input_bytes)
        return list(zip(names, results, strict=True))

    @staticmethod
    def _feed(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {s.name: s for s in model.inputs}
        for name in inputs:
            if name not in expected:
                listing = "; ".join(f"'{s.name}' {s.describe()}" for s in model.inputs)
                raise InvalidRequest(
                    f"model '{model.model_id}' has no input '{name}'; its inputs are: {listing}"
                )
        feed = {}
        for spec in model.inputs:
            array = inputs.get(spec.name)
            if array is None:
                raise InvalidRequest(
                    f"model '{model.model_id}' input '{spec.name}' is missing: expected {spec.describe()}"
                )
            if not spec.accepts(array):
                raise InvalidRequest(
                    f"model '{model.model_id}' input '{spec.name}': expected {spec.describe()}, "
                    f"got {datatype_of(array.dtype)} {format_shape(array.shape)}"
                )
            feed[spec.name] = _strings(model, spec, array) if spec.datatype == "BYTES" else array
        return feed

    @staticmethod
    def _requested_outputs(model: LoadedModel, output_names: Sequence[str]) -> list[TensorSpec]:
        if not output_names:
            # outputs v2 cannot carry (sequences, maps) are left out unless asked for by name
            return [o for o in model.outputs if o.datatype not in ("", "BF16")]
        specs = []
        for name in output_names:
            spec = model.output(name)
            if spec is None:
                listing = ", ".join(f"'{o.name}'" for o in model.outputs)
                raise InvalidRequest(
                    f"model '{model.model_id}' has no output '{name}'; its outputs are: {listing}"
                )
            if spec in specs:
                raise InvalidRequest(f"model '{model.model_id}' output '{name}' is requested twice")
            if spec.datatype in ("", "BF16"):
                raise InvalidRequest(
                    f"model '{model.model_id}' output '{name}' has type {spec.onnx_type}, "
                    "which KServe v2 tensors cannot carry"
                )
            specs.append(spec)
        return specs

    async def close(self) -> None:
        """Cancel queued loads, wait for the pools and drop every model."""
        for pending in list(self._loads.values()):
            if pending.task is not None and not pending.building:
                pending.task.cancel()
        tasks = [p.task for p in self._loads.values() if p.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        self._models.clear()
        await asyncio.to_thread(self._load_pool.shutdown)
        await asyncio.to_thread(self._infer_pool.shutdown)


def _strings(model: LoadedModel, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    # onnxruntime takes str elements for tensor(string); bytes would be fed as their repr
    out = np.empty(array.shape, dtype=object)
    try:
        for index, element in np.ndenumerate(array):
            out[index] = element.decode("utf-8") if isinstance(element, bytes) else str(element)
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"model '{model.model_id}' input '{spec.name}': elements must be UTF-8 for an ONNX string"
        ) from None
    return out
