"""KServe v2 tensors <-> numpy: every datatype in both wire forms, and the errors a client can cause."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from modelmesh.errors import InvalidRequest
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.runtime.onnx import tensors

SHAPE = (2, 3)

SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([[0, 1, 255], [7, 8, 9]], dtype=np.uint8),
    "UINT16": np.array([[0, 1, 65535], [7, 8, 9]], dtype=np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1], [7, 8, 9]], dtype=np.uint32),
    "UINT64": np.array([[0, 1, 2**64 - 1], [7, 8, 9]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127], [7, -8, 9]], dtype=np.int8),
    "INT16": np.array([[-32768, 0, 32767], [7, -8, 9]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1], [7, -8, 9]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1], [7, -8, 9]], dtype=np.int64),
    "FP16": np.array([[0.5, -1.0, 65504.0], [1e-3, 2.0, -0.0]], dtype=np.float16),
    "FP32": np.array([[0.5, -1.0, 3.4e38], [1e-30, 2.0, -0.0]], dtype=np.float32),
    "FP64": np.array([[0.5, -1.0, 1.7e308], [1e-300, 2.0, -0.0]], dtype=np.float64),
    "BYTES": np.array([[b"", b"a", b"\x00\xff"], [b"hello", "é".encode(), b"x" * 300]], dtype=object),
}
CONTENTS_TYPES = [d for d in SAMPLES if d != "FP16"]


def _request(datatype: str, array: np.ndarray, *, raw: bool) -> pb.ModelInferRequest:
    """A request with one input ``t``, encoded the way a client would (independently of tensors.py)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype=datatype, shape=array.shape)
    request = pb.ModelInferRequest(model_name="m", inputs=[tensor])
    flat = array.ravel()
    if raw:
        if datatype == "BYTES":
            request.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e for e in flat))
        else:
            request.raw_input_contents.append(flat.astype(array.dtype.newbyteorder("<")).tobytes())
    else:
        field = tensors.DATATYPES[datatype].contents_field
        getattr(request.inputs[0].contents, field).extend(flat.tolist())
    return request


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_raw_round_trip(datatype: str) -> None:
    array = SAMPLES[datatype]
    inputs, raw = tensors.decode_inputs(_request(datatype, array, raw=True))
    assert raw is True
    _assert_same(inputs["t"], array)

    response = pb.ModelInferResponse()
    tensors.encode_outputs(response, [("t", inputs["t"])], raw=True)
    out = response.outputs[0]
    assert (out.name, out.datatype, tuple(out.shape)) == ("t", datatype, SHAPE)
    assert not out.HasField("contents")
    again = pb.ModelInferRequest(inputs=[pb.ModelInferRequest.InferInputTensor(
        name="t", datatype=out.datatype, shape=out.shape)], raw_input_contents=response.raw_output_contents)
    _assert_same(tensors.decode_inputs(again)[0]["t"], array)


@pytest.mark.parametrize("datatype", CONTENTS_TYPES)
def test_contents_round_trip(datatype: str) -> None:
    array = SAMPLES[datatype]
    inputs, raw = tensors.decode_inputs(_request(datatype, array, raw=False))
    assert raw is False
    _assert_same(inputs["t"], array)

    response = pb.ModelInferResponse()
    tensors.encode_outputs(response, [("t", inputs["t"])], raw=False)
    assert not response.raw_output_contents
    out = response.outputs[0]
    assert out.datatype == datatype
    field = tensors.DATATYPES[datatype].contents_field
    assert list(getattr(out.contents, field)) == array.ravel().tolist()


def test_bytes_raw_form_is_length_prefixed_little_endian() -> None:
    assert tensors.encode_bytes_elements([b"ab", "é", b""]) == (
        b"\x02\x00\x00\x00ab" + b"\x02\x00\x00\x00\xc3\xa9" + b"\x00\x00\x00\x00"
    )
    decoded = tensors.decode_bytes_elements(b"\x01\x00\x00\x00z\x00\x00\x00\x00", 2)
    assert decoded.tolist() == [b"z", b""]


def test_str_outputs_are_encoded_as_utf8_bytes() -> None:
    # onnxruntime returns string tensors as str elements
    response = pb.ModelInferResponse()
    tensors.encode_outputs(response, [("s", np.array(["é", "b"], dtype=object))], raw=False)
    assert list(response.outputs[0].contents.bytes_contents) == ["é".encode(), b"b"]


def test_fp16_output_puts_every_output_in_raw_form() -> None:
    response = pb.ModelInferResponse()
    outputs = [("a", SAMPLES["FP32"]), ("h", SAMPLES["FP16"])]
    tensors.encode_outputs(response, outputs, raw=False)
    assert len(response.raw_output_contents) == 2
    assert np.frombuffer(response.raw_output_contents[0], "<f4").tolist() == SAMPLES["FP32"].ravel().tolist()


