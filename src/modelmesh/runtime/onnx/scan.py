"""The layout of an ONNX file (node count, initializer bytes), read without loading the model.

Both figures drive memory accounting: ``predictModelSize`` must be cheap and must not read a model's
weights, and a measured size must never fall below the bytes of the weights themselves. A full parse
(``onnx.load``) would read every weight into Python objects, so this walks the protobuf wire format
instead: it reads field tags and tensor headers and seeks over everything else, so a 1 GB model costs a
few kilobytes of reads. Only the top-level graph is walked; subgraphs of If/Loop nodes are not counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["OnnxLayout", "scan_onnx"]

# onnx.TensorProto.DataType -> bytes per element; 4-bit types are counted as half a byte below
_ITEM_BYTES = {
    1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
    17: 1, 18: 1, 19: 1, 20: 1,
}
_HALF_BYTE_TYPES = {21, 22, 23}
_STRING_TYPE = 8

# field numbers, from onnx.proto
_MODEL_GRAPH = 7
_GRAPH_NODE = 1
_GRAPH_INITIALIZER = 5
_GRAPH_SPARSE_INITIALIZER = 15
_TENSOR_DIMS = 1
_TENSOR_DATA_TYPE = 2
_TENSOR_STRING_DATA = 6

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True, slots=True)
class OnnxLayout:
    """What the top-level graph of an ONNX file holds."""

    node_count: int
    # bytes the initializers take once loaded (elements x element size), wherever their data lives
    initializer_bytes: int


class _Fields:
    """Reads the fields of one protobuf message that spans ``[start, end)`` of a file."""

    def __init__(self, file: BinaryIO, start: int, end: int) -> None:
        self._file = file
        self._end = end
        file.seek(start)

    def __iter__(self) -> _Fields:
        return self

    def __next__(self) -> tuple[int, int, int]:
        """(field number, wire type, value): the value of a LEN field is its length, and the
        file is positioned at its first byte; the caller reads it or calls ``skip``."""
        if self._file.tell() >= self._end:
            raise StopIteration
        key = self.varint()
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == _VARINT:
            return number, wire_type, self.varint()
        if wire_type == _LEN:
            length = self.varint()
            if self._file.tell() + length > self._end:
                raise ValueError("field runs past the end of its message")
            return number, wire_type, length
        if wire_type in (_FIXED64, _FIXED32):
            self.skip(8 if wire_type == _FIXED64 else 4)
            return number, wire_type, 0
        raise ValueError(f"unsupported wire type {wire_type}")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            byte = self._file.read(1)
            if not byte:
                raise ValueError("file ends inside a varint")
            value |= (byte[0] & 0x7F) << shift
            if byte[0] < 0x80:
                return value
        raise ValueError("varint longer than 10 bytes")

    def skip(self, length: int) -> None:
        if self._file.tell() + length > self._end:
            raise ValueError("field runs past the end of its message")
        self._file.seek(length, os.SEEK_CUR)


def _tensor_bytes(file: BinaryIO, start: int, length: int) -> int:
    dims: list[int] = []
    data_type = 0
    string_bytes = 0
    fields = _Fields(file, start, start + length)
    for number, wire_type, value in fields:
        if number == _TENSOR_DIMS and wire_type == _VARINT:
            dims.append(value)
        elif number == _TENSOR_DIMS and wire_type == _LEN:
            packed_end = file.tell() + value
            while file.tell() < packed_end:
                dims.append(fields.varint())
        elif number == _TENSOR_DATA_TYPE and wire_type == _VARINT:
            data_type = value
        elif wire_type == _LEN:
            if number == _TENSOR_STRING_DATA:
                string_bytes += value
            fields.skip(value)
    if data_type == _STRING_TYPE:
        return string_bytes
    count = math.prod(dims)
    if data_type in _HALF_BYTE_TYPES:
        return (count + 1) // 2
    return count * _ITEM_BYTES.get(data_type, 0)


def _scan(file: BinaryIO, size: int) -> OnnxLayout:
    nodes = 0
    weights = 0
    graphs = 0
    model = _Fields(file, 0, size)
    for number, wire_type, value in model:
        if wire_type != _LEN:
            continue
        if number != _MODEL_GRAPH:
            model.skip(value)
            continue
        graphs += 1
        graph_start = file.tell()
        graph = _Fields(file, graph_start, graph_start + value)
        for g_number, g_wire_type, g_value in graph:
            if g_wire_type != _LEN:
                continue
            field_start = file.tell()
            if g_number == _GRAPH_NODE:
                nodes += 1
            elif g_number == _GRAPH_INITIALIZER:
                weights += _tensor_bytes(file, field_start, g_value)
            elif g_number == _GRAPH_SPARSE_INITIALIZER:
                # kept sparse once loaded: its encoded size is close to its memory
                weights += g_value
            file.seek(field_start + g_value)
        file.seek(graph_start + value)
    if graphs == 0:
        raise ValueError("no graph in the file")
    return OnnxLayout(node_count=nodes, initializer_bytes=weights)


def scan_onnx(path: str | os.PathLike[str]) -> OnnxLayout:
    """The layout of the ONNX file at ``path``.

    Raises ValueError when the file is not a well-formed ONNX model (the reason in the message) and
    OSError when it cannot be read.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        return _scan(file, size)
