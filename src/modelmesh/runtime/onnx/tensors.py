"""KServe v2 tensors <-> numpy arrays, for both wire forms of tensor data.

A v2 request carries each input's data either in ``InferInputTensor.contents`` (typed repeated fields)
or, for all inputs at once, in ``raw_input_contents`` (one little-endian byte string per input, in the
order of ``inputs``). BYTES elements in the raw form are each a 4-byte little-endian length followed by
that many bytes. FP16 has no typed field, so it only travels raw; BF16 has no numpy type and is
refused.

Arrays of datatype BYTES are numpy ``object`` arrays whose elements are ``bytes``.

Errors are ``InvalidRequest`` whose message names the tensor (``input 'x': ...``), prefixed by the
caller's ``label`` (e.g. ``model 'demo-0001'``) so the client learns which model and input is wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from modelmesh.errors import InvalidRequest
from modelmesh.proto import grpc_predict_v2_pb2 as pb

__all__ = [
    "DATATYPES",
    "datatype_of",
    "decode_bytes_elements",
    "decode_input",
    "decode_inputs",
    "element_count",
    "encode_bytes_elements",
    "encode_outputs",
    "format_shape",
    "numpy_dtype",
]


@dataclass(frozen=True, slots=True)
class _Datatype:
    # little-endian numpy dtype: the byte order of the raw form on any host
    dtype: np.dtype
    # field of InferTensorContents holding this datatype, None when it only travels raw
    contents_field: str | None


DATATYPES: dict[str, _Datatype] = {
    "BOOL": _Datatype(np.dtype(np.bool_), "bool_contents"),
    "UINT8": _Datatype(np.dtype("<u1"), "uint_contents"),
    "UINT16": _Datatype(np.dtype("<u2"), "uint_contents"),
    "UINT32": _Datatype(np.dtype("<u4"), "uint_contents"),
    "UINT64": _Datatype(np.dtype("<u8"), "uint64_contents"),
    "INT8": _Datatype(np.dtype("<i1"), "int_contents"),
    "INT16": _Datatype(np.dtype("<i2"), "int_contents"),
    "INT32": _Datatype(np.dtype("<i4"), "int_contents"),
    "INT64": _Datatype(np.dtype("<i8"), "int64_contents"),
    "FP16": _Datatype(np.dtype("<f2"), None),
    "FP32": _Datatype(np.dtype("<f4"), "fp32_contents"),
    "FP64": _Datatype(np.dtype("<f8"), "fp64_contents"),
    "BYTES": _Datatype(np.dtype(object), "bytes_contents"),
}
"""The v2 datatypes this module converts, with their numpy dtype and ``contents`` field."""

_BY_KIND = {(dt.dtype.kind, dt.dtype.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"}
_LENGTH = struct.Struct("<I")


def _where(label: str, what: str) -> str:
    return f"{label} {what}" if label else what


def format_shape(shape: Iterable[int]) -> str:
    """``[1, 64]``: the shape as users write it in messages."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a v2 datatype; InvalidRequest for BF16 and unknown names."""
    try:
        return DATATYPES[datatype].dtype
    except KeyError:
        if datatype == "BF16":
            raise InvalidRequest("datatype BF16 is not supported (numpy has no bfloat16)") from None
        raise InvalidRequest(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype: str, bytes and object arrays are BYTES."""
    if dtype.kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get((dtype.kind, dtype.itemsize))
    if name is None:
        raise InvalidRequest(f"numpy dtype {dtype} has no KServe v2 datatype")
    return name


def element_count(shape: Sequence[int], *, label: str = "") -> int:
    """Number of elements of ``shape``; InvalidRequest when a dimension is negative."""
    if any(d < 0 for d in shape):
        raise InvalidRequest(_where(label, f"shape {format_shape(shape)} has a negative dimension"))
    return math.prod(shape)


def encode_bytes_elements(elements: Iterable[bytes | str]) -> bytes:
    """The raw form of BYTES elements: each as a 4-byte little-endian length, then its bytes."""
    parts = []
    for element in elements:
        data = element.encode() if isinstance(element, str) else bytes(element)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_bytes_elements(raw: bytes, count: int, *, label: str = "") -> np.ndarray:
    """Split the raw form of ``count`` BYTES elements into a 1-D object array of bytes.

    InvalidRequest when the buffer ends inside an element or holds more than ``count`` elements.
    """
    if count * _LENGTH.size > len(raw):
        # checked before allocating: a huge shape must not allocate a huge array
        raise InvalidRequest(
            _where(label, f"BYTES raw contents of {len(raw)} bytes cannot hold {count} elements")
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidRequest(
                _where(label, f"BYTES raw contents end after {i} of {count} elements")
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidRequest(
                _where(label, f"BYTES element {i} claims {length} bytes but only "
                       f"{len(view) - offset} remain in the raw contents")
            )
        out[i] = bytes(view[offset:offset + length])
        offset += length
    if offset != len(view):
        raise InvalidRequest(
            _where(label, f"BYTES raw contents hold {len(view) - offset} bytes after the "
                   f"{count} elements of the shape")
        )
    return out


def _dtype_at(datatype: str, where: str) -> np.dtype:
    try:
        return numpy_dtype(datatype)
    except InvalidRequest as err:
        raise InvalidRequest(f"{where} {err.message}") from None


def decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None = None, *, label: str = ""
) -> np.ndarray:
    """The numpy array of one input, from ``raw`` when given, else from its ``contents``."""
    where = _where(label, f"input '{tensor.name}':")
    dtype = _dtype_at(tensor.datatype, where)
    shape = tuple(tensor.shape)
    count = element_count(shape, label=where)
    datatype = DATATYPES[tensor.datatype]
    if raw is not None:
        if tensor.datatype == "BYTES":
            return decode_bytes_elements(raw, count, label=where).reshape(shape)
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidRequest(
                f"{where} {tensor.datatype} {format_shape(shape)} needs {expected} bytes of raw "
                f"contents, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype.contents_field is None:
        raise InvalidRequest(
            f"{where} {tensor.datatype} has no contents field; send it in raw_input_contents"
        )
    values = getattr(tensor.contents, datatype.contents_field)
    if len(values) != count:
        raise InvalidRequest(
            f"{where} {tensor.datatype} {format_shape(shape)} needs {count} values in "
            f"contents.{datatype.contents_field}, got {len(values)}"
        )
    if tensor.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidRequest(f"{where} a value is out of range for {tensor.datatype}") from None


def decode_inputs(
    request: pb.ModelInferRequest, *, label: str = ""
) -> tuple[dict[str, np.ndarray], bool]:
    """All inputs of a request by name, and whether the request used the raw form.

    The raw form must give one entry per input and then no input may also carry ``contents``.
    """
    raw_form = len(request.raw_input_contents) > 0
    if raw_form and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidRequest(
            _where(label, f"request has {len(request.inputs)} inputs but "
                   f"{len(request.raw_input_contents)} raw_input_contents; expected one per input")
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidRequest(_where(label, f"input '{tensor.name}' is given twice"))
        if raw_form and tensor.HasField("contents"):
            raise InvalidRequest(
                _where(label, f"input '{tensor.name}' has contents although the request uses "
                       "raw_input_contents; use one form for all inputs")
            )
        raw = request.raw_input_contents[i] if raw_form else None
        inputs[tensor.name] = decode_input(tensor, raw, label=label)
    return inputs, raw_form


def encode_outputs(
    response: pb.ModelInferResponse, outputs: Sequence[tuple[str, np.ndarray]], *, raw: bool
) -> None:
    """Append ``outputs`` to ``response``, in the raw form when ``raw``, else in ``contents``.

    An FP16 output has no contents field and v2 does not mix the two forms in one response, so any
    FP16 output puts every output in the raw form.
    """
    datatypes = [datatype_of(array.dtype) for _, array in outputs]
    raw = raw or any(DATATYPES[d].contents_field is None for d in datatypes)
    for (name, array), datatype in zip(outputs, datatypes, strict=True):
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            if raw:
                response.raw_output_contents.append(encode_bytes_elements(array.ravel()))
            else:
                tensor.contents.bytes_contents.extend(
                    e.encode() if isinstance(e, str) else bytes(e) for e in array.ravel()
                )
        elif raw:
            little = np.ascontiguousarray(array, dtype=DATATYPES[datatype].dtype)
            response.raw_output_contents.append(little.tobytes())
        else:
            field = DATATYPES[datatype].contents_field
            getattr(tensor.contents, field).extend(array.ravel().tolist())