def test_scalar_and_empty_shapes() -> None:
    scalar = pb.ModelInferRequest.InferInputTensor(name="s", datatype="INT64", shape=[])
    scalar.contents.int64_contents.append(5)
    assert tensors.decode_input(scalar).tolist() == 5
    empty = pb.ModelInferRequest.InferInputTensor(name="e", datatype="FP32", shape=[0, 4])
    assert tensors.decode_input(empty, b"").shape == (0, 4)


@pytest.mark.parametrize(
    "tensor,raw,message",
    [
        (dict(datatype="FP32", shape=[1, 4]), b"\x00" * 15,
         "model 'm' input 'x': FP32 [1, 4] needs 16 bytes of raw contents, got 15"),
        (dict(datatype="FP32", shape=[1, 4], contents=pb.InferTensorContents(fp32_contents=[1.0] * 3)), None,
         "model 'm' input 'x': FP32 [1, 4] needs 4 values in contents.fp32_contents, got 3"),
        (dict(datatype="FP32", shape=[2, -1]), b"",
         "model 'm' input 'x': shape [2, -1] has a negative dimension"),
        (dict(datatype="BF16", shape=[1]), b"\x00\x00", "model 'm' input 'x': datatype BF16 is not supported"),
        (dict(datatype="FLOAT", shape=[1]), b"\x00" * 4, "model 'm' input 'x': unknown datatype 'FLOAT'"),
        (dict(datatype="FP16", shape=[1]), None,
         "model 'm' input 'x': FP16 has no contents field; send it in raw_input_contents"),
        (dict(datatype="INT8", shape=[1], contents=pb.InferTensorContents(int_contents=[300])), None,
         "model 'm' input 'x': a value is out of range for INT8"),
        (dict(datatype="BYTES", shape=[2]), b"\x01\x00\x00\x00a",
         "model 'm' input 'x': BYTES raw contents of 5 bytes cannot hold 2 elements"),
        (dict(datatype="BYTES", shape=[10**12]), b"\x00" * 8,
         "model 'm' input 'x': BYTES raw contents of 8 bytes cannot hold 1000000000000 elements"),
        (dict(datatype="BYTES", shape=[2]), b"\x04\x00\x00\x00abcd",
         "model 'm' input 'x': BYTES raw contents end after 1 of 2 elements"),
        (dict(datatype="BYTES", shape=[1]), b"\x09\x00\x00\x00abc",
         "model 'm' input 'x': BYTES element 0 claims 9 bytes but only 3 remain"),
        (dict(datatype="BYTES", shape=[1]), b"\x01\x00\x00\x00ab",
         "model 'm' input 'x': BYTES raw contents hold 1 bytes after the 1 elements"),
    ],
)
def test_malformed_tensors_are_invalid_requests(tensor: dict, raw: bytes | None, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        tensors.decode_input(pb.ModelInferRequest.InferInputTensor(name="x", **tensor), raw, label="model 'm'")
    assert err.value.message.startswith(message)


def test_raw_contents_must_match_the_inputs() -> None:
    two = [pb.ModelInferRequest.InferInputTensor(name=n, datatype="UINT8", shape=[1]) for n in "ab"]
    with pytest.raises(InvalidRequest, match="2 inputs but 1 raw_input_contents"):
        tensors.decode_inputs(pb.ModelInferRequest(inputs=two, raw_input_contents=[b"\x01"]))

    mixed = pb.ModelInferRequest(inputs=two, raw_input_contents=[b"\x01", b"\x02"])
    mixed.inputs[1].contents.uint_contents.append(2)
    with pytest.raises(InvalidRequest, match="input 'b' has contents although the request uses raw"):
        tensors.decode_inputs(mixed)

    twice = pb.ModelInferRequest(inputs=[two[0], two[0]], raw_input_contents=[b"\x01", b"\x02"])
    with pytest.raises(InvalidRequest, match="input 'a' is given twice"):
        tensors.decode_inputs(twice)


def test_datatype_names() -> None:
    assert tensors.datatype_of(np.dtype(np.float32)) == "FP32"
    assert tensors.datatype_of(np.dtype(">i4")) == "INT32"
    assert tensors.datatype_of(np.dtype("U3")) == "BYTES"
    assert tensors.numpy_dtype("UINT16") == np.dtype("<u2")
    with pytest.raises(InvalidRequest, match="has no KServe v2 datatype"):
        tensors.datatype_of(np.dtype(np.complex64))
    assert tensors.element_count([2, 3, 4]) == 24
    assert tensors.format_shape((-1, 64)) == "[-1, 64]"
