"""Which model a data-plane request is for, read from headers and the first bytes of the body.

Rules (ARCHITECTURE.md, as in KServe ModelMesh):
1. header ``mm-model-id`` (or ``mm-model-id-bin``) names a concrete model;
2. else header ``mm-vmodel-id`` (or ``mm-vmodel-id-bin``) names a vmodel;
3. else field 1 of the request (``model_name`` of ModelInfer, ``name`` of ModelMetadata/ModelReady),
   looked up first as a vmodel id, then as a model id.
Giving both a model and a vmodel header is an error.

The body is not decoded: ``read_string_field`` walks the protobuf wire format to field 1 and stops,
so a 10 MB tensor costs no more to route than an empty one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from modelmesh.errors import InvalidRequest

MODEL_ID_HEADER = "mm-model-id"
VMODEL_ID_HEADER = "mm-vmodel-id"
# set on pod-to-pod hops so a forwarded request is served where it lands, never forwarded again
HOP_HEADER = "mm-forwarded"
# a cheap data-plane call that any KServe v2 runtime answers only with the model loaded: the mesh
# sends it to load a model on the pod placement picks (ensureLoaded, repository load)
MODEL_METADATA_METHOD = "/inference.GRPCInferenceService/ModelMetadata"

# on a pod-to-pod ModelMetadata: a load ahead of need (proactive loading), with the model's last use
# (ms) for the copy's eviction order; only a pod sets it, so it is dropped from callers' headers
LOAD_AHEAD_HEADER = "mm-load-ahead"

# "true" from a client that spreads its own load: prefer the pod it called (ModelMesh's header)
BALANCED_HEADER = "mm-balanced"

# headers the mesh owns or gRPC manages; never forwarded from a caller
_DROPPED_PREFIXES = ("grpc-", "mm-")
_DROPPED = frozenset({"content-type", "user-agent", "te", ":authority"})


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """What a request names: an id, and whether it is known to be a vmodel, a model, or either."""

    id: str
    kind: str  # "model", "vmodel" or "any" (from the body: vmodel first, then model)
    # another pod sent it here: serve it here
    forwarded: bool = False
    # the client asked to be served by the pod it called when that pod has a copy
    prefer_local: bool = False


def _header_value(value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("routing header is not valid UTF-8") from None
    return value


def resolve_target(metadata: Iterable[tuple[str, str | bytes]], body: bytes) -> RouteTarget:
    """Apply the routing rules to a request's headers and serialized body."""
    model_id = vmodel_id = None
    forwarded = prefer_local = False
    for key, value in metadata:
        if not key.startswith("mm-"):
            continue
        if key == MODEL_ID_HEADER or key == MODEL_ID_HEADER + "-bin":
            model_id = _header_value(value)
        elif key == VMODEL_ID_HEADER or key == VMODEL_ID_HEADER + "-bin":
            vmodel_id = _header_value(value)
        elif key == HOP_HEADER:
            forwarded = True
        elif key == BALANCED_HEADER:
            prefer_local = value in ("true", b"true")
    if model_id is not None and vmodel_id is not None:
        raise InvalidRequest(f"give either {MODEL_ID_HEADER} or {VMODEL_ID_HEADER}, not both")
    if model_id is not None:
        if not model_id:
            raise InvalidRequest(f"header {MODEL_ID_HEADER} is empty")
        return RouteTarget(model_id, "model", forwarded, prefer_local)
    if vmodel_id is not None:
        if not vmodel_id:
            raise InvalidRequest(f"header {VMODEL_ID_HEADER} is empty")
        return RouteTarget(vmodel_id, "vmodel", forwarded, prefer_local)
    name = read_string_field(body, 1)
    if not name:
        raise InvalidRequest(
            f"no model named: set the request's model name or the {MODEL_ID_HEADER} header"
        )
    return RouteTarget(name, "any", forwarded, prefer_local)


def forwarded_metadata(
    metadata: Iterable[tuple[str, str | bytes]], model_id: str
) -> list[tuple[str, str | bytes]]:
    """The caller's headers minus the mesh's and gRPC's own, plus ``mm-model-id``."""
    out: list[tuple[str, str | bytes]] = [
        (k, v) for k, v in metadata if k not in _DROPPED and not k.startswith(_DROPPED_PREFIXES)
    ]
    out.append((MODEL_ID_HEADER, model_id))
    return out


def encode_string_field(field_number: int, value: str) -> bytes:
    """A serialized message holding just one string field (e.g. ModelMetadataRequest.name)."""
    raw = value.encode()
    out = bytearray([(field_number << 3) | 2])
    n = len(raw)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + raw


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise InvalidRequest("malformed request: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidRequest("malformed request: varint too long")


def read_string_field(buf: bytes, field_number: int) -> str:
    """The last value of string field ``field_number`` at the top level of a serialized message
    ("" when absent), skipping other fields without decoding them. Protobuf's rule is that the
    last occurrence of a singular field wins, so the whole top level is walked; nested messages and
    tensor bytes are skipped by their length prefix."""
    pos, end, found = 0, len(buf), None
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise InvalidRequest("malformed request: field number 0")
        if wire_type == 2:  # length-delimited
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise InvalidRequest("malformed request: field runs past the end of the message")
            if number == field_number:
                found = buf[pos : pos + length]
            pos += length
        elif wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise InvalidRequest(f"malformed request: unsupported wire type {wire_type}")
    if pos > end:
        raise InvalidRequest("malformed request: truncated field")
    if found is None:
        return ""
    try:
        return found.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("malformed request: model name is not valid UTF-8") from None
