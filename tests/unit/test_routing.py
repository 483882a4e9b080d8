import pytest

from modelmesh.errors import InvalidRequest
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.routing import RouteTarget, forwarded_metadata, read_string_field, resolve_target


def infer_body(name: str = "m1", with_tensor: bool = True) -> bytes:
    req = pb.ModelInferRequest(model_name=name, id="req-1")
    if with_tensor:
        t = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        t.parameters["p"].int64_param = 3
        req.raw_input_contents.append(b"\x00" * 16)
    return req.SerializeToString()


def test_model_name_from_body_is_looked_up_as_vmodel_then_model():
    assert resolve_target([], infer_body("fraud-v2")) == RouteTarget("fraud-v2", "any")


def test_model_header_wins_over_body():
    md = [("mm-model-id", "concrete-1"), ("x-trace", "t")]
    assert resolve_target(md, infer_body("other")) == RouteTarget("concrete-1", "model")


def test_vmodel_header():
    assert resolve_target([("mm-vmodel-id", "alias")], infer_body()) == RouteTarget("alias", "vmodel")


@pytest.mark.parametrize("key,kind", [("mm-model-id-bin", "model"), ("mm-vmodel-id-bin", "vmodel")])
def test_binary_headers_are_decoded(key, kind):
    assert resolve_target([(key, "naïve".encode())], b"") == RouteTarget("naïve", kind)


def test_both_headers_is_an_error():
    with pytest.raises(InvalidRequest, match="not both"):
        resolve_target([("mm-model-id", "a"), ("mm-vmodel-id", "b")], infer_body())


def test_no_model_anywhere_is_an_error():
    with pytest.raises(InvalidRequest, match="no model named"):
        resolve_target([], pb.ModelInferRequest(id="x").SerializeToString())


def test_empty_header_is_an_error():
    with pytest.raises(InvalidRequest, match="empty"):
        resolve_target([("mm-model-id", "")], infer_body())


def test_metadata_and_ready_requests_use_field_one():
    assert read_string_field(pb.ModelMetadataRequest(name="m9", version="2").SerializeToString(), 1) == "m9"
    assert read_string_field(pb.ModelReadyRequest(name="m8").SerializeToString(), 1) == "m8"


def test_last_occurrence_of_field_wins_like_protobuf():
    body = pb.ModelInferRequest(model_name="first").SerializeToString() + \
        pb.ModelInferRequest(model_name="second").SerializeToString()
    assert read_string_field(body, 1) == pb.ModelInferRequest.FromString(body).model_name == "second"


def test_model_name_after_large_tensor_is_found():
    req = pb.ModelInferRequest()
    req.raw_input_contents.append(b"\x01" * 100_000)
    body = req.SerializeToString() + pb.ModelInferRequest(model_name="late").SerializeToString()
    assert read_string_field(body, 1) == "late"


@pytest.mark.parametrize("body", [b"\x0a\x05ab", b"\x0a", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b"])
def test_malformed_bodies_are_invalid_argument(body):
    with pytest.raises(InvalidRequest, match="malformed"):
        read_string_field(body, 1)


def test_forwarded_metadata_drops_mesh_and_grpc_headers():
    md = [("mm-model-id", "alias"), ("mm-balanced", "true"), ("grpc-timeout", "1S"),
          ("content-type", "application/grpc"), ("user-agent", "x"), ("x-request-id", "r1"),
          ("auth-bin", b"\x00\x01")]
    assert forwarded_metadata(md, "concrete") == [
        ("x-request-id", "r1"), ("auth-bin", b"\x00\x01"), ("mm-model-id", "concrete")]
